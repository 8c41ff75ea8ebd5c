"""Expert-cache simulation on routing traces: which experts would be resident, hit or loaded if a model
whose experts do not fit in fast memory decoded the trace's tokens one by one (decode order = token order).

Every MoE layer has its own cache of ``slots[l]`` experts. At token ``t`` and layer ``l`` an optional
prefetcher first loads its predicted set for ``(t, l)`` (made from layer ``l - 1`` of the same token, so it
has one layer of lead time); then every expert the token needs at ``l`` must be resident at once: the ones
already there are hits, the others are misses and are loaded, evicting by the policy (never an expert needed
by the same step). Statistics are counted on the tokens after a warm-up prefix (``warmup``, default 20%), which
also serves as the fitting data of the learned prefetcher, so the figures are out of sample.

Policies (eviction and slot allocation):

* ``lru``: evict the least recently used (or loaded) expert.
* ``lfu``: evict the lowest exponentially decayed use count (``decay`` per token of the layer; ties: least
  recently used). Counts are kept for every expert, resident or not.
* ``belady``: offline optimum (Belady, "A study of replacement algorithms for a virtual-storage computer",
  IBM Systems Journal 1966): evict the resident expert whose next use is farthest in the future. With several
  experts needed per step, none of them may be evicted; the rule stays optimal for the number of misses
  (checked against a brute-force search in the tests). The upper bound of demand-loading hit rates.
* ``shallow``: LRU eviction with Fate's shallow-favouring allocation ("Fate: Fast Edge Inference of
  Mixture-of-Experts Models via Cross-Layer Gate", arXiv 2502.12224): the same total number of slots, spread
  with weights falling linearly from 2 (first layer) to 1 (last layer), each layer keeping at least its top-k.

Prefetchers:

* ``none``.
* ``cross_layer`` (Fate): Fate applies layer ``l+1``'s gate to layer ``l``'s hidden state. A trace holds no
  hidden states (its logits at ``l+1`` are the ground truth, using them would be cheating), so here the
  prediction is the approximation a trace allows: a transition table ``P(j at l+1 | i at l)`` fitted on the
  warm-up tokens only, summed over the token's experts at ``l``; the top-``k`` (layer ``l+1``'s top-k)
  successors are prefetched. Fixed after the warm-up.
* ``transition`` (EdgeMoE, "EdgeMoE: Fast On-Device Inference of MoE-based Large Language Models",
  arXiv 2308.14352: preloading from layer-to-layer statistics): the same table, but updated online with every
  token once it has been decoded.

Layer 0 has no previous layer and is never prefetched. Hit rate counts an expert a prefetch brought in as a
hit (its load overlapped the previous layer's compute); ``bytes_moved`` counts every load, demand or prefetch.

Legend (docs/architecture.md): I layers, T tokens, K experts per token, E experts.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from ..trace.format import Trace

__all__ = ["POLICIES", "PREFETCHERS", "LayerStats", "SimResult", "layer_slots", "simulate", "expert_bytes"]

POLICIES = ("lru", "lfu", "belady", "shallow")
PREFETCHERS = ("none", "cross_layer", "transition")


@dataclass
class LayerStats:
    """Counts of one layer over the measured tokens."""

    slots: int
    hits: int = 0
    misses: int = 0
    predicted: int = 0        # experts the prefetcher named (after truncation to the slots)
    predicted_used: int = 0   # of those, needed by the token
    prefetch_loads: int = 0   # experts the prefetcher actually loaded (not already resident)

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")

    @property
    def precision(self) -> float:
        return self.predicted_used / self.predicted if self.predicted else float("nan")

    @property
    def recall(self) -> float:
        return self.predicted_used / self.accesses if self.predicted and self.accesses else float("nan")

    @property
    def loads(self) -> int:
        return self.misses + self.prefetch_loads


@dataclass
class SimResult:
    """Result of :func:`simulate`: one :class:`LayerStats` per layer plus the totals."""

    policy: str
    prefetch: str
    budget: float
    layers: list[LayerStats]
    measured_tokens: int
    bytes_per_expert: int | None = None
    options: dict = field(default_factory=dict)

    def _sum(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.layers)

    @property
    def hits(self) -> int:
        return self._sum("hits")

    @property
    def misses(self) -> int:
        return self._sum("misses")

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else float("nan")

    @property
    def loads(self) -> int:
        return self._sum("loads")

    @property
    def bytes_moved(self) -> int | None:
        return None if self.bytes_per_expert is None else self.loads * self.bytes_per_expert

    @property
    def precision(self) -> float:
        p = self._sum("predicted")
        return self._sum("predicted_used") / p if p else float("nan")

    @property
    def recall(self) -> float:
        p, used = self._sum("predicted"), self._sum("predicted_used")
        n = sum(s.accesses for s in self.layers if s.predicted)
        return used / n if p and n else float("nan")

    def to_dict(self) -> dict:
        def num(x):
            return None if isinstance(x, float) and x != x else x

        return {
            "policy": self.policy, "prefetch": self.prefetch, "budget": self.budget,
            "measured_tokens": self.measured_tokens, "hits": self.hits, "misses": self.misses,
            "hit_rate": num(self.hit_rate), "precision": num(self.precision), "recall": num(self.recall),
            "loads": self.loads, "bytes_moved": self.bytes_moved, "options": self.options,
            "layers": [{"slots": s.slots, "hits": s.hits, "misses": s.misses, "hit_rate": num(s.hit_rate),
                        "precision": num(s.precision), "recall": num(s.recall), "prefetch_loads": s.prefetch_loads,
                        "loads": s.loads} for s in self.layers],
        }


def expert_bytes(trace: Trace, bytes_per_param: int = 2) -> int | None:
    """Bytes of one gated expert (``3 * dim * hidden_dim`` parameters) from the trace's ``model`` record, or
    ``None`` when it does not say."""
    dim, hidden = trace.model.get("dim"), trace.model.get("hidden_dim")
    if isinstance(dim, int) and isinstance(hidden, int) and dim > 0 and hidden > 0:
        return 3 * dim * hidden * bytes_per_param
    return None


def _layer_top_k(experts_ITK: np.ndarray) -> list[int]:
    return [max(1, int((experts_ITK[l] >= 0).sum(-1).max())) if experts_ITK.shape[1] else 1
            for l in range(experts_ITK.shape[0])]


def layer_slots(trace: Trace, budget: float, policy: str = "lru") -> list[int]:
    """Cache slots of each layer: ``round(budget * E_l)``; ``shallow`` moves slots towards early layers keeping
    the total. ``ValueError`` when the budget is outside (0, 1] or leaves a layer fewer slots than its top-k."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a fraction of experts in (0, 1], got {budget}")
    tops = _layer_top_k(trace.experts.numpy())
    slots = [int(round(budget * e)) for e in trace.num_experts_per_layer]
    for l, (s, k) in enumerate(zip(slots, tops)):
        if s < k:
            raise ValueError(f"budget {budget} gives layer {l} {s} expert slots, fewer than its top-k of {k}")
    if policy != "shallow":
        return slots
    I, total = len(slots), sum(slots)
    weight = np.array([2.0 - l / (I - 1) if I > 1 else 1.0 for l in range(I)])
    target = total * weight / weight.sum()
    alloc = list(tops)
    caps = list(trace.num_experts_per_layer)
    for _ in range(total - sum(alloc)):  # one slot at a time to the layer furthest below its target
        open_ = [l for l in range(I) if alloc[l] < caps[l]]
        l = max(open_, key=lambda j: (target[j] - alloc[j], -j))
        alloc[l] += 1
    return alloc


