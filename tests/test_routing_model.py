"""Routers whose state crosses layers or reads the model's attention: MomentumSMoE / AdamSMoE
(moekit.routing.momentum), Similarity- / Attention-Aware SMoE and the routing fluctuation rate
(moekit.routing.graph), through moekit.model.MoELM."""
import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit import routing
from moekit.model import ModelConfig, MoELM, generate, qwen3_incompatibilities, qwen3_moe_config_dict
from moekit.routing import MomentumState, RoutingContext
from moekit.routing.graph import routing_fluctuation_rate

NEW_ROUTERS = ["momentum", "adam", "similarity", "attention"]


def tiny_config(router="topk", router_options=None, **overrides) -> ModelConfig:
    settings = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.3,
                    moe=dict(hidden_dim=16, num_experts=4, top_k=2, norm_topk=True, router=router,
                             router_options=router_options or {}))
    settings.update(overrides)
    return ModelConfig(**settings)


def tiny_model(router="topk", router_options=None, seed=0, **overrides) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(tiny_config(router, router_options, **overrides))


def test_routers_are_registered():
    assert set(NEW_ROUTERS) <= set(routing.names())
    assert routing.get("attention").needs_attention and not routing.get("similarity").needs_attention
    assert routing.get("momentum").updates_residual and routing.get("adam").updates_residual
    assert not routing.get("topk").updates_residual and not routing.get("topk").needs_attention
    # the base hook is the plain residual: the MoE output itself, untouched
    f = torch.randn(2, 3, 8)
    assert routing.get("topk")(dim=8, num_experts=4, top_k=2).residual_update(f, RoutingContext()) is f


# ---------------------------------------------------------------- momentum / adam


def reference_logits(model: MoELM, ids: torch.Tensor, update) -> torch.Tensor:
    """The decoder written out as a loop over layers; ``update(f, state, moe_index)`` turns the MoE output of
    each MoE layer into what is added to the residual stream."""
    dec = model.model
    x = dec.embed_tokens(ids)
    cos, sin = dec.rotary_emb(torch.arange(ids.shape[1]), x.dtype)
    state, moe_index = {}, 0
    for layer in dec.layers:
        h = x + layer.self_attn(layer.input_layernorm(x), cos, sin)[0]
        normed = layer.post_attention_layernorm(h)
        if layer.is_moe:
            x = h + update(layer.mlp(normed), state, moe_index)
            moe_index += 1
        else:
            x = h + layer.mlp(normed)
    return model.lm_head(dec.norm(x))


def test_momentum_with_mu0_gamma1_is_the_plain_residual_model():
    plain = tiny_model("topk").eval()
    momentum = tiny_model("momentum", dict(mu=0.0, gamma=1.0), seed=1).eval()
    assert momentum.state_dict().keys() == plain.state_dict().keys()  # no state on modules
    momentum.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        expected = plain(ids)
        assert torch.equal(momentum(ids), expected)
        heavy = tiny_model("momentum", dict(mu=0.7)).eval()
        heavy.load_state_dict(plain.state_dict())
        assert not torch.allclose(heavy(ids), expected, atol=1e-3)


@pytest.mark.parametrize("mu, gamma", [(0.7, 1.0), (0.5, 0.8)])
def test_momentum_matches_reference_loop(mu, gamma):
    model = tiny_model("momentum", dict(mu=mu, gamma=gamma), n_layers=4, dense_layers=[1]).eval()
    ids = torch.randint(0, 256, (2, 9))

    def heavy_ball(f, state, _):
        state["p"] = gamma * f if "p" not in state else mu * state["p"] + gamma * f
        return state["p"]

    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_logits(model, ids, heavy_ball), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)  # every call starts from p_0 = 0


@pytest.mark.parametrize("adam_layers", [1, None])
def test_adam_matches_reference_loop(adam_layers):
    options = dict(mu=0.7, gamma=1.0, beta1=0.9, beta2=0.999, adam_gamma=0.5, adam_layers=adam_layers)
    model = tiny_model("adam", options, n_layers=4, dense_layers=[1]).eval()
    ids = torch.randint(0, 256, (2, 9))

    def adam_then_heavy_ball(f, state, index):
        state["p"] = f if "p" not in state else 0.7 * state["p"] + f
        if adam_layers is not None and index >= adam_layers:
            return state["p"]
        m, v = state.get("m", torch.zeros_like(f)), state.get("v", torch.zeros_like(f))
        state["m"], state["v"] = 0.9 * m + 0.1 * f, 0.999 * v + 0.001 * f ** 2
        return 0.5 * state["m"] / torch.sqrt(state["v"] + 1e-8)

    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_logits(model, ids, adam_then_heavy_ball),
                                   rtol=1e-5, atol=1e-5)


def test_momentum_state_shape_mismatch_is_reported():
    router = routing.get("momentum")(dim=8, num_experts=4, top_k=2)
    ctx = RoutingContext()
    router.residual_update(torch.ones(2, 3, 8), ctx)
    with pytest.raises(ValueError, match="one forward call"):
        router.residual_update(torch.ones(2, 4, 8), ctx)


