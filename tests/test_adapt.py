"""moekit.adapt: test-time rewiring of the router offsets, streaming evaluation, RoMA and router-only tuning.

References are independent of the code under test: plain forward passes and cross-entropy, brute-force
causality (a perturbed future must not change scores of the past), and a loop-by-loop RoMA sum.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.adapt import (Rewirer, evaluate_streaming, roma_loss, roma_term, router_parameters, routing_vectors,
                          task_embeddings)
from moekit.layer import moe_layers
from moekit.model import ModelConfig, MoELM

BOS = 256


def tiny_model(seed=0, router="topk", **overrides) -> MoELM:
    torch.manual_seed(seed)
    settings = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, init_std=0.3,
                    moe=dict(hidden_dim=16, num_experts=4, top_k=2, norm_topk=True, router=router))
    settings.update(overrides)
    return MoELM(ModelConfig(**settings)).eval()


def text_ids(text: str) -> torch.Tensor:
    return torch.tensor([BOS, *text.encode()])


TEXT = "the cat sat on the mat; the cat sat on the hat; the cat sat on the bat."


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
           {n: b.detach().clone() for n, b in model.named_buffers() if not n.endswith("logit_offset")}


def plain_nats(model, ids_N):
    with torch.no_grad():
        return F.cross_entropy(model(ids_N[None, :-1])[0].float(), ids_N[1:], reduction="none")


# ---------------------------------------------------------------------------------------------- rewiring
def test_rewiring_changes_only_the_offsets_and_lowers_the_loss():
    model = tiny_model()
    model.train()  # the rewirer must adapt in eval mode and give the mode back
    before_state, before_buffers = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = text_ids(TEXT)
    base = plain_nats(model.eval(), ids).mean()
    model.train()
    rw = Rewirer(model, lr=0.5, steps=10)
    report = rw.adapt(ids)
    assert model.training
    after_state, after_buffers = snapshot(model)
    for k in before_state:  # every parameter and persistent buffer bit-equal
        assert torch.equal(before_state[k], after_state[k]), k
    for k in before_buffers:
        assert torch.equal(before_buffers[k], after_buffers[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    offsets = [layer.gate.logit_offset for layer in moe_layers(model)]
    assert all(float(o.detach().abs().sum()) > 0 for o in offsets)
    assert report.delta_norms == pytest.approx([float(o.detach().norm()) for o in offsets])
    adapted = plain_nats(model.eval(), ids).mean()
    assert report.loss_before == pytest.approx(float(base), rel=1e-5)
    assert report.loss_after == pytest.approx(float(adapted), rel=1e-5)
    assert float(adapted) < float(base)  # strictly lower on the adaptation text
    assert len(report.routing_change) == 2 and all(0.0 <= c <= 1.0 for c in report.routing_change)


def test_zero_offsets_give_the_unadapted_logits_exactly():
    model = tiny_model(seed=1)
    ids = text_ids(TEXT)[None]
    with torch.no_grad():
        reference = model(ids).clone()
    rw = Rewirer(model, lr=0.2, steps=3)
    rw.adapt(ids)
    with torch.no_grad():
        assert not torch.equal(model(ids), reference)
    rw.reset()
    assert all(float(o.detach().abs().sum()) == 0 for o in rw.offsets)
    with torch.no_grad():
        assert torch.equal(model(ids), reference)
    assert rw.routing_change(ids) == [0.0, 0.0]


def test_layer_selection_and_routing_change_counts_changed_choices():
    model = tiny_model(seed=2)
    rw = Rewirer(model, layers=[1], lr=0.1, steps=2)
    rw.adapt(text_ids(TEXT))
    first, second = (layer.gate.logit_offset for layer in moe_layers(model))
    assert float(first.detach().abs().sum()) == 0 and float(second.detach().abs().sum()) > 0
    assert rw.routing_change(text_ids(TEXT))[0] == 0.0  # layer 0 sits before the adapted layer
    # A large offset on one expert puts it in every token's top-2: the change is computable by hand.
    ids = text_ids(TEXT)[None]
    with torch.no_grad():
        second.zero_()
        model(ids[:, :-1])
        base_TK = moe_layers(model)[1].last_routing.topk_ids.clone()
        second[3] = 20.0  # large, yet the other probabilities stay non-zero (no ties in the top-k)
    changed = (~(base_TK == 3).any(-1)).float().sum() / base_TK.numel()  # one of two choices becomes expert 3
    assert rw.routing_change(ids)[1] == pytest.approx(float(changed))


def test_bad_rewirer_arguments():
    model = tiny_model()
    for kw in (dict(steps=-1), dict(every=0), dict(lr=0.0), dict(optimizer="lbfgs"), dict(layers=[5]),
               dict(layers=[])):
        with pytest.raises(ValueError):
            Rewirer(model, **kw)
    with pytest.raises(ValueError, match="no logits"):
        Rewirer(tiny_model(moe=dict(hidden_dim=16, num_experts=4, top_k=2, router="hash")))


# ---------------------------------------------------------------------------------- streaming evaluation
WINDOWS = [text_ids(TEXT).tolist(), text_ids("a b c d e f g h i j k l m n o p q r s t u v w x y z").tolist()]


def test_streaming_with_no_steps_equals_plain_evaluation():
    model = tiny_model(seed=3)
    out = evaluate_streaming(model, Rewirer(model, steps=0), WINDOWS, chunk=16)
    nats = torch.cat([plain_nats(model, torch.tensor(w)) for w in WINDOWS]).double()
    reference = float(nats.sum()) / nats.numel() / math.log(2)
    assert out["tokens"] == nats.numel()
    assert out["bits_per_byte_plain"] == pytest.approx(reference, rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(reference, rel=1e-5)


def test_streaming_adapts_only_on_already_scored_tokens():
    model = tiny_model(seed=4)
    rw = Rewirer(model, lr=0.1, steps=2, report_routing=False)
    seen = []
    real_adapt = rw.adapt

    def recording_adapt(ids):
        seen.append(torch.as_tensor(ids).numel())  # positions 0 .. n-1 of the window
        return real_adapt(ids)

    rw.adapt = recording_adapt
    trace = []
    out = evaluate_streaming(model, rw, WINDOWS, chunk=10, trace=trace)
    assert seen and out["adaptations"] == len(seen)
    adapted_upto = None
    for event in trace:
        if event[0] == "adapt":
            adapted_upto = event[2]
        else:
            _, _, first, last = event
            if adapted_upto is not None:
                assert adapted_upto < first  # every adapted-on position precedes every scored one
            adapted_upto = None
    # the recorded prefix lengths are exactly the "adapt" events: ids[:c+1] before targets c+1 ..
    assert seen == [e[2] + 1 for e in trace if e[0] == "adapt"]
    assert all(float(o.detach().abs().sum()) == 0 for o in rw.offsets)  # offsets zero again on return


def test_streaming_scores_do_not_depend_on_future_tokens():
    """A leak would make a token's score depend on later text: change the tail and compare the heads."""
    model = tiny_model(seed=5)
    rw = Rewirer(model, lr=0.2, steps=3, report_routing=False)
    a = text_ids(TEXT).tolist()
    b = a[:40] + [ord("z")] * (len(a) - 40)
    out_a = evaluate_streaming(model, rw, [a], chunk=8, per_token=True)
    out_b = evaluate_streaming(model, rw, [b], chunk=8, per_token=True)
    # targets 1..39 (ids[1..39]) agree; ids[40] differs and is a target of the same chunk (33..40) as 33..39,
    # so adapting on a chunk's own targets would change the scores of 33..39
    assert out_a["nats"][0][39] != pytest.approx(out_b["nats"][0][39], abs=1e-3)
    assert out_a["nats"][0][:39] == pytest.approx(out_b["nats"][0][:39], abs=1e-6)
    assert out_a["nats"][0][:39] != pytest.approx(out_a["nats_plain"][0][:39], abs=1e-6)  # it did adapt
    assert out_a["nats"][0][:8] == pytest.approx(out_a["nats_plain"][0][:8], abs=1e-6)  # first chunk: none yet


