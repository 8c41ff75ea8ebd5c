"""Simulator policies and prefetchers added for issue 15: lru_pinned, least_stale, adaptive, trace_match, path
(hand cases, slow references and brute force)."""
import itertools

import numpy as np
import pytest
from cache_reference import brute_min_misses  # the brute-force reference of Belady's rule

from moekit.serve import layer_slots, simulate
from moekit.serve.policies import allocate_dp, lru_hit_curve, run_cache
from moekit.trace.format import Trace
from moekit.trace.synthetic import synthetic_trace


def make_trace(experts_ITK, num_experts, seq_ids=None):
    experts_ITK = np.asarray(experts_ITK)
    weights = np.where(experts_ITK >= 0, 1.0, 0.0).astype(np.float32)
    return Trace(experts=experts_ITK, weights=weights, num_experts=num_experts, seq_ids=seq_ids,
                 layer_names=[f"l{i}" for i in range(experts_ITK.shape[0])])


def rows(*xs):
    return [np.array(x, dtype=np.int64) for x in xs]


# ------------------------------------------------------------------------------------------------ lru_pinned
def test_lru_pinned_keeps_a_prefetched_expert_until_used():
    x, b, c = 0, 1, 2
    need = rows([b], [c], [x])
    pred = rows([x], [], [])
    # t0: x prefetched (stamp 1), b missed (stamp 2); t1: c misses and must evict one of {x, b}:
    # lru evicts x (older), lru_pinned keeps x (pinned for 2 tokens) and evicts b; t2: x hits only when pinned
    lru = run_cache(need, pred, 2, "lru", 0)
    pinned = run_cache(need, pred, 2, "lru_pinned", 0, pin_tokens=2)
    assert (lru.hits, lru.misses) == (0, 3)
    assert (pinned.hits, pinned.misses) == (1, 2)
    # a one-token pin has expired by t1: the same as lru
    short = run_cache(need, pred, 2, "lru_pinned", 0, pin_tokens=1)
    assert (short.hits, short.misses) == (0, 3)


def test_lru_pinned_without_prefetch_is_lru():
    tr = synthetic_trace(num_layers=2, num_tokens=300, num_experts=8, top_k=2, keep_logits=False, seed=3)
    a = simulate(tr, 0.5, "lru", warmup=0.0)
    b = simulate(tr, 0.5, "lru_pinned", warmup=0.0)
    assert [s.hits for s in a.layers] == [s.hits for s in b.layers]


# ------------------------------------------------------------------------------------------------ least_stale
def ref_least_stale(seq, slots, num_experts):
    """Slow reference: every eviction recomputes each expert's expected gap from its full use history."""
    k = max(len(s) for s in seq)
    gap0 = num_experts / k
    uses: dict[int, list[int]] = {}
    resident: list[int] = []
    stamp: dict[int, int] = {}
    clock = hits = 0

    def gap(e):
        g = gap0
        u = uses.get(e, [])
        for a, b in zip(u, u[1:]):
            g = 0.75 * g + 0.25 * max(b - a, 1)
        return g

    for t, need in enumerate(seq):
        for e in need:
            if e in resident:
                hits += 1
            else:
                if len(resident) >= slots:
                    cand = [r for r in resident if r not in need]
                    victim = max(cand, key=lambda r: ((t - uses[r][-1]) / gap(r), -stamp[r]))
                    resident.remove(victim)
                resident.append(e)
        for e in need:
            clock += 1
            stamp[e] = clock
            uses.setdefault(e, []).append(t)
    return hits


def test_least_stale_evicts_the_overdue_frequent_expert_not_the_old_rare_one():
    # a used once at t0 (expected gap E/k = 64); b used at t1..t8 (expected gap shrinks towards 1); idle;
    # at t12 x misses: a is older (LRU victim) but b is overdue relative to its reuse (4 / 9.4 > 12 / 64)
    seq = [[0]] + [[1]] * 8 + [[], [], []] + [[2], [0]]
    need = [np.array(s, dtype=np.int64) for s in seq]
    lru = run_cache(need, None, 2, "lru", 0)
    stale = run_cache(need, None, 2, "least_stale", 0, num_experts=64)
    assert lru.hits == 7 and stale.hits == 8  # b's 7 hits, plus a's at t13 under least_stale
    assert stale.hits == ref_least_stale(seq, 2, 64)


