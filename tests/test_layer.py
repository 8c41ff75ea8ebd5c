"""moekit.MoE against the slow reference in tests/reference.py: outputs and gradients."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moekit
from moekit import MoEConfig
from reference import (
    ACTIVATION_NAMES,
    leaves,
    random_weights,
    ref_max_violation,
    ref_switch_loss,
    reference_from_state,
    rel_err,
)

# The router runs in float32 whatever the input dtype (documented), so even float64 layers agree with
# the reference only to float32 rounding in the gate weights.
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}
# Gradients of the router weight go through float32 logits: with large logits (forced routing) a 1-ulp
# difference in a logit is already ~2e-6 relative.
ROUTER_GRAD_TOL = 3e-5

ROUTER_KEYS = ("score_func", "norm_topk", "scaling_factor", "num_groups", "topk_groups",
               "capacity_factor", "drop_policy")


def build(E, D, F, K, *, activation="swiglu", dtype=torch.float64, seed=0, shared_hidden=None,
          shared_gate=False, num_shared=None, **cfg):
    """A moekit layer and the state dict loaded into it."""
    cfg.setdefault("aux_loss", None)
    # the layer runs in eval mode (no noise, no losses): the capacity under test must apply at inference too
    cfg.setdefault("eval_capacity_factor", cfg.get("capacity_factor"))
    if num_shared is None:
        num_shared = 1 if shared_hidden else 0
    config = MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, activation=activation,
                       num_shared_experts=num_shared, shared_hidden_dim=shared_hidden,
                       shared_expert_gate=shared_gate, **cfg)
    layer = moekit.MoE(config).to(dtype).eval()
    width = None if not num_shared else num_shared * (shared_hidden or F)
    sd = random_weights(E, D, F, activation, shared_hidden=width, shared_gate=shared_gate, seed=seed,
                        dtype=dtype)
    layer.load_state_dict(sd, strict=True)
    return layer, sd


def ref_kwargs(layer):
    c = layer.config
    kw = {k: getattr(c, k) for k in ROUTER_KEYS}
    kw.update(top_k=c.top_k, activation=c.activation)
    return kw


def run_both(layer, sd, x, seed=1, **extra_ref):
    """Forward + backward through moekit and the reference with the same random cotangent."""
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xm = x.detach().clone().requires_grad_(True)
    out = layer(xm)
    (out * cot.to(out.dtype)).sum().backward()

    D = x.shape[-1]
    xr = x.detach().clone().double().reshape(-1, D).requires_grad_(True)
    sdr = leaves({k: v.double() for k, v in sd.items()})
    kw = ref_kwargs(layer)
    kw.update(extra_ref)
    ref = reference_from_state(xr, sdr, **kw)
    (ref.out * cot.reshape(-1, D)).sum().backward()
    return out, xm, ref, xr, sdr


def assert_matches(layer, out, xm, ref, xr, sdr, tol):
    D = xm.shape[-1]
    assert out.shape == xm.shape and out.dtype == xm.dtype
    assert rel_err(out.reshape(-1, D), ref.out) < tol, "output"
    assert rel_err(xm.grad.reshape(-1, D), xr.grad) < tol, "grad of input"
    params = dict(layer.named_parameters())
    assert set(params) == set(sdr), (sorted(params), sorted(sdr))
    for name, p in params.items():
        assert p.grad is not None, name
        limit = max(tol, ROUTER_GRAD_TOL) if name == "gate.weight" else tol
        err = rel_err(p.grad, sdr[name].grad)
        if name == "gate.weight":  # saturated scores: both gradients may be float32 rounding noise
            err = (p.grad - sdr[name].grad).abs().max().item() / max(sdr[name].grad.abs().max().item(), 1e-7)
        assert err < limit, f"grad of {name}: {err}"


def x_of(T, D, seed=2, dtype=torch.float64, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    return x if shape is None else x.reshape(*shape, D)


# ------------------------------------------------------------------------------------ fixed cases
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_matches_reference_every_activation(activation, dtype):
    layer, sd = build(6, 8, 4, 2, activation=activation, dtype=dtype, shared_hidden=3, shared_gate=True)
    x = x_of(11, 8, dtype=dtype)
    res = run_both(layer, sd, x)
    assert_matches(layer, *res, tol=TOL[dtype])
    assert len(res[2].ids) == 11


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("D,F", [(8, 5), (6, 4), (5, 3)])
def test_float32_widths_not_multiple_of_four(D, F, activation):
    """float32 takes the torch._grouped_mm path; model widths that are not multiples of 4 must work too."""
    layer, sd = build(4, D, F, 2, activation=activation, dtype=torch.float32)
    res = run_both(layer, sd, x_of(7, D, dtype=torch.float32))
    assert_matches(layer, *res, tol=TOL[torch.float32])


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_sigmoid_scores_norm_scaling_groups(activation):
    layer, sd = build(8, 6, 4, 3, activation=activation, score_func="sigmoid", norm_topk=True,
                      scaling_factor=2.5, num_groups=4, topk_groups=2)
    res = run_both(layer, sd, x_of(9, 6))
    assert_matches(layer, *res, tol=TOL[torch.float64])


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 1, 3)])
def test_leading_shapes(shape):
    T = math.prod(shape) if shape else 1
    layer, sd = build(4, 6, 3, 2, shared_hidden=4)
    x = x_of(T, 6).reshape(*shape, 6)
    out, xm, ref, xr, sdr = run_both(layer, sd, x)
    assert out.shape == x.shape
    assert_matches(layer, out, xm, ref, xr, sdr, tol=TOL[torch.float64])


def test_non_contiguous_input():
    layer, sd = build(4, 6, 3, 2)
    x = x_of(12, 6).reshape(6, 2, 6).transpose(0, 1)  # [2, 6, 6], not contiguous
    assert not x.is_contiguous()
    res = run_both(layer, sd, x)
    assert_matches(layer, *res, tol=TOL[torch.float64])


def test_several_shared_experts_are_one_wide_ffn():
    """num_shared_experts=2 of width 3 equals the sum of two width-3 FFNs (halves of the wide one)."""
    layer, sd = build(4, 6, 3, 2, shared_hidden=3, num_shared=2)
    assert layer.shared_expert.up_proj.weight.shape == (6, 6)
    x = x_of(5, 6)
    routed_only = {k: v for k, v in sd.items() if not k.startswith("shared")}
    ref = reference_from_state(x, routed_only, **ref_kwargs(layer)).out
    for half in (slice(0, 3), slice(3, 6)):
        g = sd["shared_expert.gate_proj.weight"][half]
        u = sd["shared_expert.up_proj.weight"][half]
        d = sd["shared_expert.down_proj.weight"][:, half]
        ref = ref + (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    with torch.no_grad():
        assert rel_err(layer(x), ref) < TOL[torch.float64]


# -------------------------------------------------------------------------------- property-based
@st.composite
def layer_cases(draw):
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 7))
    case = dict(
        E=E, K=K, T=T,
        D=draw(st.integers(1, 6)),
        F=draw(st.integers(1, 4)),
        activation=draw(st.sampled_from(ACTIVATION_NAMES)),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        # norm_topk with K=1 is covered by test_routing_topk.test_norm_topk_single_expert
        norm_topk=draw(st.booleans()) if K > 1 else False,
        scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        capacity_factor=draw(st.sampled_from([None, None, 0.25, 0.5, 1.0, 1.5])),
        drop_policy=draw(st.sampled_from(["position", "probs"])),
        pad_to_capacity=draw(st.booleans()),
        shared=draw(st.sampled_from([None, 2])),
        shared_gate=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        lead=draw(st.sampled_from(["flat", "batch"])),
        hot=draw(st.sampled_from([None, None, 0, E - 1])),  # force every token's top-1 onto one expert
    )
    return case


@settings(max_examples=40)
@given(layer_cases())
def test_property_matches_reference(case):
    c = case
    if c["capacity_factor"] is None:
        c["pad_to_capacity"] = False
    layer, sd = build(c["E"], c["D"], c["F"], c["K"], activation=c["activation"], seed=c["seed"],
                      shared_hidden=c["shared"], shared_gate=bool(c["shared"]) and c["shared_gate"],
                      score_func=c["score_func"], norm_topk=c["norm_topk"],
                      scaling_factor=c["scaling_factor"], capacity_factor=c["capacity_factor"],
                      drop_policy=c["drop_policy"], pad_to_capacity=c["pad_to_capacity"])
    T = c["T"]
    shape = (1, T) if c["lead"] == "batch" else (T,)
    x = x_of(T, c["D"], seed=c["seed"] + 1)
    if c["hot"] is not None:
        pin_first_coord(x)
        force_one_expert(sd, x, hot=c["hot"])
        layer.load_state_dict(sd)
    x = x.reshape(*shape, c["D"])
    out, xm, ref, xr, sdr = run_both(layer, sd, x, seed=c["seed"] + 2)
    if c["hot"] is not None:
        assert all(ids[0] == c["hot"] for ids in ref.ids)
    assert_matches(layer, out, xm, ref, xr, sdr, tol=TOL[torch.float64])
    # load statistics against the reference's own bookkeeping
    assert layer.load.routed_E.tolist() == ref.routed_E
    assert layer.load.kept_E.tolist() == ref.kept_E
    assert layer.load.num_pairs == T * c["K"]
    assert layer.load.num_dropped == ref.num_dropped


# --------------------------------------------------------------------- forced routing, dropping, stats
def force_one_expert(sd, x, hot=0, cold=()):
    """Router weights under which every token's top-1 is expert ``hot`` and experts ``cold`` are never picked.

    Needs ``x[:, 0]`` in [1, 1.5] (see :func:`pin_first_coord`): logit_hot in [4, 6], logit_cold <= -4, the
    others below 1 in size. The margin is kept moderate on purpose: the router runs in float32, and a
    top score near 1 makes its backward (``p * (1 - p)``) cancel catastrophically in float32.
    """
    w = sd["gate.weight"]
    w.mul_(0.02)
    w[hot, 0] = 4.0
    for e in cold:
        w[e, 0] = -4.0
    return sd


def pin_first_coord(x):
    x[:, 0] = 1.0 + 0.25 * x[:, 0].abs().clamp(max=2.0)
    return x


def positive_first_coord(T, D, seed=3):
    return pin_first_coord(x_of(T, D, seed=seed))


@pytest.mark.parametrize("K", [1, 2])
def test_all_tokens_on_one_expert_and_empty_experts(K):
    E, D, T = 6, 5, 9
    layer, sd = build(E, D, 3, K)
    x = positive_first_coord(T, D)
    force_one_expert(sd, x, hot=2, cold=(0, 4, 5))
    layer.load_state_dict(sd)
    out, xm, ref, xr, sdr = run_both(layer, sd, x)
    assert all(ids[0] == 2 for ids in ref.ids)
    assert_matches(layer, out, xm, ref, xr, sdr, tol=TOL[torch.float64])
    routed = torch.bincount(torch.tensor([e for ids in ref.ids for e in ids]), minlength=E)
    assert routed[2] == T and routed[0] == routed[4] == routed[5] == 0
    assert torch.equal(layer.load.routed_E.cpu(), routed)
    # experts that got no token get exactly zero gradient
    for e in (0, 4, 5):
        assert torch.count_nonzero(layer.experts.gate_up_proj.grad[e]) == 0
        assert torch.count_nonzero(layer.experts.down_proj.grad[e]) == 0
    mean = T * K / E
    assert layer.load.max_violation == pytest.approx((routed.max().item() - mean) / mean, rel=1e-12)
    assert layer.load.dropped_fraction == 0.0


@pytest.mark.parametrize("T,E,K,cf", [(1, 3, 3, None), (1, 1, 1, None), (1, 4, 2, 0.5), (2, 5, 5, 1.0),
                                      (3, 4, 4, 0.25)])
def test_edge_shapes(T, E, K, cf):
    """T=1, K=E, and capacities so small that C=1."""
    layer, sd = build(E, 4, 3, K, capacity_factor=cf, drop_policy="probs", norm_topk=K > 1)
    out, xm, ref, xr, sdr = run_both(layer, sd, x_of(T, 4, seed=T + E))
    assert_matches(layer, out, xm, ref, xr, sdr, tol=TOL[torch.float64])
    assert layer.load.num_pairs == T * K and layer.load.routed_E.sum() == T * K
    if cf is not None:
        assert ref.capacity == math.ceil(cf * T * K / E)
        assert layer.load.num_dropped == ref.num_dropped


def test_one_expert_total():
    """E = K = 1: every token goes through the single expert with weight 1 (softmax)."""
    layer, sd = build(1, 4, 3, 1, shared_hidden=2)
    res = run_both(layer, sd, x_of(5, 4))
    assert_matches(layer, *res, tol=TOL[torch.float64])
    assert all(float(w[0].detach()) == 1.0 for w in res[2].weights)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("K", [1, 2])
def test_capacity_dropping_on_overloaded_expert(policy, K):
    E, D, T = 4, 5, 8
    layer, sd = build(E, D, 3, K, capacity_factor=1.0, drop_policy=policy)
    x = positive_first_coord(T, D, seed=5)
    force_one_expert(sd, x, hot=1)
    layer.load_state_dict(sd)
    out, xm, ref, xr, sdr = run_both(layer, sd, x)
    C = math.ceil(1.0 * T * K / E)
    assert ref.capacity == C and layer.load.kept_E[1] == C
    kept_hot = [t for t in range(T) if ref.kept[t][0]]
    if policy == "position":
        assert kept_hot == list(range(C))
    else:  # the C tokens with the highest weight on expert 1
        w = [float(ref.weights[t][0].detach()) for t in range(T)]
        assert sorted(kept_hot) == sorted(sorted(range(T), key=lambda t: -w[t])[:C])
    assert_matches(layer, out, xm, ref, xr, sdr, tol=TOL[torch.float64])
    # a token whose every pair was dropped gets an exactly zero output row
    for t in range(T):
        if not any(ref.kept[t]):
            assert torch.count_nonzero(out.reshape(-1, D)[t]) == 0
    assert layer.load.num_dropped == ref.num_dropped > 0
    assert layer.load.dropped_fraction == pytest.approx(ref.num_dropped / (T * K))


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_pad_to_capacity_does_not_change_outputs(policy):
    E, D, T, K = 5, 6, 9, 2
    common = dict(capacity_factor=1.25, drop_policy=policy, shared_hidden=3)
    plain, sd = build(E, D, 4, K, seed=7, **common)
    padded, _ = build(E, D, 4, K, seed=7, pad_to_capacity=True, **common)
    x = x_of(T, D, seed=8)
    out_p, xm_p, ref, xr, sdr = run_both(plain, sd, x)
    out_q, xm_q, *_ = run_both(padded, sd, x)
    assert_matches(padded, out_q, xm_q, ref, xr, sdr, tol=TOL[torch.float64])
    assert torch.allclose(out_p, out_q, rtol=1e-12, atol=1e-12)
    assert torch.allclose(xm_p.grad, xm_q.grad, rtol=1e-12, atol=1e-12)
    for (n, a), (_, b) in zip(plain.named_parameters(), padded.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12), n


def test_capacity_with_random_routing_both_policies_differ_from_dropless():
    """Tight capacity really drops something and the two policies keep different pairs here."""
    E, D, T, K = 4, 6, 16, 2
    layer_pos, sd = build(E, D, 3, K, seed=11, capacity_factor=0.5, drop_policy="position")
    layer_prob, _ = build(E, D, 3, K, seed=11, capacity_factor=0.5, drop_policy="probs")
    x = x_of(T, D, seed=12)
    a = run_both(layer_pos, sd, x)
    b = run_both(layer_prob, sd, x)
    assert_matches(layer_pos, *a, tol=TOL[torch.float64])
    assert_matches(layer_prob, *b, tol=TOL[torch.float64])
    assert a[2].kept != b[2].kept
    assert layer_pos.load.num_dropped == a[2].num_dropped > 0


def test_load_stats_hand_formula():
    E, D, T, K = 4, 5, 10, 2
    layer, sd = build(E, D, 3, K, seed=21, capacity_factor=1.0)
    x = x_of(T, D, seed=22)
    with torch.no_grad():
        layer(x)
    ref = reference_from_state(x, sd, **ref_kwargs(layer))
    ids = torch.tensor(ref.ids).reshape(-1)
    routed = torch.bincount(ids, minlength=E)
    assert torch.equal(layer.load.routed_E.cpu(), routed)
    C = math.ceil(T * K / E)
    kept = routed.clamp(max=C)
    assert torch.equal(layer.load.kept_E.cpu(), kept)
    mean = T * K / E
    assert layer.load.max_violation == pytest.approx((routed.max().item() - mean) / mean)
    assert layer.load.max_violation == pytest.approx(ref_max_violation(routed.tolist()))
    assert layer.load.dropped_fraction == pytest.approx((T * K - kept.sum().item()) / (T * K))


def test_nan_input_propagates_to_its_rows_only():
    E, D, T = 4, 6, 7
    layer, sd = build(E, D, 3, 2, shared_hidden=2)
    x = x_of(T, D, seed=31)
    x_nan = x.clone()
    x_nan[3, 2] = float("nan")
    with torch.no_grad():
        out = layer(x_nan)
    assert torch.isnan(out[3]).all()
    others = [t for t in range(T) if t != 3]
    assert torch.isfinite(out[others]).all()
    ref = reference_from_state(x[others], sd, **ref_kwargs(layer)).out
    assert rel_err(out[others], ref) < TOL[torch.float64]


def test_nan_input_in_training_with_capacity_does_not_raise():
    layer, sd = build(4, 6, 3, 2, capacity_factor=1.0, drop_policy="probs", aux_loss="switch")
    layer.train()
    x = x_of(6, 6, seed=32)
    x[0, 0] = float("nan")
    out = layer(x)
    assert torch.isnan(out[0]).all()


# ----------------------------------------------------------------------------------- aux losses
def test_aux_loss_sums_over_layers_in_sequential():
    E, D, T = 4, 6, 8
    layers = []
    for i, kind in enumerate(["switch", "switch", "sequence"]):
        layer, _ = build(E, D, 3, 2, seed=40 + i, aux_loss=kind, aux_loss_coef=0.1 * (i + 1),
                         z_loss_coef=0.01 if i == 1 else 0.0)
        layers.append(layer.train())
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1], layers[2])
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone())) for m in layers]
    x = x_of(T, D, seed=43).reshape(2, 4, D)
    model(x)
    for h in hooks:
        h.remove()
    expected = 0.0
    for i, (layer, inp) in enumerate(zip(layers, inputs)):
        sd = {k: v.detach() for k, v in layer.state_dict().items()}
        ref = reference_from_state(inp.reshape(-1, D), sd, **ref_kwargs(layer))
        coef = 0.1 * (i + 1)
        if layer.config.aux_loss == "switch":
            loss = coef * float(ref_switch_loss(ref.probs.double(), ref.ids, E))
        else:  # per sequence of 4 tokens, then averaged
            parts = [float(ref_switch_loss(ref.probs[s * 4:(s + 1) * 4].double(), ref.ids[s * 4:(s + 1) * 4], E))
                     for s in range(2)]
            loss = coef * sum(parts) / 2
        if i == 1:
            lse = torch.logsumexp(ref.logits.double(), dim=-1)
            loss += 0.01 * float((lse ** 2).mean())
        assert float(layer.aux_loss.detach()) == pytest.approx(loss, rel=1e-5)
        expected += loss
    total = moekit.aux_loss(model)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert total.requires_grad
    total.backward()
    assert all(layer.gate.weight.grad is not None for layer in layers)


def test_aux_loss_gradient_matches_reference():
    E, D, T = 5, 6, 9
    layer, sd = build(E, D, 3, 2, seed=50, aux_loss="switch", aux_loss_coef=0.3)
    layer.train()
    x = x_of(T, D, seed=51)
    layer(x)
    layer.aux_loss.backward()
    sdr = leaves(sd)
    ref = reference_from_state(x, sdr, **ref_kwargs(layer))
    (0.3 * ref_switch_loss(ref.probs, ref.ids, E)).backward()
    assert rel_err(layer.gate.weight.grad, sdr["gate.weight"].grad) < 1e-5


def test_aux_loss_of_model_without_losses_is_zero():
    layer, _ = build(4, 6, 3, 2, aux_loss="switch")
    model = nn.Sequential(layer.eval())
    model(x_of(3, 6))
    total = moekit.aux_loss(model)
    assert total.shape == () and float(total) == 0.0
