"""Tests of moekit.model: the compact MoE decoder, KV cache, generation and the Qwen3-MoE mapping."""
import json

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.model import (KVCache, ModelConfig, MoELM, count_active_params, count_params, from_hf_state_dict,
                          from_qwen3_moe_config, generate, param_counts, qwen3_incompatibilities,
                          qwen3_moe_config_dict, to_hf_state_dict, to_qwen3_moe_config)
from moekit.model.generate import top_p_filter

try:
    from transformers import Qwen3MoeForCausalLM
except ImportError:  # transformers is an optional dependency
    Qwen3MoeForCausalLM = None


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: thread start-up dominates, and a loaded machine makes it much worse.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> ModelConfig:
    settings = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                    moe=dict(hidden_dim=16, num_experts=4, top_k=2, norm_topk=True))
    settings.update(overrides)
    return ModelConfig(**settings)


def tiny_model(seed=0, **overrides) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(tiny_config(**overrides))


def test_shapes_layer_types_and_aux_loss():
    model = tiny_model(n_layers=4, moe_every=2, dense_layers=[3])
    assert [layer.is_moe for layer in model.model.layers] == [False, True, False, False]
    assert len(moekit.moe_layers(model)) == 1
    ids = torch.randint(0, 256, (3, 10))
    logits = model(ids)
    assert logits.shape == (3, 10, model.config.vocab_size) and logits.dtype == torch.float32
    aux = moekit.aux_loss(model)
    assert aux.item() > 0 and aux.requires_grad
    layer = moekit.moe_layers(model)[0]
    assert int(layer.load.routed_E.sum()) == 3 * 10 * 2


def test_routing_context_reaches_moe_layers():
    model = tiny_model()
    seen = []
    for layer in moekit.moe_layers(model):
        layer.gate.register_forward_hook(lambda mod, args, out: seen.append(args[1]))
    ids = torch.randint(0, 256, (2, 5))
    model(ids)
    assert [ctx.layer_index for ctx in seen] == [0, 1]
    assert all(ctx.batch_shape == (2, 5) and torch.equal(ctx.input_ids, ids) for ctx in seen)
    assert seen[0].extras is seen[1].extras


def test_causal():
    model = tiny_model(init_std=0.2).eval()
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_kv_cache_chunks_match_full_forward():
    model = tiny_model(init_std=0.2).eval()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch_size=2, max_len=16)
        parts = [model(ids[:, :4], kv_cache=cache, start_pos=0), model(ids[:, 4:5], kv_cache=cache, start_pos=4),
                 model(ids[:, 5:], kv_cache=cache, start_pos=5)]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds 16 positions"):
        model(ids, kv_cache=cache, start_pos=10)


def test_greedy_generate_with_and_without_cache():
    model = tiny_model(init_std=0.3)
    prompt = [256] + list(b"def ")
    with_cache = generate(model, prompt, max_new_tokens=24, use_cache=True)
    without = generate(model, prompt, max_new_tokens=24, use_cache=False)
    assert with_cache.shape == (len(prompt) + 24,)
    assert torch.equal(with_cache, without)
    assert with_cache[:len(prompt)].tolist() == prompt
    assert model.training  # restored
    batch = torch.tensor([prompt, prompt[::-1]])
    assert torch.equal(generate(model, batch, 10), generate(model, batch, 10, use_cache=False))


def test_sampling_is_seeded():
    model = tiny_model(init_std=0.3)
    a = generate(model, [256], 20, temperature=1.0, top_p=0.9, seed=1)
    b = generate(model, [256], 20, temperature=1.0, top_p=0.9, seed=1, use_cache=False)
    c = generate(model, [256], 20, temperature=1.0, top_p=0.9, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [256], 2, temperature=1.0, top_p=0.0)


def test_generate_stops_at_eos():
    model = tiny_model(init_std=0.3)
    first = int(generate(model, [256], 1)[-1])
    out = generate(model, [256], 10, eos_id=first)
    assert out.tolist() == [256, first]