# ---------------------------------------------------------------- similarity / attention


def test_similarity_with_zero_ws_is_causal_uniform_averaging():
    torch.manual_seed(0)
    router = routing.get("similarity")(dim=8, num_experts=5, top_k=2, aux_loss=None)
    with torch.no_grad():
        router.similarity_weight.zero_()
    B, L = 3, 6
    x = torch.randn(B * L, 8)
    out = router(x, RoutingContext(batch_shape=(B, L)))
    scores = torch.softmax(x @ router.weight.T, dim=-1).view(B, L, 5)
    expected = (scores.cumsum(dim=1) / torch.arange(1, L + 1).view(1, L, 1)).view(B * L, 5)
    torch.testing.assert_close(out.probs, expected)
    assert torch.equal(out.topk_ids, expected.topk(2, dim=-1).indices)
    torch.testing.assert_close(out.topk_weights, expected.gather(1, out.topk_ids))
    # without the causal mask every token of a sequence gets the sequence mean
    router.causal = False
    everyone = router(x, RoutingContext(batch_shape=(B, L))).probs.view(B, L, 5)
    torch.testing.assert_close(everyone, scores.mean(dim=1, keepdim=True).expand(B, L, 5))


def test_attention_router_uses_the_supplied_matrix():
    torch.manual_seed(0)
    router = routing.get("attention")(dim=8, num_experts=6, top_k=2, aux_loss=None, norm_topk=True)
    B, L = 2, 5
    x = torch.randn(B * L, 8)
    scores = torch.softmax(x @ router.weight.T, dim=-1).view(B, L, 6)
    graph = torch.tril(torch.rand(B, L, L)) + torch.eye(L)
    graph = graph / graph.sum(dim=-1, keepdim=True)
    out = router(x, RoutingContext(batch_shape=(B, L), attention_probs=graph))
    torch.testing.assert_close(out.probs, (graph @ scores).view(B * L, 6))
    # every token attending only to the first one routes as the first one
    first = torch.zeros(B, L, L)
    first[:, :, 0] = 1.0
    out = router(x, RoutingContext(batch_shape=(B, L), attention_probs=first))
    ids = out.topk_ids.view(B, L, 2)
    assert torch.equal(ids, ids[:, :1].expand(B, L, 2))
    with pytest.raises(ValueError, match="attention_probs"):
        router(x, RoutingContext(batch_shape=(B, L)))
    with pytest.raises(ValueError, match="expected"):
        router(x, RoutingContext(batch_shape=(B, L), attention_probs=graph[:, :3]))


def test_explicit_attention_matches_sdpa_and_is_causal():
    model = tiny_model("topk").eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 7, 32)
    cos, sin = model.model.rotary_emb(torch.arange(7), x.dtype)
    with torch.no_grad():
        fast, none = attn(x, cos, sin)
        slow, probs = attn(x, cos, sin, need_weights=True)
        torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-6)
        assert none is None and probs.shape == (2, 7, 7)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 7))
        assert torch.all(probs.triu(diagonal=1) == 0)
        cache = model.new_kv_cache(batch_size=2, max_len=8)  # a chunk after cached positions
        attn(x[:, :4], cos[:4], sin[:4], cache, 0)
        chunk, chunk_probs = attn(x[:, 4:], cos[4:], sin[4:], cache, 4, need_weights=True)
        torch.testing.assert_close(chunk, fast[:, 4:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunk_probs, probs[:, 4:], rtol=1e-5, atol=1e-6)


def capture_contexts(model):
    """(context, its attention_probs at call time) for every router call (the layer clears the field after)."""
    seen = []
    for layer in moekit.moe_layers(model):
        layer.gate.register_forward_pre_hook(lambda mod, args: seen.append((args[1], args[1].attention_probs)))
    return seen


def test_model_supplies_attention_only_to_routers_that_ask():
    ids = torch.randint(0, 256, (2, 6))
    model = tiny_model("attention").eval()
    seen = capture_contexts(model)
    with torch.no_grad():
        model(ids)
    assert len(seen) == 3
    for ctx, probs in seen:
        assert probs.shape == (2, 6, 6) and torch.all(probs.triu(diagonal=1) == 0)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6))
        assert ctx.attention_probs is None  # cleared after the MoE call
    assert not torch.equal(seen[0][1], seen[1][1])  # each layer's own attention
    plain = tiny_model("topk").eval()
    seen = capture_contexts(plain)
    with torch.no_grad():
        plain(ids)
    assert len(seen) == 3 and all(probs is None for _, probs in seen)


