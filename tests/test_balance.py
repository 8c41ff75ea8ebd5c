"""Load balancing: hand-computed losses, bias rules, global-batch counting, the loss-free controller."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import moekit
from moekit import balance
from reference import ref_max_violation, select_experts

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------ hand-computed losses
def test_switch_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    counts = torch.tensor([1, 1, 0])
    # f = [.5, .5, 0], P = [.4, .4, .2] -> 3 * (.2 + .2)
    assert float(balance.switch_loss(probs, counts)) == pytest.approx(1.2, rel=1e-6)
    uniform = torch.full((4, 4), 0.25)
    assert float(balance.switch_loss(uniform, torch.tensor([2, 2, 2, 2]))) == pytest.approx(1.0, rel=1e-6)
    # everything on expert 0 with prob 1: E * 1 * 1
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)
    assert float(balance.switch_loss(collapsed, torch.tensor([3, 0, 0, 0]))) == pytest.approx(4.0)


def test_switch_loss_gradient_flows_through_probs_only():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], requires_grad=True)
    balance.switch_loss(probs, torch.tensor([2, 1, 1])).backward()
    # d/dP_te of E * sum_e f_e * mean_t P_te = E * f_e / T
    expected = 3 * torch.tensor([0.5, 0.25, 0.25]) / 2
    assert torch.allclose(probs.grad, expected.expand(2, 3))


def test_sequence_loss_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    experts = torch.tensor([[0], [0], [1], [0]])
    # sequence 1: f = [1, 0], P = [.85, .15] -> 2 * .85 = 1.7
    # sequence 2: f = [.5, .5], P = [.4, .6] -> 2 * (.2 + .3) = 1.0
    assert float(balance.sequence_loss(probs, experts, 2)) == pytest.approx(1.35, rel=1e-6)
    # one sequence: the plain switch loss, f = [3/4, 1/4], P = [.625, .375] -> 1.125
    assert float(balance.sequence_loss(probs, experts, 1)) == pytest.approx(1.125, rel=1e-6)


def test_sequence_loss_with_top2():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    experts = torch.tensor([[0, 1], [2, 0]])
    # one sequence, 4 assignments: f = [.5, .25, .25], P = [.35, .25, .4]
    expected = 3 * (0.5 * 0.35 + 0.25 * 0.25 + 0.25 * 0.4)
    assert float(balance.sequence_loss(probs, experts, 1)) == pytest.approx(expected, rel=1e-6)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4 = 2 ln 2 -> mean of squares = (1 + 4) / 2 * ln2^2
    assert float(balance.z_loss(logits)) == pytest.approx(2.5 * LN2 ** 2, rel=1e-6)


@pytest.mark.parametrize("counts,expected", [([4, 2, 1, 1], 1.0), ([3, 3, 3], 0.0), ([0, 0], 0.0),
                                             ([6, 0, 0], 2.0), ([5, 3], 0.25)])
def test_max_violation(counts, expected):
    assert balance.max_violation(torch.tensor(counts)) == pytest.approx(expected)
    assert ref_max_violation(counts) == pytest.approx(expected)


# ------------------------------------------------------------------------------------- bias rules
LOAD = torch.tensor([4.0, 2.0, 1.0, 1.0])  # mean 2, mean - load = [-2, 0, 1, 1]


@pytest.mark.parametrize("rule,step,expected", [
    ("sign", 1, [-0.1, 0.0, 0.1, 0.1]),
    ("sign", 7, [-0.1, 0.0, 0.1, 0.1]),
    ("proportional", 1, [-0.1, 0.0, 0.05, 0.05]),
    ("proportional", 5, [-0.1, 0.0, 0.05, 0.05]),
    ("decaying", 1, [-0.1, 0.0, 0.05, 0.05]),
    ("decaying", 3, [-0.1 / 3, 0.0, 0.05 / 3, 0.05 / 3]),
])
def test_bias_step_rules(rule, step, expected):
    bias = torch.tensor([0.5, 0.0, -0.5, 0.25])
    start = bias.clone()
    out = balance.bias_step(bias, LOAD, rule, 0.1, step)
    assert out is bias  # in place
    assert torch.allclose(bias - start, torch.tensor(expected), atol=1e-7)


def test_bias_step_unknown_rule():
    with pytest.raises(ValueError, match="sign"):
        balance.bias_step(torch.zeros(2), torch.ones(2), "nope", 0.1, 1)


# ----------------------------------------------------------------------- router / layer integration
def ref_counts(x, W, K, bias=None):
    """Assignments per expert by plain top-k of the softmax scores (+ selection bias)."""
    E = W.shape[0]
    scores = torch.softmax(x.double() @ W.double().T, dim=-1)
    counts = [0] * E
    for t in range(x.shape[0]):
        choice = scores[t].tolist()
        if bias is not None:
            choice = [c + float(b) for c, b in zip(choice, bias)]
        for e in select_experts(choice, K):
            counts[e] += 1
    return torch.tensor(counts, dtype=torch.float64), scores


def make_layer(E=4, D=8, K=2, seed=0, **kw):
    layer = moekit.MoE(dim=D, hidden_dim=4, num_experts=E, top_k=K, **kw)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(seed)))
    return layer


def xs(T, D, seed):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", ["sign", "proportional", "decaying"])
def test_end_step_applies_bias_rule_to_accumulated_load(rule):
    E, K, u = 4, 2, 0.05
    layer = make_layer(E=E, K=K, aux_loss=None, bias_update=rule, bias_update_rate=u).train()
    model = nn.Sequential(layer)
    W = layer.gate.weight.detach()
    bias = torch.zeros(E, dtype=torch.float64)
    for step in (1, 2):
        load = torch.zeros(E, dtype=torch.float64)
        for micro in range(2):
            x = xs(10, 8, seed=10 * step + micro)
            model(x)
            load += ref_counts(x, W, K, bias)[0]
        layer.eval()(xs(10, 8, seed=99))  # an eval call must not count
        layer.train()
        moekit.end_step(model)
        mean = load.mean()
        if rule == "sign":
            bias += u * torch.sign(mean - load)
        elif rule == "proportional":
            bias += u * (mean - load) / mean
        else:
            bias += (u / step) * (mean - load) / mean
        assert torch.allclose(layer.gate.e_score_correction_bias.double(), bias, atol=1e-6), step
    # no forward since the last step: nothing to update
    moekit.end_step(model)
    assert torch.allclose(layer.gate.e_score_correction_bias.double(), bias, atol=1e-6)


def test_global_batch_loss_accumulates_until_end_step():
    E, K, coef = 4, 2, 0.1
    layers = [make_layer(E=E, K=K, seed=s, aux_loss="global", aux_loss_coef=coef).train() for s in (1, 2)]
    model = nn.Sequential(nn.Identity(), nn.Sequential(layers[0]), layers[1])
    counts = [torch.zeros(E, dtype=torch.float64) for _ in layers]
    inputs = {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach().clone()))
    for step, micro_batches in enumerate([(0, 1, 2), (3, 4)]):
        for i in range(2):
            counts[i].zero_()
        for seed in micro_batches:
            model(xs(7, 8, seed=seed))
            for i, layer in enumerate(layers):
                c, scores = ref_counts(inputs[i], layer.gate.weight.detach(), K)
                counts[i] += c
                expected = coef * E * float((counts[i] / counts[i].sum() * scores.mean(0)).sum())
                got = float(layer.aux_losses["global"].detach())
                assert got == pytest.approx(expected, rel=1e-5), (step, seed, i)
        moekit.end_step(model)


# --------------------------------------------------------------------------- loss-free controller
def test_aux_loss_free_bias_reduces_max_violation():
    """DeepSeek-V3 setting (sigmoid scores, sign rule): a router that sends every token to expert 0 is
    rebalanced by the bias alone, with no auxiliary loss and no gradient step."""
    E, D, T = 4, 8, 128
    layer = make_layer(E=E, D=D, K=1, seed=3, score_func="sigmoid", aux_loss=None, bias_update="sign",
                       bias_update_rate=0.02).train()
    with torch.no_grad():
        layer.gate.weight.mul_(0.5)
        layer.gate.weight[0, 0] = 4.0  # expert 0 wins every token with x[:, 0] >= 1
    weight_before = layer.gate.weight.detach().clone()
    g = torch.Generator().manual_seed(4)
    history = []
    for _ in range(40):
        x = torch.randn(T, D, generator=g)
        x[:, 0] = x[:, 0].abs() + 1.0
        with torch.no_grad():
            layer(x)
        counts = torch.bincount(layer.last_routing.expert_ids, minlength=E)
        history.append(ref_max_violation(counts.tolist()))
        assert layer.load.max_violation == pytest.approx(history[-1])
        moekit.end_step(layer)
    assert history[0] == pytest.approx(3.0)  # everything on one of 4 experts
    assert sum(history[-10:]) / 10 < 0.6
    bias = layer.gate.e_score_correction_bias
    assert bias[0] < 0 and (bias[1:] > 0).all()
    assert torch.equal(layer.gate.weight, weight_before)


# ----------------------------------------------------------------------------------- warning
def test_unbalanced_training_warns_once():
    layer = make_layer(aux_loss=None, bias_update=None).train()
    with pytest.warns(UserWarning, match="balanc"):
        layer(xs(5, 8, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(xs(5, 8, seed=2))


@pytest.mark.parametrize("kw,train", [(dict(aux_loss="switch"), True), (dict(aux_loss=None, bias_update="sign"), True),
                                      (dict(aux_loss=None), False)])
def test_no_warning_when_balanced_or_eval(kw, train):
    layer = make_layer(**kw).train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(xs(5, 8, seed=1))
