"""Expert cache over an :class:`moekit.serve.store.ExpertStore`: per-layer slots of expert weights in memory,
filled on demand (misses) or ahead of time by a prefetcher on a background thread, with an eviction policy
and a memory budget.

Legend (docs/architecture.md): I layers, E experts, K experts per token.

Every MoE layer has its own slots (the model of :mod:`moekit.serve.simulate`, whose policy names and meanings
this module shares; ``belady`` needs the future and exists only there). A layer call :meth:`ExpertCache.acquire`
s the experts it needs: resident ones are hits, the others are misses read from the store into slots freed by
the policy (never an expert the same call needs, never one being read), and the call's experts stay pinned
until :meth:`ExpertCache.release`. A prefetcher calls :meth:`ExpertCache.prefetch` for a later layer: the reads
run on the cache's loader thread (``os.preadv`` and torch kernels release the GIL, so loading overlaps the
compute of the current layer); a layer that needs an expert still being read waits for it (counted as a hit:
the load was issued ahead; the wait is reported as ``wait_s``).

Budget: ``budget`` a fraction of each layer's experts (``round(budget * E_l)`` slots, as the simulator), or
``budget_bytes`` / ``budget_experts`` for the whole model (spread evenly). Fewer slots in a layer than its top-k
is a ``ValueError``. Policies (eviction; allocation across layers):

* ``lru``: evict the least recently used (or loaded) expert.
* ``lfu``: evict the lowest exponentially decayed use count (``decay`` per call of the layer; ties LRU).
* ``lru_pinned``: MoE-Infinity's ``lru_ds`` idea ("MoE-Infinity: Offloading-Efficient MoE Model Serving",
  arXiv 2401.14361): an expert the prefetcher names for a call is pinned until it is used, at most
  ``pin_tokens`` calls of its layer; LRU among the unpinned, LRU among the pinned only when nothing else can go.
* ``least_stale``: SpecMD's "Least-Stale" ("SpecMD: A Comprehensive Study On Speculative Expert Prefetching",
  arXiv 2602.03921), in the reading :mod:`moekit.serve.policies` states: the staleness of expert ``e`` at call
  ``t`` is ``(t - last_e) / gap_e`` (calls since its last use or load over its expected reuse interval, an
  exponential average with weight 0.25 of the intervals between its uses, started at ``E_l / k_l``); the
  stalest goes first, ties LRU.
* ``shallow``: LRU with Fate's shallow-favouring allocation ("Fate: Fast Edge Inference of Mixture-of-Experts
  Models via Cross-Layer Gate", arXiv 2502.12224): the same total slots spread with weights falling linearly
  from 2 (first layer) to 1 (last), each layer keeping at least its top-k
  (:func:`moekit.serve.policies.shallow_slots`, the simulator's rule).
* ``adaptive``: LRU with per-layer sizes chosen by dynamic programming on a profile of hit curves (AdapMoE,
  "AdapMoE: Adaptive Sensitivity-based Expert Gating and Management for Efficient MoE Inference",
  arXiv 2408.10284): ``hits_l(s)`` is the number of LRU hits layer ``l`` would have with ``s`` slots on the
  profile, and the allocation maximises ``sum_l hits_l(s_l)`` under the total (the simulator's
  :func:`moekit.serve.policies.lru_hit_curve` and :func:`~moekit.serve.policies.allocate_dp`). The profile is
  a routing trace given as ``profile`` (per layer, the expert sets of each token) or, by default, the first
  ``profile_tokens`` tokens served (the prompt's prefill): the cache starts evenly and re-allocates once.
* ``miss_bits`` (HOBBIT, any policy): misses computed with a low-bit copy, see :meth:`ExpertCache._build_lowbit`.

:meth:`ExpertCache.stats` returns the counters as a dict: hits, misses, bytes read, seconds spent reading,
per layer, and the prefetch accounting (issued loads, used loads, precision, recall, lead time).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from .store import ExpertStore

__all__ = ["POLICIES", "ExpertCache", "LayerCounters", "allocate_slots", "lru_hit_curve"]

POLICIES = ("lru", "lfu", "lru_pinned", "least_stale", "shallow", "adaptive")


# ------------------------------------------------------------------------------------------------ allocation
def lru_hit_curve(steps: list[list[int]], num_experts: int, max_slots: int | None = None) -> np.ndarray:
    """``hits[s]`` for ``s = 0..max_slots``: hits of an LRU cache of ``s`` slots (empty at the start) on the
    sequence of expert sets ``steps``, all experts of a step needed at once (evictions never take one of them),
    by running the cache once per size. Sizes below a step's set size count no hits."""
    max_slots = num_experts if max_slots is None else max_slots
    hits = np.zeros(max_slots + 1, dtype=np.int64)
    steps = [list(dict.fromkeys(int(e) for e in need)) for need in steps]
    widest = max((len(n) for n in steps), default=0)
    for s in range(max(widest, 1), max_slots + 1):
        order: OrderedDict[int, None] = OrderedDict()  # least recent first
        for need in steps:
            for e in need:
                if e in order:
                    hits[s] += 1
                elif len(order) >= s:
                    victim = next(x for x in order if x not in need)
                    del order[victim]
                order[e] = None
            for e in need:
                order.move_to_end(e)
    return hits


