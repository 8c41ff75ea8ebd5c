"""The Router base (moekit.routing.base): the one logits step (linear gate, jitter, float32, logit offset), the
logit offsets of a model (collect, train alone, save/load), router state that keeps float32 under dtype casts,
the hooks models read and the typed RoutingContext fields."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import moekit
from moekit import routing
from moekit.model import ModelConfig, MoELM
from moekit.routing import Router, RoutingContext

D, E, K, T = 8, 4, 2, 12
LOGIT_ROUTERS = [name for name in routing.names() if routing.get(name).has_logits]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def context(name, B=1, L=T):
    """A context every router can run on: causal mean attention for 'attention', token ids for 'hash'."""
    attention = None
    if routing.get(name).needs_attention:
        attention = (torch.tril(torch.ones(L, L)) / torch.arange(1, L + 1).unsqueeze(1)).expand(B, L, L)
    return RoutingContext(batch_shape=(B, L), input_ids=torch.arange(B * L).view(B, L), attention_probs=attention)


def build(name, seed=0, scale=1.0, **options):
    """Router ``name`` with a random gate (and bias where it has one), in eval mode."""
    r = routing.get(name)(dim=D, num_experts=E, top_k=K, **options)
    if r.has_logits:
        with torch.no_grad():
            r.weight.copy_(torch.randn(E, D, generator=gen(seed)) * scale)
            if r.gate_bias:
                r.bias.copy_(torch.randn(E, generator=gen(seed + 1)))
    return r.eval()


def reference_logits(r, x):
    """float64 hand computation of ``x W^T + b``."""
    out = x.double() @ r.weight.detach().double().T
    if r.gate_bias:
        out = out + r.bias.detach().double()
    return out


def expert_sets(out):
    """Per token, the set of experts of a Routing (from its flat pair list)."""
    sets = [set() for _ in range(out.num_tokens)]
    for t, e in zip(out.token_ids.tolist(), out.expert_ids.tolist()):
        sets[t].add(e)
    return sets


# --------------------------------------------------------------------------------------------- logits step
def test_every_router_but_hash_has_logits():
    assert "hash" not in LOGIT_ROUTERS and len(LOGIT_ROUTERS) == len(routing.names()) - 1
    for name in LOGIT_ROUTERS:  # one logits step, never overridden
        assert routing.get(name).logits is Router.logits, name
    h = build("hash")
    assert not hasattr(h, "logit_offset") and not hasattr(h, "weight")
    with pytest.raises(ValueError, match="no logits"):
        h.logits(torch.randn(3, D))


@pytest.mark.parametrize("name", LOGIT_ROUTERS)
def test_router_logits_are_the_linear_gate_plus_offset(name):
    r = build(name)
    x = torch.randn(T, D, generator=gen(3))
    out = r(x, context(name))
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.double(), reference_logits(r, x), rtol=1e-5, atol=1e-5)
    offset = torch.randn(E, generator=gen(4))
    with torch.no_grad():
        r.logit_offset.copy_(offset)
    shifted = r(x, context(name))
    torch.testing.assert_close(shifted.logits.double(), reference_logits(r, x) + offset.double(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LOGIT_ROUTERS)
def test_offset_steers_selection_in_every_router(name):
    """A large offset on one expert puts it among every token's experts (scoring and selection see it)."""
    sparse_eval = {"eval_mode": "topk"} if name in ("dts", "activation_dts") else {}  # dense gates at tau=2
    r = build(name, scale=0.3, **sparse_eval)
    x = torch.randn(T, D, generator=gen(5))
    target = int(torch.topk(-reference_logits(r, x).sum(0), 1).indices)  # the least popular expert
    assert not all(target in s for s in expert_sets(r(x, context(name))))
    with torch.no_grad():
        r.logit_offset[target] = 100.0
    assert all(target in s for s in expert_sets(r(x, context(name))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_offset_is_bitwise_no_offset(dtype):
    r = build("topk").to(dtype)
    x = torch.randn(T, D, generator=gen(6)).to(dtype)
    plain = F.linear(x.float(), r.weight.float())
    assert torch.equal(r.logits(x).view(torch.int32), plain.view(torch.int32))
    mixer = build("mixer")
    plain = F.linear(x.float(), mixer.weight.float(), mixer.bias.float())
    assert torch.equal(mixer.logits(x).view(torch.int32), plain.view(torch.int32))


@pytest.mark.parametrize("name", ["topk", "dts", "similarity", "momentum", "moduleformer", "top_any"])
def test_jitter_is_the_switch_multiplicative_noise(name):
    """Training logits = (x * U(1-j, 1+j)) W^T with the noise drawn first from the global generator."""
    r = build(name, jitter=0.2).train()
    x = torch.randn(T, D, generator=gen(7))
    torch.manual_seed(123)
    out = r(x, context(name))
    torch.manual_seed(123)
    noise = torch.empty_like(x).uniform_(0.8, 1.2)
    torch.testing.assert_close(out.logits.double(), reference_logits(r, x * noise), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.logits.double(), reference_logits(r, x), atol=1e-3)
    torch.testing.assert_close(r.eval()(x, context(name)).logits.double(), reference_logits(r, x),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ logit offsets
def tiny_model(router="topk", seed=0, **moe):
    torch.manual_seed(seed)
    settings = dict(hidden_dim=16, num_experts=4, top_k=2, router=router)
    settings.update(moe)
    return MoELM(ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32, moe=settings))


def test_offsets_are_outside_parameters_and_state_dict():
    model = tiny_model(bias_update="sign")
    offsets = routing.logit_offsets(model)
    assert len(offsets) == 3 and all(o.shape == (4,) and o.dtype == torch.float32 for o in offsets)
    assert all(o.is_leaf and o.requires_grad and not o.any() for o in offsets)
    param_ids = {id(p) for p in model.parameters()}
    assert not any(id(o) in param_ids for o in offsets)
    state = model.state_dict()
    assert not any("logit_offset" in key for key in state)
    assert any(key.endswith("e_score_correction_bias") for key in state)
    fresh = tiny_model(bias_update="sign", seed=1)
    fresh.load_state_dict(state, strict=True)  # a checkpoint without offsets loads strictly
    routing.logit_offsets(model, requires_grad=False)
    assert not any(o.requires_grad for o in offsets)


def test_training_only_the_offsets_changes_routing_and_nothing_else():
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (4, 16), generator=gen(8))
    with torch.no_grad():
        model.eval()(ids)
        routes_before = [layer.last_routing.topk_ids.clone() for layer in moekit.moe_layers(model)]
    model.train()
    offsets = routing.logit_offsets(model)
    opt = torch.optim.SGD(offsets, lr=5.0)
    for _ in range(5):
        opt.zero_grad()
        logits = model(ids)
        # adapt towards expert 0: reward its gate probability (a stand-in for a test-time objective)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss = loss - sum(layer.last_routing.probs[:, 0].mean() for layer in moekit.moe_layers(model))
        loss.backward()
        opt.step()
    assert all(o.abs().sum() > 0 and o.grad is not None for o in offsets)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "a parameter or buffer moved"
    with torch.no_grad():
        model.eval()(ids)
        routes_after = [layer.last_routing.topk_ids for layer in moekit.moe_layers(model)]
    changed = sum(int((a != b).any(dim=-1).sum()) for a, b in zip(routes_before, routes_after))
    assert changed > 0
    share0 = sum(int((r == 0).sum()) for r in routes_after) / sum(int((r == 0).sum()) for r in routes_before)
    assert share0 > 1.0


def test_save_and_load_offsets(tmp_path):
    model = tiny_model()
    for i, o in enumerate(routing.logit_offsets(model)):
        with torch.no_grad():
            o.copy_(torch.randn(4, generator=gen(20 + i)))
    path = tmp_path / "offsets.safetensors"
    routing.save_logit_offsets(model, path)
    other = tiny_model(seed=3)
    kept = routing.logit_offsets(other)
    routing.load_logit_offsets(other, path)
    for a, b in zip(routing.logit_offsets(model), kept):
        assert torch.equal(a, b)  # loaded in place: tensors given to an optimiser stay valid
    assert routing.logit_offsets(other)[0] is kept[0]
    smaller = MoELM(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                moe=dict(hidden_dim=16, num_experts=4, top_k=2)))
    with pytest.raises(ValueError, match="missing: none; unexpected"):
        routing.load_logit_offsets(smaller, path)
    wider = tiny_model(num_experts=8)
    with pytest.raises(ValueError, match="shape"):
        routing.load_logit_offsets(wider, path)


