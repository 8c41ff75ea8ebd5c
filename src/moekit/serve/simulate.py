"""Expert-cache simulation on routing traces: which experts would be resident, hit or loaded if a model
whose experts do not fit in fast memory decoded the trace's tokens one by one (decode order = token order).

Every MoE layer has its own cache of ``slots[l]`` experts (:mod:`moekit.serve.policies`: eviction policies
and the allocation of slots across layers). At token ``t`` and layer ``l`` an optional prefetcher first loads
its predicted set for ``(t, l)``, made ``lead`` layers earlier; then every expert the token needs at ``l``
must be resident at once. Statistics are counted on the tokens after a warm-up prefix (``warmup``, default
20%), which is also the fitting data of the predictors and of the ``adaptive`` allocation, so the figures are
out of sample.

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
* ``trace_match`` (MoE-Infinity, "MoE-Infinity: Offloading-Efficient MoE Model Serving", arXiv 2401.14361):
  per-request expert activation matrices (EAM, ``[I, E]`` counts). The requests of the warm-up part (the
  trace's sequences; windows of ``request_tokens`` tokens when it has none) are stored, rows normalised. For
  token ``t`` at layer ``l`` the query is the current request's matrix so far (its earlier tokens, rows
  normalised) plus the current token's one-hot rows of layers ``< l``; the stored matrix with the highest
  cosine similarity (over all rows) names layer ``l``'s top-k (its row ``l``). Lead 1 layer.
* ``path`` (ExpertFlow, "ExpertFlow: Optimized Expert Activation and Token Allocation for Efficient
  Mixture-of-Experts Inference", arXiv 2410.17954): every layer's experts predicted before the rest of the pass
  from the first layer's routing, with tables ``P(j at l | i at 0)`` fitted on the warm-up tokens; all
  predictions are issued after layer 0, so layer ``l``'s prefetch has a lead of ``l`` layers.

Reported per layer and in total: precision (predicted experts that the token used), recall (used experts that
were predicted) and lead time (layers between the prediction and the use, over correctly predicted experts).

Layer 0 has no previous layer and is never prefetched. Hit rate counts an expert a prefetch brought in as a
hit (its load is assumed to finish in time); ``bytes_moved`` counts every load, demand or prefetch. With one
cache per layer no other access of layer ``l`` falls between a prediction's issue and its use, so the lead
changes no hit; it sets the window the load can hide in under the cost model (:mod:`moekit.serve.cost`).

Legend (docs/architecture.md): I layers, T tokens, K experts per token, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..trace.format import Trace
from .policies import POLICIES, LayerStats, allocate_dp, lru_hit_curve, run_cache, run_shared, shallow_slots

__all__ = ["POLICIES", "PREFETCHERS", "POOLS", "LayerStats", "SimResult", "layer_slots", "simulate",
           "expert_bytes", "predictions", "requests_of"]

PREFETCHERS = ("none", "cross_layer", "transition", "trace_match", "path")
POOLS = ("layer", "shared")  # one cache per layer, or one pool for all layers (policies.run_shared)


def _num(x):
    return None if isinstance(x, float) and x != x else x


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
    cost: dict | None = None

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

    @property
    def lead_time(self) -> float:
        used = self._sum("predicted_used")
        return self._sum("lead_sum") / used if used else float("nan")

    def to_dict(self) -> dict:
        out = {
            "policy": self.policy, "prefetch": self.prefetch, "budget": self.budget,
            "measured_tokens": self.measured_tokens, "hits": self.hits, "misses": self.misses,
            "hit_rate": _num(self.hit_rate), "precision": _num(self.precision), "recall": _num(self.recall),
            "lead_time": _num(self.lead_time), "loads": self.loads, "bytes_moved": self.bytes_moved,
            "options": self.options,
            "layers": [{"slots": s.slots, "hits": s.hits, "misses": s.misses, "hit_rate": _num(s.hit_rate),
                        "precision": _num(s.precision), "recall": _num(s.recall), "lead_time": _num(s.lead_time),
                        "prefetch_loads": s.prefetch_loads, "loads": s.loads} for s in self.layers],
        }
        if self.cost is not None:
            out["cost"] = self.cost
        return out


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


def _needed(experts_ITK: np.ndarray) -> list[list[np.ndarray]]:
    return [[row[row >= 0] for row in experts_ITK[l]] for l in range(experts_ITK.shape[0])]


def layer_slots(trace: Trace, budget: float, policy: str = "lru", *, warmup: float = 0.2) -> list[int]:
    """Cache slots of each layer: ``round(budget * E_l)``; ``shallow`` and ``adaptive`` move slots between
    layers keeping the total (``adaptive`` from LRU hit curves of the first ``warmup`` of the tokens, all tokens
    when that is none). ``ValueError`` when the budget is outside (0, 1] or leaves a layer fewer slots than its
    top-k."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a fraction of experts in (0, 1], got {budget}")
    experts_ITK = trace.experts.numpy().astype(np.int64)
    tops = _layer_top_k(experts_ITK)
    caps = list(trace.num_experts_per_layer)
    slots = [int(round(budget * e)) for e in caps]
    for l, (s, k) in enumerate(zip(slots, tops)):
        if s < k:
            raise ValueError(f"budget {budget} gives layer {l} {s} expert slots, fewer than its top-k of {k}")
    if policy == "shallow":
        return shallow_slots(slots, tops, caps)
    if policy == "adaptive":
        start = int(warmup * trace.num_tokens) or trace.num_tokens
        curves = [lru_hit_curve(need[:start], caps[l]) for l, need in enumerate(_needed(experts_ITK))]
        return allocate_dp(curves, sum(slots), tops, caps)
    return slots


