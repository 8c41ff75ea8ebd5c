"""Offloaded serving (issue 15, online half): expert store, cache policies, prefetchers, offloaded generation.

References: the store's reads against safetensors' own loader and the original tensors; the cache's hits and
misses against the trace simulator's per-layer cache (``moekit.serve.policies.run_cache``, the same policy
definitions) and, for LRU, a hand-written OrderedDict; the adaptive allocation against brute force over all
allocations with hits from direct LRU runs; the cross-layer prediction against the next router's top-k computed
by hand; offloaded greedy generation token for token against the fully resident model (moekit run, tiny
transformers OLMoE and Qwen3-MoE).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.serve.cache import ExpertCache, allocate_slots, lru_hit_curve
from moekit.serve.store import ExpertStore, write_store
from helpers import working_folder

TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--dim", "16", "--n-layers", "3", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "16", "--num-experts", "8", "--top-k", "2", "--final-eval-windows", "1",
        "--max-seq-len", "64", "--no-progress"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    with working_folder(tmp_path_factory.mktemp("offload")) as path:
        (path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 200)
        yield path


@pytest.fixture(scope="module")
def run(workdir) -> Path:
    assert main(["train", *TINY, "--data", "data.txt", "--name", "r"]) == 0
    return workdir / "runs" / "r"


@pytest.fixture(scope="module")
def store(run, workdir) -> Path:
    assert main(["offload", str(run), str(workdir / "store")]) == 0
    return workdir / "store"


def _toy_store(path: Path, layers=3, E=8, k=2, D=4, F=3, seed=0) -> tuple[Path, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    recs = [{"module": f"l{l}", "top_k": k, "experts": {"gate_up_proj": torch.randn(E, 2 * F, D, generator=g),
                                                         "down_proj": torch.randn(E, D, F, generator=g)}}
            for l in range(layers)]
    write_store(path, {"w": torch.ones(2)}, recs, {"kind": "toy", "config": {"E": E}, "fingerprint": "x"})
    return path, recs


# ------------------------------------------------------------------------------------------------ store
def test_store_reads_match_original_and_safetensors(tmp_path):
    path, recs = _toy_store(tmp_path / "s")
    st = ExpertStore(path)
    for l, e in [(0, 0), (1, 5), (2, 7)]:
        dest = st.layers[l].empty()
        n = st.read_into(l, e, dest, drop=True)
        assert n == st.layers[l].file_bytes
        ref = st.read(l, e)  # safetensors safe_open
        for name, t in recs[l]["experts"].items():
            assert torch.equal(dest[name], t[e]) and torch.equal(ref[name], t[e])


def test_store_damage_is_one_clear_error(tmp_path, capsys):
    path, _ = _toy_store(tmp_path / "s")
    f = path / "experts" / "l001" / "e0003.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="layer 1 expert 3 is truncated"):
        ExpertStore(path)
    f.unlink()
    with pytest.raises(ValueError, match="layer 1 expert 3 is missing"):
        ExpertStore(path)
    # a file of another layer (same size, other header) is refused at read time
    shutil.copy(path / "experts" / "l000" / "e0003.safetensors", f)
    st = ExpertStore(path)
    with pytest.raises(ValueError, match="does not belong to this layer"):
        st.read_into(1, 3, st.layers[1].empty())
    with pytest.raises(ValueError, match="other router weights"):
        st.check_model({"kind": "toy", "config": {"E": 8}, "fingerprint": "y"})


def test_cli_store_errors(run, store, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    (bad / "experts" / "l002" / "e0001.safetensors").unlink()
    for argv, needle in [
        (["generate", str(run), "--expert-budget", "0.25", "--store", str(bad), "--max-new-tokens", "2"],
         "layer 2 expert 1 is missing"),
        (["generate", str(run), "--expert-budget", "0.1", "--max-new-tokens", "2"], "fewer than its top-k of 2"),
        (["offload", str(run), str(store)], "already exists"),
    ]:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err and "\n" not in err and "Traceback" not in err and needle in err, err


def test_store_of_another_model_is_refused(run, workdir, tmp_path, capsys):
    assert main(["train", *TINY, "--data", "data.txt", "--name", "other", "--seed", "7"]) == 0
    other = tmp_path / "other-store"
    assert main(["offload", str(workdir / "runs" / "other"), str(other)]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--expert-budget", "0.25", "--store", str(other), "--max-new-tokens",
                 "2"]) == 2
    err = capsys.readouterr().err
    assert "written by a model with other router weights" in err and "\n" not in err.strip()


# ------------------------------------------------------------------------------------------------ cache policies
def _replay(cache: ExpertCache, layer: int, steps: list[list[int]]):
    for need in steps:
        cache.begin_call(layer, need)
        cache.acquire(layer, need)
        cache.release(layer, need)
        cache.end_call(layer)
    c = cache.counters[layer]
    return c.hits, c.misses


def _lru_reference(steps, slots):
    order, hits, misses = OrderedDict(), 0, 0
    for need in steps:
        for e in need:
            if e in order:
                hits += 1
            else:
                misses += 1
                if len(order) >= slots:
                    del order[next(x for x in order if x not in need)]
                order[e] = None
        for e in need:
            order.move_to_end(e)
    return hits, misses


@pytest.mark.parametrize("policy", ["lru", "lfu", "least_stale", "lru_pinned"])
def test_cache_policy_matches_simulator(tmp_path, policy):
    from moekit.serve.policies import run_cache

    path, _ = _toy_store(tmp_path / "s", layers=1, E=8, k=2)
    rng = np.random.default_rng(3)
    # skewed routing so that the policies differ
    steps = [sorted(rng.choice(8, 2, replace=False, p=np.array([8, 6, 5, 3, 2, 1, 1, 1]) / 27).tolist())
             for _ in range(60)]
    cache = ExpertCache(ExpertStore(path), budget=0.5, policy=policy)
    got = _replay(cache, 0, steps)
    sim = run_cache([np.array(s) for s in steps], None, 4, policy, 0, num_experts=8)
    assert got == (sim.hits, sim.misses)
    if policy == "lru":
        assert got == _lru_reference(steps, 4)
    # the cached copies are the experts' weights
    st = ExpertStore(path)
    w = cache.acquire(0, [steps[-1][0]])[0]
    assert torch.equal(w["down_proj"], st.read(0, steps[-1][0])["down_proj"])


def test_budget_below_top_k_and_byte_budget(tmp_path):
    path, _ = _toy_store(tmp_path / "s", layers=2, E=8, k=3)
    st = ExpertStore(path)
    with pytest.raises(ValueError, match="fewer than its top-k of 3"):
        ExpertCache(st, budget=0.25)
    per = st.layers[0].expert_bytes
    cache = ExpertCache(st, budget=None, budget_bytes=per * 7)
    assert cache.slots == [4, 3] and cache.resident_bytes == 7 * per
    with pytest.raises(ValueError, match="fewer than its top-k"):
        ExpertCache(st, budget=None, budget_bytes=per * 5)


def test_shallow_and_adaptive_allocation():
    from moekit.serve.policies import shallow_slots

    E, k = [8, 8, 8, 8], [2, 2, 2, 2]
    assert allocate_slots(E, k, budget=0.5, policy="shallow") == shallow_slots([4] * 4, k, E)
    alloc = allocate_slots(E, k, budget=0.5, policy="shallow")
    assert sum(alloc) == 16 and alloc[0] > alloc[-1]
    rng = np.random.default_rng(0)
    # layer 0 uses few experts (small cache suffices), layer 3 many
    profile = [[sorted(rng.choice(n, 2, replace=False).tolist()) for _ in range(40)] for n in (3, 5, 7, 8)]
    got = allocate_slots(E, k, budget=0.5, policy="adaptive", profile=profile)
    curves = [lru_hit_curve(p, 8) for p in profile]  # direct LRU runs, one per size
    best = max((sum(c[s] for c, s in zip(curves, a)), a) for a in itertools.product(range(2, 9), repeat=4)
               if sum(a) == 16)
    assert sum(got) == 16 and sum(c[s] for c, s in zip(curves, got)) == best[0]


def test_prefetch_runs_on_loader_thread_and_is_counted(tmp_path):
    path, recs = _toy_store(tmp_path / "s", layers=2, E=8, k=2)
    cache = ExpertCache(ExpertStore(path), budget=0.5)
    assert cache.prefetch(1, [5, 6, 7]) == 3
    cache.drain()
    assert cache._loader is not None and cache._loader.name == "moekit-expert-loader"
    cache.begin_call(1, [5, 1])
    w = cache.acquire(1, [5, 1])
    assert torch.equal(w[0]["gate_up_proj"], recs[1]["experts"]["gate_up_proj"][5])
    cache.release(1, [5, 1])
    cache.end_call(1)
    s = cache.stats()["layers"][1]
    assert (s["hits"], s["misses"], s["prefetch_issued"], s["prefetch_used"]) == (1, 1, 3, 1)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 2)
    assert s["lead_ms"] is not None and s["lead_ms"] >= 0
    cache.close()


# ------------------------------------------------------------------------------------------------ generation
PROMPTS = ["def f(x):", "    return"]


@pytest.mark.parametrize("policy, prefetch", [("lru", "cross_layer"), ("least_stale", "transition"),
                                              ("adaptive", "none"), ("shallow", "cross_layer"),
                                              ("lru_pinned", "path"), ("lfu", "trace_match")])
def test_moekit_offloaded_greedy_equals_resident(run, store, policy, prefetch):
    from moekit.model import generate_batch
    from moekit.serve.offload import load_offloaded_run
    from moekit.train import load_run

    ref, _ = load_run(run)
    want = generate_batch(ref, PROMPTS, 12, temperature=0, eos_id=None)
    model, engine = load_offloaded_run(store, 0.25, policy, prefetch, run=run, profile_tokens=4)
    if prefetch == "trace_match":  # it predicts from earlier requests: one first, each prompt on its own
        for prompt in PROMPTS:
            assert generate_batch(model, [prompt], 12, temperature=0, eos_id=None)[0].new_ids == \
                generate_batch(ref, [prompt], 12, temperature=0, eos_id=None)[0].new_ids
    got = generate_batch(model, PROMPTS, 12, temperature=0, eos_id=None)
    s = engine.stats()
    engine.close()
    assert [g.new_ids for g in got] == [w.new_ids for w in want]
    assert s["hits"] + s["misses"] > 0 and s["bytes_read"] > 0
    assert not any(p.numel() > 0 and "experts" in n for n, p in model.named_parameters())
    if prefetch != "none":
        assert s["prefetch_issued"] > 0 and s["precision"] is not None


def test_cross_layer_prediction_is_next_router_top_k(run, store):
    from moekit.layer import moe_layers
    from moekit.serve.offload import load_offloaded_run

    model, engine = load_offloaded_run(store, 0.5, "lru", "cross_layer")
    layers = moe_layers(model)
    x = torch.randn(1, 16)
    pred = engine.prefetcher.predict(0, x, torch.zeros(1, 2, dtype=torch.int64))
    logits = x @ layers[1].gate.weight.t()
    assert sorted(pred) == sorted(logits[0].topk(2).indices.tolist())
    engine.close()


def test_path_prediction_is_every_later_router_on_the_first_layer_input(run, store):
    from moekit.layer import moe_layers
    from moekit.serve.offload import load_offloaded_run

    model, engine = load_offloaded_run(store, 0.5, "lru", "path")
    layers = moe_layers(model)
    x = torch.randn(1, 16)
    ids = torch.zeros(1, 2, dtype=torch.int64)
    pred = engine.prefetcher.predict(0, x, ids)
    assert sorted(pred) == list(range(1, len(layers)))
    for m in range(1, len(layers)):  # layer m's own gate on layer 0's input, computed here by hand
        logits = x @ layers[m].gate.weight.t()
        assert sorted(pred[m]) == sorted(logits[0].topk(2).indices.tolist())
    assert engine.prefetcher.predict(1, x, ids) is None  # only the first layer forecasts
    engine.close()


def test_trace_match_prefetches_the_most_similar_earlier_request():
    from moekit.serve.prefetch import TraceMatchPrefetcher

    pf = TraceMatchPrefetcher([4, 4, 4], [1, 1, 1])
    call = lambda layer, ids: pf.predict(layer, torch.zeros(len(ids), 2), torch.tensor(ids))  # noqa: E731
    # request A (prefill of 2 rows, then one decoding step): layer 0 uses 0/1, layer 1 uses 2, layer 2 uses 3
    assert call(0, [[0], [1]]) is None  # nothing stored yet
    call(1, [[2], [2]]), call(2, [[3], [3]])
    call(0, [[0]]), call(1, [[2]]), call(2, [[3]])
    # request B (a prefill: more rows than the last layer-0 call) uses 3 at layer 0, then 1 and 0
    assert call(0, [[3], [3], [3]]) == [2]  # A is stored; B's first layer is unlike A's but A is the only one
    call(1, [[1], [1], [1]]), call(2, [[0], [0], [0]])
    # request C: starts like A at layer 0; hand cosine over layer 0: A = (1, 1, 0, 0) * ..., B = (0, 0, 0, 3)
    a0, b0, c0 = np.array([2.0, 1, 0, 0]), np.array([0, 0, 0, 3.0]), np.array([1.0, 0, 0, 0])
    assert c0 @ a0 / np.linalg.norm(a0) > c0 @ b0 / np.linalg.norm(b0)
    assert call(0, [[0], [0], [0], [0]]) == [2]  # A's layer-1 row
    assert pf.match(0) == 0 and len(pf.stored) == 2
    # after layer 1 uses expert 1 (like B), the match over layers 0-1 moves to B
    c = np.concatenate([[4.0, 0, 0, 0], [0, 4.0, 0, 0]])
    sims = [c @ np.concatenate(m[:2]) / np.linalg.norm(np.concatenate(m[:2])) for m in pf.stored]
    assert call(1, [[1], [1], [1], [1]]) == ([3] if sims[0] > sims[1] else [0])


def test_cli_generate_json_reports(run, store, capsys):
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def", "--temperature", "0", "--max-new-tokens", "6",
                 "--expert-budget", "0.25", "--store", str(store), "--prefetch", "cross_layer", "--cold",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    off = out["offload"]
    for key in ("tokens_per_s", "hit_rate", "bytes_read", "precision", "recall", "peak_rss_bytes", "layers"):
        assert key in off
    assert off["cold"] and off["bytes_read"] > 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def", "--temperature", "0", "--max-new-tokens", "6",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"][0]["text"] == out["prompts"][0]["text"]
    # without --store the run's store is written to a temporary folder first
    assert main(["generate", str(run), "--prompt", "def", "--temperature", "0", "--max-new-tokens", "6",
                 "--expert-budget", "0.5", "--cache", "lfu", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["prompts"][0]["text"] == out["prompts"][0]["text"] and again["offload"]["policy"] == "lfu"


# ------------------------------------------------------------------------------------------------ transformers
transformers = pytest.importorskip("transformers")


def _tiny_hf(kind: str, tmp_path: Path):
    T = transformers
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64)
    if kind == "olmoe":
        cfg = T.OlmoeConfig(**common, intermediate_size=12, num_experts=8, num_experts_per_tok=2)
    else:
        cfg = T.Qwen3MoeConfig(**common, intermediate_size=24, moe_intermediate_size=12, num_experts=8,
                               num_experts_per_tok=2, head_dim=8)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger router weights: routing varies from token to token
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0, 1.0)
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["olmoe", "qwen3"])
def test_hf_offloaded_greedy_equals_resident(kind, tmp_path):
    from moekit.serve import load_hf_from_store, offload

    folder = _tiny_hf(kind, tmp_path)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    want = ref.generate(ids, max_new_tokens=10, do_sample=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    engine = offload(model, budget=0.25, prefetch="cross_layer", store=tmp_path / "store")
    got = model.generate(ids, max_new_tokens=10, do_sample=False)
    s = engine.stats()
    engine.close()
    assert torch.equal(got, want)
    assert s["misses"] > 0 and s["prefetch_issued"] > 0
    assert not any("experts" in n for n, _ in model.named_parameters())
    # built from the store alone (experts never allocated), and the store is checked against the model
    model2, engine2 = load_hf_from_store(tmp_path / "store", budget=0.5, policy="lfu", prefetch="transition")
    assert torch.equal(model2.generate(ids, max_new_tokens=10, do_sample=False), want)
    engine2.close()
    other = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n.endswith("gate.weight")).add_(1.0)
    with pytest.raises(ValueError, match="other router weights"):
        offload(other, store=tmp_path / "store")


def test_cli_offload_transformers_folder(tmp_path, capsys):
    folder = _tiny_hf("olmoe", tmp_path)
    capsys.readouterr()
    assert main(["offload", str(folder), str(tmp_path / "st"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["kind"] == "transformers" and rec["experts"] == 24
    assert len(os.listdir(tmp_path / "st" / "experts" / "l002")) == 8


def test_miss_bits_uses_low_bit_copy_then_full_weights(tmp_path):
    from moekit.compress import quant as Q

    path, recs = _toy_store(tmp_path / "s", layers=1, E=8, k=2, D=8, F=4)
    cache = ExpertCache(ExpertStore(path), budget=0.5, miss_bits=4)
    cache.begin_call(0, [2, 6])
    w = cache.acquire(0, [2, 6])  # both miss: low-bit copies (HOBBIT)
    for e, got in zip([2, 6], w):
        for name in ("gate_up_proj", "down_proj"):
            ref = Q.pack(recs[0]["experts"][name][e], 4, group=min(128, recs[0]["experts"][name].shape[-1]))
            assert torch.equal(got[name], ref.dequantize(torch.float32))
            assert not torch.equal(got[name], recs[0]["experts"][name][e])
    cache.release(0, [2, 6])
    cache.end_call(0)
    cache.drain()  # the full experts were read behind
    cache.begin_call(0, [2, 6])
    w = cache.acquire(0, [2, 6])
    assert torch.equal(w[0]["down_proj"], recs[0]["experts"]["down_proj"][2])
    cache.release(0, [2, 6])
    s = cache.stats()
    assert (s["hits"], s["misses"], s["lowbit"]) == (2, 2, 2)
    assert all(ent.pins == 0 for ent in cache._entries[0].values())
    cache.close()
