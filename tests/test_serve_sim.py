"""Expert-cache simulator and expert placement (moekit.serve): hand cases and brute-force references."""
import itertools
import json

import numpy as np
import pytest
from cache_reference import brute_min_misses

from moekit.cli import main
from moekit.serve import eplb, expert_loads, layer_slots, milp_placement, placement_stats, round_robin, simulate
from moekit.serve.place import slot_stats, transitions
from moekit.trace import save_trace
from moekit.trace.format import Trace
from moekit.trace.synthetic import synthetic_trace


def make_trace(experts_ITK, num_experts):
    experts_ITK = np.asarray(experts_ITK)
    weights = np.where(experts_ITK >= 0, 1.0, 0.0).astype(np.float32)
    return Trace(experts=experts_ITK, weights=weights, num_experts=num_experts,
                 layer_names=[f"l{i}" for i in range(experts_ITK.shape[0])])


# ------------------------------------------------------------------------------------------------ policies
def test_lru_and_lfu_hand_trace():
    a, b, c = 0, 1, 2
    tr = make_trace([[[a], [b], [a], [c], [b], [a]]], num_experts=4)  # budget 0.5 -> 2 slots
    lru = simulate(tr, 0.5, "lru", warmup=0.0)
    # a m, b m, a h, c m (evict b), b m (evict a), a m (evict c)
    assert (lru.hits, lru.misses) == (1, 5)
    lfu = simulate(tr, 0.5, "lfu", warmup=0.0, decay=1.0)
    # a m, b m, a h (a:2), c m evicts b (1), b m evicts c (1 < 2), a h
    assert (lfu.hits, lfu.misses) == (2, 4)
    bel = simulate(tr, 0.5, "belady", warmup=0.0)
    # a m, b m, a h, c m evicts a or b? next uses: b at 4, a at 5 -> evict a; b h; a m
    assert (bel.hits, bel.misses) == (2, 4)
    assert lru.layers[0].loads == 5 and lru.hit_rate == pytest.approx(1 / 6)


def test_lfu_decay_forgets_old_uses():
    # a a a b c a with 2 slots: without decay c evicts b (a's count 3 > 1) and a hits at the end; with decay
    # 0.1 per token a's count has faded below b's (1.11 * 0.01 < 0.1) so c evicts a and a misses
    last_a = make_trace([[[0], [0], [0], [1], [2], [0]]], num_experts=4)
    assert simulate(last_a, 0.5, "lfu", warmup=0.0, decay=1.0).hits == 3
    assert simulate(last_a, 0.5, "lfu", warmup=0.0, decay=0.1).hits == 2
    assert simulate(last_a, 0.5, "lru", warmup=0.0).hits == 2


@pytest.mark.parametrize("seed", range(6))
def test_belady_equals_brute_force_on_tiny_traces(seed):
    rng = np.random.default_rng(seed)
    E, K, T = 5, 2, 9
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])[None]
    tr = make_trace(experts, E)
    slots = layer_slots(tr, 0.6)[0]  # 3
    bel = simulate(tr, 0.6, "belady", warmup=0.0)
    assert bel.misses == brute_min_misses(experts[0].tolist(), slots)


def test_belady_bounds_online_policies_on_random_traces():
    for seed in range(4):
        tr = synthetic_trace(num_layers=2, num_tokens=400, num_experts=12, top_k=2, skew=1.0, coupling=1.0,
                             keep_logits=False, seed=seed)
        bel = simulate(tr, 0.25, "belady", warmup=0.0)
        for policy in ("lru", "lfu"):
            other = simulate(tr, 0.25, policy, warmup=0.0)
            for b, o in zip(bel.layers, other.layers):
                assert b.misses <= o.misses


def test_budget_and_shallow_allocation():
    tr = synthetic_trace(num_layers=5, num_tokens=50, num_experts=16, top_k=2, keep_logits=False)
    assert layer_slots(tr, 0.25) == [4] * 5
    shallow = layer_slots(tr, 0.25, "shallow")
    assert sum(shallow) == 20 and all(s >= 2 for s in shallow)
    assert shallow == sorted(shallow, reverse=True) and shallow[0] > shallow[-1]
    with pytest.raises(ValueError, match="top-k"):
        layer_slots(tr, 0.05)
    with pytest.raises(ValueError, match="budget"):
        simulate(tr, 1.5)


# ------------------------------------------------------------------------------------------------ prefetch
def test_cross_layer_prefetch_learns_a_deterministic_successor():
    rng = np.random.default_rng(0)
    E, T = 8, 300
    perm = rng.permutation(E)
    l0 = rng.integers(0, E, T)
    tr = make_trace(np.stack([l0, perm[l0]])[..., None], E)  # layer 1's expert is a function of layer 0's
    for prefetch in ("cross_layer", "transition"):
        r = simulate(tr, 0.25, "lru", prefetch, warmup=0.3)
        assert r.layers[1].precision == 1.0 and r.layers[1].recall == 1.0
        assert r.layers[1].hit_rate == 1.0 and r.layers[1].misses == 0
        assert r.layers[0].predicted == 0
    none = simulate(tr, 0.25, "lru", "none", warmup=0.3)
    assert none.layers[1].hit_rate < 0.5
    # every load is a miss or a prefetch; prefetches are counted as loads (bytes moved)
    r = simulate(tr, 0.25, "lru", "cross_layer", warmup=0.3, bytes_per_expert=10)
    assert r.bytes_moved == 10 * (r.misses + sum(s.prefetch_loads for s in r.layers))


