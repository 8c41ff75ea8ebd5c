"""Hash, dense-to-sparse (EvoMoE and activation), top-any (MC# OTP), MixER and ModuleFormer routers: the defining
property of each, checked against hand computation."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import chi2

import moekit
from moekit import routing
from moekit.routing import dense_to_sparse, hash as hash_routing, moduleformer

ROUTERS = ("hash", "dts", "activation_dts", "top_any", "mixer", "moduleformer")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ctx_ids(ids):
    return moekit.RoutingContext(batch_shape=tuple(ids.shape), input_ids=ids)


# ----------------------------------------------------------------------------------------------------- hash
def fmix32_reference(v: int) -> int:
    """murmur3 fmix32 with Python integers."""
    m = 0xFFFFFFFF
    v ^= v >> 16
    v = (v * 0x85EBCA6B) & m
    v ^= v >> 13
    v = (v * 0xC2B2AE35) & m
    return v ^ (v >> 16)


def test_mix32_matches_reference():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    got = hash_routing.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [fmix32_reference(v) for v in values]


def test_hash_deterministic_no_parameters_same_id_same_expert():
    r = routing.get("hash")(dim=4, num_experts=8, top_k=1)
    assert list(r.parameters()) == [] and r.learned is False
    ids = torch.randint(0, 50, (6, 40), generator=gen(0))
    x = torch.randn(ids.numel(), 4)
    a = r(x, ctx_ids(ids))
    b = routing.get("hash")(dim=4, num_experts=8, top_k=1)(torch.randn_like(x), ctx_ids(ids))
    assert torch.equal(a.expert_ids, b.expert_ids)  # depends on the ids only, not on x or the instance
    assert torch.equal(a.weights, torch.ones(ids.numel()))
    seen = {}
    for token, expert in zip(ids.reshape(-1).tolist(), a.expert_ids.tolist()):
        assert seen.setdefault(token, expert) == expert
    other_seed = routing.get("hash")(dim=4, num_experts=8, top_k=1, seed=3)(x, ctx_ids(ids))
    assert not torch.equal(a.expert_ids, other_seed.expert_ids)
    assert a.logits is None and a.probs is None and a.aux_losses == {}


@pytest.mark.parametrize("E", [4, 7, 16])
def test_hash_balanced_on_uniform_ids(E):
    r = routing.get("hash")(dim=2, num_experts=E, top_k=1)
    ids = torch.arange(40_000)
    counts = r(torch.zeros(ids.numel(), 2), ctx_ids(ids)).tokens_per_expert().double()
    expected = ids.numel() / E
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert chi2.sf(stat, E - 1) > 1e-3, (stat, counts)
    assert float((counts - expected).abs().max()) < 5 * math.sqrt(expected)


def test_hash_top_k_distinct_experts_each_uniform():
    E, K = 6, 3
    r = routing.get("hash")(dim=2, num_experts=E, top_k=K)
    ids = torch.arange(30_000)
    out = r(torch.zeros(ids.numel(), 2), ctx_ids(ids))
    assert out.topk_ids.shape == (ids.numel(), K)
    assert (out.topk_ids.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct experts per token
    assert torch.allclose(out.topk_weights, torch.full((ids.numel(), K), 1 / K))
    for k in range(K):
        counts = torch.bincount(out.topk_ids[:, k], minlength=E).double()
        assert float((counts / counts.mean() - 1).abs().max()) < 0.05


def test_hash_needs_input_ids():
    r = routing.get("hash")(dim=4, num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="input_ids"):
        r(torch.randn(3, 4))
    with pytest.raises(ValueError, match="input_ids"):
        r(torch.randn(3, 4), moekit.RoutingContext(batch_shape=(3,)))
    with pytest.raises(ValueError, match="ids"):
        r(torch.randn(3, 4), ctx_ids(torch.arange(4)))


def test_hash_balanced_table_and_state_dict():
    counts = torch.tensor([100, 1, 50, 50, 3, 2, 98, 0])
    table = hash_routing.balanced_table(counts, 2)
    load = torch.zeros(2, dtype=torch.int64).index_add_(0, table, counts)
    assert load.tolist() == [152, 152]
    r = routing.get("hash")(dim=2, num_experts=2, top_k=1)
    r.set_table(table)
    ids = torch.tensor([0, 6, 2, 3, 100])  # 100 is outside the table: hashed
    out = r(torch.zeros(5, 2), ctx_ids(ids))
    assert out.expert_ids[:4].tolist() == table[[0, 6, 2, 3]].tolist()
    fresh = routing.get("hash")(dim=2, num_experts=2, top_k=1)
    fresh.load_state_dict(r.state_dict())
    assert torch.equal(fresh(torch.zeros(5, 2), ctx_ids(ids)).expert_ids, out.expert_ids)


# --------------------------------------------------------------------------------------- dense-to-sparse
def make_dts(name="dts", E=8, D=16, seed=0, **kw):
    kw.setdefault("aux_loss", None)
    r = routing.get(name)(dim=D, num_experts=E, top_k=2, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=gen(seed)) * 0.1)
    return r


def test_dts_active_experts_fall_from_all_to_one_along_the_schedule():
    E, steps = 8, 60
    r = make_dts(E=E, anneal_steps=steps).train()
    x = torch.randn(512, 16, generator=gen(1))
    active = []
    for step in range(steps + 1):
        if step % 10 == 0:
            out = r(x)
            assert out.num_pairs >= out.num_tokens  # at least one expert per token
            active.append(out.num_pairs / out.num_tokens)
        r.end_step()
    assert r.temperature == pytest.approx(0.3)
    assert active[0] > 0.9 * E, active
    # near-zero logits: the end point is set by the Gumbel noise alone; at tau = 0.3 the runner-up expert
    # passes the 0.02 threshold with probability 1 - exp(-0.3 ln 50) ~ 0.69, so ~2.3 experts remain (learned
    # logits make it sparser)
    assert active[-1] < 2.6 and active[-1] < active[0] / 3, active
    assert all(b <= a + 0.1 for a, b in zip(active, active[1:])), active


def test_dts_threshold_renormalisation_and_noise_only_in_training():
    r = make_dts(threshold=0.1, anneal_steps=4)
    r.anneal_step = 2
    x = torch.randn(64, 16, generator=gen(2))
    out = r.eval()(x)
    tau = dense_to_sparse.annealed_temperature(2, 2.0, 0.3, 4, "cosine")
    logits = x.double() @ r.weight.detach().double().T
    gate = torch.softmax(logits / tau, dim=-1)
    assert torch.allclose(out.probs.double(), gate, atol=1e-6)
    keep = (gate > 0.1) | (gate == gate.max(dim=-1, keepdim=True).values)
    assert sorted(zip(out.token_ids.tolist(), out.expert_ids.tolist())) == [tuple(p) for p in keep.nonzero().tolist()]
    expected = (gate * keep / (gate * keep).sum(-1, keepdim=True))[out.token_ids, out.expert_ids]
    assert torch.allclose(out.weights.double(), expected, atol=1e-6)
    assert torch.equal(r(x).weights, out.weights)  # no noise at inference
    r.train()
    a, b = r(x), r(x)
    assert a.num_pairs != b.num_pairs or not torch.equal(a.weights, b.weights)
    sums = torch.zeros(64).index_add_(0, a.token_ids, a.weights.detach())
    assert torch.allclose(sums, torch.ones(64), atol=1e-6)
    raw = make_dts(threshold=0.1, renormalize=False).eval()(x)
    assert torch.allclose(raw.weights, raw.probs[raw.token_ids, raw.expert_ids])


def test_dts_eval_topk_mode_and_state():
    r = make_dts(eval_mode="topk").eval()
    out = r(torch.randn(10, 16, generator=gen(3)))
    assert out.topk_ids.shape == (10, 2) and out.num_pairs == 20
    assert torch.allclose(out.topk_weights.sum(-1), torch.ones(10))
    r.end_step()
    r.end_step()
    fresh = make_dts()
    fresh.load_balancing_state(r.balancing_state())
    assert fresh.anneal_step == 2 and fresh.temperature == r.temperature


@pytest.mark.parametrize("schedule", dense_to_sparse.SCHEDULES)
def test_annealed_temperature_endpoints(schedule):
    f = dense_to_sparse.annealed_temperature
    assert f(0, 2.0, 0.3, 100, schedule) == pytest.approx(2.0)
    assert f(100, 2.0, 0.3, 100, schedule) == pytest.approx(0.3)
    assert f(500, 2.0, 0.3, 100, schedule) == pytest.approx(0.3)
    mids = [f(s, 2.0, 0.3, 100, schedule) for s in range(0, 101, 10)]
    assert all(b < a for a, b in zip(mids, mids[1:]))
    assert f(50, 2.0, 0.3, 100, "linear") == pytest.approx(1.15)


def test_activation_dts_gate_and_sparsification():
    r = make_dts("activation_dts", gumbel=False, anneal_steps=10, threshold=0.05)
    with torch.no_grad():
        r.weight.mul_(30)  # tanh(S) spread over (-1, 1)
    x = torch.randn(256, 16, generator=gen(4))
    logits = x.double() @ r.weight.detach().double().T
    out = r.eval()(x)
    assert torch.allclose(out.probs.double(), torch.softmax(torch.tanh(logits) / 2.0, -1), atol=1e-6)
    start = out.num_pairs / 256
    r.anneal_step = 10
    end = r(x).num_pairs / 256
    assert start == 8 and end < 0.5 * start
    with pytest.raises(ValueError, match="activation"):
        routing.get("activation_dts")(dim=4, num_experts=4, top_k=1, activation="relu")


# ------------------------------------------------------------------------------------------------ top-any
def make_top_any(E=6, D=8, K=3, seed=0, **kw):
    kw.setdefault("aux_loss", None)
    r = routing.get("top_any")(dim=D, num_experts=E, top_k=K, **kw)
    g = gen(seed)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D, generator=g))
        r.keep_weight.copy_(torch.randn(E, D, generator=g))
        r.keep_bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
        r.keep_ratio_scale.fill_(0.5)
    return r


def test_top_any_inference_keeps_nonempty_subsets_of_top_k_and_reports_skips():
    r = make_top_any().eval()
    x = torch.randn(200, 8, generator=gen(5))
    with torch.no_grad():
        r.keep_weight[2].fill_(-5.0)  # make some tokens drop every slot -> fallback to one
    out = r(x)
    base = routing.get("topk")(dim=8, num_experts=6, top_k=3, aux_loss=None)
    base.load_state_dict({"weight": r.weight.detach()})
    full = base.eval()(x)
    # hand computation of the mask logits and the kept sets
    w = full.topk_weights.double()
    logit = ((x.double() @ r.keep_weight.detach().double().T).gather(1, full.topk_ids)
             + r.keep_bias.detach().double() + 0.5 * (w.log() - w[:, :1].log()))
    keep = logit > 0
    empty = ~keep.any(-1)
    keep[empty, logit[empty].argmax(-1)] = True
    kept_by_token = {t: set() for t in range(200)}
    for t, e in zip(out.token_ids.tolist(), out.expert_ids.tolist()):
        kept_by_token[t].add(e)
    for t in range(200):
        topk = set(full.topk_ids[t].tolist())
        assert 1 <= len(kept_by_token[t]) and kept_by_token[t] <= topk
        assert kept_by_token[t] == {int(full.topk_ids[t, k]) for k in range(3) if keep[t, k]}
    assert empty.any() and (~keep).any() and keep.sum(-1).eq(3).any()
    hand_skipped = 1 - keep.sum().item() / (200 * 3)
    assert float(r.last_skipped_fraction) == pytest.approx(hand_skipped)
    assert float(r.last_skipped_fraction) == pytest.approx(1 - out.num_pairs / (200 * 3))
    assert torch.equal(r.last_keep_mask, keep)
    slot = (full.topk_ids[out.token_ids] == out.expert_ids[:, None]).int().argmax(-1)
    assert torch.allclose(out.weights, full.topk_weights[out.token_ids, slot])
    assert out.topk_ids is None


def test_top_any_training_straight_through_and_keep_loss():
    r = make_top_any(sparsity_coef=0.1).train()
    x = torch.randn(50, 8, generator=gen(6))
    out = r(x)
    assert out.num_pairs == 150 and out.topk_ids.shape == (50, 3)
    dropped = ~r.last_keep_mask
    assert dropped.any()
    assert torch.allclose(out.topk_weights[dropped], torch.zeros(int(dropped.sum())), atol=1e-7)
    assert set(out.aux_losses) == {"keep"}
    (out.weights * torch.randn(150, generator=gen(7))).sum().backward()
    assert r.keep_weight.grad is not None and r.keep_weight.grad.abs().sum() > 0
    assert r.keep_bias.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------------- MixER
def test_mixer_gate_gets_no_gradient():
    layer = moekit.MoE(moekit.MoEConfig(dim=8, hidden_dim=4, num_experts=3, top_k=1, router="mixer",
                                        router_options={"refit_every": 2})).train()
    assert list(layer.gate.parameters()) == []
    for step in range(4):
        y = layer(torch.randn(2, 10, 8, generator=gen(step)))
        y.square().sum().backward()
        moekit.end_step(layer)
    gate = layer.gate
    assert int(gate.num_fits) == 2 and gate.num_buffered == 80
    for name, buf in gate.named_buffers():
        assert not buf.requires_grad and buf.grad is None, name
    assert layer.experts.gate_up_proj.grad is not None


def test_mixer_recovers_gaussian_clusters():
    E, D = 4, 8
    g = gen(8)
    centers = torch.randn(E, D, generator=g) * 4
    r = routing.get("mixer")(dim=D, num_experts=E, top_k=1, refit_every=5, buffer_size=2048)

    def draw(n):
        labels = torch.randint(0, E, (n,), generator=g)
        return centers[labels] + torch.randn(n, D, generator=g), labels

    r.train()
    for _ in range(5):
        r(draw(300)[0])
        r.end_step()
    assert int(r.num_fits) == 1
    x, labels = draw(2000)
    pred = r.eval()(x).expert_ids
    confusion = torch.zeros(E, E).index_put_((labels, pred), torch.ones(2000), accumulate=True)
    rows, cols = linear_sum_assignment(-confusion.numpy())
    agreement = float(confusion[rows, cols].sum()) / 2000
    assert agreement > 0.9, confusion


# ------------------------------------------------------------------------------------------- ModuleFormer
def test_mi_and_concentration_losses_hand_computed():
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(moduleformer.mi_loss(one_hot)) == pytest.approx(-math.log(2))
    assert float(moduleformer.mi_loss(torch.full((3, 2), 0.5))) == pytest.approx(0.0, abs=1e-7)
    assert float(moduleformer.concentration_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))) == pytest.approx(0.0)
    p = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    mean = [(a + b) / 2 for a, b in zip(*p)]
    h = lambda q: -sum(v * math.log(v) for v in q if v > 0)  # noqa: E731
    probs = torch.tensor(p)
    assert float(moduleformer.concentration_loss(probs)) == pytest.approx(h(mean), rel=1e-6)
    assert float(moduleformer.mi_loss(probs)) == pytest.approx(-h(mean) + (h(p[0]) + h(p[1])) / 2, rel=1e-6)
    zero = torch.tensor([[1.0, 0.0], [0.5, 0.5]], requires_grad=True)
    moduleformer.mi_loss(zero).backward()
    assert torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("balance", moduleformer.BALANCES)
def test_moduleformer_router_aux_loss(balance):
    r = routing.get("moduleformer")(dim=6, num_experts=4, top_k=2, balance=balance, coef=0.5).train()
    out = r(torch.randn(20, 6, generator=gen(9)))
    assert set(out.aux_losses) == {balance}
    fn = moduleformer.mi_loss if balance == "mi" else moduleformer.concentration_loss
    assert float(out.aux_losses[balance].detach()) == pytest.approx(0.5 * float(fn(out.probs.detach())), rel=1e-6)
    assert r.has_balancing() == (balance == "mi")
    with pytest.raises(ValueError, match="balance"):
        routing.get("moduleformer")(dim=6, num_experts=4, top_k=2, balance="switch")


# ----------------------------------------------------------------------------------------- through MoE
ROUTER_OPTIONS = {"hash": {}, "dts": {"anneal_steps": 5}, "activation_dts": {"anneal_steps": 5}, "top_any": {},
                  "mixer": {"refit_every": 1}, "moduleformer": {"balance": "mi"}}


@pytest.mark.parametrize("name", ROUTERS)
def test_through_moe_layer_forward_backward(name):
    layer = moekit.MoE(moekit.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, router=name,
                                        router_options=ROUTER_OPTIONS[name]))
    x = torch.randn(3, 5, 16, generator=gen(10))
    ids = torch.randint(0, 100, (3, 5), generator=gen(11))
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = layer(xg, ctx_ids(ids))
        assert y.shape == x.shape and torch.isfinite(y).all()
        (y.square().sum() + moekit.aux_loss(layer)).backward()
        assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
        assert layer.experts.gate_up_proj.grad.abs().sum() > 0
        if layer.last_routing.logits is not None:
            assert layer.last_routing.logits.dtype == torch.float32
        if mode == "train" and name in ("dts", "activation_dts", "top_any", "moduleformer"):
            assert layer.aux_losses and layer.gate.weight.grad is not None
        moekit.end_step(layer)


def test_config_rejects_settings_a_router_does_not_take():
    with pytest.raises(ValueError, match="aux_loss"):
        moekit.MoE(moekit.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, router="dts", aux_loss="sequence"))
    with pytest.raises(ValueError, match="score_func"):
        moekit.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, router="hash",
                         score_func="sigmoid").router_kwargs()
