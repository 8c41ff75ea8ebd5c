"""Edge cases of routing and balancing (issue 12): padding masks, empty batches, activation checkpointing.

Every check compares against an independent computation: the same router run on the real tokens alone, a
loop over sequences, transformers' own ``load_balancing_loss_func``, or counts worked out by hand.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moekit
from moekit import balance, routing
from moekit.routing.base import RoutingContext

D, E, K = 8, 4, 2
B, L = 3, 6
# True = a real token: right padding, left padding, and one row that is all real
MASK_BL = torch.tensor([[1, 1, 1, 1, 0, 0],
                        [0, 0, 1, 1, 1, 1],
                        [1, 1, 1, 1, 1, 1]], dtype=torch.bool)


def _x(seed=0, shape=(B, L, D)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _router(name="topk", seed=0, **options):
    torch.manual_seed(seed)
    r = routing.get(name)(dim=D, num_experts=E, top_k=K, **options)
    with torch.no_grad():
        if hasattr(r, "weight") and isinstance(r.weight, torch.Tensor):
            r.weight.copy_(torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return r.train()


def _masked(router, x_BLD, mask_BL=MASK_BL):
    ctx = RoutingContext(batch_shape=tuple(x_BLD.shape[:-1]), token_mask=mask_BL)
    return router(x_BLD.reshape(-1, D), ctx)


def _real_only(router, x_BLD, mask_BL=MASK_BL):
    """The same router on the real tokens only, one flat batch."""
    real = x_BLD[mask_BL]
    return router(real, RoutingContext(batch_shape=(real.shape[0],)))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("kind", ["switch", "global"])
def test_switch_and_global_losses_count_real_tokens_only(kind):
    x = _x()
    padded = _router(aux_loss=kind, z_loss_coef=0.1)
    alone = _router(aux_loss=kind, z_loss_coef=0.1)
    got, want = _masked(padded, x), _real_only(alone, x)
    _close(got.aux_losses[kind], want.aux_losses[kind])
    _close(got.aux_losses["z"], want.aux_losses["z"])
    unmasked = _router(aux_loss=kind)(x.reshape(-1, D), RoutingContext(batch_shape=(B, L)))
    assert not torch.allclose(unmasked.aux_losses[kind], got.aux_losses[kind])  # padding did count before


def test_sequence_loss_is_the_mean_over_each_rows_real_tokens():
    x = _x(1)
    got = _masked(_router(aux_loss="sequence"), x).aux_losses["sequence"]
    per_row = []
    for b in range(B):  # each sequence alone: its real tokens as one sequence
        real = x[b][MASK_BL[b]]
        r = _router(aux_loss="sequence")(real, RoutingContext(batch_shape=(1, real.shape[0])))
        per_row.append(r.aux_losses["sequence"])
    _close(got, torch.stack(per_row).mean())


def test_sequence_loss_leaves_out_rows_without_real_tokens():
    x = _x(2)
    mask = MASK_BL.clone()
    mask[1] = False
    got = _masked(_router(aux_loss="sequence"), x, mask).aux_losses["sequence"]
    rows = [b for b in range(B) if mask[b].any()]
    want = torch.stack([_router(aux_loss="sequence")(x[b][mask[b]], RoutingContext(
        batch_shape=(1, int(mask[b].sum())))).aux_losses["sequence"] for b in rows]).mean()
    _close(got, want)


@pytest.mark.parametrize("rule", ["sign", "proportional"])
def test_bias_update_and_global_counter_see_real_tokens_only(rule):
    padded = _router(aux_loss="global", bias_update=rule, bias_update_rate=0.1)
    alone = _router(aux_loss="global", bias_update=rule, bias_update_rate=0.1)
    for seed in (3, 4):  # two micro-batches, then the optimiser step
        x = _x(seed)
        got, want = _masked(padded, x), _real_only(alone, x)
        _close(got.aux_losses["global"], want.aux_losses["global"])
    assert torch.equal(padded.load.counts_E, alone.load.counts_E)
    assert float(padded.load.counts_E.sum()) == 2 * int(MASK_BL.sum()) * K
    padded.end_step(), alone.end_step()
    assert torch.equal(padded.e_score_correction_bias, alone.e_score_correction_bias)
    assert padded.e_score_correction_bias.abs().sum() > 0


@pytest.mark.parametrize("balance_kind", ["mi", "concentration"])
def test_moduleformer_losses_count_real_tokens_only(balance_kind):
    x = _x(5)
    got = _masked(_router("moduleformer", balance=balance_kind), x).aux_losses[balance_kind]
    want = _real_only(_router("moduleformer", balance=balance_kind), x).aux_losses[balance_kind]
    _close(got, want)
    # by hand: p(e) and the per-token entropies over the real tokens
    probs = torch.softmax(x[MASK_BL] @ _router("moduleformer").weight.T, dim=-1)
    marginal = probs.mean(0)
    h_marg = -(marginal * marginal.log()).sum()
    h_cond = -(probs * probs.log()).sum(-1).mean()
    hand = (-h_marg + h_cond) if balance_kind == "mi" else h_marg
    torch.testing.assert_close(got, 1e-2 * hand, rtol=1e-5, atol=1e-7)


def test_top_any_keep_loss_counts_real_tokens_only():
    x = _x(6)
    got = _masked(_router("top_any", init_keep_logit=0.3), x).aux_losses
    want = _real_only(_router("top_any", init_keep_logit=0.3), x).aux_losses
    _close(got["keep"], want["keep"])
    _close(got["switch"], want["switch"])


@pytest.mark.parametrize("name", ["dts", "activation_dts"])
def test_dense_to_sparse_switch_loss_counts_real_tokens_only(name):
    x = _x(7)
    got = _masked(_router(name, gumbel=False), x).aux_losses["switch"]
    want = _real_only(_router(name, gumbel=False), x).aux_losses["switch"]
    _close(got, want)


def _pairs_of_real_tokens(r, mask_BL=MASK_BL):
    """Set of (rank among real tokens, expert) of the routing's pairs; fails if padding got a pair."""
    real_ids = mask_BL.reshape(-1).nonzero().reshape(-1).tolist()
    rank = {t: i for i, t in enumerate(real_ids)}
    out = set()
    for t, e in zip(r.token_ids.tolist(), r.expert_ids.tolist()):
        assert t in rank, "a padding token took part in the assignment"
        out.add((rank[t], e))
    return out


