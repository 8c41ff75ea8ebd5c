"""``moekit generate --rewire``: the online rewiring loop around KV-cache decoding.

The reference is a slow loop written here: greedy decoding by full forward passes without a cache, calling
``Rewirer.adapt`` on the prompt and then on the text so far every N tokens. The cached loop (with its partial
KV-cache recomputation) must produce the same tokens and the same offsets.
"""
from __future__ import annotations

import json

import torch

from moekit.adapt import Rewirer, generate_rewired
from moekit.adapt.online import OnlineRewiring
from moekit.layer import moe_layers
from moekit.model import ModelConfig, MoELM
from moekit.model.cache import KVCache

BOS = 256


def tiny_model(seed=0, router="topk", n_layers=3) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.3,
                             moe=dict(hidden_dim=16, num_experts=4, top_k=2, norm_topk=True,
                                      router=router))).eval()


PROMPT = [BOS, *b"the cat sat on the mat; the cat"]


def slow_reference(model, prompt, n_new, every, layers, steps=2, lr=0.05):
    rewirer = Rewirer(model, layers, lr=lr, steps=steps, every=every)
    rewirer.adapt(prompt)
    ids = list(prompt)
    offsets = []
    for i in range(n_new):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        generated = i + 1
        if generated % every == 0 and generated < n_new:
            rewirer.adapt(ids)
        offsets.append([t.detach().clone() for t in rewirer.offsets])
    final = [t.detach().clone() for t in rewirer.offsets]
    rewirer.reset()
    return ids[len(prompt):], final


def _run(model, layers, every=5, n_new=16, use_cache=True):
    rewirer = Rewirer(model, layers, lr=0.05, steps=2, every=every)
    finals = []

    def on_adapt(_i, a):
        finals.append([t.detach().clone() for t in rewirer.offsets])

    [(gen, ads)] = generate_rewired(model, [PROMPT], n_new, rewirer, every, on_adapt=on_adapt, temperature=0.0,
                                    eos_id=None, use_cache=use_cache)
    return gen, ads, finals[-1]


def test_cached_online_rewiring_matches_the_slow_loop():
    for layers in (None, [2], [1, 2]):  # all layers (full recompute) and partial recomputation from layer 1/2
        model = tiny_model()
        ref_tokens, ref_offsets = slow_reference(model, PROMPT, 16, 5, layers)
        gen, ads, last = _run(model, layers)
        assert gen.new_ids == ref_tokens, layers
        assert [a.generated for a in ads] == [0, 5, 10, 15]
        for a, b in zip(last, ref_offsets):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        first = {None: 0, (2,): 2, (1, 2): 1}[tuple(layers) if layers else None]
        assert all(a.recomputed_from == first for a in ads[1:])
        # the offsets are zero again when generation ends
        assert all(float(layer.gate.logit_offset.detach().abs().sum()) == 0 for layer in moe_layers(model))


def test_partial_recompute_equals_a_fresh_prefill():
    """After an adaptation of MoE layer 2 only, the rewritten cache equals the cache a full prefill with the
    new offsets writes (layers 0-1 untouched, layer 3's keys changed)."""
    model = tiny_model(n_layers=4)
    rewirer = Rewirer(model, [2], lr=0.1, steps=3, every=4)
    online = OnlineRewiring(model, rewirer, 4)
    ids = PROMPT + list(b" sat")
    with online, torch.no_grad():
        online.start(PROMPT)
        cache = KVCache.for_model(model, 1, 64)
        model(torch.tensor([ids[:-1]]), kv_cache=cache, start_pos=0)
        old = [k.clone() for k in cache.k_BGJA]
        with torch.enable_grad():
            online(ids, cache)
        assert online.adaptations[-1].recomputed_from == 2
        fresh = KVCache.for_model(model, 1, 64)
        model(torch.tensor([ids[:-1]]), kv_cache=fresh, start_pos=0)
    assert cache.length == fresh.length == len(ids) - 1
    for layer in range(4):
        torch.testing.assert_close(cache.k_BGJA[layer], fresh.k_BGJA[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache.v_BGJA[layer], fresh.v_BGJA[layer], rtol=1e-5, atol=1e-6)
    assert torch.equal(cache.k_BGJA[0], old[0]) and torch.equal(cache.k_BGJA[1], old[1])  # untouched
    assert not torch.allclose(cache.k_BGJA[3][:, :, 1:len(ids) - 1], old[3][:, :, 1:len(ids) - 1])  # recomputed


def test_deltas_reset_per_prompt_and_no_cache_agrees():
    model = tiny_model(1)
    other = [BOS, *b"import os\nimport sys\n"]
    rewirer = Rewirer(model, None, lr=0.05, steps=2, every=6)
    both = generate_rewired(model, [other, PROMPT], 12, rewirer, 6, temperature=0.0, eos_id=None)
    alone = generate_rewired(model, [PROMPT], 12, rewirer, 6, temperature=0.0, eos_id=None)
    nocache = generate_rewired(model, [PROMPT], 12, rewirer, 6, temperature=0.0, eos_id=None, use_cache=False)
    assert both[1][0].new_ids == alone[0][0].new_ids == nocache[0][0].new_ids
    assert [a.delta_norms for a in both[1][1]] == [a.delta_norms for a in alone[0][1]]


def _tiny_run(main, tmp_path, name, *extra):
    (tmp_path / "data.txt").write_text("def f(x):\n    return x * 2 + 1\n" * 300)
    tiny = ["--batch-size", "2", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
            "--n-kv-heads", "1", "--hidden-dim", "16", "--num-experts", "4", "--max-seq-len", "96",
            "--final-eval-windows", "2", "--no-progress", "--steps", "2", "--data", "data.txt"]
    assert main(["train", *tiny, "--name", name, *extra]) == 0


def test_generate_rewire_cli(tmp_path, monkeypatch, capsys):
    from moekit.cli import main

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    _tiny_run(main, tmp_path, "r")
    capsys.readouterr()
    assert main(["generate", "runs/r", "--prompt", "def f(x):", "--max-new-tokens", "20", "--rewire",
                 "--rewire-every", "8", "--rewire-steps", "2", "--json", "--temperature", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ads = out["prompts"][0]["adaptations"]
    assert [a["generated"] for a in ads] == [0, 8, 16]
    assert all(len(a["delta_norms"]) == 2 and len(a["routing_change"]) == 2 for a in ads)
    assert all(0 <= c <= 1 for a in ads for c in a["routing_change"])
    assert main(["generate", "runs/r", "--prompt", "def", "--max-new-tokens", "10", "--rewire",
                 "--rewire-every", "4"]) == 0
    err = capsys.readouterr().err
    assert "rewire prefill" in err and "top-k changed" in err and "after 4 tokens" in err
    for flags, needle in ((["--rewire-every", "0"], "--rewire-every"), (["--rewire-steps", "-1"], "--rewire-steps"),
                          (["--rewire-layers", "7"], "layers")):
        assert main(["generate", "runs/r", "--prompt", "x", "--max-new-tokens", "4", "--rewire", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    _tiny_run(main, tmp_path, "h", "--router", "hash", "--aux-loss", "none")
    capsys.readouterr()
    assert main(["generate", "runs/h", "--prompt", "x", "--max-new-tokens", "4", "--rewire"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rewire" in err[0] and "logits" in err[0]