# ------------------------------------------------------------------------------- router state stays float32
@pytest.mark.parametrize("name", routing.names())
def test_router_buffers_keep_float32_under_dtype_casts(name):
    r = build(name, **({"bias_update": "sign"} if name in ("topk", "momentum", "similarity") else {}))
    values = {}
    with torch.no_grad():
        for key, buf in r.named_buffers():
            if buf.is_floating_point() and buf.numel():
                buf.copy_(torch.randn(buf.shape, generator=gen(9)) * 10)
            values[key] = buf.clone()
    if r.has_logits:
        routing.logit_offsets(r)  # a trainable offset must stay a trainable leaf through the casts
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        r.to(dtype)
        for key, buf in r.named_buffers():
            assert buf.dtype == values[key].dtype and torch.equal(buf, values[key]), (name, key, dtype)
        for p in r.parameters():
            assert p.dtype == dtype
    if r.has_logits:
        assert r.logit_offset.is_leaf and r.logit_offset.requires_grad
    r.to(device="meta")  # device moves still apply
    assert all(buf.device.type == "meta" for buf in r.buffers())
    assert all(buf.dtype == values[key].dtype for key, buf in r.named_buffers())


def test_bf16_model_keeps_the_selection_bias_exact():
    layer = moekit.MoE(dim=8, hidden_dim=4, num_experts=4, top_k=2, bias_update="sign")
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.tensor([8.0917, 0.6, -1.25, 0.0]))
    layer = layer.to(torch.bfloat16)
    bias = layer.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias[0].item() == pytest.approx(8.0917, abs=1e-6)
    assert float(torch.tensor(8.0917).bfloat16()) == 8.0625  # what a bf16 buffer would have held
    model = tiny_model(bias_update="sign").to(torch.bfloat16)  # what `moekit train --dtype bfloat16` builds
    for layer in moekit.moe_layers(model):
        assert layer.gate.e_score_correction_bias.dtype == torch.float32
        assert layer.gate.logit_offset.dtype == torch.float32
        assert layer.gate.weight.dtype == torch.bfloat16
        assert layer.gate.load.counts_E.dtype == torch.float64


