"""Adaptation of a trained MoE model: test-time rewiring of the router logit offsets
(:class:`Rewirer`, :func:`evaluate_streaming`, and during generation :func:`generate_rewired`), dynamic
evaluation of all parameters as the reference (:class:`DynamicEvaluator`), router-only fine-tuning with the
RoMA regulariser (:mod:`moekit.adapt.roma`, :mod:`moekit.adapt.finetune`, ``moekit finetune``), and the
transformers side (:mod:`moekit.adapt.hf`: offsets of surgered routers written back or saved)."""
from .dynamic_eval import DynamicEvaluator
from .online import Adaptation, OnlineRewiring, generate_rewired
from .rewire import (RewireReport, Rewirer, evaluate_streaming, frozen_weights, model_logits, next_token_loss,
                     routed_layers, windows_from_corpus)
from .roma import roma_loss, roma_term, router_parameters, routing_vectors, task_embeddings

__all__ = ["Rewirer", "RewireReport", "evaluate_streaming", "frozen_weights", "next_token_loss",
           "windows_from_corpus", "roma_loss", "roma_term", "router_parameters", "routing_vectors",
           "task_embeddings", "DynamicEvaluator", "Adaptation", "OnlineRewiring", "generate_rewired",
           "model_logits", "routed_layers"]
