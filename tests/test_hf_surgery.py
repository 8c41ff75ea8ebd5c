"""``moekit.hf.surgery`` on tiny random OLMoE and DeepSeek-V3 models: router replacement is exact, fine-tuning
with moekit balancing runs, write-back + save_pretrained round-trips, inexpressible routers raise."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.hf import surgery  # noqa: E402
from moekit.hf.record import find_moe_blocks  # noqa: E402

D, F, V = 16, 8, 64
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _config(name, **kw):
    T = transformers
    if name == "olmoe":
        return T.OlmoeConfig(**COMMON, intermediate_size=F, num_experts=4, num_experts_per_tok=2, **kw)
    return T.DeepseekV3Config(**COMMON, intermediate_size=24, moe_intermediate_size=F, n_routed_experts=8,
                              num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
                              first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                              qk_nope_head_dim=4, v_head_dim=8, rope_scaling=None, routed_scaling_factor=2.5,
                              norm_topk_prob=True, **kw)


def _model(name, seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(name, **kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in find_moe_blocks(model):  # spread router scores so the top-k is decisive
            b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=g))
            bias = getattr(b.router, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.3)
    return model


def _ids(seed=0, batch=2, length=12):
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    model.eval()
    return model(ids).logits


MATCHING = {"olmoe": dict(), "dsv3": dict()}  # the class's settings are the defaults (DeepSeek: frozen bias)


@pytest.mark.parametrize("name", ["olmoe", "dsv3"])
def test_topk_surgery_is_exact(name):
    model = _model(name)
    ids = _ids()
    before = _logits(model, ids)
    names = surgery.replace_routers(model, "topk", **MATCHING[name])
    assert names == [b.name for b in find_moe_blocks(model)] and names
    assert all(isinstance(b.router, surgery.RouterAdapter) for b in find_moe_blocks(model))
    after = _logits(model, ids)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    spec = surgery.adapters(model)[0].probe.spec
    if name == "dsv3":
        assert (spec.score_func, spec.norm_topk, spec.scaling_factor, spec.num_groups, spec.topk_groups,
                spec.has_bias) == ("sigmoid", True, 2.5, 4, 2, True)
        bias = surgery.adapters(model)[0].router.e_score_correction_bias
        assert bias.abs().sum() > 0  # copied from the checkpoint
    else:
        assert (spec.score_func, spec.norm_topk, spec.has_bias) == ("softmax", False, False)
    # restore_routers puts the untouched originals back
    surgery.restore_routers(model)
    torch.testing.assert_close(_logits(model, ids), before, atol=0, rtol=0)


def _finetune(model, steps=3, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        ids = _ids(seed + step)
        out = model(ids, labels=ids)
        aux = surgery.aux_loss(model)
        (out.loss + aux).backward()
        opt.step()
        opt.zero_grad()
        surgery.end_step(model)
    return aux


@pytest.mark.parametrize("name", ["olmoe", "dsv3"])
def test_bias_finetune_write_back_round_trip(name, tmp_path):
    model = _model(name)
    surgery.replace_routers(model, "topk", bias_update="sign", bias_update_rate=0.05)
    ads = surgery.adapters(model)
    bias0 = [a.router.e_score_correction_bias.clone() for a in ads]
    w0 = [a.router.weight.detach().clone() for a in ads]
    aux = _finetune(model)
    assert aux.requires_grad and aux.item() > 0  # the default switch loss reaches the training loss
    assert all(a.router.weight.grad is None for a in ads)  # zeroed: gradients did flow, see the weight change
    assert any(not torch.equal(a.router.weight, w) for a, w in zip(ads, w0))
    assert all(not torch.equal(a.router.e_score_correction_bias, b) for a, b in zip(ads, bias0))  # end_step
    ids = _ids(99)
    tuned = _logits(model, ids)

    if name == "olmoe":  # OLMoE's router has no selection bias to hold the trained one
        with pytest.raises(ValueError, match="no selection bias"):
            surgery.write_back(model)
        with pytest.raises(ValueError, match="no selection bias"):
            surgery.save_pretrained(model, tmp_path)
        assert surgery.adapters(model)  # nothing changed
        return

    surgery.save_pretrained(model, tmp_path / "kept")  # the surgery stays in place
    assert surgery.adapters(model)
    torch.testing.assert_close(_logits(model, ids), tuned, atol=0, rtol=0)

    restored = surgery.write_back(model)
    assert restored and not surgery.adapters(model)
    torch.testing.assert_close(_logits(model, ids), tuned, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path / "plain")
    for sub in ("kept", "plain"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / sub)
        assert type(find_moe_blocks(loaded)[0].router).__name__ == "DeepseekV3TopkRouter"
        torch.testing.assert_close(_logits(loaded, ids), tuned, atol=1e-6, rtol=0)


def test_olmoe_plain_topk_round_trip(tmp_path):
    model = _model("olmoe")
    surgery.replace_routers(model, "topk", aux_loss="switch", z_loss_coef=1e-3, jitter=0.01)
    _finetune(model, steps=2)
    ids = _ids(7)
    tuned = _logits(model, ids)
    ok, reason = surgery.can_express(surgery.adapters(model)[0], surgery.adapters(model)[0].router)
    assert ok, reason
    surgery.write_back(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), tuned, atol=1e-6, rtol=0)


def test_hash_router_is_not_expressible():
    model = _model("olmoe")
    surgery.replace_routers(model, "hash")
    _finetune(model, steps=1)  # trains the experts; the hash router reads the token ids from the model call
    with pytest.raises(ValueError, match="token ids"):
        surgery.write_back(model)
    ok, reason = surgery.can_express(surgery.adapters(model)[0], surgery.adapters(model)[0].router)
    assert not ok and "OlmoeTopKRouter" in reason


def test_mismatched_settings_are_not_expressible():
    model = _model("dsv3")
    surgery.replace_routers(model, "topk", score_func="softmax", num_groups=1)  # not DeepSeek-V3's routing
    with pytest.raises(ValueError, match="sigmoid"):
        surgery.write_back(model)
    surgery.restore_routers(model)
    with pytest.warns(UserWarning, match="e_score_correction_bias"):
        surgery.replace_routers(model, "topk", bias_update=None)


@pytest.mark.parametrize("norm", [True, False])
def test_ssr_trains_and_writes_back_as_softmax_topk(norm, tmp_path):
    model = _model("olmoe", norm_topk_prob=norm)
    surgery.replace_routers(model, "ssr", sinkhorn_prob=1.0)
    ads = surgery.adapters(model)
    w0 = [a.router.weight.detach().clone() for a in ads]
    _finetune(model, steps=2)
    assert all(a.router.sinkhorn_calls > 0 for a in ads)
    assert any(not torch.equal(a.router.weight, w) for a, w in zip(ads, w0))
    ids = _ids(5)
    tuned = _logits(model, ids)
    ok, reason = surgery.can_express(ads[0], ads[0].router)
    if not norm:  # SSR's fallback renormalises the top-k; this OLMoE config does not
        assert not ok and "norm_topk" in reason
        with pytest.raises(ValueError, match="norm_topk"):
            surgery.write_back(model)
        return
    assert ok and "inference fallback is softmax top-2" in reason
    surgery.write_back(model)
    torch.testing.assert_close(_logits(model, ids), tuned, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), tuned, atol=1e-6, rtol=0)


def test_errors():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=24))
    with pytest.raises(ValueError, match="no sparse MoE blocks"):
        surgery.replace_routers(llama)
    with pytest.raises(ValueError, match="no replaced routers"):
        surgery.write_back(llama)
    model = _model("olmoe")
    with pytest.raises(ValueError, match="unknown router"):
        surgery.replace_routers(model, "nope")
    with pytest.raises(ValueError, match="residual update"):
        surgery.replace_routers(model, "momentum")
    surgery.replace_routers(model)
    with pytest.raises(ValueError, match="already replaced"):
        surgery.replace_routers(model)


def test_top_level_aux_loss_and_end_step_reach_surgered_routers():
    """moekit.aux_loss / moekit.end_step cover router adapters as well as moekit.MoE layers."""
    import moekit

    model = _model("olmoe")
    surgery.replace_routers(model, "topk", bias_update="sign", bias_update_rate=0.1)
    model.train()
    model(_ids())
    adapters = surgery.adapters(model)
    expected = sum(a.aux_loss for a in adapters)
    assert torch.equal(moekit.aux_loss(model), expected) and expected > 0
    before = [a.router.e_score_correction_bias.clone() for a in adapters]
    moekit.end_step(model)
    assert any(not torch.equal(b, a.router.e_score_correction_bias) for b, a in zip(before, adapters))