@pytest.mark.parametrize("name,options", [("expert_choice", {}), ("sparse_ot", {})])
def test_batch_level_assignment_ignores_padding(name, options):
    x = _x(8)
    got = _masked(_router(name, **options), x)
    want = _real_only(_router(name, **options), x)
    assert _pairs_of_real_tokens(got) == {(t, e) for t, e in zip(want.token_ids.tolist(), want.expert_ids.tolist())}


@pytest.mark.parametrize("name,options", [("sinkhorn", {}), ("sinkhorn", {"weights_from": "plan"}),
                                          ("ssr", {"sinkhorn_prob": 1.0})])
def test_transport_plan_is_over_real_tokens_padding_takes_token_choice(name, options):
    x = _x(9)
    got = _masked(_router(name, **options), x)
    want = _real_only(_router(name, **options), x)
    real = MASK_BL.reshape(-1)
    assert torch.equal(got.topk_ids[real], want.topk_ids)
    _close(got.topk_weights[real], want.topk_weights)
    eval_like = _router(name, **options).eval()(x.reshape(-1, D))  # padding: the token-choice fallback
    assert torch.equal(got.topk_ids[~real], eval_like.topk_ids[~real])


def test_mixer_buffers_real_tokens_only():
    r = _router("mixer")
    x = _x(10)
    _masked(r, x)
    assert r.num_buffered == int(MASK_BL.sum())
    torch.testing.assert_close(r.contexts[:r.num_buffered], x[MASK_BL])


