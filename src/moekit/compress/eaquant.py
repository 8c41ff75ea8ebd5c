"""EAQuant for moekit's experts: one smoothing vector shared by a layer's experts, chosen with a router
alignment term on expert-balanced calibration rows, and simulated activation quantisation.

Paper: Fu et al., "EAQuant: Enhancing Post-Training Quantization for MoE Models via Expert-Aware Optimization",
arXiv:2506.13329. Taken from it:

1. **Expert-aware smoothing aggregation.** SmoothQuant (Xiao et al., arXiv:2211.10438) moves activation
   outliers into the weights with a per-channel factor ``s``: ``x W^T = (x / s) (W s)^T``. All experts of a
   layer read the same input, so they must share one ``s`` (it is folded into the preceding RMSNorm in a
   deployment). Per expert, ``s_e[j] = max|x_j|^a / max_r |W_e[r, j]|^(1 - a)`` over the tokens calibrating
   expert ``e``; the shared vector is the channel-wise maximum over experts, ``s[j] = max_e s_e[j]``
   (:func:`smoothing_vector`).
2. **Router logits alignment.** A KL term ``KL(p_fp || p_q)`` between the router's softmax on the float input
   and on the smoothed, quantised input (``(W_r s) Q(x / s)``: the router of a W·A· model reads the quantised
   activation too) is added to the layer's output error when choosing the smoothing (:func:`router_kl`).
   The paper learns its transforms with that loss by gradient; here the migration strength ``a`` is chosen per
   layer from a small grid (and "no smoothing") by the same loss, a deliberately cheaper search.
3. **Expert-level calibration balance.** Each expert's statistics come from the calibration rows routed to
   it; an expert with fewer than ``min_rows`` of them is calibrated on its ``min_rows`` rows of highest router
   probability instead (:func:`balanced_rows`), so that rarely routed experts still shape ``s`` and the loss
   (the loss is the mean over experts of each expert's relative output error, not a token mean).

Weights are then quantised with GPTQ on the smoothed matrices (``W_up s``, with the input Hessian rescaled to
``S^-1 H S^-1``; the down projection is unchanged). In the saved model the vector is a buffer ``smooth`` of
:class:`moekit.experts.QuantizedExperts` (``experts_options.smooth = true``): the experts compute
``Q_a(x / s) @ (W_up s)_q^T``, the router keeps reading the float input.

**Simulated activation quantisation** (``act_bits``, also without EAQuant: ``moekit quantize --act-bits B``):
the inputs of both expert matrices are fake-quantised per token, symmetric, absmax scale
(:func:`fake_quant_act`); this is where the shared smoothing matters (with float activations smoothing only
changes the weight grid).
"""
from __future__ import annotations

import torch

__all__ = ["ALPHAS", "balanced_rows", "fake_quant_act", "layer_loss", "router_kl", "router_weights",
           "smoothing_vector", "search_smoothing", "keep_layer_inputs"]

#: migration strengths tried per layer (None: no smoothing, s = 1)
ALPHAS = (None, 0.25, 0.5, 0.75)
_EPS = 1e-6


