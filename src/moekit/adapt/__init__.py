"""Adaptation of a trained MoE model: test-time rewiring of the router logit offsets
(:class:`Rewirer`, :func:`evaluate_streaming`) and router-only fine-tuning with the RoMA regulariser
(:mod:`moekit.adapt.roma`)."""
from .rewire import RewireReport, Rewirer, evaluate_streaming, frozen_weights, next_token_loss, windows_from_corpus
from .roma import roma_loss, roma_term, router_parameters, routing_vectors, task_embeddings

__all__ = ["Rewirer", "RewireReport", "evaluate_streaming", "frozen_weights", "next_token_loss",
           "windows_from_corpus", "roma_loss", "roma_term", "router_parameters", "routing_vectors",
           "task_embeddings"]
