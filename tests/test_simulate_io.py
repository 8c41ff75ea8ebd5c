"""Trace importers (SGLang per_token dump, vLLM routed_experts), the model check, the cost model with
Fiddler's host compute, and token scheduling (hand cases and brute force)."""
import itertools
import json

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.serve import simulate
from moekit.serve.cost import CostModel, load_cost_model
from moekit.serve.importers import check_model, load_sglang, load_vllm
from moekit.serve.schedule import arrival_groups, exact_groups, greedy_groups, group_cost, schedule_trace
from moekit.trace import save_trace
from moekit.trace.format import Trace
from moekit.trace.synthetic import synthetic_trace


def make_trace(experts_ITK, num_experts, model=None, seq_ids=None):
    experts_ITK = np.asarray(experts_ITK)
    weights = np.where(experts_ITK >= 0, 1.0, 0.0).astype(np.float32)
    return Trace(experts=experts_ITK, weights=weights, num_experts=num_experts, model=model or {},
                 seq_ids=seq_ids, layer_names=[f"l{i}" for i in range(experts_ITK.shape[0])])


# ------------------------------------------------------------------------------------------------ SGLang
def sglang_dump(path):
    """A file in the layout of sglang's _DetailAccumulator.dump: 3 layers (layer 0 dense, never routed),
    4 logical experts on 6 physical slots (experts 0 and 2 replicated), top-k buffer 8 wide, -1 padded."""
    p2l = torch.tensor([[0, 1, 2, 3, 0, 2]] * 3)

    def ids(rows_by_layer):
        out = torch.full((3, len(rows_by_layer[1]), 8), -1, dtype=torch.int32)
        for l in (1, 2):
            for t, r in enumerate(rows_by_layer[l]):
                out[l, t, :len(r)] = torch.tensor(r)
        return out

    pass0 = {"forward_pass_id": 0, "rank": 0, "gatherer_key": "primary", "input_ids": [11, 12],
             "positions": [0, 1], "extend_seq_lens": [2], "forward_mode": 1,
             "topk_ids_of_layer": ids({1: [[4, 1], [3, 5]], 2: [[2, 1], [0, 3]]}), "misc_objects": [],
             "global_physical_count": torch.zeros(3, 6, dtype=torch.int32)}
    pass1 = {"forward_pass_id": 1, "rank": 0, "gatherer_key": "primary", "input_ids": [13], "positions": [2],
             "extend_seq_lens": None, "forward_mode": 2,
             "topk_ids_of_layer": ids({1: [[5, 0]], 2: [[1, 3]]}), "misc_objects": [],
             "global_physical_count": torch.zeros(3, 6, dtype=torch.int32)}
    torch.save({"records": [pass1, pass0], "last_physical_to_logical_map": p2l}, path)  # passes out of order


def test_sglang_per_token_dump(tmp_path):
    path = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    sglang_dump(path)
    with pytest.raises(ValueError, match="--allow-pickle"):  # a pickle is never read unless asked
        load_sglang(path)
    tr = load_sglang(path, allow_pickle=True)
    assert tr.num_layers == 2 and tr.num_experts == 4 and tr.num_tokens == 3 and tr.top_k == 2
    # physical -> logical: 4->0, 1->1 | 3->3, 5->2 | 5->2, 0->0 ; layer 2: 2->2, 1->1 | 0, 3 | 1, 3 (sorted ids)
    assert tr.experts[0].tolist() == [[0, 1], [2, 3], [0, 2]]
    assert tr.experts[1].tolist() == [[1, 2], [0, 3], [1, 3]]
    assert tr.tokens.tolist() == [11, 12, 13] and tr.positions.tolist() == [0, 1, 2]
    bad = tmp_path / "x.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(ValueError, match="per_token"):
        load_sglang(bad, allow_pickle=True)