@pytest.mark.parametrize("seed", range(4))
def test_least_stale_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    E, K, T = 8, 2, 120
    probs = rng.dirichlet(np.ones(E) * 0.5)
    seq = [sorted(rng.choice(E, K, replace=False, p=probs).tolist()) for _ in range(T)]
    got = run_cache([np.array(s) for s in seq], None, 3, "least_stale", 0, num_experts=E)
    assert got.hits == ref_least_stale(seq, 3, E)


# ------------------------------------------------------------------------------------------------ adaptive
@pytest.mark.parametrize("seed", range(3))
def test_lru_hit_curve_equals_lru_at_every_size(seed):
    rng = np.random.default_rng(seed)
    E, K, T = 7, 2, 80
    need = [rng.choice(E, K, replace=False) for _ in range(T)]
    curve = lru_hit_curve(need, E)
    for s in range(K, E + 1):
        assert curve[s] == run_cache(need, None, s, "lru", 0).hits


@pytest.mark.parametrize("seed", range(4))
def test_allocate_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    I, E = 3, 6
    curves = [np.concatenate([[0], np.cumsum(rng.integers(0, 10, E))]) for _ in range(I)]  # any shape
    lows, highs, total = [1, 2, 1], [E, E, 5], 9
    got = allocate_dp(curves, total, lows, highs)
    assert sum(got) == total and all(lo <= g <= hi for g, lo, hi in zip(got, lows, highs))
    best = max(sum(c[s] for c, s in zip(curves, alloc))
               for alloc in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(lows, highs)))
               if sum(alloc) == total)
    assert sum(c[s] for c, s in zip(curves, got)) == best
    with pytest.raises(ValueError):
        allocate_dp(curves, 100, lows, highs)


def test_adaptive_moves_slots_to_the_layer_that_needs_them():
    rng = np.random.default_rng(0)
    T, E = 400, 8
    l0 = rng.integers(0, 2, T)        # layer 0 uses 2 experts: 2 slots suffice
    l1 = rng.integers(0, E, T)        # layer 1 is uniform over 8: every slot helps
    tr = make_trace(np.stack([l0, l1])[..., None], E)
    slots = layer_slots(tr, 0.5, "adaptive", warmup=0.5)
    assert sum(slots) == 8 and slots[0] == 2 and slots[1] == 6
    ada = simulate(tr, 0.5, "adaptive", warmup=0.5)
    lru = simulate(tr, 0.5, "lru", warmup=0.5)
    assert ada.hits > lru.hits


# ------------------------------------------------------------------------------------------------ prefetchers
def test_trace_match_uses_the_request_history():
    # layer 0 is always expert 0; layer 1 is 1 for requests of type A and 2 for type B (chosen at random).
    # A transition table from layer 0 cannot tell them apart; the request's activation matrix can.
    rng = np.random.default_rng(0)
    R, n = 40, 10
    types = rng.integers(0, 2, R)
    l0 = np.zeros(R * n, dtype=int)
    l1 = np.repeat(1 + types, n)
    tr = make_trace(np.stack([l0, l1])[..., None], 4, seq_ids=np.repeat(np.arange(R), n))
    match = simulate(tr, 0.25, "lru", "trace_match", warmup=0.3)
    table = simulate(tr, 0.25, "lru", "cross_layer", warmup=0.3)
    # every token but the first of each request is predicted right
    measured_requests = R - int(0.3 * R * n) // n
    assert match.layers[1].predicted_used >= match.layers[1].predicted - measured_requests
    assert match.layers[1].precision > 0.85 > 0.65 > table.layers[1].precision
    assert match.layers[1].lead_time == 1.0


def test_path_predicts_all_layers_from_the_first_with_lead_l():
    rng = np.random.default_rng(1)
    E, T, I = 8, 400, 4
    perms = [rng.permutation(E) for _ in range(I)]
    l0 = rng.integers(0, E, T)
    experts = np.stack([perms[l][l0] if l else l0 for l in range(I)])[..., None]
    tr = make_trace(experts, E)
    r = simulate(tr, 0.25, "lru", "path", warmup=0.3)
    for l in range(1, I):
        s = r.layers[l]
        assert s.precision == 1.0 and s.recall == 1.0 and s.lead_time == l and s.misses == 0
    assert r.layers[0].predicted == 0
    assert r.lead_time == pytest.approx(2.0)  # mean of 1, 2, 3 over equal counts
    cross = simulate(tr, 0.25, "lru", "cross_layer", warmup=0.3)
    assert all(s.lead_time == 1.0 for s in cross.layers[1:])
    d = r.to_dict()
    assert d["lead_time"] == pytest.approx(2.0) and d["layers"][3]["lead_time"] == 3.0


