"""Prefetchers for offloaded serving: guess layer ``l + 1``'s experts while layer ``l`` computes, so that the
:class:`moekit.serve.cache.ExpertCache` reads them on its background thread.

Legend (docs/architecture.md): T tokens, D model width, E experts, K experts per token.

The prefetchers share the names and meanings of :data:`moekit.serve.simulate.PREFETCHERS`, except that online
the hidden states exist, so ``cross_layer`` is Fate's real predictor:

* ``none``.
* ``cross_layer`` (Fate, "Fate: Fast Edge Inference of Mixture-of-Experts Models via Cross-Layer Gate",
  arXiv 2502.12224): apply layer ``l + 1``'s router to layer ``l``'s router input (adjacent layers' inputs are
  close through the residual stream), take each token's top-k; the union over the call's tokens, ranked by the
  highest routing probability any token gives an expert, is prefetched (truncated to the layer's slots).
* ``transition`` (EdgeMoE, "EdgeMoE: Fast On-Device Inference of MoE-based Large Language Models",
  arXiv 2308.14352: preloading from profiled layer-to-layer statistics): counts ``N[i, j]`` of tokens that used
  expert ``i`` at layer ``l`` and ``j`` at ``l + 1``, updated online after every call; the prediction sums each
  token's normalised rows (ties by popularity at ``l + 1``, then id), as the simulator's table.
* ``path`` (ExpertFlow, "ExpertFlow: Optimized Expert Activation and Token Allocation for Efficient
  Mixture-of-Experts Inference", arXiv 2410.17954: the whole routing path forecast before the pass): at layer 0,
  every later layer ``m``'s router is applied to layer 0's router input and each layer's experts are prefetched
  at once (ranked as ``cross_layer``), so the reads of deep layers start a whole pass ahead. ExpertFlow trains a
  predictor for this; here the routers themselves are the predictor (no training), as Fate's gate is.

* ``trace_match`` (MoE-Infinity, "MoE-Infinity: Efficient MoE Inference on Personal Machines with
  Sparsity-Aware Expert Cache", arXiv 2401.14361: per-request expert activation matrices matched to stored ones):
  the current request's activation matrix (tokens routed to each (layer, expert) so far) is compared by cosine
  similarity, over the layers seen so far, with the matrices of earlier requests (the last ``memory``, 64); the
  best match's row for layer ``l + 1`` is prefetched, most used first. Requests are not announced to the
  experts, so a layer-0 call with more rows than the previous one (a prefill after decoding steps) starts a new
  request; nothing is predicted before the first request has been stored.

Layer 0 has no previous layer and is never prefetched. :meth:`Prefetcher.predict` returns the expert ids for
layer ``l + 1``, best first, or a dict ``{layer: ids}`` for several later layers (``path``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["PREFETCHERS", "CrossLayerPrefetcher", "NoPrefetcher", "PathPrefetcher", "Prefetcher",
           "TraceMatchPrefetcher", "TransitionPrefetcher", "make_prefetcher"]

PREFETCHERS = ("none", "cross_layer", "transition", "trace_match", "path")


class Prefetcher:
    """``predict(layer, x_TD, ids_TK) -> expert ids for layer + 1`` (or None); ``name`` as in PREFETCHERS."""

    name = "none"

    def predict(self, layer: int, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> list[int] | None:
        return None


class NoPrefetcher(Prefetcher):
    name = "none"


class CrossLayerPrefetcher(Prefetcher):
    """Fate's cross-layer gate. ``logits[l](x_TD) -> logits_TE`` is layer ``l``'s router logits function and
    ``top_k[l]`` its top-k; the prediction for ``l + 1`` uses ``logits[l + 1]`` on layer ``l``'s input."""

    name = "cross_layer"

    def __init__(self, logits: list[Callable[[torch.Tensor], torch.Tensor]], top_k: list[int]):
        self.logits, self.top_k = logits, top_k

    @torch.no_grad()
    def predict(self, layer: int, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> list[int] | None:
        nxt = layer + 1
        if nxt >= len(self.logits) or x_TD.shape[0] == 0:
            return None
        return self._ranked(nxt, x_TD)

    def _ranked(self, target: int, x_TD: torch.Tensor) -> list[int]:
        """Layer ``target``'s router on ``x_TD``: the union of the tokens' top-k, best routing probability first."""
        probs_TE = torch.softmax(self.logits[target](x_TD).float(), dim=-1)
        top_TK = probs_TE.topk(self.top_k[target], dim=-1)
        best_E = torch.zeros(probs_TE.shape[1], dtype=probs_TE.dtype).scatter_reduce_(
            0, top_TK.indices.reshape(-1), top_TK.values.reshape(-1), reduce="amax")
        chosen = torch.unique(top_TK.indices)
        order = torch.argsort(best_E[chosen], descending=True, stable=True)
        return chosen[order].tolist()


class PathPrefetcher(CrossLayerPrefetcher):
    """ExpertFlow's whole-path forecast from the first layer's input (see the module docstring): at layer 0 a
    dict ``{m: ids}`` for every later layer ``m``; nothing at other layers."""

    name = "path"

    @torch.no_grad()
    def predict(self, layer: int, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> dict[int, list[int]] | None:
        if layer != 0 or x_TD.shape[0] == 0:
            return None
        return {m: self._ranked(m, x_TD) for m in range(1, len(self.logits))}


class TransitionPrefetcher(Prefetcher):
    """EdgeMoE's layer-to-layer statistics, learned online (see the module docstring)."""

    name = "transition"

    def __init__(self, num_experts: list[int], top_k: list[int]):
        self.top_k = top_k
        self.counts = [np.zeros((num_experts[l], num_experts[l + 1])) for l in range(len(num_experts) - 1)]
        self.popular = [np.zeros(e) for e in num_experts]
        self._prev: list[np.ndarray | None] = [None] * len(num_experts)

    def observe(self, layer: int, ids_TK: np.ndarray) -> None:
        """Learn from a call of ``layer`` (each token's experts), pairing it with the previous layer's call."""
        self._prev[layer] = ids_TK
        if layer == 0:
            return
        prev = self._prev[layer - 1]
        if prev is None or prev.shape[0] != ids_TK.shape[0]:
            return
        table = self.counts[layer - 1]
        for p_K, n_K in zip(prev, ids_TK):
            p_K, n_K = p_K[p_K >= 0], n_K[n_K >= 0]
            table[np.ix_(p_K, n_K)] += 1.0
            self.popular[layer][n_K] += 1.0

    def predict(self, layer: int, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> list[int] | None:
        ids = ids_TK.detach().cpu().numpy().astype(np.int64)
        self.observe(layer, ids)
        nxt = layer + 1
        if nxt >= len(self.popular):
            return None
        table = self.counts[layer]
        scores = np.zeros(table.shape[1])
        for row in ids:
            row = row[row >= 0]
            rows = table[row]
            scores += (rows / np.maximum(rows.sum(1, keepdims=True), 1.0)).sum(0)
        pop = self.popular[nxt] / max(self.popular[nxt].sum(), 1.0)
        order = np.lexsort((np.arange(len(scores)), -pop, -scores))
        n = self.top_k[nxt] * max(1, min(ids.shape[0], 4))
        return order[:n].tolist()


class TraceMatchPrefetcher(Prefetcher):
    """MoE-Infinity's activation-matrix matching (see the module docstring). ``stored`` holds the finished
    requests' matrices (one ``[E_l]`` count vector per layer), ``current`` the running request's."""

    name = "trace_match"

    def __init__(self, num_experts: list[int], top_k: list[int], memory: int = 64):
        self.num_experts, self.top_k, self.memory = num_experts, top_k, memory
        self.stored: list[list[np.ndarray]] = []
        self.current = [np.zeros(e) for e in num_experts]
        self._rows0 = None  # rows of the last layer-0 call

    def _finish_request(self) -> None:
        if any(c.any() for c in self.current):
            self.stored = (self.stored + [self.current])[-self.memory:]
        self.current = [np.zeros(e) for e in self.num_experts]

    def match(self, upto: int) -> int | None:
        """Index of the stored matrix most cosine-similar to the current one over layers ``0..upto``."""
        if not self.stored:
            return None
        cur = np.concatenate(self.current[:upto + 1])
        best, best_sim = None, -np.inf
        for i, m in enumerate(self.stored):
            ref = np.concatenate(m[:upto + 1])
            sim = float(cur @ ref) / max(float(np.linalg.norm(cur) * np.linalg.norm(ref)), 1e-12)
            if sim > best_sim:
                best, best_sim = i, sim
        return best

    def predict(self, layer: int, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> list[int] | None:
        ids = ids_TK.detach().cpu().numpy().astype(np.int64)
        if layer == 0:
            if self._rows0 is None or ids.shape[0] > self._rows0:
                self._finish_request()
            self._rows0 = ids.shape[0]
        flat = ids[ids >= 0]
        np.add.at(self.current[layer], flat, 1.0)
        nxt = layer + 1
        best = self.match(layer) if nxt < len(self.num_experts) else None
        if best is None:
            return None
        row = self.stored[best][nxt]
        order = np.lexsort((np.arange(len(row)), -row))
        n = self.top_k[nxt] * max(1, min(ids.shape[0], 4))
        return [int(e) for e in order[:n] if row[e] > 0]


def make_prefetcher(name: str, *, logits=None, num_experts=None, top_k=None) -> Prefetcher:
    """The prefetcher called ``name`` (:data:`PREFETCHERS`); ``ValueError`` otherwise."""
    if name == "none":
        return NoPrefetcher()
    if name == "cross_layer":
        return CrossLayerPrefetcher(logits, top_k)
    if name == "transition":
        return TransitionPrefetcher(num_experts, top_k)
    if name == "path":
        return PathPrefetcher(logits, top_k)
    if name == "trace_match":
        return TraceMatchPrefetcher(num_experts, top_k)
    raise ValueError(f"prefetch must be one of {', '.join(PREFETCHERS)}, got {name!r}")