# ------------------------------------------------------------------------------------------------ prediction
class _Table:
    """Transition counts ``N[i, j]`` from one layer to another; predicts the top-n successors of a set."""

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


def requests_of(trace: Trace, request_tokens: int = 64) -> np.ndarray:
    """``[T]`` request id of every token: the trace's sequences, else consecutive windows of
    ``request_tokens`` tokens."""
    seq = trace.seq_ids.numpy().astype(np.int64)
    if (seq >= 0).all() and len(np.unique(seq)) > 1:
        return seq
    return np.arange(trace.num_tokens) // max(1, request_tokens)


def _trace_match(experts_ITK: np.ndarray, E: int, tops: list[int], fit_tokens: int, req_T: np.ndarray):
    I, T, _ = experts_ITK.shape
    need = _needed(experts_ITK)
    # stored matrices: one per request of the warm-up tokens
    stored: dict[int, np.ndarray] = {}
    for t in range(fit_tokens):
        m = stored.setdefault(int(req_T[t]), np.zeros((I, E)))
        for l in range(I):
            m[l, need[l][t]] += 1.0
    out: list = [None] + [[] for _ in range(1, I)]
    if not stored:
        for l in range(1, I):
            out[l] = [np.arange(tops[l]) for _ in range(T)]
        return out
    M = np.stack(list(stored.values()))                        # [R, I, E]
    M = M / np.maximum(np.linalg.norm(M, axis=-1, keepdims=True), 1e-12)
    history = np.zeros((I, E))
    current_req = None
    for t in range(T):
        r = int(req_T[t])
        if r != current_req:
            history[:] = 0.0
            current_req = r
        hist_n = history / np.maximum(np.linalg.norm(history, axis=-1, keepdims=True), 1e-12)
        query = hist_n.copy()
        for l in range(1, I):
            query[l - 1, need[l - 1][t]] += 1.0
            sim = np.einsum("rle,le->r", M, query)  # the query's norm does not change the best match
            best = int(np.argmax(sim))
            row = M[best, l]
            out[l].append(np.lexsort((np.arange(E), -row))[:tops[l]])
        for l in range(I):
            history[l, need[l][t]] += 1.0
    return out


def predictions(experts_ITK: np.ndarray, num_experts: int, tops: list[int], prefetch: str, fit_tokens: int,
                req_T: np.ndarray | None = None) -> tuple[list[list[np.ndarray] | None], list[int]]:
    """Predicted experts of every (layer, token) by ``prefetch`` and each layer's lead in layers."""
    I, T, _ = experts_ITK.shape
    out: list = [None] * I
    leads = [0] * I
    if prefetch == "none" or I < 2:
        return out, leads
    need = _needed(experts_ITK)
    if prefetch == "trace_match":
        out = _trace_match(experts_ITK, num_experts, tops, fit_tokens,
                           req_T if req_T is not None else np.zeros(T, dtype=np.int64))
        return out, [0] + [1] * (I - 1)
    for l in range(1, I):
        src = 0 if prefetch == "path" else l - 1
        leads[l] = l - src
        table = _Table(num_experts)
        for t in range(fit_tokens):
            table.add(need[src][t], need[l][t])
        preds = []
        for t in range(T):
            preds.append(table.predict(need[src][t], tops[l]))
            if prefetch == "transition" and t >= fit_tokens:
                table.add(need[src][t], need[l][t])  # learned once this token is decoded
        out[l] = preds
    return out, leads