def _layer(**kw):
    torch.manual_seed(0)
    cfg = dict(dim=D, hidden_dim=6, num_experts=E, top_k=K)
    cfg.update(kw)
    return moekit.MoE(moekit.MoEConfig(**cfg)).train()


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_load_stats_count_real_tokens_and_padding_takes_no_capacity(capacity):
    layer = _layer(capacity_factor=capacity)
    ref = copy.deepcopy(layer)
    x = _x(11)
    out = layer(x, RoutingContext(batch_shape=(B, L), token_mask=MASK_BL))
    got = layer.load
    real = x[MASK_BL]
    out_real = ref(real)
    assert torch.equal(got.routed_E, ref.load.routed_E) and torch.equal(got.kept_E, ref.load.kept_E)
    assert got.num_pairs == ref.load.num_pairs == int(MASK_BL.sum()) * K
    assert got.num_dropped == ref.load.num_dropped
    torch.testing.assert_close(out[MASK_BL], out_real)  # same experts kept for the real tokens
    assert torch.equal(out[~MASK_BL], torch.zeros_like(out[~MASK_BL]))  # padding: no routed output


def test_trace_leaves_padding_out():
    from moekit.trace import record_routing

    class Wrap(torch.nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.moe = moe

        def forward(self, x, mask=None):
            return self.moe(x, RoutingContext(batch_shape=tuple(x.shape[:-1]), token_mask=mask))

    model = Wrap(_layer(router="expert_choice")).eval()
    model.moe.router.eval_routing = "batch"
    x = _x(12)
    ids = torch.arange(B * L).reshape(B, L)
    with record_routing(model) as rec:
        model(x, MASK_BL)
        rec.annotate(tokens=ids)
    with record_routing(model) as ref:
        model(x[MASK_BL][None])
        ref.annotate(tokens=ids[MASK_BL])
    got, want = rec.trace(), ref.trace()
    assert torch.equal(got.tokens, want.tokens)
    assert got.experts.shape[1] == int(MASK_BL.sum())
    width = min(got.experts.shape[2], want.experts.shape[2])
    assert torch.equal(got.experts[..., :width], want.experts[..., :width])
    assert (got.experts[..., width:] == -1).all() and (want.experts[..., width:] == -1).all()


def test_moelm_attention_mask_reaches_the_routers_and_trainer_mask():
    from moekit.data import PAD_ID
    from moekit.model import MoELM, ModelConfig
    from moekit.train.loop import padding_mask

    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    assert padding_mask(ids) is None
    ids[0, 3:] = PAD_ID
    mask = padding_mask(ids)
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    torch.manual_seed(0)
    model = MoELM(ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=264, max_seq_len=8,
                              moe=moekit.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2))).train()
    model(ids, attention_mask=mask)
    layer = moekit.moe_layers(model)[0]
    assert int(layer.load.routed_E.sum()) == 8 * 2
    assert torch.equal(layer.last_routing.token_mask, mask.reshape(-1))