def test_bf16_sign_updates_move_a_small_step():
    """Sign updates of 1e-3 on a bias of 0.6 reach 0.65 after 50 updates under a bf16 model (a bf16 bias
    would be stuck: 0.6 + 1e-3 rounds back to 0.6 in bf16)."""
    layer = moekit.MoE(dim=8, hidden_dim=4, num_experts=4, top_k=2, bias_update="sign",
                       bias_update_rate=1e-3).to(torch.bfloat16)
    gate = layer.gate
    with torch.no_grad():
        gate.e_score_correction_bias.fill_(0.6)
    for _ in range(50):
        gate.load.add(torch.tensor([0.0, 10.0, 10.0, 10.0]))  # expert 0 underloaded: its bias rises
        gate.end_step()
    assert gate.e_score_correction_bias[0].item() == pytest.approx(0.65, abs=1e-5)
    assert float(torch.tensor(0.6).bfloat16() + 1e-3) == float(torch.tensor(0.6).bfloat16())


# -------------------------------------------------------------------------------------- top_k=1 warning
def test_top1_with_norm_topk_warns_and_gets_no_task_gradient():
    x = torch.randn(10, 8, generator=gen(10))

    def task_grad(**kw):
        torch.manual_seed(0)  # the same weights for every variant
        layer = moekit.MoE(dim=8, hidden_dim=4, num_experts=4, aux_loss="switch", **kw).train()
        layer(x).square().sum().backward()  # the task loss only (no auxiliary loss added)
        return layer.gate.weight.grad.abs().max()

    with pytest.warns(UserWarning, match="no gradient"):
        dead = task_grad(top_k=1, norm_topk=True)
    for kw in (dict(top_k=1, norm_topk=False), dict(top_k=2, norm_topk=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            alive = task_grad(**kw)
        # d/dw of w / (w + 1e-20) is zero up to float32 rounding of 1/w - w/w^2: noise, not a signal
        assert alive > 0 and dead < 1e-5 * alive, kw


# ------------------------------------------------------------------------------------ hooks and context
def test_hooks_are_base_class_attributes():
    assert Router.needs_attention is False and Router.updates_residual is False
    for name in routing.names():
        cls = routing.get(name)
        assert cls.updates_residual == (name in ("momentum", "adam")), name
        assert cls.needs_attention == (name == "attention"), name


def test_routing_context_typed_fields():
    ctx = RoutingContext()
    assert ctx.token_mask is None and ctx.attention_probs is None and ctx.kv_cache is None
    assert ctx.start_pos == 0 and ctx.extras == {}
    assert ctx.momentum.p is None and ctx.momentum.adam_layers_seen == 0
    assert RoutingContext().momentum is not ctx.momentum  # a fresh state per context unless shared


# --------------------------------------------------------------------------- sinkhorn at small temperature
def exact_top1(logits_TE):
    """Balanced assignment (each expert T/E tokens) maximising the summed logits, by the Hungarian method."""
    num_tokens, num_experts = logits_TE.shape
    slots = num_tokens // num_experts
    rows, cols = linear_sum_assignment(np.repeat(logits_TE, slots, axis=1), maximize=True)
    out = np.empty(num_tokens, dtype=np.int64)
    out[rows] = cols // slots
    return out


def test_sinkhorn_small_temperature_reaches_the_exact_balanced_assignment():
    """Untrained routers have small logits: at the default temperature top-1 misses the exact assignment for
    a good share of tokens; at epsilon=1e-4 it agrees for (almost) all of them, with exactly balanced loads."""
    agree_hot, agree_cold = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        hot = routing.get("sinkhorn")(dim=64, num_experts=8, top_k=1).train()  # moekit's init: std 0.02
        cold = routing.get("sinkhorn")(dim=64, num_experts=8, top_k=1, epsilon=1e-4, n_iters=200, tol=1e-6).train()
        cold.load_state_dict(hot.state_dict())
        x = torch.randn(256, 64, generator=gen(seed + 30))
        reference = exact_top1(reference_logits(hot, x).numpy())
        agree_hot.append(np.mean(hot(x).topk_ids[:, 0].numpy() == reference))
        chosen = cold(x).topk_ids[:, 0].numpy()
        agree_cold.append(np.mean(chosen == reference))
        assert np.abs(np.bincount(chosen, minlength=8) - 32).max() <= 1  # balanced up to a rounding tie
    assert np.mean(agree_hot) < 0.95
    assert np.mean(agree_cold) >= 0.99 and min(agree_cold) >= 0.98