# ------------------------------------------------------------------------------------------------ shared pool
def ref_shared(trace, preds, leads, slots, pinned_policy, start, pin_tokens=1):
    """Slow reference of one shared LRU pool in decode order (token, layer), with prefetches issued before
    step (t, l - lead + 1); recency as a list (least recent first)."""
    ex = trace.experts.numpy()
    I, T = ex.shape[0], ex.shape[1]
    need = [[[int(e) for e in ex[l, t] if e >= 0] for t in range(T)] for l in range(I)]
    res, pin, hits = [], {}, [0] * I

    def evict(protect, g):
        cands = [x for x in res if x not in protect]
        if pinned_policy:
            cands = [x for x in cands if pin.get(x, -1) < g] or cands
        if not cands:
            return False
        res.remove(cands[0])
        pin.pop(cands[0], None)
        return True

    for t in range(T):
        for l in range(I):
            g = t * I + l
            batch = [(j, (j, int(e))) for j in range(I) if preds[j] is not None and max(j - leads[j] + 1, 0) == l
                     for e in preds[j][t]]
            keys = [(l, e) for e in need[l][t]]
            protect = set(keys) | {k for _, k in batch}
            for j, k in batch:
                if pinned_policy:
                    pin[k] = t * I + j + (pin_tokens - 1) * I
                if k in res or (len(res) >= slots and not evict(protect, g)):
                    continue
                res.append(k)
            for k in keys:
                if k in res:
                    hits[l] += t >= start
                elif len(res) < slots or evict(set(keys), g):
                    res.append(k)
            for k in keys:
                if k in res:
                    res.remove(k)
                    res.append(k)
                pin.pop(k, None)
    return hits


def test_shared_pool_lru_and_belady_against_references():
    tr = synthetic_trace(num_layers=3, num_tokens=200, num_experts=6, top_k=2, coupling=2.0, keep_logits=False,
                         seed=1)
    r = simulate(tr, 0.5, "lru", pool="shared", warmup=0.0)
    assert [s.hits for s in r.layers] == ref_shared(tr, [None] * 3, [0] * 3, 9, False, 0)
    small = synthetic_trace(num_layers=2, num_tokens=6, num_experts=4, top_k=2, keep_logits=False, seed=2)
    bel = simulate(small, 0.5, "belady", pool="shared", warmup=0.0)  # a pool of 4 over 2 layers x 4 experts
    ex = small.experts.numpy()
    seq = [[l * 4 + int(e) for e in ex[l, t]] for t in range(6) for l in range(2)]
    assert bel.misses == brute_min_misses(seq, 4)
    with pytest.raises(ValueError, match="per layer"):
        simulate(small, 0.5, "shallow", pool="shared")


def test_shared_pool_pins_path_prefetches_until_used():
    from moekit.serve.simulate import _layer_top_k, predictions

    found = False
    for seed in range(6):
        tr = synthetic_trace(num_layers=4, num_tokens=160, num_experts=8, top_k=2, coupling=3.0, keep_logits=False,
                             seed=seed)
        ex = tr.experts.numpy().astype(np.int64)
        start = int(0.25 * tr.num_tokens)
        preds, leads = predictions(ex, 8, _layer_top_k(ex), "path", start)
        for policy, pinned in (("lru", False), ("lru_pinned", True)):
            r = simulate(tr, 0.25, policy, "path", pool="shared", warmup=0.25, pin_tokens=1)
            assert [s.hits for s in r.layers] == ref_shared(tr, preds, leads, 8, pinned, start)
        lru = simulate(tr, 0.25, "lru", "path", pool="shared", warmup=0.25, pin_tokens=1)
        pin = simulate(tr, 0.25, "lru_pinned", "path", pool="shared", warmup=0.25, pin_tokens=1)
        found |= pin.hits != lru.hits
    assert found  # pinning changes what a shared pool keeps


@pytest.mark.parametrize("policy", ["lru", "lfu", "lru_pinned", "least_stale", "belady"])
def test_shared_pool_of_one_layer_is_the_layer_cache(policy):
    tr = synthetic_trace(num_layers=1, num_tokens=300, num_experts=8, top_k=2, skew=1.0, keep_logits=False, seed=4)
    a = simulate(tr, 0.375, policy, warmup=0.2)
    b = simulate(tr, 0.375, policy, warmup=0.2, pool="shared")
    assert (a.hits, a.misses) == (b.hits, b.misses)
