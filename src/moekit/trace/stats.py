"""Statistics of a routing trace: pure functions of a :class:`~moekit.trace.Trace` returning numpy arrays
(the counting is done with chunked one-hot products in torch).

Load and balance: :func:`expert_load`, :func:`routing_frequency`, :func:`max_violation` (MaxVio, Wang et al.
2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", arXiv:2408.15664).
Entropy: :func:`load_entropy` (of the mean routing distribution), :func:`token_entropy` (mean per-token entropy of
the router's softmax, when the trace has logits).
Structure: :func:`coactivation` (experts chosen together within a layer), :func:`transition_counts` (expert i at
layer l and expert j at layer l+1 for the same token, the cross-layer dependency that MoETuner, 2025, places
experts by and EdgeMoE, 2023, preloads by), :func:`cross_layer_predictability` (how well layer l+1's experts
are predicted from layer l's: the hit rate and top-1 accuracy that Fate, "Accurate Expert Predictions in MoE
Inference via Cross-Layer Gate", 2025, reports for its prefetcher), :func:`domain_expert_frequency`.
Disparity: :func:`routing_disparity` and :func:`disparity_by_domain` live in :mod:`moekit.trace.disparity`.

Legend (docs/architecture.md): I layers, T tokens, K experts per token (``-1`` pads), E experts, O domains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .format import Trace

__all__ = ["expert_load", "routing_frequency", "max_violation", "load_entropy", "token_entropy", "coactivation",
           "transition_counts", "transition_matrices", "Predictability", "cross_layer_predictability",
           "domain_expert_frequency", "routed_mask"]


def _chunk(num_experts: int) -> int:
    """Tokens per chunk where a ``[T, E]`` float64 intermediate is built (about 64 MB)."""
    return max(1024, (1 << 23) // (num_experts + 1))


def _experts(trace: Trace) -> np.ndarray:
    """``experts`` as int64 numpy ``[I, T, K]``."""
    return trace.experts.numpy().astype(np.int64)


def _layer(trace: Trace, layer: int) -> np.ndarray:
    """``experts[layer]`` as int64 numpy ``[T, K]``."""
    return trace.experts[layer].numpy().astype(np.int64)


def routed_mask(trace: Trace, layer: int) -> np.ndarray:
    """Boolean ``[T, E]``: token t was routed to expert e at ``layer``."""
    experts_TK = _layer(trace, layer)
    mask_TE = np.zeros((trace.num_tokens, trace.num_experts + 1), dtype=bool)
    np.put_along_axis(mask_TE, np.where(experts_TK >= 0, experts_TK, trace.num_experts), True, axis=1)
    return mask_TE[:, :-1]


def expert_load(trace: Trace) -> np.ndarray:
    """``[I, E]`` int64: tokens routed to each expert (the router's assignment, before any capacity dropping)."""
    experts_ITK = _experts(trace)
    E = trace.num_experts
    return np.stack([np.bincount(e[e >= 0], minlength=E) for e in experts_ITK]).astype(np.int64)


def routing_frequency(trace: Trace, tokens: np.ndarray | None = None) -> np.ndarray:
    """``[I, E]``: fraction of the tokens (all, or those selected by the mask/indices ``tokens``) routed to
    each expert; rows sum to the mean number of experts per token."""
    experts_ITK = _experts(trace) if tokens is None else _experts(trace)[:, np.asarray(tokens)]
    n = experts_ITK.shape[1]
    counts = np.stack([np.bincount(e[e >= 0], minlength=trace.num_experts) for e in experts_ITK])
    return counts / n if n else np.zeros_like(counts, dtype=np.float64)


def max_violation(trace: Trace) -> np.ndarray:
    """``[L]`` MaxVio = (max_e load_e - mean load) / mean load over each layer's experts (0 when balanced).

    The metric of Wang et al. 2024 (arXiv:2408.15664), as :func:`moekit.balance.max_violation`.
    """
    load_IE = expert_load(trace).astype(np.float64)
    out = np.zeros(trace.num_layers)
    for l, E_l in enumerate(trace.num_experts_per_layer):
        mean = load_IE[l, :E_l].mean()
        out[l] = (load_IE[l, :E_l].max() - mean) / mean if mean > 0 else 0.0
    return out


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def load_entropy(trace: Trace) -> np.ndarray:
    """``[L]`` entropy in bits of the mean routing distribution ``p_e = load_e / sum(load)``.

    ``log2(E)`` when every expert gets the same load, 0 when one expert gets all of it.
    """
    load_IE = expert_load(trace).astype(np.float64)
    total_I1 = load_IE.sum(axis=1, keepdims=True)
    return _entropy_bits(np.divide(load_IE, total_I1, out=np.zeros_like(load_IE), where=total_I1 > 0))


def token_entropy(trace: Trace) -> np.ndarray | None:
    """``[L]`` mean over tokens of the entropy in bits of ``softmax(logits)``, or None without logits.

    Measures how confident the router is per token (``log2(E)`` for a uniform router); columns of ``-inf``
    (padding of layers with fewer experts) contribute nothing.
    """
    if trace.logits is None:
        return None
    out = np.zeros(trace.num_layers)
    if trace.num_tokens == 0:
        return out
    for l in range(trace.num_layers):
        total = 0.0
        chunk = _chunk(trace.num_experts)
        for start in range(0, trace.num_tokens, chunk):
            p_TE = torch.softmax(trace.logits[l, start:start + chunk].float(), dim=-1)
            total += float(torch.special.entr(p_TE).sum(dtype=torch.float64))
        out[l] = total / trace.num_tokens / math.log(2)
    return out


def _one_hot(experts_TK: np.ndarray, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[T, E]`` routing indicator of padded rows (pads ``-1`` dropped)."""
    experts = torch.from_numpy(np.where(experts_TK >= 0, experts_TK, num_experts))
    hot = torch.zeros(experts.shape[0], num_experts + 1, dtype=dtype)
    hot.scatter_(1, experts, 1.0)
    return hot[:, :num_experts].contiguous()


def _pair_counts(a_TK: np.ndarray, b_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E, E]`` int64: tokens with expert i in their row of ``a`` and expert j in their row of ``b``
    (``onehot(a)^T @ onehot(b)`` per chunk of tokens, exact in float32 since a chunk has < 2^24 tokens,
    accumulated in int64)."""
    counts = torch.zeros(num_experts, num_experts, dtype=torch.int64)
    chunk = _chunk(num_experts)
    for start in range(0, a_TK.shape[0], chunk):
        stop = start + chunk
        product = _one_hot(a_TK[start:stop], num_experts).T @ _one_hot(b_TK[start:stop], num_experts)
        counts += product.round().to(torch.int64)
    return counts.numpy()


def coactivation(trace: Trace, layer: int) -> np.ndarray:
    """``[E, E]`` int64 co-activation counts within ``layer``: ``C[i, j]`` tokens routed to both i and j
    (i != j); the diagonal holds each expert's load. Symmetric. ``C[i, j] / C[i, i]`` is P(j | i)."""
    experts_TK = _layer(trace, layer)
    return _pair_counts(experts_TK, experts_TK, trace.num_experts)  # an expert appears once per row


def transition_counts(trace: Trace, layer: int) -> np.ndarray:
    """``[E, E]`` int64: ``N[i, j]`` = tokens routed to expert i at ``layer`` and to expert j at ``layer + 1``."""
    if not 0 <= layer < trace.num_layers - 1:
        raise ValueError(f"layer must be in [0, {trace.num_layers - 1}) for a transition, got {layer}")
    return _pair_counts(_layer(trace, layer), _layer(trace, layer + 1), trace.num_experts)


def transition_matrices(trace: Trace) -> np.ndarray:
    """``[L-1, E, E]``: :func:`transition_counts` for every pair of consecutive layers."""
    E = trace.num_experts
    if trace.num_layers < 2:
        return np.zeros((0, E, E), dtype=np.int64)
    return np.stack([transition_counts(trace, l) for l in range(trace.num_layers - 1)])


@dataclass
class Predictability:
    """How well layer l+1's experts are predicted from layer l's, per pair of consecutive layers (``[L-1]``).

    ``hit_rate``: fraction of the experts a token actually used at l+1 that are among the predicted ones
    (as many predicted as used). ``top1_accuracy``: the best-scored expert is the token's highest-weight expert
    at l+1. ``baseline_*``: the same for a predictor that ignores layer l and always predicts the most popular
    experts of layer l+1. ``num_eval_tokens``: held-out tokens scored.
    """

    hit_rate: np.ndarray
    top1_accuracy: np.ndarray
    baseline_hit_rate: np.ndarray
    baseline_top1_accuracy: np.ndarray
    num_eval_tokens: int


def _ranks(scores_TE: np.ndarray) -> np.ndarray:
    """``[T, E]`` rank of each expert by descending score, ties to the lower id (0 = best)."""
    order_TE = np.argsort(-scores_TE, axis=1, kind="stable")
    rank_TE = np.empty_like(order_TE)
    np.put_along_axis(rank_TE, order_TE, np.arange(scores_TE.shape[1])[None, :], axis=1)
    return rank_TE


def _hits(rank_TK: np.ndarray, actual_TK: np.ndarray) -> tuple[int, int]:
    """(used experts among the predicted ones, tokens whose top-1 expert is ranked first), given the rank of
    each used expert in the prediction; a token's ``k`` best-ranked experts are predicted, ``k`` = experts used."""
    valid_TK = actual_TK >= 0
    hits = int(((rank_TK < valid_TK.sum(axis=1, keepdims=True)) & valid_TK).sum())
    top1 = int(((rank_TK[:, 0] == 0) & valid_TK[:, 0]).sum())
    return hits, top1


def cross_layer_predictability(trace: Trace, seed: int = 0, fit_fraction: float = 0.5) -> Predictability:
    """Predict each token's experts at layer l+1 from its experts at layer l, scored on held-out tokens.

    Tokens are split at random (seeded) into a fitting part (``fit_fraction``) and a held-out part. On the
    fitting part the transition counts ``N[i, j]`` (:func:`transition_counts`) are estimated; a held-out token
    routed to the set ``S_l`` at layer l gets the score ``sum_{i in S_l} N[i, j]`` for expert j of layer l+1
    (ties broken by popularity at l+1, then by expert id), and its ``k`` best-scored experts are predicted,
    ``k`` being the number it actually used. This is the statistical analogue of the cross-layer expert
    prediction of Fate ("Accurate Expert Predictions in MoE Inference via Cross-Layer Gate", 2025), which uses
    layer l+1's gate on layer l's hidden state instead, and of EdgeMoE's (2023) preloading from profiled
    layer-to-layer statistics.
    """
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    L, T, E = trace.num_layers, trace.num_tokens, trace.num_experts
    pairs = max(L - 1, 0)
    result = {k: np.full(pairs, np.nan) for k in ("hit", "top1", "base_hit", "base_top1")}
    perm = np.random.default_rng(seed).permutation(T)
    n_fit = int(round(T * fit_fraction))
    fit_idx, eval_idx = np.sort(perm[:n_fit]), np.sort(perm[n_fit:])
    experts_ITK = _experts(trace)
    for l in range(pairs):
        prev_fit, next_fit = experts_ITK[l, fit_idx], experts_ITK[l + 1, fit_idx]
        transitions_EE = torch.from_numpy(_pair_counts(prev_fit, next_fit, E)).double()
        popularity_E = torch.from_numpy(np.bincount(next_fit[next_fit >= 0], minlength=E)).double()
        tie_break_E = popularity_E / (popularity_E.sum() + 1.0)  # < 1: only orders experts of equal counts
        tie_break_E[trace.num_experts_per_layer[l + 1]:] = -1.0  # experts a narrower layer does not have
        hits = top1 = base_hits = base_top1 = 0
        base_rank_E = _ranks(tie_break_E.numpy()[None])[0]
        chunk = _chunk(E)
        for start in range(0, eval_idx.size, chunk):
            idx = eval_idx[start:start + chunk]
            next_TK = experts_ITK[l + 1, idx]
            safe_TK = np.maximum(next_TK, 0)
            scores_TE = (_one_hot(experts_ITK[l, idx], E, torch.float64) @ transitions_EE + tie_break_E).numpy()
            h, t1 = _hits(np.take_along_axis(_ranks(scores_TE), safe_TK, axis=1), next_TK)
            bh, bt1 = _hits(base_rank_E[safe_TK], next_TK)
            hits, top1, base_hits, base_top1 = hits + h, top1 + t1, base_hits + bh, base_top1 + bt1
        next_eval = experts_ITK[l + 1, eval_idx]
        used, tokens_used = int((next_eval >= 0).sum()), int((next_eval[:, 0] >= 0).sum())
        if used:
            result["hit"][l], result["base_hit"][l] = hits / used, base_hits / used
            result["top1"][l], result["base_top1"][l] = top1 / tokens_used, base_top1 / tokens_used
    return Predictability(result["hit"], result["top1"], result["base_hit"], result["base_top1"],
                          int(eval_idx.size))


def domain_expert_frequency(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """``(freq [I, O, E], tokens [D])``: fraction of domain d's tokens routed to expert e at each layer, and
    the number of tokens of each domain. Tokens with domain ``-1`` are left out; ``D`` is
    ``len(domain_names)`` (or the largest id + 1 when the trace names no domains)."""
    domain_T = trace.domain_ids.numpy().astype(np.int64)
    D = len(trace.domain_names) or (int(domain_T.max()) + 1 if domain_T.size and domain_T.max() >= 0 else 0)
    L, E = trace.num_layers, trace.num_experts
    tokens_O = np.bincount(domain_T[domain_T >= 0], minlength=D)[:D] if D else np.zeros(0, dtype=np.int64)
    counts_IOE = np.zeros((L, D, E), dtype=np.float64)
    experts_ITK = _experts(trace)
    for l in range(L):
        ok_TK = (experts_ITK[l] >= 0) & (domain_T[:, None] >= 0)
        flat = np.broadcast_to(domain_T[:, None], ok_TK.shape)[ok_TK] * E + experts_ITK[l][ok_TK]
        counts_IOE[l] = np.bincount(flat, minlength=D * E)[:D * E].reshape(D, E)
    freq_IOE = np.divide(counts_IOE, tokens_O[None, :, None], out=np.zeros_like(counts_IOE),
                         where=tokens_O[None, :, None] > 0)
    return freq_IOE, tokens_O