# -------------------------------------------------------------------------------------------------- RoMA
def test_roma_term_equals_a_hand_computation():
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.1]])
    r = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    k = 2
    for weight in ("cosine", "heat"):
        expected = 0.0
        for i in range(4):
            sims = []
            for j in range(4):
                if j != i:
                    ci = sum(a * b for a, b in zip(emb[i].tolist(), emb[j].tolist()))
                    ci /= math.hypot(*emb[i].tolist()) * math.hypot(*emb[j].tolist())
                    sims.append((ci, j))
            for c, j in sorted(sims, reverse=True)[:k]:
                w = max(c, 0.0) if weight == "cosine" else math.exp(-(2 - 2 * c) / 0.5)
                expected += w * sum((x - y) ** 2 for x, y in zip(r[i].tolist(), r[j].tolist()))
        assert float(roma_term(r, emb, k, weight=weight, tau=0.5)) == pytest.approx(expected, rel=1e-5)
    # candidates: only sample 0 may be a neighbour, so every other sample's single neighbour is 0
    got = roma_term(r, emb, 2, candidates=torch.tensor([True, False, False, False]))
    hand = sum(max(float(F.cosine_similarity(emb[i], emb[0], dim=0)), 0.0) * float(((r[i] - r[0]) ** 2).sum())
               for i in (1, 2, 3))
    assert float(got) == pytest.approx(hand, rel=1e-5)


