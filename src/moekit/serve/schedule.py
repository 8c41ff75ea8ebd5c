"""Token scheduling (ExpertFlow, "ExpertFlow: Optimized Expert Activation and Token Allocation for Efficient
Mixture-of-Experts Inference", arXiv 2410.17954): regroup the requests of a decode batch into micro-batches
whose tokens activate fewer distinct experts, so fewer experts must be resident (or loaded) per micro-batch.

Taken from ExpertFlow: the regrouping works on the *predicted* routing paths of the batch's tokens (before
the pass), and its measure is the number of distinct experts a micro-batch activates, summed over layers.
The grouping itself here is a greedy clustering followed by pairwise-swap local search:

* greedy: seed a micro-batch with the unassigned request that activates the most experts, then add the
  request that adds the fewest new experts (summed over layers) until it holds ``micro`` requests;
* local search: swap two requests of different micro-batches while that lowers the total; started from the
  greedy grouping and from the arrival order, the better result is kept, so it is never worse than arrival
  order on the routing it is given.

:func:`exact_groups` enumerates every grouping (tiny batches only; the tests' reference).
:func:`schedule_trace` measures the reduction on a trace: the trace's requests (sequences) after the warm-up
form batches of ``batch`` requests decoding in lockstep; at every position the batch is split into micro-batches
of ``micro`` requests in arrival order or by the scheduler, on the ``path`` prediction (layer 0's experts plus
layers 1.. predicted from them with tables fitted on the warm-up tokens) or on the true routing (an oracle).
The distinct experts are always counted on the true routing.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..trace.format import Trace

__all__ = ["group_cost", "arrival_groups", "greedy_groups", "exact_groups", "schedule_trace"]

Sets = list[list[frozenset]]  # [request][layer] -> experts


def group_cost(sets: Sets, groups: list[list[int]]) -> int:
    """Distinct experts activated, summed over micro-batches and layers."""
    if not groups:
        return 0
    layers = len(sets[groups[0][0]]) if groups[0] else 0
    return sum(len(frozenset().union(*(sets[b][l] for b in g))) for g in groups if g for l in range(layers))


def arrival_groups(n: int, micro: int) -> list[list[int]]:
    return [list(range(i, min(i + micro, n))) for i in range(0, n, micro)]


def _local_search(sets: Sets, groups: list[list[int]], max_rounds: int = 20) -> list[list[int]]:
    groups = [list(g) for g in groups]
    cost = group_cost(sets, groups)
    for _ in range(max_rounds):
        improved = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            base = group_cost(sets, [groups[a], groups[b]])
            best, best_swap = 0, None
            for i, j in itertools.product(range(len(groups[a])), range(len(groups[b]))):
                ga, gb = list(groups[a]), list(groups[b])
                ga[i], gb[j] = gb[j], ga[i]
                gain = base - group_cost(sets, [ga, gb])
                if gain > best:
                    best, best_swap = gain, (i, j)
            if best_swap is not None:
                i, j = best_swap
                groups[a][i], groups[b][j] = groups[b][j], groups[a][i]
                cost -= best
                improved = True
        if not improved:
            break
    return groups


def greedy_groups(sets: Sets, micro: int) -> list[list[int]]:
    """Micro-batches of ``micro`` requests (the last may be smaller) with few distinct experts."""
    n = len(sets)
    if micro < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {micro}")
    sizes = [len(g) for g in arrival_groups(n, micro)]
    remaining = list(range(n))
    groups = []
    for size in sizes:
        seed = max(remaining, key=lambda r: (sum(len(s) for s in sets[r]), -r))
        remaining.remove(seed)
        g, union = [seed], [set(s) for s in sets[seed]]
        while len(g) < size:
            r = min(remaining, key=lambda c: (sum(len(s - u) for s, u in zip(sets[c], union)), c))
            remaining.remove(r)
            g.append(r)
            for u, s in zip(union, sets[r]):
                u |= s
        groups.append(g)
    candidates = [_local_search(sets, groups), _local_search(sets, arrival_groups(n, micro))]
    return min(candidates, key=lambda gs: group_cost(sets, gs))


def exact_groups(sets: Sets, micro: int) -> list[list[int]]:
    """The best grouping by enumeration (every partition into the arrival order's group sizes)."""
    n = len(sets)
    sizes = sorted((len(g) for g in arrival_groups(n, micro)), reverse=True)
    best: tuple[int, list] = (1 << 60, [])

    def rec(rest: list[int], sizes_left: list[int], acc: list[list[int]]):
        nonlocal best
        if not rest:
            c = group_cost(sets, acc)
            if c < best[0]:
                best = (c, [list(g) for g in acc])
            return
        first, others = rest[0], rest[1:]
        for size in sorted(set(sizes_left)):
            left = list(sizes_left)
            left.remove(size)
            for comp in itertools.combinations(others, size - 1):
                g = [first, *comp]
                rec([r for r in others if r not in comp], left, acc + [g])

    rec(list(range(n)), sizes, [])
    return best[1]


def schedule_trace(trace: Trace, batch: int = 16, micro: int = 4, *, warmup: float = 0.2,
                   max_steps: int | None = None, progress: bool = False) -> dict:
    """Distinct experts per decode step on ``trace``: arrival order vs the scheduler on predicted and on true
    routing (see the module docstring). ``ValueError`` when the trace has too few requests."""
    from .simulate import _layer_top_k, _needed, predictions, requests_of

    if batch < 2 or micro < 1 or micro >= batch:
        raise ValueError(f"need batch >= 2 and 1 <= micro-batch < batch, got batch {batch}, micro-batch {micro}")
    experts_ITK = trace.experts.numpy().astype(np.int64)
    I, T, _ = experts_ITK.shape
    start = int(warmup * T)
    req_T = requests_of(trace)
    need = _needed(experts_ITK)
    preds, _ = predictions(experts_ITK, trace.num_experts, _layer_top_k(experts_ITK), "path", start, req_T)
    order, tokens_of = [], {}
    for t in range(T):
        r = int(req_T[t])
        if r not in tokens_of:
            order.append(r)
            tokens_of[r] = []
        tokens_of[r].append(t)
    evaluated = [r for r in order if tokens_of[r][0] >= start]
    if len(evaluated) < batch:
        raise ValueError(f"the trace has {len(evaluated)} requests after the warm-up, fewer than a batch of {batch}")
    from tqdm import tqdm

    totals = {"arrival": 0, "predicted": 0, "oracle": 0}
    steps = 0
    plan = [(evaluated[b0:b0 + batch], p) for b0 in range(0, len(evaluated) - batch + 1, batch)
            for p in range(min(len(tokens_of[r]) for r in evaluated[b0:b0 + batch]))]
    if max_steps is not None:
        plan = plan[:max_steps]
    for reqs, p in tqdm(plan, desc="schedule", disable=not progress):
        toks = [tokens_of[r][p] for r in reqs]
        true = [[frozenset(need[l][t].tolist()) for l in range(I)] for t in toks]
        pred = [[frozenset(need[0][t].tolist())] + [frozenset(preds[l][t].tolist()) for l in range(1, I)]
                for t in toks]
        totals["arrival"] += group_cost(true, arrival_groups(batch, micro))
        totals["predicted"] += group_cost(true, greedy_groups(pred, micro))
        totals["oracle"] += group_cost(true, greedy_groups(true, micro))
        steps += 1
    a = totals["arrival"]
    return {"batch": batch, "micro_batch": micro, "steps": steps, "layers": I,
            "distinct_experts": totals,
            "per_step": {k: v / steps if steps else float("nan") for k, v in totals.items()},
            "reduction_predicted": 1 - totals["predicted"] / a if a else 0.0,
            "reduction_oracle": 1 - totals["oracle"] / a if a else 0.0}
