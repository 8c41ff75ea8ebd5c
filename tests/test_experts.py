"""The Experts seam: a second, independent Experts implementation and a products-only subclass (both in
tests/custom_experts.py, registered from outside moekit) through the float64 loop reference, gradcheck,
``moekit train`` + bit-exact resume; the registry; the plan hook; one dispatcher call.

Expert parallelism with these kinds against one process runs in tests/test_parallel.py (dist_workers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import custom_experts
import moekit
from moekit.dispatch import LocalDispatcher, make_plan
from moekit.experts import DenseExperts, Experts, get, names, register
from helpers import autograd_node_names
from reference import reference_moe, rel_err

E, D, F, K, T = 5, 6, 4, 2, 9


def _loop_layer(seed=0, **cfg):
    cfg.setdefault("aux_loss", None)
    torch.manual_seed(seed)
    return moekit.MoE(dim=D, hidden_dim=F, num_experts=E, top_k=K, experts="test_loop", **cfg).double()


def _run_loop_vs_reference(layer, x, **ref_kw):
    ex = layer.experts
    router_w = layer.router.weight.detach().clone().requires_grad_(True)
    w_gate, w_in, w_out = (p.detach().clone().requires_grad_(True) for p in (ex.w_gate, ex.w_in, ex.w_out))
    x_ref = x.clone().requires_grad_(True)
    ref = reference_moe(x_ref, router_w, torch.cat([w_gate, w_in], dim=1), w_out, top_k=K, **ref_kw)
    x_mk = x.clone().requires_grad_(True)
    out = layer(x_mk)
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    (out * cot).sum().backward()
    (ref.out * cot).sum().backward()
    assert rel_err(out, ref.out) < 1e-6
    assert rel_err(x_mk.grad, x_ref.grad) < 1e-6
    for mine, theirs in ((ex.w_gate, w_gate), (ex.w_in, w_in), (ex.w_out, w_out)):
        assert rel_err(mine.grad, theirs.grad) < 1e-6  # routing weights come from float32 router math
    assert rel_err(layer.router.weight.grad, router_w.grad) < 3e-5


@pytest.mark.parametrize("capacity", [None, 0.75])
def test_independent_experts_match_the_loop_reference(capacity):
    layer = _loop_layer(capacity_factor=capacity, eval_capacity_factor=capacity).eval()
    assert type(layer.experts) is custom_experts.LoopExperts
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _run_loop_vs_reference(layer, x, capacity_factor=capacity)
    if capacity is not None:
        assert layer.load.num_dropped > 0


def test_independent_experts_gradcheck_through_the_layer():
    layer = _loop_layer(seed=2).eval()
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    names_ = [n for n in sd if n.startswith("experts.")]

    def f(x_in, *params):
        return functional_call(layer, {**sd, **dict(zip(names_, params))}, (x_in,))

    params = tuple(sd[n].clone().requires_grad_(True) for n in names_)
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), *params), eps=1e-6, atol=1e-7,
                                    rtol=1e-5, fast_mode=True)


def test_products_only_subclass_keeps_the_fused_path():
    torch.manual_seed(0)
    layer = moekit.MoE(dim=D, hidden_dim=F, num_experts=E, top_k=K, experts="test_fakequant",
                       aux_loss=None).double().eval()
    ex = layer.experts
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = layer(x)
    # the fused autograd node (one node for the whole expert path) is in the graph
    assert any("FusedExperts" in name for name in autograd_node_names(out))
    # forward and gradients equal the loop reference run on the rounded weights (straight-through)
    q_up = custom_experts.fake_quant(ex.gate_up_proj.detach()).requires_grad_(True)
    q_down = custom_experts.fake_quant(ex.down_proj.detach()).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_moe(x_ref, layer.router.weight.detach(), q_up, q_down, top_k=K)
    assert rel_err(out, ref.out) < 1e-6
    assert not torch.equal(q_up, ex.gate_up_proj.detach())  # the rounding did something
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    (out * cot).sum().backward()
    (ref.out * cot).sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-6
    assert rel_err(ex.gate_up_proj.grad, q_up.grad) < 1e-6  # float32 router math in the routing weights
    assert rel_err(ex.down_proj.grad, q_down.grad) < 1e-6


def test_expert_rows_of_both_kinds_agree_with_dense():
    """``expert_rows`` (unweighted rows sorted by expert) of the loop kind equals the dense kind's on the same
    weights, empty experts included, and shard keeps exactly the asked experts."""
    loop = custom_experts.LoopExperts(E, D, F).double()
    dense = DenseExperts(E, D, F).double()
    dense.load_state_dict(loop.state_to_dense())
    counts = torch.tensor([3, 0, 2, 0, 4])
    x = torch.randn(int(counts.sum()), D, dtype=torch.float64)
    assert rel_err(loop.expert_rows(x, counts), dense.expert_rows(x, counts)) < 1e-12
    sliced = loop.shard(range(2, 4))
    assert sorted(sliced) == ["w_gate", "w_in", "w_out"] and loop.num_experts == 2
    dense.shard(range(2, 4))
    assert rel_err(loop.expert_rows(x[:5], torch.tensor([2, 3])), dense.expert_rows(x[:5], torch.tensor([2, 3]))) < 1e-12
    with pytest.raises(ValueError, match="contiguous range"):
        loop.shard(range(0, 5))


def test_registry_and_config_errors():
    assert {"dense", "test_loop", "test_fakequant"} <= set(names())
    assert get("dense") is DenseExperts
    with pytest.raises(ValueError, match="unknown experts 'nope'.*dense"):
        moekit.MoEConfig(dim=4, hidden_dim=4, num_experts=2, experts="nope")
    with pytest.raises(ValueError, match="experts_options must be a dict"):
        moekit.MoEConfig(dim=4, hidden_dim=4, num_experts=2, experts_options=[1])
    with pytest.raises(TypeError, match="not a subclass"):
        register("bad")(int)
    with pytest.raises(ValueError, match="already registered"):
        register("dense")(custom_experts.LoopExperts)
    with pytest.raises(NotImplementedError, match="expert_rows"):
        Experts().expert_rows(torch.zeros(1, 2), torch.tensor([1]))


def test_plan_hook_sees_the_plan_first_and_may_replace_the_experts():
    torch.manual_seed(0)
    layer = moekit.MoE(dim=D, hidden_dim=F, num_experts=E, top_k=K, aux_loss=None).eval()
    calls = []
    real_forward = layer.experts.forward

    def spy(x_TD, plan):
        calls.append("experts")
        return real_forward(x_TD, plan)

    layer.experts.forward = spy
    x = torch.randn(T, D)
    expected = layer(x)
    calls.clear()

    def watch(mod, x_TD, plan):
        calls.append(("hook", plan.counts_E.tolist()))
        return None

    handle = layer.register_plan_hook(watch)
    out = layer(x)
    assert torch.equal(out, expected)
    assert calls[0][0] == "hook" and calls[1] == "experts"  # the hook ran before any expert
    assert calls[0][1] == layer.last_plan.counts_E.tolist() and sum(calls[0][1]) == T * K
    replaced = layer.register_plan_hook(lambda mod, x_TD, plan: torch.full_like(x_TD, 7.0))
    calls.clear()
    assert torch.equal(layer(x), torch.full_like(x, 7.0))
    assert "experts" not in calls
    handle.remove()
    replaced.remove()
    calls.clear()
    assert torch.equal(layer(x), expected) and calls == ["experts"]


def test_one_dispatcher_call():
    torch.manual_seed(0)
    layer = moekit.MoE(dim=D, hidden_dim=F, num_experts=E, top_k=K, aux_loss=None).eval()
    assert isinstance(layer.dispatcher, LocalDispatcher)
    x = torch.randn(T, D)
    plan = make_plan(layer.router(x))
    assert torch.equal(LocalDispatcher()(x, plan, layer.experts), layer.experts(x, plan))
    assert torch.equal(layer(x), layer.experts(x, plan))


TINY = ["--batch-size", "4", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "16", "--num-experts", "4", "--checkpoint-every", "3",
        "--final-eval-windows", "2", "--max-seq-len", "64", "--no-progress"]


def test_train_and_bit_exact_resume_with_independent_experts(tmp_path, monkeypatch, capsys):
    from moekit.cli import main

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY, "--experts", "test_loop", "--name", "full", "--steps", "6"]) == 0
        assert main(["train", *TINY, "--experts", "test_loop", "--name", "part", "--steps", "3"]) == 0
        assert main(["train", "--resume", "runs/part", "--steps", "6", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    cfg = json.loads(Path("runs/full/config.json").read_text())
    assert cfg["model"]["moe"]["experts"] == "test_loop"

    def losses(run):
        recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r]

    full, part = losses("runs/full"), losses("runs/part")
    assert len(full) == 6 and full == part


# ------------------------------------------------------------------------------------------ small-batch path
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("num_experts,tokens", [(8, 1), (8, 4), (256, 1), (256, 2), (256, 16)])
@pytest.mark.parametrize("capacity", [None, 0.5])
def test_small_batch_path_matches_the_float64_reference(activation, num_experts, tokens, capacity):
    """The loop over used experts (``small_batch="on"``) against the slow float64 reference, with a shared
    expert and capacity off and on; ``"auto"`` takes it only when few experts can have rows."""
    from reference import random_weights, reference_from_state

    D, F, K = 8, 4, 2
    cfg = moekit.MoEConfig(dim=D, hidden_dim=F, num_experts=num_experts, top_k=K, activation=activation,
                           num_shared_experts=1, shared_hidden_dim=3, aux_loss=None,
                           capacity_factor=capacity, eval_capacity_factor=capacity)
    layer = moekit.MoE(cfg).double().eval()
    sd = random_weights(num_experts, D, F, activation, shared_hidden=3, seed=tokens + num_experts)
    layer.load_state_dict(sd)
    x = torch.randn(tokens, D, dtype=torch.float64, generator=torch.Generator().manual_seed(tokens))
    ref = reference_from_state(x, sd, top_k=K, activation=activation, capacity_factor=capacity)
    layer.experts.small_batch = "on"
    with torch.no_grad():
        out = layer(x)
    assert layer.experts.last_path == "small-batch"
    assert rel_err(out, ref.out) < 1e-6
    layer.experts.small_batch = "auto"
    with torch.no_grad():
        layer(x)
    few_rows = layer.last_plan.token_S.shape[0] * layer.experts.small_batch_rows_divisor <= num_experts
    assert layer.experts.last_path == ("small-batch" if few_rows else "grouped")
