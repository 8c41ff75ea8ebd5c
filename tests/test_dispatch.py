"""moekit.dispatch: the fused expert autograd function, grouped products and the dispatch plan."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import moekit
from moekit.dispatch import ActivationSpec, fused_experts, grouped_mm, grouped_wgrad, make_plan
from moekit.experts import get_activation
from moekit.routing.base import Routing
from reference import ACTIVATION_NAMES, capacity_of, ffn, keep_mask, random_weights, rel_err


def glu_dispatch(x, token_S, weight_S, offsets, up, down, activation):
    """The one place that knows the fused function's argument list (moekit's dense experts' form)."""
    return fused_experts(x, token_S, weight_S, None, offsets, up, down,
                         ActivationSpec.from_activation(get_activation(activation)))


def offsets_of(counts):
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)


# ------------------------------------------------------------------------------ FusedExperts
def dispatch_case(activation, dtype=torch.float64, seed=0):
    """T=6 tokens, E=4 experts with rows [2, 0, 3, 1]; token 3 twice, token 5 never."""
    g = torch.Generator().manual_seed(seed)
    gated = activation in ("swiglu", "geglu")
    T, D, F, E = 6, 5, 3, 4
    H = 2 * F if gated else F
    token_S = torch.tensor([0, 3, 1, 2, 3, 4])
    counts = [2, 0, 3, 1]
    x = torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(len(token_S), generator=g, dtype=torch.float64).to(dtype) + 0.1
    up = (torch.randn(E, H, D, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    down = (torch.randn(E, D, F, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    return x, token_S, w, counts, up, down


def loop_dispatch(x, token_S, w, counts, up, down, activation):
    out = torch.zeros_like(x)
    s = 0
    for e, n in enumerate(counts):
        for _ in range(n):
            t = int(token_S[s])
            out[t] = out[t] + w[s] * ffn(x[t], up[e], down[e], activation)
            s += 1
    return out


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_grouped_glu_dispatch_gradcheck(activation):
    x, token_S, w, counts, up, down = dispatch_case(activation)
    offs = offsets_of(counts)
    args = [t.clone().requires_grad_(True) for t in (x, w, up, down)]

    def f(x_, w_, up_, down_):
        return glu_dispatch(x_, token_S, w_, offs, up_, down_, activation)

    # forward against a per-pair loop first
    assert rel_err(f(*args), loop_dispatch(x, token_S, w, counts, up, down, activation)) < 1e-12
    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_grouped_glu_dispatch_grads_vs_loop(activation):
    """Explicit gradients (input, gate weights, both weight tensors) vs autograd through the loop."""
    x, token_S, w, counts, up, down = dispatch_case(activation, seed=3)
    a = [t.clone().requires_grad_(True) for t in (x, w, up, down)]
    b = [t.clone().requires_grad_(True) for t in (x, w, up, down)]
    cot = torch.randn_like(x)
    out = glu_dispatch(a[0], token_S, a[1], offsets_of(counts), a[2], a[3], activation)
    (out * cot).sum().backward()
    (loop_dispatch(b[0], token_S, b[1], counts, b[2], b[3], activation) * cot).sum().backward()
    for name, p, q in zip(("x", "weight_S", "up", "down"), a, b):
        assert rel_err(p.grad, q.grad) < 1e-12, name
    assert torch.count_nonzero(a[0].grad[5]) == 0           # token 5 routed nowhere
    assert torch.count_nonzero(a[2].grad[1]) == 0           # expert 1 has no rows
    assert torch.count_nonzero(a[3].grad[1]) == 0


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_gradcheck_through_layer_expert_params(policy):
    """gradcheck of the whole layer with respect to every expert parameter (routing held fixed)."""
    E, D, F, T = 4, 5, 3, 7
    layer = moekit.MoE(dim=D, hidden_dim=F, num_experts=E, top_k=2, capacity_factor=0.75, drop_policy=policy,
                       eval_capacity_factor=0.75, num_shared_experts=1, shared_hidden_dim=2, shared_expert_gate=True,
                       aux_loss=None).double().eval()
    sd = random_weights(E, D, F, shared_hidden=2, shared_gate=True, seed=4)
    layer.load_state_dict(sd)
    x = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    names = [n for n in sd if n != "gate.weight"]
    fixed = {"gate.weight": sd["gate.weight"]}

    def f(*params):
        return functional_call(layer, {**fixed, **dict(zip(names, params))}, (x,))

    params = tuple(sd[n].clone().requires_grad_(True) for n in names)
    f(*params)
    assert layer.load.num_dropped > 0
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------- grouped_mm / wgrad
COUNT_PATTERNS = [
    [3, 0, 2, 4],        # empty expert in the middle
    [0, 0, 5, 0],        # only one expert has rows
    [0, 2, 3, 0],        # empty first and last
    [0, 0, 0, 0],        # no rows at all
    [1, 1, 1, 1],
]


def loop_mm(a, b, counts):
    out, s = [], 0
    for e, n in enumerate(counts):
        out.append(a[s:s + n] @ b[e])
        s += n
    return torch.cat(out) if out else a.new_zeros(0, b.shape[-1])


def loop_wgrad(dy, x, counts):
    out, s = [], 0
    for e, n in enumerate(counts):
        out.append(dy[s:s + n].T @ x[s:s + n])
        s += n
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", COUNT_PATTERNS)
@pytest.mark.parametrize("transposed_b", [False, True])
def test_grouped_mm_vs_loop(counts, dtype, transposed_b):
    g = torch.Generator().manual_seed(sum(counts))
    S, X, Y = sum(counts), 8, 12
    a = torch.randn(S, X, generator=g, dtype=torch.float64)
    b = torch.randn(len(counts), X, Y, generator=g, dtype=torch.float64)
    ref = loop_mm(a, b, counts)
    bb = b.to(dtype)
    if transposed_b:  # the layout the dispatch uses: weights [E, Y, X] viewed as [E, X, Y]
        bb = b.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    out = grouped_mm(a.to(dtype), bb, offsets_of(counts))
    assert out.shape == (S, Y) and out.dtype == dtype
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("counts", COUNT_PATTERNS)
def test_grouped_wgrad_vs_loop(counts, dtype):
    g = torch.Generator().manual_seed(10 + sum(counts))
    S, X, Y = sum(counts), 8, 4
    dy = torch.randn(S, Y, generator=g, dtype=torch.float64)
    x = torch.randn(S, X, generator=g, dtype=torch.float64)
    ref = loop_wgrad(dy, x, counts)
    for _ in range(3):  # repeated: empty experts must be zeros, not whatever memory held
        torch.full((len(counts), Y, X), 7.0, dtype=dtype).sum()
        out = grouped_wgrad(dy.to(dtype), x.to(dtype), offsets_of(counts))
        assert out.shape == (len(counts), Y, X) and out.dtype == dtype
        assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-13)
        for e, n in enumerate(counts):
            if n == 0:
                assert torch.count_nonzero(out[e]) == 0


@pytest.mark.parametrize("X,Y", [(5, 3), (6, 4), (4, 6)])
def test_grouped_mm_float32_widths_not_multiple_of_four(X, Y):
    counts = [2, 0, 3]
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, X, generator=g)
    b = torch.randn(3, X, Y, generator=g)
    assert rel_err(grouped_mm(a, b, offsets_of(counts)), loop_mm(a.double(), b.double(), counts)) < 1e-6
    dy = torch.randn(5, Y, generator=g)
    assert rel_err(grouped_wgrad(dy, a, offsets_of(counts)), loop_wgrad(dy.double(), a.double(), counts)) < 1e-6


# ------------------------------------------------------------------------------------------ plans
def brute_plan(ids, weights, num_experts, capacity_factor, policy):
    """Kept (token, weight) pairs per expert, routed counts and C, by brute force."""
    T = len(ids)
    K = len(ids[0]) if T else 0
    C = None if capacity_factor is None else capacity_of(capacity_factor, T, K, num_experts)
    kept = keep_mask(ids, weights, num_experts, C, policy)
    per_expert = {e: [] for e in range(num_experts)}
    routed = [0] * num_experts
    for t in range(T):
        for k, e in enumerate(ids[t]):
            routed[e] += 1
            if kept[t][k]:
                per_expert[e].append((t, weights[t][k]))
    return per_expert, routed, C


@st.composite
def plan_cases(draw):
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    skew = draw(st.booleans())
    ids = []
    for _ in range(T):
        perm = torch.randperm(E, generator=g).tolist()
        if skew and 0 in perm[K:]:  # push expert 0 into most tokens' choices
            perm.remove(0)
            perm.insert(0, 0)
        ids.append(perm[:K])
    ties = draw(st.booleans())
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    if ties:
        w = (w * 2).round() / 2  # values in {0, 0.5, 1}: many exact ties
    return dict(E=E, K=K, T=T, ids=ids, w=w,
                cf=draw(st.sampled_from([None, 0.25, 0.5, 1.0, 1.3, 2.0])),
                policy=draw(st.sampled_from(["position", "probs"])),
                pad=draw(st.booleans()))


@settings(max_examples=60)
@given(plan_cases())
def test_make_plan_vs_brute_force(case):
    E, K, T, ids, cf, policy, pad = (case[k] for k in ("E", "K", "T", "ids", "cf", "policy", "pad"))
    weights = case["w"].clone().requires_grad_(True)
    routing = Routing.from_topk(torch.tensor(ids, dtype=torch.int64), weights, E)
    plan = make_plan(routing, cf, policy, pad)
    per_expert, routed, C = brute_plan(ids, case["w"].tolist(), E, cf, policy)
    kept = [len(per_expert[e]) for e in range(E)]

    assert plan.routed_E.tolist() == routed
    assert plan.kept_E.tolist() == kept
    assert plan.num_pairs == T * K and plan.num_tokens == T
    assert plan.num_dropped == T * K - sum(kept)
    assert plan.capacity == C
    padded = cf is not None and pad
    counts = [C] * E if padded else kept
    assert plan.counts_E.tolist() == counts
    assert plan.offsets_E.dtype == torch.int32
    assert plan.offsets_E.tolist() == [sum(counts[:e + 1]) for e in range(E)]
    n = sum(counts)
    assert plan.token_S.shape == (n,) and plan.weight_S.shape == (n,) and plan.expert_S.shape == (n,)

    start = 0
    for e in range(E):
        seg = slice(start, start + counts[e])
        start += counts[e]
        assert (plan.expert_S[seg] == e).all()
        rows = list(zip(plan.token_S[seg].tolist(), plan.weight_S[seg].tolist()))
        real = rows[:kept[e]] if padded else rows
        assert sorted(real) == sorted(per_expert[e]), (e, real, per_expert[e])
        for t, w in rows[len(real):]:  # padding rows: weight 0, token 0
            assert w == 0.0 and t == 0

    # weight_S is differentiable: each kept pair's routing weight gets gradient 1, dropped pairs 0
    if n:
        plan.weight_S.sum().backward()
        grad = weights.grad if weights.grad is not None else torch.zeros_like(weights)
        for t in range(T):
            for k, e in enumerate(ids[t]):
                expected = 1.0 if any(tt == t for tt, _ in per_expert[e]) else 0.0
                assert grad[t, k].item() == expected


def test_plan_probs_policy_breaks_ties_by_position():
    """Equal weights everywhere: 'probs' keeps the same pairs as 'position' (earliest first)."""
    ids = torch.tensor([[0], [0], [1], [0], [0], [1]])
    w = torch.full((6, 1), 0.5)
    routing = Routing.from_topk(ids, w, 2)
    C = math.ceil(0.5 * 6 / 2)  # 2
    for policy in ("position", "probs"):
        plan = make_plan(routing, 0.5, policy)
        assert plan.capacity == C
        assert sorted(plan.token_S[:2].tolist()) == [0, 1]
        assert sorted(plan.token_S[2:].tolist()) == [2, 5]
    plan = make_plan(Routing.from_topk(ids, torch.tensor([[.1], [.2], [.9], [.8], [.3], [.4]]), 2), 0.5, "probs")
    assert sorted(plan.token_S[:2].tolist()) == [3, 4]  # weights .8 and .3 on expert 0


def test_expert_capacity_formula():
    from moekit.dispatch import expert_capacity
    for cf, S, E in [(1.0, 12, 4), (1.25, 10, 4), (0.1, 3, 8), (2.0, 7, 3), (1.0, 1, 1)]:
        assert expert_capacity(cf, S, E) == max(1, math.ceil(cf * S / E))


def test_bfloat16_layer_runs_the_kernel_path_and_stays_close_to_float32():
    """The dtype used on GPUs: bfloat16 weights and input through torch._grouped_mm (on the CPU here)."""
    import moekit
    from moekit.dispatch import grouped

    torch.manual_seed(0)
    layer = moekit.MoE(dim=64, hidden_dim=32, num_experts=8, top_k=2, aux_loss=None)
    x = torch.randn(4, 16, 64)
    ref = layer(x)
    layer_bf16 = moekit.MoE(dim=64, hidden_dim=32, num_experts=8, top_k=2, aux_loss=None).to(torch.bfloat16)
    layer_bf16.load_state_dict(layer.state_dict())
    w = layer_bf16.experts.gate_up_proj
    assert grouped._use_kernel(x.bfloat16().reshape(-1, 64), w.transpose(1, 2))
    x_bf16 = x.bfloat16().requires_grad_(True)
    out = layer_bf16(x_bf16)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x_bf16.grad.dtype == torch.bfloat16
    rel = (out.float() - ref).abs().max() / ref.abs().max()
    assert rel < 3e-2
    assert torch.isfinite(w.grad.float()).all() and w.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ FusedExperts edge cases
def test_gated_activation_returning_its_input_keeps_gradients_exact():
    """A bilinear GLU (act = identity) hands back a view of h; the forward must not write into the saved h."""
    from moekit.experts.activations import Activation

    def identity_backward(grad, x, out):
        out.copy_(grad)

    bilinear = Activation("bilinear", lambda t: t, True, identity_backward)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(2, 6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    down = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, generator=gen, requires_grad=True)
    token_S = torch.tensor([0, 1, 2, 3, 2, 3, 4, 5])
    offsets = torch.tensor([4, 8], dtype=torch.int32)
    gate = ActivationSpec.from_activation(bilinear)
    for combine in (True, False):
        torch.autograd.gradcheck(
            lambda x, up, down, w: fused_experts(x, token_S, w, None, offsets, up, down, gate, combine=combine),
            (x, up, down, w))


def test_dense_experts_pickle():
    import io

    from moekit.experts.dense import DenseExperts

    buf = io.BytesIO()
    torch.save(DenseExperts(4, 8, 4, "swiglu"), buf)  # the gate is a module-level callable, not a closure
    buf.seek(0)
    experts = torch.load(buf, weights_only=False)
    assert experts.act_spec.fast is not None and experts.act_spec.fn(torch.ones(2, 8)).shape == (2, 4)


def test_gate_with_parameters_must_use_autograd():
    with pytest.raises(ValueError, match="autograd path"):
        ActivationSpec(torch.sigmoid, get_activation("gelu"), (torch.zeros(1, requires_grad=True),))


def test_fused_experts_is_differentiated_once():
    x = torch.randn(4, 8, requires_grad=True)
    up, down = torch.randn(2, 8, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    out = fused_experts(x, torch.arange(4), torch.ones(4), None, torch.tensor([2, 4], dtype=torch.int32), up, down,
                        ActivationSpec.from_activation(get_activation("swiglu")))
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()