def test_routing_vectors_are_mean_routing_probabilities():
    model = tiny_model(seed=6)
    ids = torch.stack([text_ids(TEXT)[:20], text_ids(TEXT)[20:40]])
    r = routing_vectors(model, ids)
    assert r.shape == (2, 8)
    with torch.no_grad():
        model(ids[:1])
        first = torch.cat([layer.last_routing.probs.mean(0) for layer in moe_layers(model)])
    assert torch.allclose(r[0], first, atol=1e-5)
    assert torch.allclose(r.view(2, 2, 4).sum(-1), torch.ones(2, 2), atol=1e-5)
    assert task_embeddings(model, ids).shape == (2, 32)


def test_router_only_finetuning_with_roma_changes_routers_only():
    model = tiny_model(seed=7).train()
    router_names = {f"{name}.{p}" for name, m in model.named_modules() if m in [l.gate for l in moe_layers(model)]
                    for p, _ in m.named_parameters()}
    assert {id(p) for p in router_parameters(model)} == {id(p) for n, p in model.named_parameters()
                                                        if n in router_names}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(router_parameters(model), lr=1e-2)
    ids = torch.stack([text_ids(TEXT)[i:i + 16] for i in range(0, 64, 16)])
    for _ in range(3):
        opt.zero_grad()
        loss, parts = roma_loss(model, ids, lam=1.0, k=2)
        assert parts["roma"] > 0
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in router_names:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


# ------------------------------------------------------------------------------------------ moekit eval --rewire
def test_eval_rewire_cli(tmp_path, monkeypatch, capsys):
    """``moekit eval RUN --rewire --json`` reports the rewired and plain figures of the same windows (the plain
    one equal to what evaluate_streaming computes with no adaptation steps); bad settings and a router without
    logits are one-line errors with exit code 2."""
    import json as _json

    from moekit.cli import main

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("def f(x):\n    return x * 2 + 1\n" * 300)
    tiny = ["--batch-size", "2", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
            "--n-kv-heads", "1", "--hidden-dim", "16", "--num-experts", "4", "--max-seq-len", "64",
            "--final-eval-windows", "2", "--no-progress", "--steps", "3", "--data", "data.txt"]
    assert main(["train", *tiny, "--name", "r"]) == 0
    capsys.readouterr()
    assert main(["eval", "runs/r", "--rewire", "--json", "--max-windows", "3", "--rewire-every", "16"]) == 0
    out = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["adaptations"] > 0 and out["tokens"] > 0
    assert out["bits_per_byte"] != out["bits_per_byte_plain"]
    for flags, needle in ((["--rewire-steps", "0"], "--rewire-steps"), (["--rewire-every", "0"], "--rewire-every"),
                          (["--rewire-lr", "-1"], "--rewire-lr")):
        assert main(["eval", "runs/r", "--rewire", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0]
    assert main(["train", *tiny, "--name", "h", "--router", "hash", "--aux-loss", "none"]) == 0
    capsys.readouterr()
    assert main(["eval", "runs/h", "--rewire", "--max-windows", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rewire" in err[0]
