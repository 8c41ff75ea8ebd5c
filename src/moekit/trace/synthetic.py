"""Synthetic routing traces with known structure, for tests, examples and benchmarks of trace consumers
(report, compression, serving) that should not need a model.

Legend (docs/architecture.md): I layers, T tokens, K experts per token, E experts.
"""
from __future__ import annotations

import numpy as np

from .format import Trace

__all__ = ["synthetic_trace"]


def synthetic_trace(num_layers: int = 3, num_tokens: int = 2000, num_experts: int = 8, top_k: int = 2, *,
                    num_domains: int = 2, doc_len: int = 50, domain_strength: float = 0.0,
                    coupling: float = 0.0, skew: float = 0.0, keep_logits: bool = True, seed: int = 0) -> Trace:
    """A token-choice top-k trace drawn from Gaussian router logits with three knobs.

    Tokens come in documents of ``doc_len`` tokens; document ``i`` has domain ``i % num_domains`` (names
    ``"domain0"``...). ``domain_strength`` adds that much to the logit of expert ``(3 * d) % E`` for tokens of
    domain ``d`` (a specialised expert); ``coupling`` adds that much at layer l+1 to expert ``(e + 1) % E``
    where ``e`` is the token's top-1 expert at layer l (cross-layer structure); ``skew`` adds
    ``skew * linspace(0, 1, E)`` to every token's logits (load imbalance). Weights are the softmax over the
    selected ``top_k`` logits.
    """
    rng = np.random.default_rng(seed)
    L, T, E, K = num_layers, num_tokens, num_experts, top_k
    doc_T = np.arange(T) // doc_len
    domain_T = doc_T % num_domains
    logits_ITE = rng.normal(size=(L, T, E)) + skew * np.linspace(0.0, 1.0, E)
    logits_ITE[:, np.arange(T), (3 * domain_T) % E] += domain_strength
    experts_ITK = np.zeros((L, T, K), dtype=np.int64)
    for l in range(L):
        if l > 0 and coupling:
            logits_ITE[l, np.arange(T), (experts_ITK[l - 1, :, 0] + 1) % E] += coupling
        experts_ITK[l] = np.argsort(-logits_ITE[l], axis=1, kind="stable")[:, :K]
    top_ITK = np.take_along_axis(logits_ITE, experts_ITK, axis=2)
    weights_ITK = np.exp(top_ITK - top_ITK.max(axis=2, keepdims=True))
    weights_ITK /= weights_ITK.sum(axis=2, keepdims=True)
    return Trace(
        experts=experts_ITK, weights=weights_ITK.astype(np.float32), num_experts=E,
        layer_names=[f"model.layers.{l}.mlp" for l in range(L)],
        logits=logits_ITE.astype(np.float32) if keep_logits else None,
        tokens=rng.integers(0, 256, T), positions=np.arange(T) % doc_len, doc_ids=doc_T, domain_ids=domain_T,
        seq_ids=doc_T, domain_names=[f"domain{d}" for d in range(num_domains)],
        model={"num_experts": E, "top_k": K, "router": "synthetic"},
        source={"synthetic": {"seed": seed, "domain_strength": domain_strength, "coupling": coupling,
                              "skew": skew}})