# ------------------------------------------------------------------------------------------------ prediction
class _Table:
    """Transition counts ``N[i, j]`` from layer l to l+1; predicts the top-n successors of a set."""

    def __init__(self, num_experts: int):
        self.counts_EE = np.zeros((num_experts, num_experts))
        self.popular_E = np.zeros(num_experts)

    def add(self, prev: np.ndarray, nxt: np.ndarray) -> None:
        self.counts_EE[np.ix_(prev, nxt)] += 1.0
        self.popular_E[nxt] += 1.0

    def predict(self, prev: np.ndarray, n: int) -> np.ndarray:
        rows = self.counts_EE[prev]
        totals = rows.sum(1, keepdims=True)
        score = (rows / np.maximum(totals, 1.0)).sum(0)
        # ties (and unseen rows) broken by popularity at the next layer, then by expert id
        pop = self.popular_E / max(self.popular_E.sum(), 1.0)
        order = np.lexsort((np.arange(len(score)), -pop, -score))
        return order[:n]


def _predictions(experts_ITK: np.ndarray, num_experts: int, tops: list[int], prefetch: str,
                 fit_tokens: int) -> list[list[np.ndarray] | None]:
    I, T, _ = experts_ITK.shape
    out: list = [None] * I
    if prefetch == "none":
        return out
    for l in range(1, I):
        table = _Table(num_experts)
        prev_T = [row[row >= 0] for row in experts_ITK[l - 1]]
        next_T = [row[row >= 0] for row in experts_ITK[l]]
        for t in range(fit_tokens):
            table.add(prev_T[t], next_T[t])
        preds = []
        for t in range(T):
            if prefetch == "transition" and t >= fit_tokens:
                preds.append(table.predict(prev_T[t], tops[l]))
                table.add(prev_T[t], next_T[t])  # learned once this token is decoded
            else:
                preds.append(table.predict(prev_T[t], tops[l]))
        out[l] = preds
    return out


