"""Rough edges of the transformers integration: ``import moekit`` alone enables ``experts_implementation="moekit"``
(without importing transformers eagerly), variable-k routers after surgery record clean traces,
``output_router_logits`` after surgery is refused in one sentence, and routers ``write_back`` cannot express
round-trip through ``save_routers`` / ``load_routers``. Tiny models built from configs."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.hf import surgery  # noqa: E402
from moekit.hf.record import find_moe_blocks, record_routing  # noqa: E402

D, F, V = 16, 8, 64
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _model(kind: str, seed: int = 0, num_experts: int = 4):
    T = transformers
    if kind == "olmoe":
        cfg = T.OlmoeConfig(**COMMON, intermediate_size=F, num_experts=num_experts, num_experts_per_tok=2)
    else:
        cfg = T.Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=F, num_experts=4,
                               num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in find_moe_blocks(model):
            b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=g))
    return model


def _ids(seed=0, batch=2, length=12):
    return torch.randint(3, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_import_moekit_alone_enables_the_experts_implementation():
    code = textwrap.dedent(f"""
        import sys
        import torch
        import moekit
        assert "transformers.integrations.moe" not in sys.modules, "import moekit imported transformers' MoE code"
        import transformers
        cfg = transformers.OlmoeConfig(vocab_size={V}, hidden_size={D}, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size={F}, num_experts=4,
                                       num_experts_per_tok=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="moekit").eval()
        assert model.config._experts_implementation == "moekit"
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        import moekit.hf.experts as mx
        assert ALL_EXPERTS_FUNCTIONS["moekit"] is mx.moekit_experts_forward
        ids = torch.randint(3, {V}, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(ids).logits
            model.set_experts_implementation("eager")
            eager = model(ids).logits
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_expert_choice_after_surgery_records_a_clean_trace():
    model = _model("olmoe")
    surgery.replace_routers(model, "expert_choice")
    model.train()
    ids = _ids()
    with record_routing(model) as rec:
        model(ids)
    trace = rec.trace()  # validated by the trace format: no expert twice for one token
    adapters = surgery.adapters(model)
    T = ids.numel()
    for layer, a in enumerate(adapters):
        r = a.last_routing
        want = sorted(zip(r.token_ids.tolist(), r.expert_ids.tolist()))
        experts = trace.experts[layer].long()
        got = sorted((t, int(e)) for t in range(T) for e in experts[t] if e >= 0)
        assert got == want  # exactly the router's pairs, padding dropped
        assert a.last_padding is not None and bool(a.last_padding.any())  # some rows were padded
        weights = trace.weights[layer]
        assert bool((weights[experts < 0] == 0).all())
        dense = torch.zeros(T, 4).index_put_((r.token_ids, r.expert_ids), r.weights.detach().float(),
                                             accumulate=True)
        rows = torch.arange(T)[:, None].expand_as(experts)
        ok = experts >= 0
        torch.testing.assert_close(weights[ok], dense[rows[ok], experts[ok]])


def test_output_router_logits_after_surgery_is_refused_clearly():
    model = _model("olmoe")
    ids = _ids()
    with torch.no_grad():
        model(ids, output_router_logits=True)  # fine before surgery
    surgery.replace_routers(model, "topk")
    with pytest.raises(ValueError, match="output_router_logits=True does not work after"):
        model(ids, output_router_logits=True)
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="aux_loss"):
        model(ids)
    model.config.output_router_logits = False
    with torch.no_grad():
        model(ids)
    surgery.restore_routers(model)
    with torch.no_grad():
        model(ids, output_router_logits=True)  # and fine again once the routers are back


def test_save_and_load_routers_round_trip(tmp_path):
    base = _model("qwen3")
    model = copy.deepcopy(base)
    surgery.replace_routers(model, "topk", bias_update="sign", bias_update_rate=0.05, aux_loss=None)
    model.train()
    ids = _ids(length=16)
    with torch.no_grad():
        for step in range(4):  # auxiliary-loss-free bias updates from the routed load
            model(_ids(seed=step, length=16))
            surgery.end_step(model)
        for a in surgery.adapters(model):  # stands for fine-tuned gate weights
            a.router.weight.add_(0.1 * torch.randn_like(a.router.weight))
    assert any(bool((a.router.e_score_correction_bias != 0).any()) for a in surgery.adapters(model))
    with pytest.raises(ValueError, match="save_routers"):
        surgery.write_back(model)  # Qwen3-MoE's router has no bias to hold it
    model.eval()
    with torch.no_grad():
        want = model(ids).logits

    path = surgery.save_routers(model, tmp_path)
    assert path == tmp_path / surgery.ROUTERS_FILE and path.is_file()
    fresh = copy.deepcopy(base)
    blocks = surgery.load_routers(fresh, tmp_path)
    assert blocks == [b.name for b in find_moe_blocks(base)]
    fresh.eval()
    with torch.no_grad():
        got = fresh(ids).logits
    assert torch.equal(got, want)
    with torch.no_grad():
        assert not torch.equal(base(ids).logits, want)  # the trained routers do change the output

    other = _model("olmoe", num_experts=8)
    with pytest.raises(ValueError, match="has shape"):
        surgery.load_routers(other, path)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="router file"):
        surgery.load_routers(copy.deepcopy(base), tmp_path / "junk.safetensors")
