"""The token-choice top-k router against brute force (enumerating expert and group subsets)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit import routing

TopK = routing.get("topk")


def make_router(D, E, K, seed=0, **kw):
    kw.setdefault("aux_loss", None)
    r = TopK(dim=D, num_experts=E, top_k=K, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=g))
    return r.eval()


def xs(T, D, seed=1, dtype=torch.float32):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def brute_scores(x, W, score_func):
    logits = x.double() @ W.double().T
    if score_func == "softmax":
        scores = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    else:
        scores = 1 / (1 + torch.exp(-logits))
    return logits, scores


def brute_select(choice, K, G=1, TG=1):
    """Enumerate every set of TG groups (best total group score), then every K-subset inside them."""
    E = len(choice)
    size = E // G
    allowed = range(E)
    if G > 1:
        gscore = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(G)]
        best = max(itertools.combinations(range(G), TG), key=lambda gs: sum(gscore[g] for g in gs))
        allowed = [e for g in best for e in range(g * size, (g + 1) * size)]
    return set(max(itertools.combinations(allowed, K), key=lambda es: sum(choice[e] for e in es)))


def brute_weights(scores_row, chosen, norm_topk, scaling):
    w = {e: scores_row[e] for e in chosen}
    if norm_topk:
        total = sum(w.values())
        w = {e: v / total for e, v in w.items()}
    return {e: v * scaling for e, v in w.items()}


def check_routing(r, x, bias=None, tol=2e-6):
    out = r(x)
    T, E, K = x.shape[0], r.num_experts, r.top_k
    logits, scores = brute_scores(x, r.weight, r.score_func)
    assert out.logits.dtype == torch.float32
    assert torch.allclose(out.logits.double(), logits, rtol=1e-5, atol=1e-5)
    probs = scores if r.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    assert torch.allclose(out.probs.double(), probs, rtol=1e-5, atol=1e-6)
    assert out.topk_ids.shape == (T, K) and out.topk_weights.shape == (T, K)
    for t in range(T):
        choice = scores[t].tolist()
        if bias is not None:
            choice = [c + float(b) for c, b in zip(choice, bias)]
        chosen = brute_select(choice, K, r.num_groups, r.topk_groups)
        assert set(out.topk_ids[t].tolist()) == chosen, t
        expected = brute_weights(scores[t].tolist(), chosen, r.norm_topk, r.scaling_factor)
        for k in range(K):
            e = int(out.topk_ids[t, k])
            assert float(out.topk_weights[t, k].detach()) == pytest.approx(expected[e], rel=tol, abs=1e-7)
    # flat pair list: token-major, k-minor
    assert out.token_ids.tolist() == [t for t in range(T) for _ in range(K)]
    assert out.expert_ids.tolist() == out.topk_ids.reshape(-1).tolist()
    assert torch.equal(out.weights, out.topk_weights.reshape(-1))
    assert out.num_tokens == T and out.num_experts == E
    return out


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk", [False, True])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_scores_norm_scaling_vs_brute_force(score_func, norm_topk, scaling):
    r = make_router(6, 7, 3, score_func=score_func, norm_topk=norm_topk, scaling_factor=scaling)
    check_routing(r, xs(10, 6))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_norm_topk_single_expert(score_func):
    """norm_topk renormalises the K selected weights to sum to one, K = 1 included (Mixtral / OLMoE /
    Qwen2-MoE in transformers divide by the sum for every K)."""
    with pytest.warns(UserWarning, match="no gradient"):  # K = 1: every weight is 1
        r = make_router(5, 4, 1, score_func=score_func, norm_topk=True)
    out = r(xs(6, 5))
    assert torch.allclose(out.topk_weights, torch.ones(6, 1))


@pytest.mark.parametrize("G,TG,K", [(4, 2, 3), (4, 1, 2), (2, 1, 4), (8, 3, 2), (8, 8, 5)])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_selection_vs_brute_force(G, TG, K, score_func):
    r = make_router(5, 8, K, num_groups=G, topk_groups=TG, score_func=score_func, norm_topk=True)
    check_routing(r, xs(12, 5, seed=G * 10 + TG))


def test_group_limitation_changes_selection():
    """Sanity: the group constraint is active (differs from plain top-k on these inputs)."""
    x = xs(32, 5, seed=3)
    plain = make_router(5, 8, 2, seed=4)
    grouped = make_router(5, 8, 2, seed=4, num_groups=4, topk_groups=1)
    a, b = plain(x), grouped(x)
    assert not torch.equal(a.topk_ids.sort(-1).values, b.topk_ids.sort(-1).values)
    # under topk_groups=1 both experts of a token share one group of 2
    assert torch.equal(b.topk_ids[:, 0] // 2, b.topk_ids[:, 1] // 2)


@st.composite
def router_cases(draw):
    G = draw(st.sampled_from([1, 1, 2, 3]))
    size = draw(st.integers(1, 3))
    E = G * size
    TG = draw(st.integers(1, G))
    K = draw(st.integers(1, TG * size if G > 1 else E))
    return dict(E=E, K=K, G=G, TG=TG, T=draw(st.integers(1, 6)), D=draw(st.integers(1, 5)),
                score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
                norm_topk=draw(st.booleans()) if K > 1 else False,
                scaling=draw(st.sampled_from([1.0, 0.5, 3.0])),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 10_000)))


@settings(max_examples=40)
@given(router_cases())
def test_property_selection_and_weights(c):
    kw = dict(score_func=c["score_func"], norm_topk=c["norm_topk"], scaling_factor=c["scaling"],
              num_groups=c["G"], topk_groups=c["TG"])
    if c["bias"]:
        kw["bias_update"] = "sign"
    r = make_router(c["D"], c["E"], c["K"], seed=c["seed"], **kw)
    bias = None
    if c["bias"]:
        bias = torch.randn(c["E"], generator=torch.Generator().manual_seed(c["seed"] + 1)) * 0.3
        r.e_score_correction_bias.copy_(bias)
    check_routing(r, xs(c["T"], c["D"], seed=c["seed"] + 2), bias=bias)


# ------------------------------------------------------------------------------ selection bias
def test_selection_bias_changes_selection_not_weights():
    x = xs(9, 6, seed=5)
    r = make_router(6, 5, 2, seed=6, bias_update="sign")
    plain = r(x)
    r.e_score_correction_bias[3] = 10.0  # expert 3 now chosen by every token
    biased = check_routing(r, x, bias=r.e_score_correction_bias.clone())
    assert (biased.topk_ids == 3).any(-1).all()
    assert not torch.equal(plain.topk_ids, biased.topk_ids)
    _, scores = brute_scores(x, r.weight, "softmax")
    col = (biased.topk_ids == 3).int().argmax(-1)
    w3 = biased.topk_weights.gather(1, col[:, None]).squeeze(1)
    assert torch.allclose(w3.double(), scores[:, 3], rtol=1e-5)  # the score, bias not added
    assert (w3 < 1.0).all()


def test_bias_gets_no_gradient():
    x = xs(8, 6, seed=7)
    r = make_router(6, 5, 2, seed=8, bias_update="sign", score_func="sigmoid", aux_loss="switch").train()
    r.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.5, -0.4]))
    assert "e_score_correction_bias" in dict(r.named_buffers())
    assert all(p is not r.e_score_correction_bias for p in r.parameters())
    cot = torch.randn(8, 2, generator=torch.Generator().manual_seed(9))
    out = r(x)
    ((out.topk_weights * cot).sum() + sum(out.aux_losses.values())).backward()
    assert not r.e_score_correction_bias.requires_grad and r.e_score_correction_bias.grad is None
    # router weight gradient: the weights are sigmoid(logits) at the chosen ids, the bias absent
    W = r.weight.detach().double().clone().requires_grad_(True)
    scores = torch.sigmoid(x.double() @ W.T)
    picked = scores.gather(1, out.topk_ids)
    probs = scores / scores.sum(-1, keepdim=True)
    counts = torch.bincount(out.topk_ids.reshape(-1), minlength=5).double()
    aux = 1e-2 * 5 * (counts / counts.sum() * probs.mean(0)).sum()
    ((picked * cot.double()).sum() + aux).backward()
    assert torch.allclose(r.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- jitter
def test_jitter_only_in_training():
    x = xs(16, 6, seed=10)
    r = make_router(6, 4, 2, seed=11, jitter=0.3)
    clean = x.double() @ r.weight.double().T
    out_eval = r(x)
    assert torch.allclose(out_eval.logits.double(), clean, rtol=1e-5, atol=1e-6)
    assert torch.equal(r(x).logits, out_eval.logits)
    r.train()
    a, b = r(x).logits, r(x).logits
    assert not torch.allclose(a, out_eval.logits)
    assert not torch.equal(a, b)
    # multiplicative noise in [1 - j, 1 + j]: |logit - clean| <= j * sum_d |W_ed x_d|
    bound = 0.3 * (x.double().abs() @ r.weight.double().abs().T)
    assert ((a.double() - clean).abs() <= bound + 1e-5).all()


def test_jitter_does_not_touch_expert_input():
    """With one expert (weight exactly 1 whatever the noise) training output equals eval output."""
    layer = moekit.MoE(dim=4, hidden_dim=4, num_experts=1, top_k=1, jitter=0.5, aux_loss="switch").double()
    x = xs(5, 4, seed=12, dtype=torch.float64)
    with torch.no_grad():
        y_eval = layer.eval()(x)
        y_train = layer.train()(x)
    assert torch.allclose(y_train, y_eval, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ dtypes, errors
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_logits_float32_for_any_input_dtype(dtype):
    r = make_router(8, 4, 2, seed=13).to(dtype)
    x = xs(6, 8, seed=14, dtype=dtype)
    out = r(x)
    for name in ("logits", "probs", "topk_weights", "weights"):
        assert getattr(out, name).dtype == torch.float32, name
    expected = x.double() @ r.weight.double().T  # the (rounded) dtype inputs, product in high precision
    assert torch.allclose(out.logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_unknown_router_name():
    with pytest.raises(ValueError) as err:
        routing.get("nope")
    msg = str(err.value)
    assert "nope" in msg and "topk" in msg
    assert "topk" in routing.names()


def test_aux_losses_only_in_training():
    x = xs(6, 5, seed=15)
    r = make_router(5, 4, 2, aux_loss="switch", z_loss_coef=0.1)
    assert r(x).aux_losses == {}
    r.train()
    losses = r(x).aux_losses
    assert set(losses) == {"switch", "z"}
    lse = torch.logsumexp(x.double() @ r.weight.detach().double().T, -1)
    assert float(losses["z"].detach()) == pytest.approx(0.1 * float((lse ** 2).mean()), rel=1e-5)


def test_router_rejects_bad_options():
    for kw, field in [(dict(score_func="tanh"), "score_func"), (dict(num_groups=3), "num_groups"),
                      (dict(num_groups=4, topk_groups=5), "topk_groups"), (dict(jitter=1.0), "jitter"),
                      (dict(aux_loss="foo"), "aux_loss"), (dict(bias_update="foo"), "bias_update"),
                      (dict(scaling_factor=0.0), "scaling_factor"),
                      (dict(num_groups=4, topk_groups=1), "topk_groups")]:
        with pytest.raises(ValueError, match=field):
            TopK(dim=4, num_experts=8, top_k=3, **kw)
    assert math.isfinite(TopK(dim=4, num_experts=8, top_k=3).weight.sum().item())
