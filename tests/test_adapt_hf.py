"""moekit.adapt on transformers models whose routers were replaced by moekit.hf.surgery: rewiring changes only
the offsets, zero offsets reproduce the model's logits, the offsets round-trip through a file beside the
checkpoint, and write-back into a router bias gives the same logits (hand-computed ``W x + b``)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.adapt import Rewirer, evaluate_streaming  # noqa: E402
from moekit.adapt.hf import OFFSETS_FILE, load_offsets, save_pretrained_with_offsets, write_back_offsets  # noqa: E402
from moekit.hf import surgery  # noqa: E402
from moekit.hf.record import find_moe_blocks  # noqa: E402

D, F, V = 16, 8, 64
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _config(name):
    T = transformers
    if name == "olmoe":
        return T.OlmoeConfig(**COMMON, intermediate_size=F, num_experts=4, num_experts_per_tok=2)
    return T.Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=F, num_experts=6,
                            num_experts_per_tok=2, head_dim=8, norm_topk_prob=True)


def _saved(name, folder):
    """A tiny random model made from a config, saved with save_pretrained and loaded back (float32)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(name))
    with torch.no_grad():
        for b in find_moe_blocks(model):
            b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(folder)
    return folder


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


IDS = torch.randint(3, V, (1, 24), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(ids).logits


@pytest.mark.parametrize("name", ["qwen3", "olmoe"])
def test_rewiring_a_surgered_transformers_model(name, tmp_path):
    model = _load(_saved(name, tmp_path / "ckpt"))
    reference = _logits(model)
    surgery.replace_routers(model, "topk")
    torch.testing.assert_close(_logits(model), reference, rtol=1e-5, atol=1e-5)  # zero offsets: unchanged
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rewirer = Rewirer(model, lr=0.2, steps=5, pad_id=None)
    assert len(rewirer.layers) == 2
    report = rewirer.adapt(IDS[0])
    assert report.loss_after < report.loss_before
    assert all(n > 0 for n in rewirer.delta_norms()) and len(report.routing_change) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # only the offsets changed
    adapted = _logits(model)
    assert not torch.allclose(adapted, reference)

    # saved beside the checkpoint, loaded into a fresh surgered model: the adapted logits again
    out = tmp_path / "adapted"
    save_pretrained_with_offsets(model, out)
    assert (out / OFFSETS_FILE).is_file() and (out / "config.json").is_file()
    fresh = _load(out)
    surgery.replace_routers(fresh, "topk")
    torch.testing.assert_close(_logits(fresh), reference, rtol=1e-5, atol=1e-5)
    load_offsets(fresh, out)
    torch.testing.assert_close(_logits(fresh), adapted, rtol=1e-5, atol=1e-5)

    # these classes have no router bias: write-back is refused, naming the class
    with pytest.raises(ValueError, match="no linear bias"):
        write_back_offsets(model)

    # streaming evaluation runs on it too, and never changes the weights
    result = evaluate_streaming(model, Rewirer(model, lr=0.05, steps=1, every=8, pad_id=None), [IDS[0].tolist()])
    assert result["adaptations"] == 2 and result["tokens"] == 23


def test_write_back_into_a_router_bias_gives_the_same_logits(tmp_path):
    """A router class with a linear bias: after write-back, ``W x + b`` of the original equals the moekit
    router's logits with the offset (computed by hand)."""
    model = _load(_saved("olmoe", tmp_path / "ckpt"))
    surgery.replace_routers(model, "topk")
    adapters = surgery.adapters(model)
    for a in adapters:  # stand-in originals that hold a bias
        lin = torch.nn.Linear(D, a.router.num_experts, bias=True)
        with torch.no_grad():
            lin.weight.copy_(a.router.weight)
            lin.bias.zero_()
        a.__dict__["original"] = lin
    Rewirer(model, lr=0.2, steps=3, pad_id=None).adapt(IDS[0])
    offsets = [a.router.logit_offset.detach().clone() for a in adapters]
    assert all(float(o.abs().sum()) > 0 for o in offsets)
    x = torch.randn(5, D)
    with torch.no_grad():
        want = [x @ a.router.weight.T + o for a, o in zip(adapters, offsets)]
    assert write_back_offsets(model) == [a.block_name for a in adapters]
    for a, o, w in zip(adapters, offsets, want):
        torch.testing.assert_close(a.original.bias.detach(), o)
        torch.testing.assert_close(a.original(x).detach(), w)
        assert float(a.router.logit_offset.detach().abs().sum()) == 0
