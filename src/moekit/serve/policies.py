"""Per-layer expert caches for the trace simulator: slot allocation across layers and eviction policies.

One cache per MoE layer holds ``slots[l]`` experts. :func:`run_cache` replays one layer's accesses (decode
order = token order): at token ``t`` an optional prefetched set is loaded first, then every expert the token
needs must be resident at once (hits; misses are loaded, evicting by the policy, never an expert the same step
needs).

Eviction (the victim is the resident expert with the lowest score):

* ``lru`` (also ``shallow`` and ``adaptive``, which only change the slots): least recently used or loaded.
* ``lfu``: lowest exponentially decayed use count (``decay`` per token), ties least recently used.
* ``lru_pinned``: MoE-Infinity's ``lru_ds`` idea ("MoE-Infinity: Offloading-Efficient MoE Model Serving",
  arXiv 2401.14361): an expert brought in by the prefetcher is pinned until it is used, at most
  ``pin_tokens`` tokens; LRU among the unpinned, LRU among the pinned only when every candidate is pinned.
* ``least_stale``: SpecMD's "Least-Stale" ("SpecMD: A Comprehensive Study On Speculative Expert Prefetching",
  arXiv 2602.03921). Only the paper's abstract could be read from here (it calls Least-Stale a hybrid of
  temporal and spatial locality that exploits MoE's predictable access pattern), so the rule implemented is
  our reading, stated exactly: the staleness of expert ``e`` at token ``t`` is ``(t - last_e) / gap_e``, the
  tokens since its last use (or load) over its expected reuse interval ``gap_e``, an exponential average
  (weight ``0.25``) of the intervals between its uses, started at ``E_l / k_l`` (the interval under uniform
  routing). The stalest expert is evicted; ties least recently used. Unlike LRU an expert that is used
  rarely but regularly is kept as long as it is not overdue, and a frequently used one is dropped soon after
  it stops being used.
* ``belady``: offline optimum (Belady, "A study of replacement algorithms for a virtual-storage computer",
  IBM Systems Journal 1966): evict the expert whose next use is farthest away; with several experts needed
  per step (none of them evictable) it still minimises misses (checked against brute force in the tests).

:func:`run_shared` replays one pool shared by all layers instead (MoE-Infinity keeps a single expert cache):
there predictions issued several layers ahead occupy slots until used, which is where ``lru_pinned`` matters
(with one cache per layer nothing of that layer happens between a prediction and its use).

Slot allocation (:func:`layer_slots`): ``round(budget * E_l)`` per layer; ``shallow`` moves slots towards the
first layers (Fate, arXiv 2502.12224: weights falling linearly from 2 to 1, the same total); ``adaptive``
(AdapMoE, "AdapMoE: Adaptive Sensitivity-based Expert Gating and Management for Efficient MoE Inference",
arXiv 2408.10284: per-layer cache sizes by dynamic programming) profiles every layer's LRU hit curve on the
warm-up tokens (:func:`lru_hit_curve`, exact for LRU by the stack property) and chooses the sizes that
maximise the summed hits with the same total (:func:`allocate_dp`).

Legend (docs/architecture.md): T tokens, E experts.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

__all__ = ["POLICIES", "LayerStats", "run_cache", "run_shared", "lru_hit_curve", "allocate_dp", "shallow_slots"]

POLICIES = ("lru", "lfu", "lru_pinned", "least_stale", "shallow", "adaptive", "belady")
EVICTION = {"shallow": "lru", "adaptive": "lru"}  # policies that only change the slots


@dataclass
class LayerStats:
    """Counts of one layer over the measured tokens (``*_T`` arrays: per measured token, for the cost model)."""

    slots: int
    hits: int = 0
    misses: int = 0
    predicted: int = 0        # experts the prefetcher named (after truncation to the slots)
    predicted_used: int = 0   # of those, needed by the token
    prefetch_loads: int = 0   # experts the prefetcher actually loaded (not already resident)
    lead_sum: int = 0         # layers between a prediction's issue and the use, summed over predicted_used
    hits_T: np.ndarray = field(default=None, repr=False)
    misses_T: np.ndarray = field(default=None, repr=False)
    prefetch_T: np.ndarray = field(default=None, repr=False)
    lead: int = 0             # layers ahead at which this layer's predictions are issued (0: no prefetch)
    admitted: bool = True     # misses are loaded (False: computed on the host, Fiddler; not loads)

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    def count_access(self, hit: bool, m: int) -> None:
        """One needed expert at measured token ``m`` (``m < 0``: a warm-up token, not counted)."""
        if m < 0:
            return
        if hit:
            self.hits += 1
            self.hits_T[m] += 1
        else:
            self.misses += 1
            self.misses_T[m] += 1

    def count_prediction(self, predicted: int, used: int, lead: int) -> None:
        """A prediction of ``predicted`` experts of which ``used`` were needed, issued ``lead`` layers ahead."""
        self.predicted += predicted
        self.predicted_used += used
        self.lead_sum += used * lead

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
    def lead_time(self) -> float:
        """Mean layers between the prediction and the use of a correctly prefetched expert."""
        return self.lead_sum / self.predicted_used if self.predicted_used else float("nan")

    @property
    def loads(self) -> int:
        return (self.misses if self.admitted else 0) + self.prefetch_loads


def shallow_slots(slots: list[int], tops: list[int], caps: list[int]) -> list[int]:
    """Fate's allocation: the total of ``slots`` spread with weights 2 (first layer) -> 1 (last), each layer
    at least its top-k and at most its experts; one slot at a time to the layer furthest below its target."""
    I, total = len(slots), sum(slots)
    weight = np.array([2.0 - l / (I - 1) if I > 1 else 1.0 for l in range(I)])
    target = total * weight / weight.sum()
    alloc = list(tops)
    for _ in range(total - sum(alloc)):
        open_ = [l for l in range(I) if alloc[l] < caps[l]]
        l = max(open_, key=lambda j: (target[j] - alloc[j], -j))
        alloc[l] += 1
    return alloc


def lru_hit_curve(needed_T: list[np.ndarray], num_experts: int) -> np.ndarray:
    """``hits[s]`` of an LRU cache of ``s`` slots (s = 0..E) replaying ``needed_T`` from empty, in one pass.

    LRU keeps the ``s`` most recently used experts (the step's own experts count as used together), so an
    expert hits in a cache of ``s`` slots exactly when its position in the recency list before the step is
    below ``s``: ``hits[s] = #accesses with position < s``.
    """
    order: list[int] = []  # most recent first
    at = np.zeros(num_experts + 1, dtype=np.int64)
    for need in needed_T:
        row = need.tolist()
        for e in row:
            if e in order:
                at[order.index(e)] += 1
        for e in row:
            if e in order:
                order.remove(e)
        order[:0] = row[::-1]  # the step stamps its experts in order: the last is the most recent
    hits = np.zeros(num_experts + 1, dtype=np.int64)
    hits[1:] = np.cumsum(at[:num_experts])
    return hits


def allocate_dp(curves: list[np.ndarray], total: int, lows: list[int], highs: list[int]) -> list[int]:
    """Sizes ``s_l`` in ``[lows[l], highs[l]]`` with ``sum s_l == total`` maximising ``sum curves[l][s_l]``
    (dynamic programming over layers and slots used). ``ValueError`` when no allocation fits."""
    I = len(curves)
    if not sum(lows) <= total <= sum(highs):
        raise ValueError(f"no allocation of {total} slots fits the per-layer bounds")
    neg = -np.inf
    best = np.full((I + 1, total + 1), neg)
    choice = np.zeros((I + 1, total + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for l in range(I):
        for used in range(total + 1):
            if best[l, used] == neg:
                continue
            for s in range(lows[l], min(highs[l], total - used) + 1):
                v = best[l, used] + float(curves[l][s])
                if v > best[l + 1, used + s]:  # strict: the smallest size wins ties (earlier s first)
                    best[l + 1, used + s] = v
                    choice[l + 1, used + s] = s
    alloc, used = [0] * I, total
    for l in range(I, 0, -1):
        alloc[l - 1] = int(choice[l, used])
        used -= alloc[l - 1]
    return alloc


def run_cache(needed_T: list[np.ndarray], predicted_T: list[np.ndarray] | None, slots: int, policy: str,
              start: int, *, decay: float = 0.95, lead: int = 1, pin_tokens: int = 2, admit_misses: bool = True,
              num_experts: int | None = None, initial: list[int] | None = None) -> LayerStats:
    """Replay one layer's cache over ``needed_T`` (the experts of each token) with optional predictions.

    ``start``: first measured token; ``lead``: layers between a prediction's issue and its use (reported);
    ``admit_misses=False``: a missed expert is computed elsewhere and not loaded (Fiddler's host compute), only
    prefetches change the cache; ``initial``: experts resident before the first token (Fiddler's static
    placement of the most popular experts).
    """
    policy = EVICTION.get(policy, policy)
    T = len(needed_T)
    stats = LayerStats(slots=slots, lead=lead if predicted_T is not None else 0, admitted=admit_misses)
    measured = max(T - start, 0)
    stats.hits_T = np.zeros(measured, dtype=np.int32)
    stats.misses_T = np.zeros(measured, dtype=np.int32)
    stats.prefetch_T = np.zeros(measured, dtype=np.int32)
    resident: set[int] = set((initial or [])[:slots])
    last: dict[int, int] = {e: -1 - i for i, e in enumerate(initial or [])}
    clock = 0
    freq: dict[int, tuple[float, int]] = {}   # lfu: expert -> (decayed count, token of the count)
    pinned: dict[int, int] = {}               # lru_pinned: expert -> last token of its pin
    last_tok: dict[int, int] = {}             # least_stale: token of the last use or load
    gap: dict[int, float] = {}                # least_stale: expected reuse interval
    last_use: dict[int, int] = {}             # least_stale: token of the last use
    k_max = max((len(n) for n in needed_T), default=1) or 1
    gap0 = float(num_experts or slots) / k_max
    uses: dict[int, list[int]] = {}
    if policy == "belady":
        for t, row in enumerate(needed_T):
            for e in row.tolist():
                uses.setdefault(e, []).append(t)

    def score(e: int, t: int):
        if policy == "belady":
            u = uses.get(e, [])
            i = bisect.bisect_left(u, t)
            return -(u[i] if i < len(u) else T + 1)
        if policy == "lfu":
            c, at = freq.get(e, (0.0, t))
            return (c * decay ** (t - at), last.get(e, -1))
        if policy == "lru_pinned":
            return (pinned.get(e, -1) >= t, last.get(e, -1))
        if policy == "least_stale":
            return (-(t - last_tok.get(e, t)) / gap.get(e, gap0), last.get(e, -1))
        return last.get(e, -1)

    def make_room(t: int, protected: set[int]) -> None:
        victims = [e for e in resident if e not in protected]
        v = min(victims, key=lambda e: score(e, t))
        resident.discard(v)
        pinned.pop(v, None)

    for t, need in enumerate(needed_T):
        m = t - start
        need_list = need.tolist()
        need_set = set(need_list)
        if predicted_T is not None:
            pred = predicted_T[t][:slots].tolist()
            pred_set = set(pred)
            for e in pred:
                if policy == "lru_pinned":
                    pinned[e] = t + pin_tokens - 1
                if e in resident:
                    continue
                if len(resident) >= slots:
                    make_room(t, pred_set)
                resident.add(e)
                clock += 1
                last[e] = clock
                last_tok[e] = t
                if m >= 0:
                    stats.prefetch_loads += 1
                    stats.prefetch_T[m] += 1
            if m >= 0:
                stats.count_prediction(len(pred_set), len(pred_set & need_set), lead)
        for e in need_list:
            stats.count_access(e in resident, m)
            if e not in resident:
                if admit_misses:
                    if len(resident) >= slots:
                        make_room(t, need_set)
                    resident.add(e)
        for e in need_list:
            clock += 1
            last[e] = clock
            pinned.pop(e, None)
            if policy == "least_stale":
                if e in last_use:
                    gap[e] = 0.75 * gap.get(e, gap0) + 0.25 * max(t - last_use[e], 1)
                last_use[e] = t
                last_tok[e] = t
            if policy == "lfu":
                c, at = freq.get(e, (0.0, t))
                freq[e] = (c * decay ** (t - at) + 1.0, t)
    return stats


def run_shared(needed: list[list[np.ndarray]], predicted: list[list[np.ndarray] | None], leads: list[int],
               slots: int, policy: str, start: int, *, decay: float = 0.95, pin_tokens: int = 2,
               experts_per_layer: list[int], admit_misses: bool = True,
               initial: list[tuple[int, int]] | None = None) -> list[LayerStats]:
    """One pool of ``slots`` experts shared by all layers (MoE-Infinity's single expert cache), replayed in
    decode order: token ``t``, layers ``0..I-1``. Returns one :class:`LayerStats` per layer (their ``slots``
    field holds the pool size).

    Layer ``l``'s prediction for token ``t`` is loaded when it is issued, right before step ``(t, l - lead +
    1)`` (``path``: every layer's right after layer 0), so in a shared pool it occupies a slot until its use and
    other layers' misses may evict it first; ``lru_pinned`` keeps it (pinned until used, at most
    ``pin_tokens`` tokens). Times are global steps ``g = t * I + l``: ``belady`` evicts the farthest next use in
    steps, ``least_stale`` measures staleness and reuse intervals in steps (initial interval ``I * E_l / k_l``).
    The step's own experts and the experts being prefetched together are never evicted; a prefetch that finds
    no evictable slot is dropped.
    """
    policy = EVICTION.get(policy, policy)
    if policy != "lru" and policy not in ("lfu", "lru_pinned", "least_stale", "belady"):
        raise ValueError(f"policy {policy!r} is not defined for a shared pool")
    I, T = len(needed), len(needed[0])
    emax = max(experts_per_layer)
    measured = max(T - start, 0)
    stats = [LayerStats(slots=slots, lead=leads[l] if predicted[l] is not None else 0, admitted=admit_misses)
             for l in range(I)]
    for s in stats:
        s.hits_T = np.zeros(measured, dtype=np.int32)
        s.misses_T = np.zeros(measured, dtype=np.int32)
        s.prefetch_T = np.zeros(measured, dtype=np.int32)
    tops = [max((len(n) for n in needed[l]), default=1) or 1 for l in range(I)]
    gap0 = [I * experts_per_layer[l] / tops[l] for l in range(I)]
    issue_at: dict[int, list[int]] = {}
    for j in range(I):
        if predicted[j] is not None:
            issue_at.setdefault(max(j - leads[j] + 1, 0), []).append(j)
    resident: set[int] = set()
    last: dict[int, int] = {}
    for i, (l, e) in enumerate((initial or [])[:slots]):
        resident.add(l * emax + e)
        last[l * emax + e] = -1 - i
    clock = 0
    freq: dict[int, tuple[float, int]] = {}
    pinned: dict[int, int] = {}
    last_step: dict[int, int] = {}
    last_use: dict[int, int] = {}
    gap: dict[int, float] = {}
    uses: dict[int, list[int]] = {}
    if policy == "belady":
        for l in range(I):
            for t, row in enumerate(needed[l]):
                for e in row.tolist():
                    uses.setdefault(l * emax + e, []).append(t * I + l)
        for u in uses.values():
            u.sort()

    def score(k: int, g: int, t: int):
        if policy == "belady":
            u = uses.get(k, [])
            i = bisect.bisect_left(u, g)
            return -(u[i] if i < len(u) else T * I + 1)
        if policy == "lfu":
            c, at = freq.get(k, (0.0, t))
            return (c * decay ** (t - at), last.get(k, -1))
        if policy == "lru_pinned":
            return (pinned.get(k, -1) >= g, last.get(k, -1))
        if policy == "least_stale":
            return (-(g - last_step.get(k, g)) / gap.get(k, gap0[k // emax]), last.get(k, -1))
        return last.get(k, -1)

    def make_room(g: int, t: int, protected: set[int]) -> bool:
        victims = [k for k in resident if k not in protected]
        if not victims:
            return False
        v = min(victims, key=lambda k: score(k, g, t))
        resident.discard(v)
        pinned.pop(v, None)
        return True

    for t in range(T):
        m = t - start
        for l in range(I):
            g = t * I + l
            need_keys = [l * emax + e for e in needed[l][t].tolist()]
            batch = [(j, j * emax + e) for j in issue_at.get(l, ()) for e in predicted[j][t][:tops[j]].tolist()]
            protect = set(need_keys) | {k for _, k in batch}
            for j, k in batch:
                if policy == "lru_pinned":
                    pinned[k] = t * I + j + (pin_tokens - 1) * I
                if k in resident:
                    continue
                if len(resident) >= slots and not make_room(g, t, protect):
                    continue
                resident.add(k)
                clock += 1
                last[k] = clock
                last_step[k] = g
                if m >= 0:
                    stats[j].prefetch_loads += 1
                    stats[j].prefetch_T[m] += 1
            if m >= 0:
                for j in issue_at.get(l, ()):
                    pred = set(predicted[j][t][:tops[j]].tolist())
                    stats[j].count_prediction(len(pred), len(pred & set(needed[j][t].tolist())), leads[j])
            s = stats[l]
            for k in need_keys:
                s.count_access(k in resident, m)
                if k not in resident:
                    if admit_misses and (len(resident) < slots or make_room(g, t, set(need_keys))):
                        resident.add(k)
            for k in need_keys:
                clock += 1
                last[k] = clock
                pinned.pop(k, None)
                if policy == "least_stale":
                    if k in last_use:
                        gap[k] = 0.75 * gap.get(k, gap0[l]) + 0.25 * max(g - last_use[k], 1)
                    last_use[k] = g
                    last_step[k] = g
                if policy == "lfu":
                    c, at = freq.get(k, (0.0, t))
                    freq[k] = (c * decay ** (t - at) + 1.0, t)
    return stats