def allocate_slots(num_experts: list[int], top_k: list[int], *, budget: float | None = None,
                   budget_experts: int | None = None, policy: str = "lru",
                   profile: list[list[list[int]]] | None = None) -> list[int]:
    """Slots of each layer. ``budget``: fraction of each layer's experts; else ``budget_experts`` in all, spread
    evenly (the remainder to the first layers). ``shallow`` and ``adaptive`` (with a ``profile``) move slots
    between layers keeping the total. ``ValueError`` when a layer gets fewer slots than its top-k."""
    I = len(num_experts)
    if budget is not None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"expert budget must be a fraction of experts in (0, 1], got {budget}")
        slots = [int(round(budget * e)) for e in num_experts]
        what = f"expert budget {budget:g}"
    else:
        if budget_experts is None or budget_experts < 1:
            raise ValueError(f"expert budget must be at least one expert, got {budget_experts}")
        base, extra = divmod(int(budget_experts), I)
        slots = [min(e, base + (l < extra)) for l, e in enumerate(num_experts)]
        what = f"expert budget of {budget_experts} experts"
    for l, (s, k) in enumerate(zip(slots, top_k)):
        if s < k:
            raise ValueError(f"{what} gives layer {l} {s} expert slots, fewer than its top-k of {k} (one token "
                             f"needs {k} experts resident at once)")
    from .policies import allocate_dp, lru_hit_curve as sim_curve, shallow_slots

    if policy == "shallow":
        return shallow_slots(slots, list(top_k), list(num_experts))
    if policy == "adaptive" and profile is not None:
        curves = [sim_curve([np.asarray(sorted(set(int(e) for e in row)), dtype=np.int64) for row in profile[l]],
                            num_experts[l]) for l in range(I)]
        return allocate_dp(curves, sum(slots), list(top_k), list(num_experts))
    return slots


# ------------------------------------------------------------------------------------------------ counters
@dataclass
class LayerCounters:
    """Counters of one layer (see :meth:`ExpertCache.stats`)."""

    slots: int
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    wait_s: float = 0.0        # time calls waited for experts a prefetch was still reading
    prefetch_issued: int = 0   # loads the prefetcher started
    prefetch_used: int = 0     # of those, used by a call before eviction
    predicted: int = 0         # experts the prefetcher named for a call (after truncation to the slots)
    predicted_used: int = 0    # of those, needed by that call
    predicted_calls_accesses: int = 0  # accesses of the calls that had a prediction (recall denominator)
    lead_s: float = 0.0        # summed time from a prediction to the call it was for
    lead_n: int = 0
    late: int = 0              # needed experts whose prefetch read had not finished when the call came
    lowbit: int = 0            # misses computed with the low-bit copy (miss_bits)

    def to_dict(self) -> dict:
        n = self.hits + self.misses
        return {"slots": self.slots, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / n if n else None, "bytes_read": self.bytes_read, "read_s": self.read_s,
                "wait_s": self.wait_s, "prefetch_issued": self.prefetch_issued,
                "prefetch_used": self.prefetch_used,
                "precision": self.predicted_used / self.predicted if self.predicted else None,
                "recall": (self.predicted_used / self.predicted_calls_accesses
                           if self.predicted and self.predicted_calls_accesses else None),
                "lead_ms": 1000 * self.lead_s / self.lead_n if self.lead_n else None, "late": self.late,
                "lowbit": self.lowbit}