# ------------------------------------------------------------------------------------------------ one cache
def _run_cache(needed_T: list[np.ndarray], predicted_T: list[np.ndarray] | None, slots: int, policy: str,
               start: int, decay: float) -> LayerStats:
    stats = LayerStats(slots=slots)
    resident: set[int] = set()
    last: dict[int, int] = {}
    clock = 0
    freq: dict[int, tuple[float, int]] = {}  # expert -> (decayed count, token of the count)
    uses: dict[int, list[int]] = {}
    if policy == "belady":
        for t, row in enumerate(needed_T):
            for e in row.tolist():
                uses.setdefault(e, []).append(t)

    def score(e: int, t: int):
        if policy == "belady":
            u = uses.get(e, [])
            i = bisect.bisect_left(u, t)
            return -(u[i] if i < len(u) else len(needed_T) + 1)  # farthest next use = lowest score
        if policy == "lfu":
            c, at = freq.get(e, (0.0, t))
            return (c * decay ** (t - at), last.get(e, -1))
        return last.get(e, -1)

    def make_room(t: int, protected: set[int]) -> None:
        victims = [e for e in resident if e not in protected]
        resident.discard(min(victims, key=lambda e: score(e, t)))

    for t, need in enumerate(needed_T):
        measured = t >= start
        need_set = set(need.tolist())
        if predicted_T is not None:
            pred = predicted_T[t][:slots].tolist()
            pred_set = set(pred)
            for e in pred:
                if e in resident:
                    continue
                if len(resident) >= slots:
                    make_room(t, pred_set)
                resident.add(e)
                clock += 1
                last[e] = clock
                if measured:
                    stats.prefetch_loads += 1
            if measured:
                stats.predicted += len(pred_set)
                stats.predicted_used += len(pred_set & need_set)
        for e in need.tolist():
            if e in resident:
                stats.hits += measured
            else:
                stats.misses += measured
                if len(resident) >= slots:
                    make_room(t, need_set)
                resident.add(e)
        for e in need.tolist():
            clock += 1
            last[e] = clock
            if policy == "lfu":
                c, at = freq.get(e, (0.0, t))
                freq[e] = (c * decay ** (t - at) + 1.0, t)
    return stats


def simulate(trace: Trace, budget: float = 0.25, policy: str = "lru", prefetch: str = "none", *,
             warmup: float = 0.2, decay: float = 0.95, bytes_per_expert: int | None = None) -> SimResult:
    """Simulate per-layer expert caches holding ``budget`` of each layer's experts while decoding ``trace``.

    ``policy`` in :data:`POLICIES`, ``prefetch`` in :data:`PREFETCHERS`; ``warmup`` the fraction of tokens
    (at the start) that warm the caches and fit the prefetch table and are not counted; ``decay`` the LFU decay
    per token; ``bytes_per_expert`` (default from the trace's model record, see :func:`expert_bytes`) turns
    loads into ``bytes_moved``.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if prefetch not in PREFETCHERS:
        raise ValueError(f"prefetch must be one of {', '.join(PREFETCHERS)}, got {prefetch!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    slots = layer_slots(trace, budget, policy)
    experts_ITK = trace.experts.numpy().astype(np.int64)
    I, T, _ = experts_ITK.shape
    start = int(warmup * T)
    tops = _layer_top_k(experts_ITK)
    predictions = _predictions(experts_ITK, trace.num_experts, tops, prefetch, start)
    evict = "lru" if policy == "shallow" else policy
    layers = [_run_cache([row[row >= 0] for row in experts_ITK[l]], predictions[l], slots[l], evict, start, decay)
              for l in range(I)]
    return SimResult(policy=policy, prefetch=prefetch, budget=budget, layers=layers, measured_tokens=T - start,
                     bytes_per_expert=bytes_per_expert if bytes_per_expert is not None else expert_bytes(trace),
                     options={"warmup": warmup, "decay": decay})