# ------------------------------------------------------------------------------------------------ vLLM
def test_vllm_routed_experts_npz_npy_jsonl(tmp_path):
    rng = np.random.default_rng(0)
    a = np.stack([rng.choice(8, 2, replace=False) for _ in range(15)]).reshape(5, 3, 2)  # [seq, layers, k]
    b = np.stack([rng.choice(8, 2, replace=False) for _ in range(12)]).reshape(4, 3, 2)
    np.savez(tmp_path / "r.npz", req0=a, req1=b)
    tr = load_vllm(tmp_path / "r.npz", num_experts=8)
    assert (tr.num_layers, tr.num_tokens, tr.num_experts) == (3, 9, 8)
    assert tr.seq_ids.tolist() == [0] * 5 + [1] * 4 and tr.positions.tolist() == list(range(5)) + list(range(4))
    assert tr.experts[2, 6].tolist() == sorted(b[1, 2].tolist())
    np.save(tmp_path / "one.npy", a)
    assert load_vllm(tmp_path / "one.npy").num_tokens == 5
    with open(tmp_path / "r.jsonl", "w") as f:
        f.write(json.dumps({"request_id": "x", "routed_experts": a.tolist(), "token_ids": [1, 2, 3]}) + "\n")
        f.write(json.dumps({"request_id": "y", "routed_experts": b.tolist()}) + "\n")
    tr = load_vllm(tmp_path / "r.jsonl", num_experts=8)
    assert tr.num_tokens == 9 and tr.experts[0, 0].tolist() == sorted(a[0, 0].tolist())
    # a saved OpenAI-server response: prompt routing at the response level, generated routing per choice
    resp = {"id": "cmpl-1", "prompt_routed_experts": a[:3].tolist(),
            "choices": [{"index": 0, "text": "x", "routed_experts": a[3:].tolist()},
                        {"index": 1, "text": "y", "routed_experts": b[:2].tolist()}]}
    (tmp_path / "resp.json").write_text(json.dumps(resp))
    tr = load_vllm(tmp_path / "resp.json", num_experts=8)
    assert tr.num_tokens == 5 + 5 and tr.seq_ids.tolist() == [0] * 5 + [1] * 5
    assert tr.experts[1, 4].tolist() == sorted(a[4, 1].tolist())
    assert tr.experts[0, 8].tolist() == sorted(b[0, 0].tolist())
    np.save(tmp_path / "flat.npy", a[:, 0])
    with pytest.raises(ValueError, match="seq_len, layer_num, topk"):
        load_vllm(tmp_path / "flat.npy")


def test_trace_from_another_model_is_refused(tmp_path, capsys):
    tr = synthetic_trace(num_layers=3, num_tokens=200, num_experts=8, top_k=2, keep_logits=False)
    check_model(tr, 3, 8)
    with pytest.raises(ValueError, match="another model"):
        check_model(tr, 4, 8)
    path = save_trace(tr, tmp_path / "t.safetensors")
    assert main(["simulate", str(path), "--experts", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "8 experts (not 16)" in err
    # a run folder states the model: 4 MoE layers x 16 experts
    from moekit.model.config import ModelConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"format": "moekit-run", "version": 1,
                                                 "model": ModelConfig().to_dict()}))
    assert main(["simulate", str(path), "--run", str(run)]) == 2
    assert "3 MoE layers (not 4)" in capsys.readouterr().err