def test_transition_is_online_and_cross_layer_is_fixed():
    E, T = 4, 100
    l0 = np.zeros(T, dtype=int)
    l1 = np.where(np.arange(T) < 20, 1, 2)  # the successor changes right after the fitting part
    tr = make_trace(np.stack([l0, l1])[..., None], E)
    fixed = simulate(tr, 0.25, "lru", "cross_layer", warmup=0.2)
    online = simulate(tr, 0.25, "lru", "transition", warmup=0.2)
    assert fixed.layers[1].predicted_used == 0
    # the online table predicts 2 once its count (one per decoded token) passes the 20 fitted 1s
    assert online.layers[1].predicted_used == 80 - 21


# ------------------------------------------------------------------------------------------------ placement
def brute_placement(loads, trans, G, w):
    I, E = loads.shape
    options = sorted(set(itertools.permutations(np.repeat(np.arange(G), E // G))))
    best = np.inf
    for combo in itertools.product(options, repeat=I):
        dev = np.array(combo)
        obj = sum(max(loads[l][dev[l] == g].sum() for g in range(G)) for l in range(I))
        obj += w * sum(trans[l, i, j] for l in range(I - 1) for i in range(E) for j in range(E)
                       if dev[l, i] != dev[l + 1, j])
        best = min(best, obj)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    loads = rng.integers(1, 20, (2, 4)).astype(float)
    trans = rng.integers(0, 6, (1, 4, 4)).astype(float)
    dev, info = milp_placement(loads, trans, 2, traffic_weight=0.7)
    assert info["optimal"]
    assert np.bincount(dev[0], minlength=2).tolist() == [2, 2]
    got = placement_stats(dev, loads, trans, 2, 0.7)["objective"]
    assert got == pytest.approx(brute_placement(loads, trans, 2, 0.7))
    assert got <= placement_stats(round_robin(2, 4, 2), loads, trans, 2, 0.7)["objective"] + 1e-9


def test_eplb_greedy_packing_by_hand():
    loads = np.array([[10.0, 6.0, 5.0, 3.0]])
    # no copies: 10 -> d0, 6 -> d1, 5 -> d1, 3 -> d0 (d1 is full) : loads 13, 11
    slots = eplb(loads, 2, 0)
    assert slots.tolist() == [[0, 3, 1, 2]]
    s = slot_stats(slots, loads, 2)
    assert s["max_device_load"] == 13 and s["balancedness"] == pytest.approx(12 / 13)
    # two copies: 10 -> 2 x 5, then 6 -> 2 x 3; copies 5,5,5,3,3,3 on 3 slots per device:
    # e0 5 d0, e0 5 d1, e2 5 d0 (tie -> d0), e1 3 d1 (8), e1 3 d1 (11, full), e3 3 d0 (13)
    slots = eplb(loads, 2, 2)
    assert slots.tolist() == [[0, 2, 3, 0, 1, 1]]
    assert slot_stats(slots, loads, 2)["max_device_load"] == 13


def test_loads_and_transitions_from_trace():
    tr = make_trace([[[0, 1], [2, -1]], [[3, 2], [0, 1]]], 4)
    assert expert_loads(tr).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    t = transitions(tr)[0]
    assert t.sum() == 4 + 2 and t[0, 3] == t[0, 2] == t[1, 3] == t[1, 2] == 1 and t[2, 0] == t[2, 1] == 1


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_simulate_and_place(tmp_path, capsys):
    tr = synthetic_trace(num_layers=3, num_tokens=600, num_experts=8, top_k=2, coupling=3.0, skew=1.0,
                         keep_logits=False)
    path = save_trace(tr, tmp_path / "t.safetensors")
    assert main(["simulate", str(path), "--budget", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by = {(r["policy"], r["prefetch"]): r for r in out["results"]}
    assert ("belady", "none") in by and ("belady", "cross_layer") not in by
    assert by[("belady", "none")]["hit_rate"] >= by[("lru", "none")]["hit_rate"]
    assert main(["simulate", str(path), "--budget", "0.1"]) == 2
    assert "top-k" in capsys.readouterr().err
    bad = tmp_path / "x.safetensors"
    bad.write_text("not a trace")
    assert main(["simulate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    out_file = tmp_path / "place.json"
    assert main(["place", str(path), "--devices", "2", "--replicas", "2", "--format", "sglang", "--out",
                 str(out_file), "--json", "--time-limit", "10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eplb"]["balancedness"] >= report["round_robin"]["balancedness"]
    assert report["milp"]["objective"] <= report["round_robin"]["objective"] + 1e-9
    m = json.loads(out_file.read_text())["physical_to_logical_map"]
    assert np.array(m).shape == (3, 10) and all(sorted(set(row)) == list(range(8)) for row in m)
    assert main(["place", str(path), "--devices", "3"]) == 2
