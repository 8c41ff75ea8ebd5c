"""Calibration: one pass over calibration batches through a model's MoE layers, recording streamed per-expert
statistics for pruning, merging and quantisation.

Typical use::

    from moekit.compress.calibrate import calibrate, calibration_batches, require_min_tokens

    batches = calibration_batches(corpus, seq_len=256, num_tokens=32768, domain="json")   # or text=PATH
    stats = calibrate(model, batches, all_experts=True, hessians=True, routing_weighted=True)
    print(stats.format_counts())                   # per-expert token counts, one line per MoE layer
    require_min_tokens(stats, 16)                  # ValueError naming (layer, expert, count) below 16
    layer = stats.layers[0]
    layer.count_E                                   # routed tokens per expert       [E] int64
    layer.hessian_EDD / layer.count_E[:, None, None]   # mean input second moment of expert e (GPTQ)

API (everything a consumer needs):

* :func:`calibrate(model, batches, *, all_experts=False, hessians=False, routing_weighted=False,
  keep_inputs=0, progress=True) -> CalibrationStats`. ``model`` is any module holding :class:`moekit.MoE`
  layers (a :class:`moekit.model.MoELM`, or a bare ``MoE``); ``batches`` yields ``input_ids [B, L]`` tensors
  or dicts / objects with ``input_ids`` (and optionally ``attention_mask``) for an LM, or ``x [..., D]`` float
  tensors for a bare layer. The model runs in eval mode under ``torch.no_grad``; its outputs are those of
  the unmodified model (the hook computes the routed output itself, so experts run once). Memory is bounded:
  only sums are kept (``O(E * D)`` per layer, plus ``O(E * D^2)`` with ``hessians`` / ``routing_weighted``,
  plus ``keep_inputs * D`` with ``keep_inputs``), never activations of the whole pass. The all-experts pass
  runs the tokens in chunks of at most ``ALL_EXPERTS_ROWS`` rows.
* :class:`CalibrationStats`: ``layers`` (list of :class:`LayerCalibration`, in model order), ``tokens``
  (tokens fed), ``layer(i)`` (by model layer index), ``format_counts()``, ``counts()`` (list of lists).
* :class:`LayerCalibration` per MoE layer (float64 sums unless said; ``T`` = calibration tokens of the layer,
  padding excluded):

  ========================  ===============================================================================
  ``count_E``               routed (kept) tokens per expert (int64)
  ``weight_sum_E``          sum of the router's routing weights (as the layer applies them)
  ``reap_sum_E``            sum of renormalised weight x ||expert output||_2 (REAP score = this / count)
  ``easy_ep_sum_E``         sum of renormalised weight x ||output|| x max(0, 1 - cos(h_in, h_in + routed)),
                            ``h_in`` the residual stream entering the MoE block (EASY-EP)
  ``output_norm_sum_E``     sum of ||expert output||_2 over routed tokens
  ``routed_output_sum_ED``  sum of the expert's (unweighted) output over its routed tokens
  ``output_sum_ED``         all-experts mode: sum of each expert's output over ALL ``T`` tokens (HC-SMoE
                            features: ``output_mean_ED``); None otherwise
  ``logit_sum_E``           sum of router logits over all tokens (``logit_mean_E``)
  ``logit_gram_EE``         sum over tokens of ``l l^T`` (UNCURL: covariance / correlation of the experts'
                            logit columns, ``logit_corr_EE``)
  ``coact_EE``              tokens routed to both e and e' (diagonal: ``count_E``)
  ``ratio_hist_R``          histogram of ``w2 / w1`` (second / first routing weight of each token, top-k >= 2)
                            over ``RATIO_BINS`` bins of [0, 1]; ``ratio_median()`` (NAEE's beta)
  ``hessian_EDD``           with ``hessians``: sum over routed tokens of ``x x^T`` (GPTQ)
  ``weighted_hessian_EDD``  with ``routing_weighted``: sum over routed tokens of ``g x x^T`` (MoEQuant AGQ;
                            ``g`` the routing weight as applied)
  ``inputs_ND``             with ``keep_inputs=N``: the layer's first ``N`` input rows (float32), for
                            reconstruction-error methods (NAEE)
  ========================  ===============================================================================

  Scalars: ``layer_index`` (in the model), ``name`` (module name), ``num_experts``, ``top_k``, ``tokens``.
* :func:`require_min_tokens(stats, n, allow=False)` raises ``ValueError`` naming every ``(layer, expert,
  count)`` with fewer than ``n`` routed tokens (returns the list instead when ``allow``).
* :func:`calibration_batches(corpus, seq_len, num_tokens, *, domain=None, batch_size=8, seed=0)` windows of
  the training split (of one domain, or evenly spaced over the whole split); :func:`text_batches(path,
  seq_len, num_tokens)` windows of a user's text file or folder; :func:`ebss_calibration_batches(model,
  seq_len, num_tokens)` text the model writes itself (MoEQuant's EBSS, :mod:`moekit.compress.ebss`);
  :func:`available_tokens` checks the size before any work.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..layer import MoE, moe_layers

__all__ = ["ALL_EXPERTS_ROWS", "RATIO_BINS", "CalibrationStats", "LayerCalibration", "available_tokens",
           "calibrate", "calibration_batches", "ebss_calibration_batches", "require_min_tokens", "text_batches"]

RATIO_BINS = 4096
ALL_EXPERTS_ROWS = 1 << 16  # rows per all-experts chunk (tokens x experts)


@dataclass
class LayerCalibration:
    """Streamed statistics of one MoE layer (see the module docstring for every field)."""

    layer_index: int
    name: str
    num_experts: int
    top_k: int
    dim: int
    tokens: int = 0
    count_E: torch.Tensor = None
    weight_sum_E: torch.Tensor = None
    reap_sum_E: torch.Tensor = None
    easy_ep_sum_E: torch.Tensor = None
    output_norm_sum_E: torch.Tensor = None
    routed_output_sum_ED: torch.Tensor = None
    output_sum_ED: torch.Tensor | None = None
    logit_sum_E: torch.Tensor | None = None
    logit_gram_EE: torch.Tensor | None = None
    coact_EE: torch.Tensor = None
    ratio_hist_R: torch.Tensor = None
    hessian_EDD: torch.Tensor | None = None
    weighted_hessian_EDD: torch.Tensor | None = None
    inputs_ND: torch.Tensor | None = None
    _inputs: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        E, D = self.num_experts, self.dim
        f64 = dict(dtype=torch.float64)
        self.count_E = torch.zeros(E, dtype=torch.int64)
        self.weight_sum_E = torch.zeros(E, **f64)
        self.reap_sum_E = torch.zeros(E, **f64)
        self.easy_ep_sum_E = torch.zeros(E, **f64)
        self.output_norm_sum_E = torch.zeros(E, **f64)
        self.routed_output_sum_ED = torch.zeros(E, D, **f64)
        self.coact_EE = torch.zeros(E, E, dtype=torch.int64)
        self.ratio_hist_R = torch.zeros(RATIO_BINS, dtype=torch.int64)

    # ---------------------------------------------------------------- derived
    @property
    def reap_E(self) -> torch.Tensor:
        """REAP score: mean over routed tokens of renormalised weight x ||output|| (0 for unrouted experts)."""
        return self.reap_sum_E / self.count_E.clamp(min=1)

    @property
    def frequency_E(self) -> torch.Tensor:
        """Share of the layer's tokens routed to each expert."""
        return self.count_E.double() / max(self.tokens, 1)

    @property
    def output_mean_ED(self) -> torch.Tensor:
        if self.output_sum_ED is None:
            raise ValueError("output means need calibrate(..., all_experts=True)")
        return self.output_sum_ED / max(self.tokens, 1)

    @property
    def logit_mean_E(self) -> torch.Tensor:
        if self.logit_sum_E is None:
            raise ValueError(f"layer {self.layer_index}: its router gives no logits")
        return self.logit_sum_E / max(self.tokens, 1)

    @property
    def logit_cov_EE(self) -> torch.Tensor:
        m = self.logit_mean_E
        return self.logit_gram_EE / max(self.tokens, 1) - torch.outer(m, m)

    @property
    def logit_corr_EE(self) -> torch.Tensor:
        """Pearson correlation of the experts' router-logit columns over the calibration tokens."""
        cov = self.logit_cov_EE
        sd = cov.diagonal().clamp(min=1e-30).sqrt()
        return cov / torch.outer(sd, sd)

    def ratio_median(self) -> float:
        """Median of ``w2 / w1`` over the calibration tokens (to 1/RATIO_BINS; bin centre), NAEE's beta."""
        total = int(self.ratio_hist_R.sum())
        if total == 0:
            raise ValueError(f"layer {self.layer_index}: no token had two routing weights (top_k >= 2 needed)")
        cum = torch.cumsum(self.ratio_hist_R, 0)
        b = int(torch.searchsorted(cum, torch.tensor((total + 1) // 2)).item())
        return (b + 0.5) / RATIO_BINS


@dataclass
class CalibrationStats:
    layers: list[LayerCalibration]
    tokens: int = 0
    options: dict = field(default_factory=dict)

    def layer(self, layer_index: int) -> LayerCalibration:
        for s in self.layers:
            if s.layer_index == layer_index:
                return s
        raise KeyError(f"no MoE layer {layer_index} in the calibration statistics")

    def counts(self) -> list[list[int]]:
        return [s.count_E.tolist() for s in self.layers]

    def format_counts(self) -> str:
        """Per-expert routed-token counts, one line per MoE layer."""
        lines = [f"calibration: {self.tokens:,} tokens; routed tokens per expert:"]
        for s in self.layers:
            lines.append(f"  layer {s.layer_index:>3d}: " + " ".join(str(c) for c in s.count_E.tolist())
                         + f"   (min {int(s.count_E.min())}, max {int(s.count_E.max())})")
        return "\n".join(lines)


def require_min_tokens(stats: CalibrationStats, n: int, allow: bool = False) -> list[tuple[int, int, int]]:
    """The experts with fewer than ``n`` routed calibration tokens, as ``(layer, expert, count)``.

    Raises ``ValueError`` naming them (up to 20, then a count) unless ``allow``."""
    low = [(s.layer_index, e, int(c)) for s in stats.layers for e, c in enumerate(s.count_E.tolist()) if c < n]
    if low and not allow:
        shown = ", ".join(f"(layer {l}, expert {e}, {c} tokens)" for l, e, c in low[:20])
        more = f" and {len(low) - 20} more" if len(low) > 20 else ""
        raise ValueError(f"{len(low)} experts have fewer than {n} calibration tokens: {shown}{more}; give more "
                         "calibration data or pass --allow-undercalibrated")
    return low


# ------------------------------------------------------------------------------------------------ the pass
def _layer_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules() if isinstance(m, MoE)}


def _residual_sources(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """For MoE layers inside a decoder layer with ``post_attention_layernorm``: that norm, whose input is the
    residual stream the MoE block adds to."""
    out = {}
    for m in model.modules():
        mlp = getattr(m, "mlp", None)
        norm = getattr(m, "post_attention_layernorm", None)
        if isinstance(mlp, MoE) and norm is not None:
            out[id(mlp)] = norm
    return out


class _Recorder:
    def __init__(self, layer: MoE, stats: LayerCalibration, all_experts: bool, hessians: bool,
                 routing_weighted: bool, keep_inputs: int):
        self.layer, self.s = layer, stats
        self.all_experts, self.hessians, self.routing_weighted = all_experts, hessians, routing_weighted
        self.keep_inputs = keep_inputs
        self.residual_TD = None  # set by the pre-hook of the post-attention norm, when there is one
        E, D = stats.num_experts, stats.dim
        if all_experts:
            stats.output_sum_ED = torch.zeros(E, D, dtype=torch.float64)
        if hessians:
            stats.hessian_EDD = torch.zeros(E, D, D, dtype=torch.float64)
        if routing_weighted:
            stats.weighted_hessian_EDD = torch.zeros(E, D, D, dtype=torch.float64)

    def residual_hook(self, _module, args):
        self.residual_TD = args[0].reshape(-1, args[0].shape[-1])

    def __call__(self, layer: MoE, x_TD: torch.Tensor, plan) -> torch.Tensor:
        s = self.s
        E = s.num_experts
        token_S, weight_S, expert_S = plan.token_S, plan.weight_S, plan.expert_S
        counts_E = plan.counts_E
        x_SD = x_TD.index_select(0, token_S)
        y_SD = layer.experts.expert_rows(x_SD, counts_E)
        w_S = weight_S.to(y_SD.dtype)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_S, y_SD * w_S[:, None])
        # Real pairs only (padding to capacity adds zero-weight rows on token 0).
        if plan.capacity is not None and int(counts_E.sum()) != int(plan.kept_E.sum()):
            keep = torch.zeros(token_S.numel(), dtype=torch.bool, device=token_S.device)
            starts = torch.cumsum(counts_E, 0) - counts_E
            for e in range(E):
                k = int(plan.kept_E[e])
                keep[int(starts[e]):int(starts[e]) + k] = True
            token_S, weight_S, expert_S, x_SD, y_SD = (t[keep] for t in (token_S, weight_S, expert_S, x_SD, y_SD))
        T = x_TD.shape[0]
        mask_T = self._token_mask(layer, T, x_TD.device)
        n_real = int(mask_T.sum()) if mask_T is not None else T
        s.tokens += n_real
        e64 = expert_S.long().cpu()
        s.count_E += torch.bincount(e64, minlength=E)
        g64 = weight_S.detach().double().cpu()
        s.weight_sum_E.index_add_(0, e64, g64)
        tok_sum = torch.zeros(T, dtype=torch.float64).index_add_(0, token_S.cpu(), g64)
        g_renorm = g64 / tok_sum[token_S.cpu()].clamp(min=1e-30)
        norm_S = y_SD.detach().double().norm(dim=-1).cpu()
        s.output_norm_sum_E.index_add_(0, e64, norm_S)
        s.reap_sum_E.index_add_(0, e64, g_renorm * norm_S)
        s.routed_output_sum_ED.index_add_(0, e64, y_SD.detach().double().cpu())
        h_TD = self.residual_TD if (self.residual_TD is not None and self.residual_TD.shape == x_TD.shape) else x_TD
        self.residual_TD = None
        h64 = h_TD.detach().double()
        cos_T = F.cosine_similarity(h64, h64 + out_TD.detach().double(), dim=-1, eps=1e-30)
        contrib_T = (1 - cos_T).clamp(min=0).cpu()
        s.easy_ep_sum_E.index_add_(0, e64, g_renorm * norm_S * contrib_T[token_S.cpu()])
        # co-activation and the w2/w1 ratio, from each token's pairs
        onehot_TE = torch.zeros(T, E, dtype=torch.float64)
        onehot_TE[token_S.cpu(), e64] = 1.0
        w_TE = torch.zeros(T, E, dtype=torch.float64)
        w_TE[token_S.cpu(), e64] = g64
        if mask_T is not None:
            onehot_TE = onehot_TE[mask_T.cpu()]
            w_TE = w_TE[mask_T.cpu()]
        s.coact_EE += (onehot_TE.T @ onehot_TE).round().long()
        if E >= 2:
            top2 = w_TE.topk(2, dim=-1).values
            has2 = top2[:, 1] > 0
            ratio = (top2[has2, 1] / top2[has2, 0].clamp(min=1e-30)).clamp(0, 1)
            bins = (ratio * RATIO_BINS).long().clamp(max=RATIO_BINS - 1)
            s.ratio_hist_R += torch.bincount(bins, minlength=RATIO_BINS)
        # router logits
        logits_TE = self._logits(layer, x_TD)
        if logits_TE is not None:
            l64 = logits_TE.detach().double().cpu()
            if mask_T is not None:
                l64 = l64[mask_T.cpu()]
            if s.logit_sum_E is None:
                s.logit_sum_E = torch.zeros(E, dtype=torch.float64)
                s.logit_gram_EE = torch.zeros(E, E, dtype=torch.float64)
            s.logit_sum_E += l64.sum(0)
            s.logit_gram_EE += l64.T @ l64
        xr_TD = x_TD if mask_T is None else x_TD[mask_T]
        if self.keep_inputs and len(s._inputs) < self.keep_inputs:
            room = self.keep_inputs - sum(t.shape[0] for t in s._inputs)
            if room > 0:
                s._inputs.append(xr_TD[:room].detach().float().cpu().clone())
        if self.hessians or self.routing_weighted:
            x64 = x_SD.detach().double().cpu()
            for e in torch.unique(e64).tolist():
                sel = e64 == e
                xe = x64[sel]
                if self.hessians:
                    s.hessian_EDD[e] += xe.T @ xe
                if self.routing_weighted:
                    s.weighted_hessian_EDD[e] += (xe * g64[sel, None]).T @ xe
        if self.all_experts and xr_TD.shape[0]:
            chunk = max(1, ALL_EXPERTS_ROWS // E)
            for first in range(0, xr_TD.shape[0], chunk):
                xc = xr_TD[first:first + chunk]
                n = xc.shape[0]
                rows = xc.repeat(E, 1)  # expert-major: expert e gets rows e*n ... e*n + n - 1
                y = layer.experts.expert_rows(rows, torch.full((E,), n, dtype=torch.int64, device=xc.device))
                s.output_sum_ED += y.detach().double().view(E, n, -1).sum(1).cpu()
        return out_TD

    @staticmethod
    def _token_mask(layer: MoE, T: int, device) -> torch.Tensor | None:
        ctx = getattr(layer, "_calib_ctx", None)
        return None if ctx is None else ctx

    @staticmethod
    def _logits(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor | None:
        router = layer.router
        if not getattr(router, "has_logits", True):
            return None
        try:
            return router.logits(x_TD, None)
        except Exception:  # a router without the base logits step
            return None


def _as_call(batch):
    """``(args, kwargs)`` for ``model(...)`` from one calibration batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        kw = {"attention_mask": batch["attention_mask"]} if batch.get("attention_mask") is not None else {}
        return (batch["input_ids"],), kw
    if hasattr(batch, "input_ids"):
        return (batch.input_ids,), {}
    raise ValueError(f"calibration batches must be tensors, dicts or objects with input_ids, got "
                     f"{type(batch).__name__}")


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches: Iterable, *, all_experts: bool = False, hessians: bool = False,
              routing_weighted: bool = False, keep_inputs: int = 0, progress: bool = True,
              total: int | None = None) -> CalibrationStats:
    """One pass of ``batches`` through ``model``, recording every MoE layer's per-expert statistics (module
    docstring). ``total``: number of batches, for the progress bar."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no moekit MoE layers to calibrate")
    names = _layer_names(model)
    norms = _residual_sources(model)
    stats = CalibrationStats([], options=dict(all_experts=all_experts, hessians=hessians,
                                              routing_weighted=routing_weighted, keep_inputs=keep_inputs))
    handles, recorders = [], []
    for pos, layer in enumerate(layers):
        name = names.get(id(layer), "")
        layer_index = _index_from_name(name, pos)
        s = LayerCalibration(layer_index, name, layer.config.num_experts, layer.config.top_k, layer.config.dim)
        rec = _Recorder(layer, s, all_experts, hessians, routing_weighted, keep_inputs)
        handles.append(layer.register_plan_hook(rec))
        handles.append(layer.register_forward_pre_hook(_mask_hook, with_kwargs=True))
        if id(layer) in norms:
            handles.append(norms[id(layer)].register_forward_pre_hook(rec.residual_hook))
        stats.layers.append(s)
        recorders.append(rec)
    was_training = model.training
    model.eval()
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc="calibrate", total=total, leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        for batch in iterator:
            args, kwargs = _as_call(batch)
            model(*args, **kwargs)
            x = args[0]
            if x.is_floating_point():
                stats.tokens += x.numel() // x.shape[-1]
            else:
                m = kwargs.get("attention_mask")
                stats.tokens += int(m.sum()) if m is not None else x.numel()
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            layer.__dict__.pop("_calib_ctx", None)
        model.train(was_training)
    for s in stats.layers:
        if s._inputs:
            s.inputs_ND = torch.cat(s._inputs)
        s._inputs = []
    return stats


def _mask_hook(layer, args, kwargs):
    ctx = kwargs.get("ctx", args[1] if len(args) > 1 else None)
    mask = None
    if ctx is not None and getattr(ctx, "token_mask", None) is not None:
        mask = ctx.token_mask.reshape(-1).to(torch.bool)
    layer.__dict__["_calib_ctx"] = mask
    return None


def _index_from_name(name: str, pos: int) -> int:
    """Layer index from a module name like ``model.layers.3.mlp`` (else the MoE layer's position)."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return pos


# ------------------------------------------------------------------------------------------------ data
MIN_CALIB_TOKENS = 64


def _domain_ranges(corpus, domain: str, split: str = "train") -> list[tuple[int, int]]:
    if domain not in corpus.domains:
        raise ValueError(f"--calib-domain: unknown domain {domain!r}; the corpus has: {', '.join(corpus.domains)}")
    d = corpus.domains.index(domain)
    return [(doc["offset"], doc["offset"] + doc["length"]) for doc in corpus.documents(split) if doc["domain"] == d]


def available_tokens(corpus, domain: str | None = None, split: str = "train") -> int:
    """Tokens calibration can draw from ``split`` (of ``domain`` when given)."""
    if domain is None:
        return len(corpus.tokens(split))
    return sum(b - a for a, b in _domain_ranges(corpus, domain, split))


def _check_request(num_tokens: int, seq_len: int) -> None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < MIN_CALIB_TOKENS:
        raise ValueError(f"--calib-tokens must be an integer >= {MIN_CALIB_TOKENS}, got {num_tokens!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def _windows(tokens: np.ndarray, ranges: list[tuple[int, int]], seq_len: int, num_tokens: int) -> list[np.ndarray]:
    """Windows of ``seq_len`` tokens covering ``num_tokens`` tokens, evenly spread over ``ranges``."""
    spans = []
    for a, b in ranges:
        for s in range(a, b, seq_len):
            spans.append((s, min(s + seq_len, b)))
    if not spans:
        return []
    need = math.ceil(num_tokens / seq_len)
    if need < len(spans):
        picks = np.unique(np.linspace(0, len(spans) - 1, need).round().astype(np.int64))
        spans = [spans[i] for i in picks]
    out, total = [], 0
    for s, e in spans:
        w = np.asarray(tokens[s:e], dtype=np.int64)
        w = w[: max(0, num_tokens - total)]
        if len(w):
            out.append(w)
            total += len(w)
        if total >= num_tokens:
            break
    return out


def _batched(windows: list[np.ndarray], batch_size: int) -> list[dict]:
    from ..data import PAD_ID

    batches = []
    for first in range(0, len(windows), batch_size):
        group = windows[first:first + batch_size]
        L = max(len(w) for w in group)
        ids = torch.full((len(group), L), PAD_ID, dtype=torch.int64)
        mask = torch.zeros((len(group), L), dtype=torch.bool)
        for i, w in enumerate(group):  # right padding
            ids[i, :len(w)] = torch.from_numpy(w)
            mask[i, :len(w)] = True
        batches.append({"input_ids": ids, "attention_mask": None if bool(mask.all()) else mask})
    return batches


def calibration_batches(corpus, seq_len: int, num_tokens: int, *, domain: str | None = None,
                        batch_size: int = 8, split: str = "train") -> list[dict]:
    """About ``num_tokens`` tokens of ``split`` (the training split by default, so validation stays unseen) in
    windows of ``seq_len``: the documents of ``domain`` only when given, else windows evenly spaced over the
    split. ``ValueError`` when the request is below ``MIN_CALIB_TOKENS`` or the data hold fewer tokens."""
    _check_request(num_tokens, seq_len)
    tokens = corpus.tokens(split)
    ranges = _domain_ranges(corpus, domain, split) if domain is not None else [(0, len(tokens))]
    have = sum(b - a for a, b in ranges)
    if have < num_tokens:
        where = f"domain {domain!r}" if domain else f"the {split} split"
        raise ValueError(f"calibration too small: {where} holds {have:,} tokens, --calib-tokens asks {num_tokens:,}")
    return _batched(_windows(tokens, ranges, seq_len, num_tokens), batch_size)


def text_batches(path, seq_len: int, num_tokens: int, batch_size: int = 8) -> list[dict]:
    """Calibration windows of a user's text file or folder (UTF-8; each file ``BOS bytes EOS``)."""
    from pathlib import Path

    from ..data import BOS_ID, EOS_ID
    from ..data.sources import text_documents

    _check_request(num_tokens, seq_len)
    if not Path(path).exists():
        raise ValueError(f"--calib-data: {path} does not exist")
    pieces = []
    for doc in text_documents(path):
        body = np.frombuffer(doc.data, dtype=np.uint8).astype(np.int64)
        pieces.append(np.concatenate([[BOS_ID], body, [EOS_ID]]).astype(np.int64))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if len(tokens) < num_tokens:
        raise ValueError(f"calibration too small: --calib-data {path} holds {len(tokens):,} tokens, "
                         f"--calib-tokens asks {num_tokens:,}")
    return _batched(_windows(tokens, [(0, len(tokens))], seq_len, num_tokens), batch_size)


def ebss_calibration_batches(model, seq_len: int, num_tokens: int, batch_size: int = 8,
                             progress: bool = True) -> list[dict]:
    """Calibration batches the model writes itself: MoEQuant's expert-balanced self-sampling
    (:mod:`moekit.compress.ebss`), in the format of :func:`calibration_batches`."""
    from .ebss import ebss_batches

    return ebss_batches(model, num_tokens, seq_len, batch_size=batch_size, progress=progress)