# ---------------------------------------------------------------------- transformers: Mixtral after surgery
def test_mixtral_surgery_aux_loss_equals_transformers_masked_loss():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from moekit.hf import surgery

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=2, output_router_logits=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # 5 right-padding tokens: 3 in row 0 ...
    mask[1, 6:] = 0  # ... and 2 in row 1
    ids = ids.masked_fill(mask == 0, 2)
    # transformers' own reference, one layer at a time (its function pools the layers it is given)
    def router_logits(**kw):
        logits = {}
        hooks = [blk.gate.register_forward_hook(lambda m, a, out, i=i: logits.__setitem__(i, out[0].detach()))
                 for i, blk in enumerate(b.block for b in surgery.find_moe_blocks(model))]
        model.eval()
        with torch.no_grad():
            model(ids, **kw)
        for h in hooks:
            h.remove()
        return logits

    masked_logits, plain_logits = router_logits(attention_mask=mask), router_logits()
    want_masked = sum(load_balancing_loss_func((lg,), 4, 2, mask) for lg in masked_logits.values())
    want_plain = sum(load_balancing_loss_func((lg,), 4, 2, None) for lg in plain_logits.values())
    # moekit's switch loss is transformers' divided by top_k: a coefficient of top_k gives the same number
    surgery.replace_routers(model, "topk", aux_loss="switch", aux_loss_coef=2.0)
    model.train()
    model(ids, attention_mask=mask)
    torch.testing.assert_close(surgery.aux_loss(model), want_masked, rtol=1e-5, atol=1e-6)
    model(ids)
    torch.testing.assert_close(surgery.aux_loss(model), want_plain, rtol=1e-5, atol=1e-6)
    assert abs(float(want_masked) - float(want_plain)) > 1e-3


# ------------------------------------------------------------------------------------------- empty batches
def _configs(name):
    """Every valid (router options, layer options) of a router for the empty-batch sweep."""
    cls = routing.get(name)
    topk_family = issubclass(cls, routing.get("topk")) and name != "moduleformer"
    aux = ["switch", "sequence", "global", None] if topk_family else [None]
    if name in ("dts", "activation_dts"):
        aux = ["switch", "global", None]
    bias = ["sign", None] if topk_family and name not in ("dts", "activation_dts") else [None]
    caps = [(None, False), (1.0, False), (1.0, True)]
    for a, b, (cap, pad), shared in itertools.product(aux, bias, caps, (0, 1)):
        kw = dict(capacity_factor=cap, pad_to_capacity=pad, num_shared_experts=shared)
        if topk_family:
            kw.update(aux_loss=a, bias_update=b, z_loss_coef=0.1)
        options = {}
        if name == "ssr":
            options["sinkhorn_prob"] = 1.0
        if name == "moduleformer":
            options["z_loss_coef"] = 0.1
        yield dict(kw, router=name, router_options=options)


@pytest.mark.parametrize("name", routing.names())
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)])
def test_empty_batches_give_empty_outputs_zero_losses_and_zero_gradients(name, shape):
    for kw in _configs(name):
        for train in (True, False):
            layer = _layer(**kw).train(train)
            x = torch.zeros(shape, requires_grad=True)
            ctx = RoutingContext(batch_shape=shape[:-1], input_ids=torch.zeros(shape[:-1], dtype=torch.long))
            if name == "attention":
                ctx.attention_probs = torch.zeros(1, 0, 0) if len(shape) == 2 else torch.zeros(2, 0, 0)
            with torch.autograd.set_grad_enabled(True):
                out = layer(x, ctx)
                assert out.shape == shape, (kw, train)
                total = out.sum() + moekit.aux_loss(layer)
            for loss in layer.aux_losses.values():
                assert torch.isfinite(loss) and float(loss.detach()) == 0.0, (kw, train, layer.aux_losses)
            if total.requires_grad:
                total.backward()
            for p in list(layer.parameters()) + [x]:
                assert p.grad is None or not p.grad.any(), (kw, train, p.shape)
            assert int(layer.load.routed_E.sum()) == 0 and layer.load.max_violation == 0.0
            if train:
                moekit.end_step(layer)  # an empty step moves no bias
                bias = getattr(layer.router, "e_score_correction_bias", None)
                assert bias is None or not bias.any()


# ------------------------------------------------------------------------------------- recomputation
def _global_layer():
    return _layer(aux_loss="global", bias_update="sign", aux_loss_coef=1.0)