@dataclass
class _Entry:
    slot: int
    ready: threading.Event = field(default_factory=threading.Event)
    pins: int = 0
    last: int = 0
    count: float = 0.0
    count_at: int = 0
    prefetched: bool = False   # loaded by the prefetcher and not used yet
    pinned_until: int = -1     # lru_pinned: last call of the layer its pin lasts (until used)
    last_call: int = 0         # least_stale: call of the last use or load
    last_use: int | None = None
    gap: float | None = None   # least_stale: expected reuse interval (calls)
    error: BaseException | None = None


class ExpertCache:
    """Per-layer expert slots over ``store`` (see the module docstring).

    ``budget`` (fraction of each layer's experts) or ``budget_bytes`` / ``budget_experts`` (whole model);
    ``policy`` in :data:`POLICIES`; ``decay`` for ``lfu``; ``cold`` drops the page cache of every expert file
    first and of each file after it is read (every miss reads the disk); ``profile`` for ``adaptive`` (per
    layer, a list of expert-id lists, one per token) else the first ``profile_tokens`` tokens served.
    """

    def __init__(self, store: ExpertStore, budget: float | None = 0.25, policy: str = "lru", *,
                 budget_bytes: int | None = None, budget_experts: int | None = None, decay: float = 0.95,
                 cold: bool = False, profile: list | None = None, profile_tokens: int = 32, pin_tokens: int = 2,
                 miss_bits: int | None = None, miss_group: int = 128):
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {', '.join(POLICIES)}, got {policy!r}"
                             + (" (belady needs the future: it exists only in moekit simulate)"
                                if policy == "belady" else ""))
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.store, self.policy, self.decay, self.cold = store, policy, decay, cold
        if isinstance(pin_tokens, bool) or not isinstance(pin_tokens, int) or pin_tokens < 1:
            raise ValueError(f"pin_tokens must be a positive integer, got {pin_tokens!r}")
        self.pin_tokens = pin_tokens
        layers = store.layers
        self.num_experts = [s.num_experts for s in layers]
        self.top_k = [s.top_k for s in layers]
        if budget_bytes is not None:
            per = max(s.expert_bytes for s in layers)
            budget_experts = int(budget_bytes) // per
            if budget_experts < 1:
                raise ValueError(f"expert budget of {budget_bytes} bytes holds no expert ({per} bytes each)")
            budget = None
        elif budget_experts is not None:
            budget = None
        if profile is not None and len(profile) != len(layers):
            raise ValueError(f"adaptive profile has {len(profile)} layers, the store {len(layers)}")
        self.slots = allocate_slots(self.num_experts, self.top_k, budget=budget, budget_experts=budget_experts,
                                    policy=policy, profile=profile if policy == "adaptive" else None)
        self.budget = budget if budget is not None else sum(self.slots) / sum(self.num_experts)
        if policy == "adaptive" and len({json_key(s.tensors) for s in layers}) != 1:
            raise ValueError("adaptive allocation needs every layer's experts to have the same shapes")
        self._adapt_pending = policy == "adaptive" and profile is None
        self.profile_tokens = profile_tokens
        self._profile: list[list[list[int]]] = [[] for _ in layers]
        self._lock = threading.Condition()
        self._entries: list[OrderedDict[int, _Entry]] = [OrderedDict() for _ in layers]
        self._history: list[dict[int, tuple]] = [{} for _ in layers]
        self._unpinned: list[set[int]] = [set() for _ in layers]  # lfu / least_stale state of evicted experts
        self._buffers: list[list[dict[str, torch.Tensor]]] = [[s.empty() for _ in range(n)]
                                                              for s, n in zip(layers, self.slots)]
        self._free: list[list[int]] = [list(range(n)) for n in self.slots]
        self._clock = 0
        self._calls = [0] * len(layers)
        self._pred: list[tuple[set, float, int] | None] = [None] * len(layers)
        self.counters = [LayerCounters(n) for n in self.slots]
        self._queue: queue.Queue = queue.Queue()
        self._loader: threading.Thread | None = None
        self._closed = False
        self.miss_bits = miss_bits
        self._lowbit: list[list[dict]] | None = None
        if miss_bits is not None:
            self._build_lowbit(miss_bits, miss_group)
        if cold:
            store.drop_pages()

    def _build_lowbit(self, bits, group: int) -> None:
        """HOBBIT's low-bit copies ("HOBBIT: A Mixed Precision Expert Offloading System for Fast MoE Inference",
        arXiv 2411.01433): every expert quantised once with :func:`moekit.compress.quant.pack` (round to nearest,
        symmetric groups of ``group`` along the input dimension) and kept in memory; a miss then computes with
        the dequantised copy at once while the full expert is read in the background for later calls. Output
        is no longer identical to the resident model's."""
        from tqdm import tqdm

        from ..compress import quant as Q

        Q.check_bits(bits)
        total = sum(s.num_experts for s in self.store.layers)
        self._lowbit = []
        with tqdm(total=total, desc=f"{bits}-bit expert copies", unit="expert", leave=False,
                  disable=total < 256) as bar:
            for spec in self.store.layers:
                copies = []
                scratch = spec.empty()
                for e in range(spec.num_experts):
                    self.store.read_into(spec.index, e, scratch)
                    copies.append({n: Q.pack(t.float(), bits, group=min(group, t.shape[-1]))
                                   for n, t in scratch.items()})
                    bar.update(1)
                self._lowbit.append(copies)

    @property
    def lowbit_bytes(self) -> int:
        """Bytes of the low-bit copies (0 without ``miss_bits``)."""
        if self._lowbit is None:
            return 0
        return sum(p.nbytes for layer in self._lowbit for ex in layer for p in ex.values())

    def _lowbit_weights(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        spec = self.store.layers[layer]
        return {n: p.dequantize(torch.float32).to(_dtype_of(spec, n)) for n, p in self._lowbit[layer][e].items()}

    # ------------------------------------------------------------------------------------------ properties
    @property
    def resident_bytes(self) -> int:
        """Bytes of all slot buffers (the experts' share of memory)."""
        return sum(n * s.expert_bytes for s, n in zip(self.store.layers, self.slots))

    def resident(self, layer: int) -> list[int]:
        """The experts of ``layer`` in memory or being read, by slot order of entry."""
        with self._lock:
            return list(self._entries[layer])

    # ------------------------------------------------------------------------------------------ eviction
    def _score(self, layer: int, e: int, ent: _Entry):
        """Lower is evicted first."""
        p = self.policy
        if p == "lfu":
            return (ent.count * self.decay ** (self._calls[layer] - ent.count_at), ent.last)
        t = self._calls[layer]
        if p == "lru_pinned":
            return (ent.pinned_until >= t, ent.last)
        if p == "least_stale":
            gap = ent.gap if ent.gap is not None else self.num_experts[layer] / self.top_k[layer]
            return (-(t - ent.last_call) / gap, ent.last)
        return ent.last

    def _evictable(self, layer: int, e: int, ent: _Entry, protect) -> bool:
        return not (ent.pins or e in protect or not ent.ready.is_set())

    def _take_slot(self, layer: int, protect, block: bool) -> int | None:
        """A free slot of ``layer``, evicting by the policy; waits (``block``) while every entry is pinned or
        being read. Called with the lock held."""
        while True:
            if self._free[layer]:
                return self._free[layer].pop()
            ents = self._entries[layer]
            cand = [(self._score(layer, e, ent), e) for e, ent in ents.items()
                    if self._evictable(layer, e, ent, protect)]
            if cand:
                _, victim = min(cand)
                gone = ents.pop(victim)
                self._history[layer][victim] = (gone.count, gone.count_at, gone.last_use, gone.gap)
                return gone.slot
            if not block:
                return None
            self._lock.wait(timeout=1.0)

    # ------------------------------------------------------------------------------------------ loading
    def _read(self, layer: int, e: int, slot: int) -> None:
        t0 = time.perf_counter()
        n = self.store.read_into(layer, e, self._buffers[layer][slot], drop=self.cold)
        dt = time.perf_counter() - t0
        with self._lock:
            c = self.counters[layer]
            c.bytes_read += n
            c.read_s += dt

    def _loader_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            layer, e, ent = item
            try:
                self._read(layer, e, ent.slot)
            except BaseException as exc:  # reported to the call that needs it
                ent.error = exc
            with self._lock:
                ent.pins -= 1
                ent.ready.set()
                self._lock.notify_all()

    def prefetch(self, layer: int, experts, issued: float | None = None) -> int:
        """Start background reads of ``experts`` for the next call of ``layer`` (truncated to its slots);
        returns how many reads were started. Never blocks on a full cache: experts that find no evictable slot
        are skipped."""
        if self._closed:
            return 0
        experts = list(dict.fromkeys(int(e) for e in experts))[:self.slots[layer]]
        started = 0
        with self._lock:
            self._pred[layer] = (set(experts), time.perf_counter() if issued is None else issued,
                                 self._calls[layer])
            ents = self._entries[layer]
            until = self._calls[layer] + self.pin_tokens - 1
            for e in experts:
                if e in ents:
                    ents[e].pinned_until = until
                    continue
                slot = self._take_slot(layer, set(experts), block=False)
                if slot is None:
                    break
                self._clock += 1
                ent = _Entry(slot, pins=1, last=self._clock, prefetched=True, last_call=self._calls[layer])
                ent.pinned_until = until
                ents[e] = ent
                self.counters[layer].prefetch_issued += 1
                started += 1
                if self._loader is None:
                    self._loader = threading.Thread(target=self._loader_loop, name="moekit-expert-loader",
                                                    daemon=True)
                    self._loader.start()
                self._queue.put((layer, e, ent))
        return started

    def acquire(self, layer: int, experts, tokens: list[list[int]] | None = None) -> list[dict[str, torch.Tensor]]:
        """The weights of ``experts`` of ``layer`` (one dict of tensors each, in order), read now where missing;
        they stay pinned until :meth:`release`. ``len(experts)`` must not exceed the layer's slots.
        ``tokens`` (each token's experts) feeds the adaptive profile; the call counter advances once per
        :meth:`begin_call`."""
        experts = [int(e) for e in experts]
        if len(set(experts)) > self.slots[layer]:
            raise ValueError(f"layer {layer}: {len(set(experts))} experts at once exceed its {self.slots[layer]} slots")
        need = set(experts)
        to_read, waits = [], []
        lowbit: dict[int, dict | None] = {}
        with self._lock:
            ents = self._entries[layer]
            c = self.counters[layer]
            call = self._calls[layer]
            for e in dict.fromkeys(experts):
                ent = ents.get(e)
                if ent is not None:
                    c.hits += 1
                    if not ent.ready.is_set():
                        waits.append(ent)
                        c.late += 1
                    if ent.prefetched:
                        c.prefetch_used += 1
                        ent.prefetched = False
                elif self._lowbit is not None:  # HOBBIT: compute with the low-bit copy, read the full one behind
                    c.misses += 1
                    c.lowbit += 1
                    lowbit[e] = None
                    continue
                else:
                    c.misses += 1
                    slot = self._take_slot(layer, need, block=True)
                    ent = _Entry(slot)
                    old = self._history[layer].get(e)
                    if old is not None:  # use history outlives residency (the simulator keeps it per expert)
                        ent.count, ent.count_at, ent.last_use, ent.gap = old
                    ents[e] = ent
                    to_read.append((e, ent))
                ent.pins += 1
                self._clock += 1
                ent.last = self._clock
                ent.pinned_until = -1
                if ent.last_use is not None:
                    g = ent.gap if ent.gap is not None else self.num_experts[layer] / self.top_k[layer]
                    ent.gap = 0.75 * g + 0.25 * max(call - ent.last_use, 1)
                ent.last_use = ent.last_call = call
                if self.policy == "lfu":
                    ent.count = ent.count * self.decay ** (call - ent.count_at) + 1.0
                    ent.count_at = call
        try:
            for e, ent in to_read:
                self._read(layer, e, ent.slot)
                ent.ready.set()
        except BaseException:
            with self._lock:
                for e, ent in to_read:
                    if not ent.ready.is_set():
                        self._entries[layer].pop(e, None)
                        self._free[layer].append(ent.slot)
                self._release(layer, [e for e in experts if e in self._entries[layer]])
            raise
        if waits:
            t0 = time.perf_counter()
            for ent in waits:
                ent.ready.wait()
            with self._lock:
                self.counters[layer].wait_s += time.perf_counter() - t0
            for ent in waits:
                if ent.error is not None:
                    self.release(layer, experts)
                    raise ent.error
        if lowbit:
            with self._lock:
                self._unpinned[layer].update(lowbit)
            for e in lowbit:
                lowbit[e] = self._lowbit_weights(layer, e)
            self._fetch_behind(layer, list(lowbit))
        with self._lock:
            ents = self._entries[layer]
            return [lowbit[e] if e in lowbit else self._buffers[layer][ents[e].slot] for e in experts]

    def _fetch_behind(self, layer: int, experts: list[int]) -> None:
        """Background full-precision reads of experts served low-bit (not counted as prefetches)."""
        with self._lock:
            ents = self._entries[layer]
            for e in experts:
                if e in ents:
                    continue
                slot = self._take_slot(layer, set(), block=False)
                if slot is None:
                    return
                self._clock += 1
                ent = _Entry(slot, pins=1, last=self._clock, last_call=self._calls[layer])
                ents[e] = ent
                if self._loader is None:
                    self._loader = threading.Thread(target=self._loader_loop, name="moekit-expert-loader",
                                                    daemon=True)
                    self._loader.start()
                self._queue.put((layer, e, ent))

    def _release(self, layer: int, experts) -> None:
        ents = self._entries[layer]
        skip = self._unpinned[layer]  # served low-bit: never pinned (an entry is a background read's)
        for e in dict.fromkeys(int(x) for x in experts):
            if e in skip:
                skip.discard(e)
                continue
            ent = ents.get(e)
            if ent is not None and ent.pins > 0:
                ent.pins -= 1
        self._lock.notify_all()

    def release(self, layer: int, experts) -> None:
        """Unpin ``experts`` of ``layer`` (they become evictable)."""
        with self._lock:
            self._release(layer, experts)

    def begin_call(self, layer: int, needed, tokens: list[list[int]] | None = None) -> None:
        """Account for the start of a call of ``layer`` needing the set ``needed``: prefetch precision / recall /
        lead time against the last prediction for this layer; the adaptive profile (``tokens``: each token's
        experts)."""
        needed = {int(e) for e in needed}
        with self._lock:
            pred = self._pred[layer]
            c = self.counters[layer]
            if pred is not None:
                names, t_issue, _ = pred
                c.predicted += len(names)
                c.predicted_used += len(names & needed)
                c.predicted_calls_accesses += len(needed)
                c.lead_s += time.perf_counter() - t_issue
                c.lead_n += 1
                self._pred[layer] = None
            if self._adapt_pending and tokens is not None:
                self._profile[layer].extend(tokens)
        if self._adapt_pending and layer == len(self.slots) - 1 \
                and min(len(p) for p in self._profile) >= self.profile_tokens:
            self.adapt(self._profile)

    def end_call(self, layer: int) -> None:
        with self._lock:
            self._calls[layer] += 1

    # ------------------------------------------------------------------------------------------ adaptive
    def adapt(self, profile: list[list[list[int]]]) -> list[int]:
        """Re-allocate the slots across layers from ``profile`` (AdapMoE's dynamic program); returns the new
        slots. Layers that shrink evict by the policy; their buffers move to the layers that grow."""
        self.drain()  # no read in flight while buffers move
        new = allocate_slots(self.num_experts, self.top_k, budget_experts=sum(self.slots), policy="adaptive",
                             profile=profile)
        if sum(new) != sum(self.slots):  # allocate_slots spreads evenly first; the program keeps the total
            raise RuntimeError("adaptive allocation changed the total")
        with self._lock:
            self._adapt_pending = False
            spare: list[dict] = []
            for l, (old, n) in enumerate(zip(self.slots, new)):
                while len(self._buffers[l]) > n:
                    slot = self._take_slot(l, set(), block=True)
                    # move the last buffer into the freed slot's place, renumbering its entry
                    last = len(self._buffers[l]) - 1
                    if slot != last:
                        moved = [e for e, ent in self._entries[l].items() if ent.slot == last]
                        if moved:
                            self._entries[l][moved[0]].slot = slot
                            self._buffers[l][slot], self._buffers[l][last] = self._buffers[l][last], \
                                self._buffers[l][slot]
                        else:
                            self._free[l].remove(last)
                            self._free[l].append(slot)
                    spare.append(self._buffers[l].pop())
            for l, n in enumerate(new):
                while len(self._buffers[l]) < n:
                    self._free[l].append(len(self._buffers[l]))
                    self._buffers[l].append(spare.pop())
            self.slots = new
            for c, n in zip(self.counters, new):
                c.slots = n
        return new

    # ------------------------------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """Counters: totals and ``layers`` (one dict per layer: slots, hits, misses, hit_rate, bytes_read,
        read_s, wait_s, prefetch_issued, prefetch_used, precision, recall, lead_ms, late)."""
        with self._lock:
            layers = [c.to_dict() for c in self.counters]
            cs = list(self.counters)
        hits = sum(c.hits for c in cs)
        misses = sum(c.misses for c in cs)
        pred = sum(c.predicted for c in cs)
        pred_used = sum(c.predicted_used for c in cs)
        pred_acc = sum(c.predicted_calls_accesses for c in cs)
        lead_n = sum(c.lead_n for c in cs)
        return {"policy": self.policy, "budget": self.budget, "slots": list(self.slots), "cold": self.cold,
                "resident_expert_bytes": self.resident_bytes, "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "bytes_read": sum(c.bytes_read for c in cs), "read_s": sum(c.read_s for c in cs),
                "wait_s": sum(c.wait_s for c in cs), "prefetch_issued": sum(c.prefetch_issued for c in cs),
                "prefetch_used": sum(c.prefetch_used for c in cs),
                "precision": pred_used / pred if pred else None,
                "recall": pred_used / pred_acc if pred and pred_acc else None,
                "lead_ms": 1000 * sum(c.lead_s for c in cs) / lead_n if lead_n else None,
                "late": sum(c.late for c in cs), "miss_bits": self.miss_bits,
                "lowbit": sum(c.lowbit for c in cs), "lowbit_bytes": self.lowbit_bytes, "layers": layers}

    def reset_stats(self) -> None:
        with self._lock:
            self.counters = [LayerCounters(n) for n in self.slots]

    def drain(self) -> None:
        """Wait until every started prefetch read has finished."""
        with self._lock:
            pending = [ent for ents in self._entries for ent in ents.values() if not ent.ready.is_set()]
        for ent in pending:
            ent.ready.wait()

    def close(self) -> None:
        """Stop the loader thread (after its pending reads)."""
        self._closed = True
        if self._loader is not None:
            self._queue.put(None)
            self._loader.join()
            self._loader = None


def _dtype_of(spec, name: str) -> torch.dtype:
    from .store import _DTYPES

    return _DTYPES[spec.tensors[name]["dtype"]]


def json_key(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
