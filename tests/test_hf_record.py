"""``moekit.hf.record_routing`` on tiny random transformers MoE models: what it records equals the routers'
own computation, logits are raw, ``generate()`` with a KV cache gives one entry per fed token, traces load."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.hf.record import find_moe_blocks, record_routing  # noqa: E402
from moekit.trace import load_trace, save_trace  # noqa: E402

D, F, V = 16, 8, 64
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _config(name):
    T = transformers
    return {
        "olmoe": lambda: T.OlmoeConfig(**COMMON, intermediate_size=F, num_experts=4, num_experts_per_tok=2),
        "mixtral": lambda: T.MixtralConfig(**COMMON, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2),
        "qwen3": lambda: T.Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=F, num_experts=6,
                                          num_experts_per_tok=2, head_dim=8, norm_topk_prob=True),
        "qwen2": lambda: T.Qwen2MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=F,
                                          shared_expert_intermediate_size=12, num_experts=4, num_experts_per_tok=2),
        "dsv3": lambda: T.DeepseekV3Config(**COMMON, intermediate_size=24, moe_intermediate_size=F,
                                           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
                                           topk_group=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8,
                                           qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, rope_scaling=None,
                                           routed_scaling_factor=2.5, norm_topk_prob=True),
        "gptoss": lambda: T.GptOssConfig(**COMMON, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2,
                                         head_dim=8, layer_types=["full_attention", "full_attention"]),
    }[name]()


NAMES = ["olmoe", "mixtral", "qwen3", "qwen2", "dsv3", "gptoss"]


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(name)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in find_moe_blocks(model):  # spread router scores so the top-k is decisive
            b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=g))
            bias = getattr(b.router, "e_score_correction_bias", None)
            if bias is not None:  # DeepSeek-V3: a selection bias that changes the choice
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.3)
    return model


def _capture_router_inputs(model):
    """Forward pre-hooks that keep each router's input hidden states (independent of the recorder)."""
    seen, handles = {}, []
    for b in find_moe_blocks(model):
        def hook(module, args, name=b.name):
            seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        handles.append(b.router.register_forward_pre_hook(hook))
    return seen, handles


def _sorted(experts, weights):
    order = torch.argsort(-weights, dim=-1, stable=True)
    return experts.gather(-1, order), weights.gather(-1, order)


@pytest.mark.parametrize("name", NAMES)
def test_recorded_routing_equals_router_recomputation(name, tmp_path):
    model = _model(name)
    blocks = find_moe_blocks(model)
    assert blocks and all(b.num_experts == b.router.weight.shape[0] for b in blocks)
    x = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    seen, handles = _capture_router_inputs(model)
    with torch.no_grad(), record_routing(model) as rec:
        model(x)
    for h in handles:
        h.remove()
    trace = rec.trace(source={"test": name})
    L, T = len(blocks), x.numel()
    assert trace.experts.shape == (L, T, trace.top_k) and trace.logits.shape == (L, T, trace.num_experts)
    assert trace.layer_names == [b.name for b in blocks]
    assert trace.tokens.tolist() == x.reshape(-1).tolist()
    assert trace.positions.tolist() == list(range(7)) * 2 and trace.seq_ids.tolist() == [0] * 7 + [1] * 7

    for layer, b in enumerate(blocks):
        (h,) = seen[b.name]
        with torch.no_grad():
            logits, weights, index = b.router(h)  # the router module itself, on the hidden states it saw
        e, w = _sorted(index.long(), weights.float())
        assert torch.equal(trace.experts[layer].long(), e)
        torch.testing.assert_close(trace.weights[layer], w, rtol=0, atol=0)
        # raw logits: x W^T (+ the router's own bias), before softmax/sigmoid
        raw = torch.nn.functional.linear(h.float(), b.router.weight.float(), getattr(b.router, "bias", None))
        torch.testing.assert_close(trace.logits[layer], raw, rtol=1e-6, atol=1e-6)
        rec_e, rec_w, rec_l = trace.experts[layer].long(), trace.weights[layer], trace.logits[layer]
        if name == "dsv3":  # sigmoid scores, renormalised, scaled; selection on score + bias in the best groups
            s = torch.sigmoid(rec_l)
            g = s + b.router.e_score_correction_bias
            grp = g.view(T, 4, 2).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
            allowed = torch.zeros(T, 4, dtype=torch.bool).scatter_(1, grp, True).repeat_interleave(2, dim=1)
            chosen = g.masked_fill(~allowed, float("-inf")).topk(2, dim=-1).indices
            assert torch.equal(rec_e.sort(-1).values, chosen.sort(-1).values)
            pw = s.gather(1, rec_e)
            torch.testing.assert_close(rec_w, pw / pw.sum(-1, keepdim=True) * 2.5)
        elif name == "gptoss":  # softmax over the top-k logits
            top = rec_l.topk(2, dim=-1)
            assert torch.equal(rec_e, top.indices)
            torch.testing.assert_close(rec_w, torch.softmax(top.values, -1))
        else:  # softmax of the recorded logits is the router's probability distribution
            p = torch.softmax(rec_l, dim=-1)
            assert torch.equal(rec_e, p.topk(2, dim=-1).indices)
            pw = p.gather(1, rec_e)
            normalised = name in ("mixtral", "qwen3")
            torch.testing.assert_close(rec_w, pw / pw.sum(-1, keepdim=True) if normalised else pw)

    path = tmp_path / f"{name}.safetensors"
    save_trace(trace, path)
    back = load_trace(path)
    assert torch.equal(back.experts, trace.experts) and torch.equal(back.weights, trace.weights)
    assert torch.equal(back.logits, trace.logits) and back.model["architecture"] == type(model).__name__