def _run(layer, xs, how):
    losses = []
    for x in xs:
        x = x.clone().requires_grad_(True)
        if how == "plain":
            out = layer(x)
        else:
            out = checkpoint(layer, x, use_reentrant=(how == "reentrant"))
        loss = layer.aux_losses["global"]
        losses.append(float(loss))
        (out.square().mean() + loss).backward()
    return losses


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant"])
def test_checkpoint_counts_each_forward_once(how):
    xs = [_x(20 + i, (12, D)) for i in range(2)]
    layer = _global_layer()
    w = layer.router.weight.detach().clone()
    ref = copy.deepcopy(layer)
    got = _run(layer, xs, how)
    # by hand: top-2 of x W^T, 12 tokens x 2 experts per micro-batch, counted once each
    counts = [torch.bincount((x @ w.T).topk(K, dim=-1).indices.reshape(-1), minlength=E).double() for x in xs]
    assert float(layer.router.load.counts_E.sum()) == 48.0
    assert torch.equal(layer.router.load.counts_E, counts[0] + counts[1])
    seen = counts[0] + counts[1]
    probs = torch.softmax(xs[1] @ w.T, dim=-1).double()
    hand = E * ((seen / seen.sum()) * probs.mean(0)).sum()
    assert got[1] == pytest.approx(float(hand), rel=1e-6)
    # and the gradients equal those of the same steps without checkpointing
    want = _run(ref, xs, "plain")
    assert got == pytest.approx(want, rel=1e-6)
    if how == "non_reentrant":  # a reentrant checkpoint runs the forward without grad: no loss gradient there
        torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad)
    moekit.end_step(layer), moekit.end_step(ref)
    assert torch.equal(layer.router.e_score_correction_bias, ref.router.e_score_correction_bias)


@pytest.mark.parametrize("how", ["reentrant", "non_reentrant"])
def test_checkpoint_one_backward_of_summed_micro_batches(how):
    """Recomputations run last micro-batch first: each still sees the counts of its own forward."""
    xs = [_x(30 + i, (12, D)) for i in range(2)]
    layer, ref = _global_layer(), None
    ref = copy.deepcopy(layer)
    total, want_total = 0, 0
    for x in xs:
        xg = x.clone().requires_grad_(True)
        out = checkpoint(layer, xg, use_reentrant=(how == "reentrant"))
        total = total + out.square().mean() + layer.aux_losses["global"]
        out_ref = ref(x.clone().requires_grad_(True))
        want_total = want_total + out_ref.square().mean() + ref.aux_losses["global"]
    total.backward()
    want_total.backward()
    assert float(layer.router.load.counts_E.sum()) == 48.0
    if how == "non_reentrant":  # the reentrant forward runs without grad: its loss reaches no router weight
        torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad)


@pytest.mark.parametrize("name,counter", [("mixer", "num_buffered"), ("ssr", "train_calls")])
def test_checkpoint_other_router_state_once(name, counter):
    options = {"sinkhorn_prob": 1.0} if name == "ssr" else {}
    layer = _layer(router=name, router_options=options, top_k=1 if name == "mixer" else K)
    for how in ("reentrant", "non_reentrant"):
        x = _x(40, (12, D)).requires_grad_(True)
        checkpoint(layer, x, use_reentrant=(how == "reentrant")).square().mean().backward()
    expected = 24 if name == "mixer" else 2
    assert getattr(layer.router, counter) == expected
    if name == "ssr":
        assert layer.router.sinkhorn_calls == 2


def test_transformers_gradient_checkpointing_counts_once():
    transformers = pytest.importorskip("transformers")
    from moekit.hf import surgery

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    surgery.replace_routers(model, "topk", aux_loss="global", bias_update="sign")
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    for kwargs in ({"use_reentrant": True}, {"use_reentrant": False}):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        out = model(ids, labels=ids)
        (out.loss + surgery.aux_loss(model)).backward()
        for a in surgery.adapters(model):
            assert float(a.router.load.counts_E.sum()) == 12 * 2, kwargs
        surgery.end_step(model)