def test_cli_imports_sglang_and_vllm(tmp_path, capsys):
    path = tmp_path / "dump.pt"
    sglang_dump(path)
    assert main(["simulate", str(path), "--budget", "0.5", "--policies", "lru", "--prefetch", "none"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["simulate", str(path), "--allow-pickle", "--budget", "0.5", "--policies", "lru", "--prefetch",
                 "none", "--warmup", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["hits"] + out["results"][0]["misses"] == 12
    rng = np.random.default_rng(1)
    np.save(tmp_path / "r.npy", np.stack([rng.choice(8, 2, replace=False) for _ in range(60)]).reshape(30, 2, 2))
    assert main(["simulate", str(tmp_path / "r.npy"), "--format", "vllm", "--num-experts", "8", "--layers", "2",
                 "--policies", "lru,belady", "--prefetch", "none,path"]) == 0
    assert "belady" in capsys.readouterr().out
    assert main(["simulate", str(tmp_path / "r.npy"), "--format", "vllm", "--layers", "3"]) == 2
    assert "another model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ cost model
def test_cost_model_fiddler_choice_by_hand():
    # one layer, 4 experts, 2 slots, warm-up = first 4 tokens; an expert is 1 MB
    tr = make_trace([[[0], [0], [1], [2], [0], [3], [1], [2]]], 4, model={"dim": 4, "hidden_dim": 8})
    cm = CostModel(link_gbps=1.0, link_latency_us=0.0, fast_tflops=1e6, fast_mem_gbps=1000.0, host_tflops=1e6,
                   host_mem_gbps=2.0, dense_ms=0.0)
    t = cm.times(tr, 1_000_000)
    assert t["fast"] == pytest.approx(1e-6) and t["move"] == pytest.approx(1e-3 + 1e-6)
    assert t["host"] == pytest.approx(0.5e-3 + 2 * 8 / 1e9)
    # the two options, enumerated: the host is cheaper per miss, so Fiddler computes misses there
    options = {"move": t["move"], "host": t["host"]}
    assert cm.host_wins(tr, 1_000_000) and min(options, key=options.get) == "host"
    r = simulate(tr, 0.5, "lru", warmup=0.5, bytes_per_expert=1_000_000, cost_model=cm)
    # resident = the 2 most popular warm-up experts {0 (2 uses), 1 (tie with 2, lower id)}, never changed:
    # measured 0 hit, 3 miss (host), 1 hit, 2 miss (host)
    assert (r.hits, r.misses) == (2, 2)
    assert r.cost["miss_choice"] == "host" and r.loads == 0  # nothing moved: misses run on the host
    assert r.cost["ms_per_token"] == pytest.approx((2 * t["fast"] + 2 * t["host"]) / 4 * 1e3)
    assert r.cost["resident_ms_per_token"] == pytest.approx(t["fast"] * 1e3)
    # without host compute every miss is moved and loaded (LRU): the warm-up leaves {1, 2}; then 0 misses
    # (evicts 1), 3 misses (evicts 2), 1 misses (evicts 0), 2 misses: 4 moves
    no_host = CostModel(**{**cm.to_dict(), "host_tflops": 0.0})
    r2 = simulate(tr, 0.5, "lru", warmup=0.5, bytes_per_expert=1_000_000, cost_model=no_host)
    assert r2.cost["miss_choice"] == "move" and (r2.hits, r2.misses) == (0, 4) and r2.loads == 4
    assert r2.cost["ms_per_token"] == pytest.approx(t["move"] * 1e3)


def test_cost_model_prefetch_stall_and_files(tmp_path):
    # two layers, layer 1 = layer 0 + 1: cross_layer prefetches exactly; the load (1 ms) overlaps one layer of
    # compute (dense 0.4 ms + one fast expert), the rest stalls
    l0 = np.array([0, 1, 2, 3] * 10)
    tr = make_trace(np.stack([l0, (l0 + 1) % 4])[..., None], 4, model={"dim": 4, "hidden_dim": 8})
    cm = CostModel(link_gbps=1.0, link_latency_us=0.0, fast_tflops=1e6, fast_mem_gbps=1e6, host_tflops=0.0,
                   dense_ms=0.4)
    r = simulate(tr, 0.25, "lru", "cross_layer", warmup=0.5, bytes_per_expert=1_000_000, cost_model=cm)
    s1 = r.layers[1]
    assert s1.misses == 0 and s1.prefetch_loads == r.measured_tokens
    fast = 1e6 / 1e15
    stall = 1e-3 - (0.4e-3 + fast)
    assert r.cost["stall_ms_per_token"] == pytest.approx(stall * 1e3)
    expected = (2 * 0.4e-3 + s1.hits * fast / r.measured_tokens + stall
                + r.layers[0].misses * (1e-3 + fast) / r.measured_tokens + r.layers[0].hits * fast / r.measured_tokens)
    assert r.cost["ms_per_token"] == pytest.approx(expected * 1e3)
    (tmp_path / "m.toml").write_text("link_gbps = 12.5\nhost_tflops = 0.0\n")
    assert load_cost_model(str(tmp_path / "m.toml")).link_gbps == 12.5
    (tmp_path / "m.json").write_text(json.dumps({"link_gbps": 3, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        load_cost_model(str(tmp_path / "m.json"))
    with pytest.raises(ValueError, match="preset"):
        load_cost_model(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="link_gbps"):
        CostModel(link_gbps=0)


def test_cli_cost_model(tmp_path, capsys):
    tr = synthetic_trace(num_layers=2, num_tokens=300, num_experts=8, top_k=2, keep_logits=False)
    path = save_trace(tr, tmp_path / "t.safetensors")
    (tmp_path / "cm.json").write_text(json.dumps({"expert_flops": 6e6, "host_tflops": 0.0}))
    assert main(["simulate", str(path), "--policies", "lru", "--prefetch", "none,cross_layer", "--cost-model",
                 str(tmp_path / "cm.json"), "--expert-bytes", "1000000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(r["cost"]["ms_per_token"] >= r["cost"]["resident_ms_per_token"] for r in out["results"])
    assert out["cost_model"]["expert_flops"] == 6e6
    assert main(["simulate", str(path), "--cost-model", str(tmp_path / "cm.json")]) == 2  # bytes unknown
    assert "--expert-bytes" in capsys.readouterr().err
    assert main(["simulate", str(path), "--cost-model", "gpu-pcie", "--expert-bytes", "10"]) == 2  # FLOPs unknown
    assert "expert_flops" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ scheduling
def brute_best(sets, micro):
    """Best grouping by trying every order of the requests cut into arrival-size groups."""
    n = len(sets)
    return min(group_cost(sets, [list(p[i:i + micro]) for i in range(0, n, micro)])
               for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("seed", range(3))
def test_schedule_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, micro, I, E = 6, 2 + seed % 2, 2, 6
    sets = [[frozenset(rng.choice(E, 2, replace=False).tolist()) for _ in range(I)] for _ in range(n)]
    best = brute_best(sets, micro)
    assert group_cost(sets, exact_groups(sets, micro)) == best
    greedy = group_cost(sets, greedy_groups(sets, micro))
    assert best <= greedy <= group_cost(sets, arrival_groups(n, micro))


def test_schedule_finds_the_clusters():
    # requests alternate between two expert clusters; arrival order mixes them, the scheduler separates them
    a = [frozenset({0, 1}), frozenset({4, 5})]
    b = [frozenset({2, 3}), frozenset({6, 7})]
    sets = [a, b, a, b, a, b, a, b]
    g = greedy_groups(sets, 4)
    assert group_cost(sets, g) == 8 == group_cost(sets, exact_groups(sets, 4))
    assert group_cost(sets, arrival_groups(8, 4)) == 16
    assert sorted(sorted(x) for x in g) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_schedule_trace_and_cli(tmp_path, capsys):
    # 20 requests of 2 kinds (each kind its own experts at both layers) in random order
    rng = np.random.default_rng(0)
    R, n = 20, 6
    kinds = rng.integers(0, 2, R)
    l0 = np.concatenate([rng.choice([0, 1] if k == 0 else [2, 3], n) for k in kinds])
    l1 = l0 + 4
    tr = make_trace(np.stack([l0, l1])[..., None], 8, seq_ids=np.repeat(np.arange(R), n))
    rep = schedule_trace(tr, batch=8, micro=4, warmup=0.2)
    assert rep["steps"] == 2 * n and rep["distinct_experts"]["oracle"] <= rep["distinct_experts"]["arrival"]
    assert rep["reduction_predicted"] > 0.1
    path = save_trace(tr, tmp_path / "t.safetensors")
    assert main(["simulate", str(path), "--schedule", "4", "--batch", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["schedule"]
    assert out["distinct_experts"] == rep["distinct_experts"]
    assert main(["simulate", str(path), "--schedule", "4", "--batch", "64"]) == 2
    assert "fewer than a batch" in capsys.readouterr().err