# ------------------------------------------------------------------------------------------------ simulate
def simulate(trace: Trace, budget: float = 0.25, policy: str = "lru", prefetch: str = "none", *,
             warmup: float = 0.2, decay: float = 0.95, bytes_per_expert: int | None = None, pin_tokens: int = 2,
             request_tokens: int = 64, cost_model=None, pool: str = "layer", _cache: dict | None = None) -> SimResult:
    """Simulate per-layer expert caches holding ``budget`` of each layer's experts while decoding ``trace``.

    ``policy`` in :data:`POLICIES`, ``prefetch`` in :data:`PREFETCHERS`; ``warmup`` the fraction of tokens
    (at the start) that warm the caches and fit the predictors and the adaptive allocation and are not counted;
    ``decay`` the LFU decay per token; ``pin_tokens`` how long ``lru_pinned`` keeps a prefetched expert pinned
    at most; ``request_tokens`` the request length ``trace_match`` assumes when the trace has no sequences;
    ``bytes_per_expert`` (default from the trace's model record, see :func:`expert_bytes`) turns loads into
    ``bytes_moved``; ``cost_model`` (a :class:`moekit.serve.cost.CostModel`) adds the simulated decode time
    (``result.cost``), with Fiddler's host compute of misses when it is cheaper than moving the expert.
    ``pool="shared"`` replaces the per-layer caches by one pool of the same total slots for all layers
    (:func:`moekit.serve.policies.run_shared`; not with ``shallow`` / ``adaptive``, which allocate per layer).
    ``_cache`` (a dict) lets repeated calls on one trace share the predictions.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if prefetch not in PREFETCHERS:
        raise ValueError(f"prefetch must be one of {', '.join(PREFETCHERS)}, got {prefetch!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if pin_tokens < 1:
        raise ValueError(f"pin_tokens must be >= 1, got {pin_tokens}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if pool == "shared" and policy in ("shallow", "adaptive"):
        raise ValueError(f"policy {policy} allocates slots per layer; a shared pool has one (use pool='layer')")
    cache = _cache if _cache is not None else {}
    slots = layer_slots(trace, budget, policy, warmup=warmup)
    experts_ITK = cache.get("experts")
    if experts_ITK is None:
        experts_ITK = cache["experts"] = trace.experts.numpy().astype(np.int64)
    I, T, _ = experts_ITK.shape
    start = int(warmup * T)
    tops = _layer_top_k(experts_ITK)
    key = ("pred", prefetch, start, request_tokens)
    if key not in cache:
        cache[key] = predictions(experts_ITK, trace.num_experts, tops, prefetch, start,
                                 requests_of(trace, request_tokens))
    preds, leads = cache[key]
    if "needed" not in cache:
        cache["needed"] = _needed(experts_ITK)
    bpe = bytes_per_expert if bytes_per_expert is not None else expert_bytes(trace)
    admit = [True] * I
    if cost_model is not None:
        admit = [not cost_model.host_wins(trace, bpe) for _ in range(I)]
    initial: list = [None] * I
    counts_IE = None
    if not all(admit):  # Fiddler: the most popular experts of the warm-up stay resident, misses run on the host
        fit = start or T
        counts_IE = np.stack([np.bincount(np.concatenate(cache["needed"][l][:fit]), minlength=trace.num_experts)
                              for l in range(I)])
        for l in range(I):
            initial[l] = np.lexsort((np.arange(trace.num_experts), -counts_IE[l]))[:slots[l]].tolist()
    if pool == "shared":
        shared_initial = None
        if counts_IE is not None:
            flat = np.lexsort((np.arange(counts_IE.size), -counts_IE.ravel()))[:sum(slots)]
            shared_initial = [(int(i) // trace.num_experts, int(i) % trace.num_experts) for i in flat]
        layers = run_shared(cache["needed"], preds, leads, sum(slots), policy, start, decay=decay,
                            pin_tokens=pin_tokens, experts_per_layer=trace.num_experts_per_layer,
                            admit_misses=admit[0], initial=shared_initial)
    else:
        layers = [run_cache(cache["needed"][l], preds[l], slots[l], policy, start, decay=decay, lead=leads[l],
                            pin_tokens=pin_tokens, admit_misses=admit[l],
                            num_experts=trace.num_experts_per_layer[l], initial=initial[l])
                  for l in range(I)]
    result = SimResult(policy=policy, prefetch=prefetch, budget=budget, layers=layers, measured_tokens=T - start,
                       bytes_per_expert=bpe,
                       options={"warmup": warmup, "decay": decay, "pin_tokens": pin_tokens,
                                "request_tokens": request_tokens, "pool": pool})
    if cost_model is not None:
        result.cost = cost_model.decode_time(result, trace, bpe)
    return result
