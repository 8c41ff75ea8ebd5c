"""Batch-level routers: expert choice, Sinkhorn (BASE / Megatron), Selective Sinkhorn Routing, sparsity-constrained
OT. Each against a brute force or an exact solver (scipy) on small instances, plus the MoE layer end to end."""
from __future__ import annotations

import itertools
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment, linprog

import moekit
from moekit import routing
from moekit.routing.sinkhorn import log_sinkhorn
from moekit.routing.sparse_ot import semi_dual, simplex_projection_sorted, solve_sparse_ot
from moekit.routing.ssr import ssr_log_plan

ROUTERS = ("expert_choice", "sinkhorn", "ssr", "sparse_ot")


def make_router(name, D, E, K, seed=0, scale=1.0, **kw):
    r = routing.get(name)(dim=D, num_experts=E, top_k=K, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(seed)) * scale)
    return r.train()


def xs(T, D, seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def brute_logits(r, x):
    return x.double() @ r.weight.detach().double().T


def grad_of(fn, W):
    """Gradient of the scalar ``fn(W)`` at a float64 copy of ``W``."""
    W = W.detach().double().clone().requires_grad_(True)
    fn(W).backward()
    return W.grad


# ------------------------------------------------------------------------------------------------ registry
def test_registered_with_properties():
    for name in ROUTERS:
        cls = routing.get(name)
        assert issubclass(cls, routing.Router) and cls.causal is False, name
        assert "arXiv:" in sys.modules[cls.__module__].__doc__, name
    assert routing.get("expert_choice").balances_itself
    assert routing.get("sinkhorn").balances_itself
    assert routing.get("sparse_ot").balances_itself
    assert not routing.get("ssr").balances_itself  # balanced only on its Sinkhorn calls


@pytest.mark.parametrize("name,kw,field", [
    ("expert_choice", dict(capacity_factor=0), "capacity_factor"),
    ("expert_choice", dict(eval_routing="greedy"), "eval_routing"),
    ("sinkhorn", dict(n_iters=0), "n_iters"), ("sinkhorn", dict(epsilon=-1.0), "epsilon"),
    ("sinkhorn", dict(weights_from="relu"), "weights_from"), ("ssr", dict(sinkhorn_prob=1.5), "sinkhorn_prob"),
    ("ssr", dict(cost="l2"), "cost"), ("ssr", dict(epsilon=0.0), "epsilon"),
    ("sparse_ot", dict(max_tokens_per_expert=0), "max_tokens_per_expert"), ("sparse_ot", dict(gamma=0), "gamma"),
    ("sparse_ot", dict(max_evals=1.5), "max_evals"),
])
def test_bad_options_name_the_field(name, kw, field):
    with pytest.raises(ValueError, match=field):
        routing.get(name)(dim=4, num_experts=4, top_k=2, **kw)


# ---------------------------------------------------------------------------------------- expert choice
@settings(max_examples=25)
@given(T=st.integers(1, 12), E=st.integers(1, 6), cf=st.sampled_from([None, 0.5, 1.0, 1.5, 2.0]),
       seed=st.integers(0, 10_000))
def test_expert_choice_vs_per_expert_sort(T, E, cf, seed):
    K = min(2, E)
    r = make_router("expert_choice", 5, E, K, seed=seed, capacity_factor=cf)
    x = xs(T, 5, seed=seed + 1)
    out = r(x)
    probs = torch.softmax(brute_logits(r, x), dim=-1)
    C = min(T, max(1, math.ceil(T * (K if cf is None else cf) / E - 1e-9)))
    assert out.tokens_per_expert().tolist() == [C] * E
    for e in range(E):
        mine = out.token_ids[out.expert_ids == e].tolist()
        assert len(set(mine)) == C
        order = sorted(range(T), key=lambda t: -float(probs[t, e]))  # brute force: sort the column
        kth = float(probs[order[C - 1], e])
        assert all(float(probs[t, e]) >= kth - 1e-6 for t in mine)
        assert sum(float(probs[t, e]) > kth + 1e-6 for t in range(T)) <= C
    assert torch.allclose(out.weights.double(), probs[out.token_ids, out.expert_ids], rtol=1e-5)
    assert out.aux_losses == {}


def test_expert_choice_exact_capacity_and_gradient():
    r = make_router("expert_choice", 6, 4, 2, seed=3, capacity_factor=1.5)
    x = xs(16, 6, seed=4)  # T * c / E = 6, whole
    out = r(x)
    assert r.capacity(16) == 6 and out.tokens_per_expert().tolist() == [6, 6, 6, 6]
    assert r.capacity(7) == 3 and r.capacity(0) == 0  # ceil(2.625)
    cot = torch.randn(out.num_pairs, generator=torch.Generator().manual_seed(5))
    (out.weights * cot).sum().backward()
    tok, exp = out.token_ids, out.expert_ids
    ref = grad_of(lambda W: (torch.softmax(x.double() @ W.T, -1)[tok, exp] * cot.double()).sum(), r.weight)
    assert torch.allclose(r.weight.grad.double(), ref, rtol=1e-4, atol=1e-6)


def test_expert_choice_eval_fallback_is_token_choice():
    r = make_router("expert_choice", 6, 5, 2, seed=6)
    x = xs(9, 6, seed=7)
    train_out = r(x)
    r.eval()
    out = r(x)
    probs = torch.softmax(brute_logits(r, x), -1)
    assert out.topk_ids.shape == (9, 2)
    assert torch.equal(out.topk_ids.sort(-1).values, probs.topk(2, -1).indices.sort(-1).values)
    assert torch.allclose(out.topk_weights.double(), probs.gather(1, out.topk_ids), rtol=1e-5)
    # a token's eval routing does not depend on the other tokens (causal), unlike the training routing
    assert torch.equal(r(x[:3]).topk_ids, out.topk_ids[:3])
    r.eval_routing = "batch"
    assert torch.equal(r(x).token_ids, train_out.token_ids)


# ---------------------------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_log_sinkhorn_marginals(eps):
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(37, 6, generator=g, dtype=torch.float64) * 2 / eps
    log_row = torch.full((37,), math.log(2.0), dtype=torch.float64)
    log_col = torch.log(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    log_col = log_col + math.log(74.0) - torch.logsumexp(log_col, 0)  # total column mass = total row mass
    plan = log_sinkhorn(scores, log_row, log_col, n_iters=3000, tol=1e-6).exp()
    assert torch.allclose(plan.sum(1), log_row.exp(), rtol=1e-3)
    assert torch.allclose(plan.sum(0), log_col.exp(), rtol=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_sinkhorn_top1_approaches_optimal_balanced_assignment(seed):
    """T=8, E=4, K=1: each expert's capacity is 2; small epsilon approaches the balanced linear assignment."""
    r = make_router("sinkhorn", 5, 4, 1, seed=seed, epsilon=0.01, n_iters=5000, tol=1e-6)
    x = xs(8, 5, seed=seed + 100)
    out = r(x)
    logits = brute_logits(r, x).numpy()
    rows, cols = linear_sum_assignment(np.repeat(logits, 2, axis=1), maximize=True)  # expert e -> columns 2e, 2e+1
    optimum = logits[rows, cols // 2].sum()
    chosen = out.topk_ids[:, 0].numpy()
    assert np.bincount(chosen, minlength=4).tolist() == [2, 2, 2, 2]
    assert logits[np.arange(8), chosen].sum() == pytest.approx(optimum, abs=1e-4)


def test_sinkhorn_selection_and_megatron_gates():
    r = make_router("sinkhorn", 6, 5, 2, seed=9, epsilon=0.5, n_iters=300, tol=0.0)
    x = xs(20, 6, seed=10)
    out = r(x)
    logits = brute_logits(r, x)
    # independent reference: multiplicative Sinkhorn (Megatron-Core's form) in float64, rows 2, columns 20*2/5
    kernel = torch.exp(logits / 0.5)
    u, v = torch.ones(20, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    for _ in range(300):
        v = 8.0 / (kernel.T @ u)
        u = 2.0 / (kernel @ v)
    plan = u[:, None] * kernel * v[None, :]
    assert torch.equal(out.topk_ids.sort(-1).values, plan.topk(2, -1).indices.sort(-1).values)
    probs = torch.softmax(logits, -1)
    assert torch.allclose(out.topk_weights.double(), probs.gather(1, out.topk_ids), rtol=1e-5)
    r.weights_from = "sigmoid"
    assert torch.allclose(r(x).topk_weights.double(), torch.sigmoid(logits).gather(1, out.topk_ids), rtol=1e-5)
    assert out.aux_losses == {}


def test_sinkhorn_plan_gate_values_and_gradient():
    r = make_router("sinkhorn", 6, 4, 2, seed=11, epsilon=0.5, n_iters=200, tol=0.0, weights_from="plan")
    x = xs(10, 6, seed=12)
    out = r(x)
    cot = torch.randn(10, 2, generator=torch.Generator().manual_seed(13))
    (out.topk_weights * cot).sum().backward()

    def reference(W):
        kernel = torch.exp(x.double() @ W.T / 0.5)
        u, v = torch.ones(10, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        for _ in range(200):
            v = 5.0 / (kernel.T @ u)
            u = 2.0 / (kernel @ v)
        chosen = (u[:, None] * kernel * v[None, :]).gather(1, out.topk_ids)
        return chosen / chosen.sum(-1, keepdim=True)

    ref_w = reference(r.weight.detach().double())
    assert torch.allclose(out.topk_weights.double(), ref_w, rtol=1e-4, atol=1e-6)
    ref_g = grad_of(lambda W: (reference(W) * cot.double()).sum(), r.weight)
    assert torch.allclose(r.weight.grad.double(), ref_g, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("gate", ["softmax", "plan"])
def test_sinkhorn_eval_is_greedy_token_choice(gate):
    r = make_router("sinkhorn", 6, 5, 2, seed=14, weights_from=gate).eval()
    x = xs(11, 6, seed=15)
    out = r(x)
    probs = torch.softmax(brute_logits(r, x), -1)
    assert torch.equal(out.topk_ids.sort(-1).values, probs.topk(2, -1).indices.sort(-1).values)
    expected = probs.gather(1, out.topk_ids)
    if gate == "plan":
        expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(out.topk_weights.double(), expected, rtol=1e-5)
    r.eval_routing = "batch"
    assert torch.equal(r(x).topk_ids, r.train()(x).topk_ids)


# ------------------------------------------------------------------------------------------------- SSR
@pytest.mark.parametrize("cost", ["softmax", "logits"])
def test_ssr_plan_marginals(cost):
    logits = torch.randn(24, 6, generator=torch.Generator().manual_seed(16)) * 2
    plan = ssr_log_plan(logits.double(), epsilon=0.05, cost=cost, n_iters=5000, tol=1e-6).exp()
    assert torch.allclose(plan.sum(1), torch.ones(24, dtype=torch.float64), rtol=1e-3)
    assert torch.allclose(plan.sum(0), torch.full((6,), 4.0, dtype=torch.float64), rtol=1e-3)


def test_ssr_sinkhorn_call_gates_from_plan_no_aux_loss():
    r = make_router("ssr", 6, 4, 2, seed=17, sinkhorn_prob=1.0, epsilon=0.1, n_iters=500, tol=0.0)
    x = xs(12, 6, seed=18)
    out = r(x)
    plan = ssr_log_plan(brute_logits(r, x), 0.1, "softmax", 500, 0.0).exp()
    assert torch.equal(out.topk_ids.sort(-1).values, plan.topk(2, -1).indices.sort(-1).values)
    chosen = plan.gather(1, out.topk_ids)
    assert torch.allclose(out.topk_weights.double(), chosen / chosen.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
    assert out.aux_losses == {} and r.sinkhorn_calls == 1
    out.topk_weights[:, 0].sum().backward()  # gates carry gradients through the Sinkhorn iterations
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_ssr_balances_a_skewed_batch():
    """Every token prefers expert 0: softmax top-1 overloads it, the SSR plan spreads tokens evenly."""
    r = make_router("ssr", 4, 4, 1, seed=19, scale=0.3, sinkhorn_prob=1.0, cost="logits", epsilon=0.05,
                    n_iters=2000, tol=1e-6)
    with torch.no_grad():
        r.weight[0] += 3.0
    x = xs(32, 4, seed=20).abs()
    balanced = r(x).tokens_per_expert()
    r.sinkhorn_prob = 0.0
    plain = r(x).tokens_per_expert()
    assert plain.max() >= 24
    assert balanced.max() <= 10  # plan columns hold 8 tokens each; top-1 of the rows stays near it


def test_ssr_selective_rule_and_eval():
    r = make_router("ssr", 4, 4, 2, seed=21, sinkhorn_prob=0.25, n_iters=5)
    x = xs(6, 4, seed=22)
    plain = torch.softmax(brute_logits(r, x), -1).topk(2, -1)
    torch.manual_seed(123)
    for _ in range(400):
        r(x)
    assert r.train_calls == 400 and abs(r.sinkhorn_calls - 100) <= 4 * math.sqrt(400 * 0.25 * 0.75)
    r.eval()
    r.sinkhorn_prob = 1.0
    out = r(x)  # eval mode never balances: softmax top-k with renormalised weights
    assert r.train_calls == 400
    assert torch.equal(out.topk_ids.sort(-1).values, plain.indices.sort(-1).values)
    w = plain.values / plain.values.sum(-1, keepdim=True)
    assert torch.allclose(out.topk_weights.sort(-1).values.double(), w.sort(-1).values, rtol=1e-5)
    state = r.balancing_state()
    fresh = make_router("ssr", 4, 4, 2)
    fresh.load_balancing_state(state)
    assert fresh.balancing_state() == state == {"sinkhorn_calls": r.sinkhorn_calls, "train_calls": 400}


# ----------------------------------------------------------------------------------- sparsity-constrained OT
@settings(max_examples=30)
@given(n=st.integers(1, 8), mass=st.floats(0.1, 5.0), seed=st.integers(0, 10_000))
def test_simplex_projection_vs_bisection(n, mass, seed):
    u = torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    u = u.sort(dim=1, descending=True).values
    p, rho = simplex_projection_sorted(u, torch.full((3,), mass, dtype=torch.float64))
    for row in range(3):
        lo, hi = float(u[row].min()) - mass, float(u[row].max())  # sum(max(u - tau, 0)) is decreasing in tau
        for _ in range(200):
            tau = (lo + hi) / 2
            lo, hi = (tau, hi) if float((u[row] - tau).clamp_min(0).sum()) > mass else (lo, tau)
        assert torch.allclose(p[row], (u[row] - lo).clamp_min(0), atol=1e-9)
        assert int(rho[row]) == int((p[row] > 0).sum())


def primal_value(plan, scores, gamma):
    return float((plan * -scores).sum() + 0.5 * gamma * (plan ** 2).sum())


def brute_force_sparse_ot(scores, a, b, gamma, k):
    """Exact optimum of the sparsity-constrained primal: every support of at most k tokens per column; on each,
    the equality-constrained QP in closed form (KKT), kept when nonnegative."""
    T, E = scores.shape
    rhs = np.concatenate([a, b])
    supports = [s for n in range(1, min(k, T) + 1) for s in itertools.combinations(range(T), n)]
    best = math.inf
    for sups in itertools.product(supports, repeat=E):
        pairs = [(i, j) for j, sup in enumerate(sups) for i in sup]
        c = np.array([-scores[i, j] for i, j in pairs])
        A = np.zeros((T + E, len(pairs)))
        for v, (i, j) in enumerate(pairs):
            A[i, v] = A[T + j, v] = 1.0
        p = (A.T @ np.linalg.pinv(A @ A.T) @ (gamma * rhs + A @ c) - c) / gamma
        if np.abs(A @ p - rhs).max() < 1e-9 and p.min() > -1e-12:
            best = min(best, c @ p + 0.5 * gamma * p @ p)
    return best


def test_sparse_ot_equals_brute_force_on_small_instances():
    rng = np.random.default_rng(0)
    feasible = 0
    for trial in range(8):
        scores = rng.normal(size=(4, 2))
        a, b = np.ones(4), np.full(2, 2.0)
        for k, gamma in [(2, 0.3), (2, 1.0), (3, 0.3), (4, 1.0)]:
            exact = brute_force_sparse_ot(scores, a, b, gamma, k)
            sol = solve_sparse_ot(torch.tensor(scores), torch.tensor(a), torch.tensor(b), k, gamma, max_evals=500,
                                  tol=1e-12)
            plan = sol.dense(4).numpy()
            assert (plan > 0).sum(0).max() <= k and np.allclose(plan.sum(0), b, atol=1e-9)
            assert sol.value <= exact + 1e-9  # weak duality: the semi-dual is a lower bound
            if k == 4:  # no effective cardinality constraint: convex, no duality gap, plan feasible
                assert sol.row_error < 1e-8
            if sol.row_error < 1e-8:  # a plan meeting the token marginals is optimal
                feasible += 1
                assert primal_value(plan, scores, gamma) == pytest.approx(exact, abs=1e-7)
                assert sol.value == pytest.approx(exact, abs=1e-7)
    assert feasible >= 24  # most of the 32 instances have no duality gap


def lp_ot(scores, a, b):
    T, E = scores.shape
    A = np.zeros((T + E, T * E))
    for i, j in itertools.product(range(T), range(E)):
        A[i, i * E + j] = A[T + j, i * E + j] = 1.0
    res = linprog(-scores.reshape(-1), A_eq=A, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
    return res.fun


@pytest.mark.parametrize("seed", range(3))
def test_sparse_ot_small_k_recovers_unregularised_ot(seed):
    rng = np.random.default_rng(seed)
    T, E, gamma = 6, 3, 0.5
    scores = rng.normal(size=(T, E)) * 2
    a, b = np.full(T, 2.0), np.full(E, 4.0)
    ot = lp_ot(scores, a, b)
    sols = [solve_sparse_ot(torch.tensor(scores), torch.tensor(a), torch.tensor(b), k, gamma, max_evals=2000,
                            tol=1e-12) for k in range(1, T + 1)]
    values = [s.value for s in sols]
    # k = 1: the semi-dual is the unregularised OT semi-dual plus (gamma / 2) sum_j b_j^2
    assert values[0] - 0.5 * gamma * (b ** 2).sum() == pytest.approx(ot, abs=1e-6)
    assert all(v1 >= v2 - 1e-9 for v1, v2 in zip(values, values[1:]))  # the constraint relaxes as k grows
    gaps = [float((s.dense(T).numpy() * -scores).sum()) - ot for s in sols]
    assert sols[1].row_error < 1e-8 and sols[-1].row_error < 1e-8
    assert gaps[1] == pytest.approx(0.0, abs=1e-6)  # k = 2 (b_j / a_i): an optimal OT plan
    assert gaps[-1] > gaps[1] + 1e-3  # k = T: quadratic regularisation moves it away from the OT plan


def test_semi_dual_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(23)
    scores_ET = torch.randn(3, 7, generator=g, dtype=torch.float64)
    a, b = torch.ones(7, dtype=torch.float64), torch.full((3,), 7 / 3, dtype=torch.float64)
    alpha = torch.randn(7, generator=g, dtype=torch.float64)
    _, grad, _ = semi_dual(alpha, scores_ET, a, b, 4, 0.7)
    for i in range(7):
        step = torch.zeros(7, dtype=torch.float64)
        step[i] = 1e-6
        hi = semi_dual(alpha + step, scores_ET, a, b, 4, 0.7)[0]
        lo = semi_dual(alpha - step, scores_ET, a, b, 4, 0.7)[0]
        assert float(grad[i]) == pytest.approx(float(hi - lo) / 2e-6, abs=1e-5)


@settings(max_examples=20)
@given(T=st.integers(1, 24), E=st.integers(1, 6), K=st.integers(1, 3), k=st.sampled_from([None, 1, 2, 5]),
       gamma=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 10_000))
def test_sparse_ot_router_at_most_k_tokens_per_expert(T, E, K, k, gamma, seed):
    K = min(K, E)
    r = make_router("sparse_ot", 5, E, K, seed=seed, max_tokens_per_expert=k, gamma=gamma)
    x = xs(T, 5, seed=seed + 1)
    out = r(x)
    limit = r.tokens_per_expert(T)
    assert limit == max(1, min(T, math.ceil(T * K / E) if k is None else k))
    assert out.tokens_per_expert().max() <= limit
    pairs = set(zip(out.token_ids.tolist(), out.expert_ids.tolist()))
    assert len(pairs) == out.num_pairs  # no duplicate pair
    sums = torch.zeros(T).index_add_(0, out.token_ids, out.weights)
    routed = torch.bincount(out.token_ids, minlength=T) > 0
    assert torch.allclose(sums[routed], torch.ones(int(routed.sum())), atol=1e-5)
    assert (out.weights > 0).all() and out.aux_losses == {}


def test_sparse_ot_router_gates_are_the_normalised_plan_rows():
    r = make_router("sparse_ot", 6, 4, 2, seed=24, gamma=2.0, max_tokens_per_expert=12, max_evals=200, tol=1e-10)
    x = xs(16, 6, seed=25)
    out = r(x)
    logits = brute_logits(r, x)
    sol = solve_sparse_ot(logits, torch.full((16,), 2.0), torch.full((4,), 8.0), 12, 2.0, 200, 1e-10)
    plan = sol.dense(16)
    assert torch.allclose(plan.sum(0), torch.full((4,), 8.0, dtype=torch.float64)) and (plan > 0).sum(0).max() <= 12
    assert sol.row_error < 1e-6
    mine = torch.zeros(16, 4, dtype=torch.float64)
    mine[out.token_ids, out.expert_ids] = out.weights.double()
    assert torch.allclose(mine, plan / plan.sum(1, keepdim=True), atol=1e-5)
    cot = torch.randn(out.num_pairs, generator=torch.Generator().manual_seed(26))
    (out.weights * cot).sum().backward()
    assert r.weight.grad is not None and torch.isfinite(r.weight.grad).all() and r.weight.grad.abs().sum() > 0
    r.eval()
    ev = r(x)
    probs = torch.softmax(logits, -1).topk(2, -1)
    assert torch.equal(ev.topk_ids.sort(-1).values, probs.indices.sort(-1).values)


# ------------------------------------------------------------------------------------------ the MoE layer
LAYER_OPTIONS = {"expert_choice": {}, "sinkhorn": {"n_iters": 20}, "ssr": {"sinkhorn_prob": 1.0, "n_iters": 20},
                 "sparse_ot": {"gamma": 0.5}}


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16)])
def test_moe_layer_forward_backward(name, mode, shape):
    cfg = moekit.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, router=name,
                           router_options=LAYER_OPTIONS[name])
    layer = moekit.MoE(cfg)
    getattr(layer, mode)()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(27), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "training without balancing" warning: these routers balance
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for param in layer.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()
    assert layer.aux_loss is None
    assert layer.load.routed_E.sum() == layer.last_routing.num_pairs
