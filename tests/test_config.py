"""Bad input raises ValueError naming the field and the allowed values, before any work is done."""
from __future__ import annotations

import pytest
import torch

import moekit
from moekit import MoEConfig

BASE = dict(dim=8, hidden_dim=4, num_experts=4, top_k=2)


def config_error(**kw):
    with pytest.raises(ValueError) as err:
        MoEConfig(**{**BASE, **kw})
    return str(err.value)


def test_top_k_above_num_experts():
    msg = config_error(top_k=5)
    assert "top_k" in msg and "num_experts=4" in msg


@pytest.mark.parametrize("top_k", [0, -1, 1.5])
def test_top_k_not_positive(top_k):
    msg = config_error(top_k=top_k)
    assert "top_k" in msg and ("positive" in msg or "[1," in msg)


@pytest.mark.parametrize("cf", [0, 0.0, -1.0, float("nan"), "1.0"])
def test_capacity_factor_not_positive(cf):
    msg = config_error(capacity_factor=cf)
    assert "capacity_factor" in msg and "> 0" in msg


def test_capacity_factor_infinite_is_rejected_or_works():
    """An infinite capacity factor must either be refused by the config or behave as dropless."""
    try:
        layer = moekit.MoE(**BASE, capacity_factor=float("inf"))
    except ValueError as err:
        assert "capacity_factor" in str(err)
        return
    x = torch.randn(5, 8)
    out = layer(x)
    assert layer.load.num_dropped == 0 and out.shape == x.shape


def test_unknown_router():
    msg = config_error(router="nope")
    assert "router" in msg and "nope" in msg and "topk" in msg


def test_unknown_activation():
    msg = config_error(activation="tanh")
    assert "activation" in msg and "tanh" in msg
    for allowed in ("swiglu", "geglu", "gelu", "relu"):
        assert allowed in msg


def test_unknown_drop_policy():
    msg = config_error(capacity_factor=1.0, drop_policy="random")
    assert "drop_policy" in msg and "position" in msg and "probs" in msg


@pytest.mark.parametrize("field", ["dim", "hidden_dim", "num_experts"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_sizes_must_be_positive_integers(field, value):
    msg = config_error(**{field: value})
    assert field in msg and "positive integer" in msg


@pytest.mark.parametrize("field,value,allowed", [
    ("aux_loss", "entropy", "switch"),
    ("bias_update", "always", "sign"),
    ("score_func", "tanh", "softmax"),
])
def test_unknown_balancing_and_score_options(field, value, allowed):
    with pytest.raises(ValueError) as err:
        moekit.MoE(MoEConfig(**BASE, **{field: value}))
    assert field in str(err.value) and allowed in str(err.value)


def test_from_dict_unknown_key():
    good = MoEConfig(**BASE).to_dict()
    assert MoEConfig.from_dict(good) == MoEConfig(**BASE)
    with pytest.raises(ValueError) as err:
        MoEConfig.from_dict({**good, "num_expert": 3})
    assert "num_expert" in str(err.value)


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig.from_dict({**BASE, "top_k": 9})


# ------------------------------------------------------------------------------------------- inputs
@pytest.fixture
def layer():
    return moekit.MoE(**BASE)


def _assert_no_work(layer):
    assert layer.load is None and layer.last_routing is None and layer.aux_losses == {}


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 9), (8, 5), (8,)])
def test_wrong_input_width(layer, shape):
    if shape == (8,):
        shape = (3,)
    with pytest.raises(ValueError) as err:
        layer(torch.randn(*shape))
    msg = str(err.value)
    assert "dim=8" in msg and str(shape[-1]) in msg
    _assert_no_work(layer)


def test_scalar_input(layer):
    with pytest.raises(ValueError, match="dim"):
        layer(torch.tensor(1.0))
    _assert_no_work(layer)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_input(layer, dtype):
    with pytest.raises(ValueError) as err:
        layer(torch.zeros(3, 8, dtype=dtype))
    assert "float" in str(err.value) and str(dtype) in str(err.value)
    _assert_no_work(layer)


def test_errors_happen_before_routing(layer, monkeypatch):
    calls = []
    monkeypatch.setattr(layer.gate, "forward", lambda *a, **k: calls.append(1))
    for bad in (torch.zeros(3, 8, dtype=torch.int64), torch.randn(3, 7)):
        with pytest.raises(ValueError):
            layer(bad)
    assert calls == []


def test_config_and_kwargs_together_rejected():
    with pytest.raises(ValueError):
        moekit.MoE(MoEConfig(**BASE), top_k=1)


def test_empty_token_batch():
    """Zero tokens: a [0, D] input gives a [0, D] output (nothing to route)."""
    layer = moekit.MoE(**BASE, aux_loss=None).eval()
    out = layer(torch.randn(0, 8))
    assert out.shape == (0, 8)