def test_top_p_filter():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_loss_decreases_on_repeated_string():
    torch.manual_seed(0)
    model = MoELM(tiny_config(dim=48, moe=dict(hidden_dim=32, num_experts=4, top_k=2)))
    ids = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 3))[None, :]
    inputs, targets = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        (loss + moekit.aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        moekit.end_step(model)
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("field, value, match", [
    ("dim", 0, "dim"),
    ("n_layers", -1, "n_layers"),
    ("n_kv_heads", 3, "n_kv_heads"),
    ("head_dim", 7, "head_dim"),
    ("rope_theta", 0.0, "rope_theta"),
    ("norm_eps", -1e-6, "norm_eps"),
    ("moe_every", 0, "moe_every"),
    ("dense_layers", [5], "dense_layers"),
    ("dense_hidden_dim", 0, "dense_hidden_dim"),
    ("tie_embeddings", "yes", "tie_embeddings"),
    ("moe", dict(dim=8, hidden_dim=8, num_experts=4), "moe.dim"),
    ("moe", dict(hidden_dim=8, num_experts=2, top_k=3), "top_k"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_config_dict_round_trip():
    cfg = tiny_config(moe_every=2, dense_layers=[0], tie_embeddings=True)
    data = json.loads(json.dumps(cfg.to_dict()))
    again = ModelConfig.from_dict(data)
    assert again == cfg and isinstance(again.moe, moekit.MoEConfig)
    assert cfg.head_dim == 8 and cfg.dense_hidden_dim == 32
    with pytest.raises(ValueError, match="unknown model setting"):
        ModelConfig.from_dict({**data, "n_experts": 4})
    with pytest.raises(ValueError, match="unknown moe setting"):
        ModelConfig.from_dict({**data, "moe": {**data["moe"], "n_experts": 4}})
    defaults = ModelConfig()
    assert (defaults.dim, defaults.n_layers, defaults.moe.num_experts, defaults.moe.top_k) == (256, 4, 16, 2)


def test_param_counts():
    model = tiny_model(n_layers=2, moe_every=2)  # layer 0 dense, layer 1 MoE
    counts = param_counts(model)
    assert counts["total"] == count_params(model) == sum(p.numel() for p in model.parameters())
    experts = 4 * (2 * 16 * 32 + 32 * 16)
    assert counts["routed_experts"] == experts
    assert counts["active"] == count_active_params(model) == counts["total"] - experts // 2
    assert counts["embedding"] == 2 * 264 * 32
    tied = param_counts(tiny_model(tie_embeddings=True))
    assert tied["embedding"] == 264 * 32
    assert tied["total"] == param_counts(tiny_model())["total"] - 264 * 32


def test_tied_embeddings_share_storage():
    model = tiny_model(tie_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_qwen3_config_mapping_round_trip():
    cfg = tiny_config(n_layers=3, moe_every=2, dense_layers=[2], tie_embeddings=True)
    hf = qwen3_moe_config_dict(cfg)
    assert hf["decoder_sparse_step"] == 2 and hf["mlp_only_layers"] == [2] and hf["norm_topk_prob"] is True
    assert json.loads(json.dumps(hf)) == hf
    assert from_qwen3_moe_config({**hf, "model_type": "qwen3_moe"}) == cfg
    bad = tiny_config(moe=dict(hidden_dim=16, num_experts=4, num_shared_experts=1))
    assert any("num_shared_experts" in p for p in qwen3_incompatibilities(bad))
    with pytest.raises(ValueError, match="no Qwen3-MoE equivalent"):
        qwen3_moe_config_dict(bad)


@pytest.mark.skipif(Qwen3MoeForCausalLM is None, reason="transformers with Qwen3-MoE is not installed")
@pytest.mark.parametrize("overrides", [
    dict(),
    dict(n_layers=3, moe_every=2, tie_embeddings=True, n_kv_heads=1),
    dict(n_layers=3, dense_layers=[1], head_dim=12, moe=dict(hidden_dim=16, num_experts=4, top_k=1, norm_topk=False)),
])
def test_logits_match_transformers_qwen3_moe(overrides):
    torch.manual_seed(0)
    cfg = tiny_config(init_std=0.2, **overrides)
    model = MoELM(cfg).eval()
    with torch.no_grad():  # norms away from one, routers with clear preferences
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    hf_config = to_qwen3_moe_config(cfg)
    hf_config._experts_implementation = "eager"
    hf_config._attn_implementation = "eager"
    hf = Qwen3MoeForCausalLM(hf_config).eval()
    state = to_hf_state_dict(model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    rel = (ours - theirs).abs().max() / theirs.abs().max()
    assert rel < 1e-5, float(rel)
    # and back: a transformers state dict loads into moekit
    back = MoELM(cfg)
    back.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids), ours)


def test_kv_cache_rejects_wrong_batch():
    model = tiny_model()
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))