@pytest.mark.parametrize("name", ["qwen3", "dsv3"])
def test_generate_with_cache_records_one_entry_per_token(name, tmp_path):
    model = _model(name)
    B, P, N = 2, 5, 4
    x = torch.randint(3, V, (B, P), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), record_routing(model, keep_logits=False) as rec:
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N,
                             do_sample=False, use_cache=True)
    trace = rec.trace()
    assert out.shape == (B, P + N)
    # the prompt, then one token per sequence per decoding step (the last generated token is never fed back)
    T = B * P + B * (N - 1)
    assert trace.num_tokens == T and trace.logits is None
    assert trace.num_layers == len(find_moe_blocks(model))
    fed = [out[:, :P].reshape(-1)] + [out[:, P + i] for i in range(N - 1)]
    assert trace.tokens.tolist() == torch.cat(fed).tolist()
    assert trace.positions.tolist() == list(range(P)) * B + [P + i for i in range(N - 1) for _ in range(B)]
    assert trace.seq_ids.tolist() == [0] * P + [1] * P + [0, 1] * (N - 1)
    assert bool((trace.experts >= 0).all()) and bool((trace.weights > 0).all())

    # the decoding steps routed as a full forward pass over the whole sequence does (cache changes nothing)
    with torch.no_grad(), record_routing(model, keep_logits=False) as full:
        model(out[:, :P + N - 1])
    ref = full.trace()
    last = ref.experts[:, ref.positions >= P]  # rows of positions P.. in (sequence, position) order
    rows = trace.experts[:, B * P:]  # (position, sequence) order
    order = torch.arange(B * (N - 1)).view(N - 1, B).t().reshape(-1)
    assert torch.equal(rows[:, order], last)

    # a second generate() starts new sequences
    with torch.no_grad(), record_routing(model, keep_logits=False) as rec2:
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, min_new_tokens=2, do_sample=False)
        model.generate(x[:1], attention_mask=torch.ones_like(x[:1]), max_new_tokens=2, min_new_tokens=2,
                       do_sample=False)
    assert sorted(set(rec2.trace().seq_ids.tolist())) == [0, 1, 2]
    save_trace(trace, tmp_path / "gen.safetensors")
    assert load_trace(tmp_path / "gen.safetensors").num_tokens == T


def test_errors():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=24))
    with pytest.raises(ValueError, match="no sparse MoE blocks"):
        with record_routing(llama):
            pass
    model = _model("olmoe")
    with record_routing(model) as rec:
        pass
    with pytest.raises(ValueError, match="no routing recorded"):
        rec.trace()
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with record_routing(model):
        pass
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before  # removed
