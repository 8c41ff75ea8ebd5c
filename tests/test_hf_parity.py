"""Parity with transformers' OLMoE / Mixtral / Qwen2-MoE sparse blocks (eager experts), float32.

Same weights (state dicts load both ways with strict=True) -> same outputs and gradients within 1e-5
relative error (max|a - b| / max|b|).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit import MoEConfig  # noqa: E402
from reference import rel_err  # noqa: E402

TOL = 1e-5
D, F, E = 32, 16, 8


def olmoe(top_k=2, norm=False):
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=top_k,
                      norm_topk_prob=norm)
    cfg._experts_implementation = "eager"
    return OlmoeSparseMoeBlock(cfg), MoEConfig(D, F, E, top_k, norm_topk=norm, aux_loss=None)


def mixtral(top_k=2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=top_k,
                        router_jitter_noise=0.0)
    cfg._experts_implementation = "eager"
    return MixtralSparseMoeBlock(cfg), MoEConfig(D, F, E, top_k, norm_topk=True, aux_loss=None)


def qwen2(top_k=2, norm=False, shared=24):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=shared,
                         num_experts=E, num_experts_per_tok=top_k, norm_topk_prob=norm)
    cfg._experts_implementation = "eager"
    block = Qwen2MoeSparseMoeBlock(cfg)
    return block, MoEConfig(D, F, E, top_k, norm_topk=norm, num_shared_experts=1,
                            shared_hidden_dim=cfg.shared_expert_intermediate_size, shared_expert_gate=True,
                            aux_loss=None)


BLOCKS = {
    "olmoe": lambda: olmoe(norm=False),
    "olmoe-norm": lambda: olmoe(norm=True),
    "mixtral": mixtral,
    "qwen2": lambda: qwen2(norm=False),
    "qwen2-norm": lambda: qwen2(norm=True),
}


def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            std = 0.3 if name == "gate.weight" else 0.15
            p.copy_(torch.randn(p.shape, generator=g) * std)


def forward_backward(module, x, cot):
    module.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    out = module(xx)
    (out * cot).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    return out.detach(), xx.grad.detach(), grads


def compare(moe, hf, seed=5, zero_grads=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, D, generator=g)
    cot = torch.randn(2, 7, D, generator=g)
    out_m, dx_m, g_m = forward_backward(moe, x, cot)
    out_h, dx_h, g_h = forward_backward(hf, x, cot)
    assert rel_err(out_m, out_h) < TOL, rel_err(out_m, out_h)
    assert rel_err(dx_m, dx_h) < TOL, rel_err(dx_m, dx_h)
    assert set(g_m) == set(g_h)
    for name in g_h:
        if name in zero_grads:  # analytically zero: both must be rounding noise
            assert g_m[name].abs().max() < 1e-6 and g_h[name].abs().max() < 1e-6, name
            continue
        assert rel_err(g_m[name], g_h[name]) < TOL, (name, rel_err(g_m[name], g_h[name]))
    return out_h


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_hf_weights_into_moekit(kind):
    hf, config = BLOCKS[kind]()
    randomise(hf, seed=1)
    moe = moekit.MoE(config)
    moe.load_state_dict(hf.state_dict(), strict=True)
    out = compare(moe.eval(), hf.eval())
    assert out.abs().max() > 0


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_moekit_weights_into_hf(kind):
    hf, config = BLOCKS[kind]()
    moe = moekit.MoE(config)
    randomise(moe, seed=2)
    hf.load_state_dict(moe.state_dict(), strict=True)
    compare(moe.eval(), hf.eval(), seed=6)


def test_mixtral_top1_parity():
    """Mixtral renormalises the selected weights for every K; with K=1 each token's weight is 1 (so the
    router weight gets no gradient from the output)."""
    hf, config = mixtral(top_k=1)
    randomise(hf, seed=3)
    moe = moekit.MoE(config)
    moe.load_state_dict(hf.state_dict(), strict=True)
    compare(moe.eval(), hf.eval(), seed=7, zero_grads=("gate.weight",))


def test_parity_uses_every_expert_and_both_routings_differ():
    """Sanity of the setup: the random router spreads tokens, and norm_topk changes OLMoE's output."""
    a, ca = olmoe(norm=False)
    b, cb = olmoe(norm=True)
    randomise(a, seed=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(8))
    moe = moekit.MoE(ca).eval()
    moe.load_state_dict(a.state_dict())
    with torch.no_grad():
        moe(x)
        assert (moe.load.routed_E > 0).sum() >= 6
        assert rel_err(a(x), b(x)) > 1e-2