def fake_quant_act(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Per-row symmetric absmax fake quantisation to ``bits`` (levels ``-(2^(b-1)-1) .. 2^(b-1)-1``); the
    input unchanged when ``bits`` is None."""
    if bits is None:
        return x
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def smoothing_vector(act_max_ED: torch.Tensor, w_up_EHD: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """``s [D]``: the channel-wise maximum over experts of SmoothQuant's ``act_max_e^a / w_max_e^(1-a)``
    (``act_max_ED``: per expert the max |x_j| over its calibration rows; ``w_max_e[j] = max_r |W_e[r, j]|``).
    Experts without rows (an all-zero ``act_max``) do not vote. ``alpha=None``: ones."""
    D = w_up_EHD.shape[-1]
    if alpha is None:
        return torch.ones(D, dtype=torch.float32)
    a = act_max_ED.double().clamp(min=_EPS)
    w = w_up_EHD.detach().double().abs().amax(1).clamp(min=_EPS)
    s_ED = a.pow(alpha) / w.pow(1 - alpha)
    voting = act_max_ED.abs().amax(1) > 0
    if not bool(voting.any()):
        return torch.ones(D, dtype=torch.float32)
    return s_ED[voting].amax(0).clamp(min=1e-4, max=1e4).float()


def router_kl(logits_fp_TE: torch.Tensor, logits_q_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(fp) || softmax(q))`` (natural log)."""
    lp = torch.log_softmax(logits_fp_TE.double(), -1)
    lq = torch.log_softmax(logits_q_TE.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def router_weights(logits_TE: torch.Tensor, top_k: int, norm_topk: bool, scaling: float = 1.0) -> torch.Tensor:
    """``[T, E]`` dense routing weights of a softmax top-k router (zero outside the top-k)."""
    p = torch.softmax(logits_TE.double(), -1)
    val, idx = p.topk(top_k, -1)
    if norm_topk:
        val = val / val.sum(-1, keepdim=True)
    return torch.zeros_like(p).scatter_(-1, idx, val * scaling)


def balanced_rows(logits_TE: torch.Tensor, top_k: int, min_rows: int) -> list[torch.Tensor]:
    """Per expert, the indices of the calibration rows that calibrate it: the rows routed to it (top-k of the
    router), or its ``min_rows`` rows of highest router probability when fewer are routed (EAQuant's
    expert-level balance)."""
    T, E = logits_TE.shape
    top = logits_TE.topk(top_k, -1).indices
    probs = torch.softmax(logits_TE.double(), -1)
    out = []
    for e in range(E):
        rows = (top == e).any(-1).nonzero().flatten()
        if rows.numel() < min(min_rows, T):
            rows = probs[:, e].topk(min(min_rows, T)).indices.sort().values
        out.append(rows)
    return out


def _expert(x, w_up, w_down, act_fn, act_bits):
    a = act_fn(fake_quant_act(x, act_bits) @ w_up.t())
    return fake_quant_act(a, act_bits) @ w_down.t()


@torch.no_grad()
def layer_loss(x_TD, router_w_ED, router_b_E, w_up_EHD, w_down_EDF, wq_up_EHD, wq_down_EDF, smooth_D, act_fn,
               act_bits, top_k, norm_topk, scaling, rows_E, kl_weight: float = 1.0) -> dict:
    """EAQuant's loss of one layer for one candidate: the mean over experts of each expert's relative output
    error on its (balanced) rows, ``||f_e(x) - f_e^q(Q(x/s))||^2 / ||f_e(x)||^2``, plus ``kl_weight`` times the
    router KL between the float router and the router on the smoothed quantised input (``wq_up`` already holds
    the smoothing: the quantised ``W_up s``)."""
    x = x_TD.double()
    xs = x / smooth_D.double()
    lf = x @ router_w_ED.double().t()
    lq = fake_quant_act(xs, act_bits) @ (router_w_ED.double() * smooth_D.double()).t()
    if router_b_E is not None:
        lf, lq = lf + router_b_E.double(), lq + router_b_E.double()
    kl = router_kl(lf, lq)
    errs = []
    for e, rows in enumerate(rows_E):
        if rows.numel() == 0:
            continue
        y = _expert(x[rows], w_up_EHD[e].double(), w_down_EDF[e].double(), act_fn, None)
        yq = _expert(xs[rows], wq_up_EHD[e].double(), wq_down_EDF[e].double(), act_fn, act_bits)
        errs.append(float((y - yq).square().sum() / y.square().sum().clamp(min=1e-30)))
    out = sum(errs) / max(1, len(errs))
    return {"output_error": out, "kl": float(kl), "loss": out + kl_weight * float(kl)}


@torch.no_grad()
def keep_layer_inputs(model: torch.nn.Module, batches, rows: int) -> dict[str, torch.Tensor]:
    """The first ``rows`` input rows ``[N, D]`` (float32) of every MoE layer over ``batches`` (module name ->
    rows); padded positions of batches with an ``attention_mask`` are dropped."""
    from ..layer import MoE

    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    kept: dict[str, list] = {name: [] for name in layers}
    mask_box = {}

    def make(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).detach().float()
            m = mask_box.get("mask")
            if m is not None and m.numel() == x.shape[0]:
                x = x[m]
            have = sum(t.shape[0] for t in kept[name])
            if have < rows:
                kept[name].append(x[:rows - have].clone())
        return hook

    handles = [m.register_forward_pre_hook(make(name)) for name, m in layers.items()]
    was = model.training
    model.eval()
    try:
        for batch in batches:
            if all(sum(t.shape[0] for t in v) >= rows for v in kept.values()):
                break
            if isinstance(batch, dict):
                m = batch.get("attention_mask")
                mask_box["mask"] = m.reshape(-1).bool() if m is not None else None
                model(batch["input_ids"], **({"attention_mask": m} if m is not None else {}))
            else:
                mask_box["mask"] = None
                model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {name: torch.cat(v) if v else torch.zeros(0) for name, v in kept.items()}


@torch.no_grad()
def search_smoothing(x_TD, router, w_up_EHD, w_down_EDF, act_fn, act_bits, top_k, norm_topk, scaling,
                     quantize_pair, *, alphas=ALPHAS, min_rows: int = 32, kl_weight: float = 1.0):
    """Choose the layer's shared smoothing vector: for every ``alpha`` of ``alphas``, ``s`` from the balanced
    per-expert activation maxima (:func:`smoothing_vector`), weights quantised by ``quantize_pair(e, w_up_s,
    w_down) -> (up, down)`` (dequantised tensors), loss by :func:`layer_loss`; returns ``(s, alpha, table)``
    with ``table`` the loss of every candidate."""
    x = x_TD.float()
    rw = router.weight.detach().float()
    rb = router.bias.detach().float() if getattr(router, "gate_bias", False) else None
    logits = x.double() @ rw.double().t() + (rb.double() if rb is not None else 0)
    rows_E = balanced_rows(logits, top_k, min_rows)
    E, D = w_up_EHD.shape[0], w_up_EHD.shape[2]
    act_max = torch.zeros(E, D, dtype=torch.float64)
    for e, rows in enumerate(rows_E):
        if rows.numel():
            act_max[e] = x[rows].double().abs().amax(0)
    table, best = [], None
    for alpha in alphas:
        s = smoothing_vector(act_max, w_up_EHD, alpha)
        w_up_s = w_up_EHD.float() * s
        pairs = [quantize_pair(e, w_up_s[e], w_down_EDF[e]) for e in range(E)]
        wq_up = torch.stack([p[0] for p in pairs])
        wq_down = torch.stack([p[1] for p in pairs])
        res = layer_loss(x, rw, rb, w_up_EHD, w_down_EDF, wq_up, wq_down, s, act_fn, act_bits, top_k, norm_topk,
                         scaling, rows_E, kl_weight)
        res["alpha"] = alpha
        table.append(res)
        if best is None or res["loss"] < best[2]["loss"]:
            best = (s, alpha, res)
    return best[0], best[1], table