def test_model_fills_typed_context_fields():
    """One MomentumState per call shared by the layers; the cache and start position in typed fields."""
    ids = torch.randint(0, 256, (2, 6))
    model = tiny_model("similarity").eval()
    seen = capture_contexts(model)
    with torch.no_grad():
        model(ids)
        cache = model.new_kv_cache(batch_size=2, max_len=8)
        model(ids[:, :4], kv_cache=cache, start_pos=0)
        model(ids[:, 4:], kv_cache=cache, start_pos=4)
    ctxs = [c for c, _ in seen]
    first, second, third = ctxs[:3], ctxs[3:6], ctxs[6:]
    assert all(isinstance(c.momentum, MomentumState) for c in ctxs)
    assert first[0].momentum is first[2].momentum and first[0].momentum is not second[0].momentum
    assert all(c.kv_cache is None and c.start_pos == 0 for c in first)
    assert all(c.kv_cache is cache and c.start_pos == 0 for c in second)
    assert all(c.kv_cache is cache and c.start_pos == 4 for c in third)
    assert all(c.token_mask is None for c in ctxs)
    assert [c.layer_index for c in third] == [0, 1, 2]


@pytest.mark.parametrize("router", NEW_ROUTERS)
def test_routes_never_depend_on_later_tokens(router):
    model = tiny_model(router).eval()
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256

    def routes(inputs):
        with torch.no_grad():
            logits = model(inputs)
        return logits, [(layer.last_routing.topk_ids.view(2, 12, -1), layer.last_routing.topk_weights.view(2, 12, -1))
                        for layer in moekit.moe_layers(model)]

    (logits_a, routes_a), (logits_b, routes_b) = routes(ids), routes(changed)
    for (ids_a, w_a), (ids_b, w_b) in zip(routes_a, routes_b):
        assert torch.equal(ids_a[:, :7], ids_b[:, :7])
        torch.testing.assert_close(w_a[:, :7], w_b[:, :7], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_a[:, :7], logits_b[:, :7], rtol=0, atol=1e-5)
    assert not all(torch.equal(a[0][:, 7:], b[0][:, 7:]) for a, b in zip(routes_a, routes_b))


# ---------------------------------------------------------------- every new router through MoELM


@pytest.mark.parametrize("router", NEW_ROUTERS)
def test_forward_backward(router):
    model = tiny_model(router, n_layers=2)
    ids = torch.randint(0, 256, (2, 8))
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    (loss + moekit.aux_loss(model)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in moekit.moe_layers(model):
        assert layer.gate.weight.grad.abs().sum() > 0
        if router == "similarity":
            assert layer.gate.similarity_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", NEW_ROUTERS)
def test_kv_cache_and_generate_match_full_forward(router):
    model = tiny_model(router)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        full = model.eval()(ids)
        cache = model.new_kv_cache(batch_size=2, max_len=16)
        parts = [model(ids[:, :4], kv_cache=cache, start_pos=0), model(ids[:, 4:5], kv_cache=cache, start_pos=4),
                 model(ids[:, 5:], kv_cache=cache, start_pos=5)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    prompt = [256] + list(b"def ")
    assert torch.equal(generate(model, prompt, 12), generate(model, prompt, 12, use_cache=False))
    batch = torch.tensor([prompt, prompt[::-1]])
    assert torch.equal(generate(model, batch, 6), generate(model, batch, 6, use_cache=False))


@pytest.mark.parametrize("router", NEW_ROUTERS)
def test_export_rejects_router(router):
    cfg = tiny_config(router)
    assert any(f"moe.router={router!r}" in p for p in qwen3_incompatibilities(cfg))
    with pytest.raises(ValueError, match=f"no Qwen3-MoE equivalent: moe.router={router!r}"):
        qwen3_moe_config_dict(cfg)


@pytest.mark.parametrize("router, options, match", [
    ("momentum", dict(mu=1.0), "mu"),
    ("momentum", dict(gamma=0.0), "gamma"),
    ("adam", dict(beta2=1.0), "beta2"),
    ("adam", dict(eps=-1.0), "eps"),
    ("adam", dict(adam_layers=-1), "adam_layers"),
    ("similarity", dict(tau=0.0), "tau"),
    ("similarity", dict(causal="yes"), "causal"),
    ("attention", dict(score_func="relu"), "score_func"),
])
def test_bad_options(router, options, match):
    with pytest.raises(ValueError, match=match):
        MoELM(tiny_config(router, options))


def test_routing_fluctuation_rate():
    assert routing_fluctuation_rate(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3, 3])) == 0.25
    top2_a = torch.tensor([[0, 1], [2, 3], [1, 0]])
    top2_b = torch.tensor([[0, 3], [3, 2], [0, 1]])  # only the first column counts
    assert routing_fluctuation_rate(top2_a, top2_b) == pytest.approx(2 / 3)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert routing_fluctuation_rate(probs, torch.tensor([0, 0])) == 0.5
    assert routing_fluctuation_rate([top2_a, probs], [top2_a, probs]) == 0.0
    model = tiny_model("similarity").eval()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        model(ids)
        before = [layer.last_routing for layer in moekit.moe_layers(model)]
        model(ids)
        after = [layer.last_routing for layer in moekit.moe_layers(model)]
    assert routing_fluctuation_rate(before, after) == 0.0
    with pytest.raises(ValueError, match="different numbers of tokens"):
        routing_fluctuation_rate(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
