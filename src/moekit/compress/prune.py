"""Expert pruning: scores from calibration statistics, per-layer or global budgets, NAEE's exhaustive
reconstruction-error search, and the rebuild of a smaller model (router rows and expert weights sliced).

Methods (``PRUNE_METHODS``), each a per-expert score computed from :mod:`moekit.compress.calibrate` sums; the
highest scores are kept:

* ``frequency``: routed calibration tokens per expert (drop the least-routed experts).
* ``reap``: REAP (Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE compression",
  arXiv:2510.13999): mean over the tokens routed to the expert of the renormalised gate weight times the L2
  norm of the expert's output.
* ``easy_ep``: EASY-EP (Dong et al. 2025, "Domain-Specific Pruning of Large Mixture-of-Experts Models with
  Few-shot Demonstrations", arXiv:2504.06792): sum over the (in-domain) calibration tokens routed to the
  expert of gate weight x ||expert output|| x max(0, 1 - cos(h, h + routed output)), ``h`` the residual stream
  entering the MoE block and ``routed output`` the routing-weighted sum of the routed experts (shared experts
  excluded), as the authors' code computes ``cos(x, x + r_moe)``. Here the gate weight is renormalised over
  the token's selected experts (equal to the router's weight for ``norm_topk`` routers).
* ``naee``: NAEE (Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
  Mixture-of-Experts Large Language Models", arXiv:2402.14800): per layer, the set of kept experts that
  minimises the squared Frobenius reconstruction error ``||F(X) - F_kept(X)||^2`` of the layer's routed output
  on calibration inputs ``X`` (the original model's inputs of that layer), where ``F_kept`` routes among the kept
  experts only (exactly the pruned layer: the dropped experts' logits are -inf). Exhaustive over all
  ``C(E, n)`` sets when that is at most ``max_combinations``, else greedy backward elimination (drop, one at a
  time, the expert whose removal adds the least error). Dynamic skipping (:func:`enable_dynamic_skipping`):
  a token's 2nd expert is skipped when ``w2 < beta * w1``, ``beta`` the median of ``w2 / w1`` on calibration
  data (for top-k > 2 every non-first expert is compared with ``w1``); the kept weight is not renormalised.
* ``dern``: DERN (arXiv:2509.10377), :mod:`moekit.compress.dern`: experts dropped by summed routing weight,
  their neuron segments merged into the most compatible kept experts.
* ``uncurl``: UNCURL (arXiv:2409.01483), :mod:`moekit.compress.uncurl`: task-specific clustering of the experts
  on their router logits over the (task) calibration data, each cluster merged into one expert; the same as
  ``moekit merge --method uncurl``.

Budgets: per layer, ``n_l = round(keep * E_l)`` experts (at least 1); global, ``round(keep * sum_l E_l)``
experts in all, each layer first gets its ``top_k`` best (1 with clamping), the rest go to the highest scores
normalised by the layer's total score (so layers with different score scales compete fairly). A layer left with
fewer experts than its top-k is an error unless ``clamp_top_k`` (then top-k is lowered, with a warning).

:func:`rebuild_model` writes the smaller :class:`moekit.model.MoELM` (per-layer counts through
``ModelConfig.moe_overrides`` when they differ) from groups of original experts: one expert per group for
pruning, several for merging (:mod:`moekit.compress.merge`). :func:`masked_model` is the independent
reference: the original model with the dropped experts' router logits at -inf.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import replace

import torch

from ..dispatch.plan import DispatchPlan
from ..layer import MoE, moe_layers
from ..routing.base import RoutingContext
from .calibrate import CalibrationStats, LayerCalibration

__all__ = ["PRUNE_METHODS", "DynamicSkip", "budgets", "enable_dynamic_skipping", "expert_scores", "keep_sets",
           "masked_model", "naee_search", "naee_keep_sets", "rebuild_model", "moe_layer_map", "prune_model"]

PRUNE_METHODS = ("frequency", "reap", "easy_ep", "naee", "dern", "uncurl")
NAEE_MAX_COMBINATIONS = 20000


def expert_scores(s: LayerCalibration, method: str) -> torch.Tensor:
    """Per-expert importance ``[E]`` (float64) of one layer under ``method`` (higher = keep)."""
    if method == "frequency":
        return s.count_E.double()
    if method == "reap":
        return s.reap_E
    if method == "easy_ep":
        return s.easy_ep_sum_E.clone()
    if method == "dern":
        return s.weight_sum_E.clone()
    raise ValueError(f"unknown score method {method!r}; choose from frequency, reap, easy_ep, dern")


def moe_layer_map(model: torch.nn.Module) -> dict[int, tuple[str, MoE]]:
    """``{layer_index: (module name, MoE)}`` of a model (layer index from ``...layers.N...`` names)."""
    from .calibrate import _index_from_name

    out = {}
    names = {id(m): n for n, m in model.named_modules()}
    for pos, layer in enumerate(moe_layers(model)):
        name = names[id(layer)]
        out[_index_from_name(name, pos)] = (name, layer)
    return out


def _round_count(keep: float, n: int) -> int:
    return max(1, int(math.floor(keep * n + 0.5)))


def check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0 < keep <= 1) or math.isnan(keep):
        raise ValueError(f"--keep must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def budgets(layer_experts: dict[int, int], layer_top_k: dict[int, int], keep: float, *,
            global_budget: bool = False, clamp_top_k: bool = False) -> dict[int, int] | int:
    """Checked experts kept per layer (per-layer mode), or the global total (global mode).

    ``ValueError`` when a layer would keep fewer experts than its top-k and ``clamp_top_k`` is False."""
    keep = check_keep(keep)
    if global_budget:
        total = _round_count(keep, sum(layer_experts.values()))
        floor = sum(1 if clamp_top_k else layer_top_k[i] for i in layer_experts)
        if total < floor:
            raise ValueError(f"--keep {keep} keeps {total} experts in all, fewer than the {floor} the layers' top-k "
                             f"need (pass --clamp-top-k to lower top-k)")
        return total
    out = {}
    for i, n in layer_experts.items():
        k = _round_count(keep, n)
        if k < layer_top_k[i] and not clamp_top_k:
            raise ValueError(f"--keep {keep} leaves {k} of {n} experts in layer {i}, fewer than its top-k "
                             f"{layer_top_k[i]}; pass --clamp-top-k to lower top-k to what remains")
        out[i] = k
    return out


def keep_sets(scores: dict[int, torch.Tensor], budget: dict[int, int] | int, layer_top_k: dict[int, int],
              clamp_top_k: bool = False) -> dict[int, list[int]]:
    """Kept expert indices per layer (sorted) from per-layer scores: the top ``budget[i]`` of each layer, or
    under a global total the greedy allocation described in the module docstring."""
    if isinstance(budget, dict):
        return {i: sorted(torch.topk(scores[i], budget[i]).indices.tolist()) for i in scores}
    chosen: dict[int, set[int]] = {}
    for i, s in scores.items():
        first = 1 if clamp_top_k else layer_top_k[i]
        chosen[i] = set(torch.topk(s, min(first, s.numel())).indices.tolist())
    left = budget - sum(len(c) for c in chosen.values())
    pool = []
    for i, s in scores.items():
        total = float(s.sum())
        norm = s / total if total > 0 else torch.zeros_like(s)
        pool += [(float(norm[e]), i, e) for e in range(s.numel()) if e not in chosen[i]]
    pool.sort(key=lambda t: (-t[0], t[1], t[2]))
    for _, i, e in pool[:max(0, left)]:
        chosen[i].add(e)
    return {i: sorted(c) for i, c in chosen.items()}


# ------------------------------------------------------------------------------------------------ NAEE
def _select_masked(router, logits_NE: torch.Tensor, keep_BE: torch.Tensor, top_k: int):
    """The router's top-k ids and weights ``[B, N, K]`` when only the experts of each row of ``keep_BE`` exist
    (the others' logits at -inf), with the router's own selection rule (``select``)."""
    from ..routing.topk import scores_from_logits

    B, E = keep_BE.shape
    N = logits_NE.shape[0]
    masked = logits_NE.unsqueeze(0).masked_fill(~keep_BE.unsqueeze(1), float("-inf")).reshape(B * N, E)
    old_k = router.top_k
    router.top_k = top_k
    try:
        routing = router.select(scores_from_logits(masked, router.score_func), masked, RoutingContext())
    finally:
        router.top_k = old_k
    return routing.topk_ids.view(B, N, -1), routing.topk_weights.view(B, N, -1).double()


def _check_naee_router(layer: MoE) -> None:
    from ..routing.topk import TopKRouter

    r = layer.router
    if not isinstance(r, TopKRouter) or type(r).mix_scores is not TopKRouter.mix_scores:
        raise ValueError(f"naee needs a token-choice top-k router (topk), got {layer.config.router!r}")
    if r.num_groups > 1:
        raise ValueError("naee: group-limited routing (num_groups > 1) is not supported")


@torch.no_grad()
def naee_search(layer: MoE, x_ND: torch.Tensor, n_keep: int, *, max_combinations: int = NAEE_MAX_COMBINATIONS,
                top_k: int | None = None, chunk_rows: int = 1 << 22) -> tuple[list[int], float, str]:
    """NAEE's drop set for one layer on calibration inputs ``x_ND``: ``(kept experts, error, "exhaustive" |
    "greedy")``; ``error`` is the summed squared reconstruction error of the routed output.

    The error of every candidate set comes from per-token Gram matrices of the experts' outputs, so a set costs
    ``O(N K^2)``: ``err_n = |y_n|^2 - 2 sum_k w_k <y_n, o_{n,e_k}> + sum_{k,k'} w_k w_k' <o_{n,e_k}, o_{n,e_k'}>``.
    """
    _check_naee_router(layer)
    router, experts = layer.router, layer.experts
    E = layer.config.num_experts
    top_k = min(top_k or layer.config.top_k, n_keep)
    x_ND = x_ND.to(next(layer.parameters()).dtype)
    N = x_ND.shape[0]
    logits_NE = router.logits(x_ND, None)
    out_NED = experts.expert_rows(x_ND.repeat(E, 1), torch.full((E,), N, dtype=torch.int64)).double()
    out_NED = out_NED.view(E, N, -1).transpose(0, 1).contiguous()
    full = router(x_ND, RoutingContext())
    w_NK = full.topk_weights.double()
    y_ND = (w_NK.unsqueeze(-1) * out_NED.gather(1, full.topk_ids.unsqueeze(-1).expand(-1, -1, out_NED.shape[-1]))).sum(1)
    gram_NEE = out_NED @ out_NED.transpose(1, 2)
    cross_NE = torch.einsum("nd,ned->ne", y_ND, out_NED)
    base = float((y_ND * y_ND).sum())
    n_idx = torch.arange(N)

    def errors(keep_BE: torch.Tensor) -> torch.Tensor:
        B = keep_BE.shape[0]
        ids, w = _select_masked(router, logits_NE, keep_BE, top_k)
        c = cross_NE.unsqueeze(0).expand(B, -1, -1).gather(2, ids)  # [B, N, K]
        g = gram_NEE[n_idx[None, :, None, None], ids[..., :, None], ids[..., None, :]]  # [B, N, K, K]
        quad = torch.einsum("bnk,bnkj,bnj->b", w, g, w)
        return base - 2 * (w * c).sum((1, 2)) + quad

    per_chunk = max(1, chunk_rows // max(1, N * E))

    def best_of(candidates: list[tuple[int, ...]]) -> tuple[tuple[int, ...], float]:
        best, best_err = None, math.inf
        for first in range(0, len(candidates), per_chunk):
            group = candidates[first:first + per_chunk]
            keep_BE = torch.zeros(len(group), E, dtype=torch.bool)
            for b, c in enumerate(group):
                keep_BE[b, list(c)] = True
            err = errors(keep_BE)
            j = int(torch.argmin(err))
            if float(err[j]) < best_err:
                best, best_err = group[j], float(err[j])
        return best, best_err

    if math.comb(E, n_keep) <= max_combinations:
        best, err = best_of(list(itertools.combinations(range(E), n_keep)))
        return sorted(best), max(err, 0.0), "exhaustive"
    current = tuple(range(E))
    err = 0.0
    while len(current) > n_keep:
        candidates = [tuple(e for e in current if e != drop) for drop in current]
        current, err = best_of(candidates)
    return sorted(current), max(err, 0.0), "greedy"


def naee_keep_sets(model: torch.nn.Module, stats: CalibrationStats, budget: dict[int, int], *,
                   max_combinations: int = NAEE_MAX_COMBINATIONS, clamp_top_k: bool = False,
                   log=None) -> dict[int, list[int]]:
    """NAEE's kept sets for every MoE layer, on the inputs ``calibrate(..., keep_inputs=N)`` kept."""
    layers = moe_layer_map(model)
    out = {}
    for i, (_, layer) in layers.items():
        s = stats.layer(i)
        if s.inputs_ND is None or s.inputs_ND.shape[0] == 0:
            raise ValueError("naee needs calibration inputs: calibrate(..., keep_inputs=N)")
        k = layer.config.top_k if not clamp_top_k else min(layer.config.top_k, budget[i])
        keep, err, how = naee_search(layer, s.inputs_ND, budget[i], max_combinations=max_combinations, top_k=k)
        if log:
            log(f"naee layer {i}: kept {keep} ({how}, squared error {err:.4g} over {s.inputs_ND.shape[0]} tokens)")
        out[i] = keep
    return out


# ------------------------------------------------------------------------------------------------ rebuild
def _new_config(config, counts: dict[int, int], clamp_top_k: bool):
    """The model config with ``counts[i]`` experts in MoE layer ``i`` (top-k lowered when clamping)."""
    overrides = {i: dict(v) for i, v in config.moe_overrides.items()}
    layer_moes = config.layer_moes
    new = {}
    for i, moe in layer_moes.items():
        n = counts.get(i, moe.num_experts)
        k = moe.top_k
        if n < k:
            if not clamp_top_k:
                raise ValueError(f"layer {i} keeps {n} experts, fewer than its top-k {k}; pass --clamp-top-k")
            warnings.warn(f"layer {i}: top-k lowered from {k} to {n}, the experts that remain", stacklevel=3)
            k = n
        new[i] = (n, k)
    shapes = set(new.values())
    moe = config.moe
    if len(shapes) == 1:
        n, k = next(iter(shapes))
        moe = replace(config.moe, num_experts=n, top_k=k)
    for i, (n, k) in new.items():
        settings = {key: v for key, v in overrides.get(i, {}).items() if key not in ("num_experts", "top_k")}
        if n != moe.num_experts:
            settings["num_experts"] = n
        if k != moe.top_k:
            settings["top_k"] = k
        if settings:
            overrides[i] = settings
        else:
            overrides.pop(i, None)
    return replace(config, moe=moe, moe_overrides=overrides)


@torch.no_grad()
def rebuild_model(model: torch.nn.Module, groups: dict[int, list[list[int]]], *,
                  member_weights: dict[int, torch.Tensor] | None = None, router_rows: str = "dominant",
                  clamp_top_k: bool = False):
    """A new, smaller model whose MoE layer ``i`` has one expert per group of ``groups[i]`` (lists of original
    expert indices). A one-member group copies the expert and its router row (pruning); a larger group's
    expert weights are the average of its members weighted by ``member_weights[i]`` (uniform where they sum to
    zero), and its router row (and per-expert router buffers) is the row of the member with the largest weight
    (``router_rows="dominant"``) or the plain mean of the members' rows (``"average"``). Layers not in
    ``groups`` are unchanged. Returns the model in eval mode, with the original's dtype.
    """
    from ..model import MoELM

    if router_rows not in ("dominant", "average"):
        raise ValueError(f"router_rows must be 'dominant' or 'average', got {router_rows!r}")
    layers = moe_layer_map(model)
    for i, g in groups.items():
        if i not in layers:
            raise ValueError(f"layer {i} is not a MoE layer of the model")
        E = layers[i][1].config.num_experts
        flat = [e for grp in g for e in grp]
        if not g or any(not grp for grp in g) or len(set(flat)) != len(flat) or not all(0 <= e < E for e in flat):
            raise ValueError(f"layer {i}: groups must be non-empty, disjoint lists of experts in [0, {E})")
    config = _new_config(model.config, {i: len(g) for i, g in groups.items()}, clamp_top_k)
    state = model.state_dict()
    new_state = dict(state)
    for i, g in groups.items():
        name, layer = layers[i]
        E = layer.config.num_experts
        fw = member_weights.get(i) if member_weights else None
        coeffs, dominant = [], []
        for grp in g:
            w = torch.ones(len(grp), dtype=torch.float64) if fw is None else fw[grp].double().clamp(min=0)
            if float(w.sum()) <= 0:
                w = torch.ones(len(grp), dtype=torch.float64)
            coeffs.append(w / w.sum())
            dominant.append(grp[int(torch.argmax(w))])
        expert_keys = {f"{name}.experts.{p}" for p in layer.experts.expert_parameter_names()}
        for key, t in state.items():
            if not key.startswith(name + "."):
                continue
            per_expert = t.dim() >= 1 and t.shape[0] == E
            if key in expert_keys:
                rows = [(t[grp].double() * c.view(-1, *[1] * (t.dim() - 1))).sum(0) if len(grp) > 1 else t[grp[0]].double()
                        for grp, c in zip(g, coeffs)]
                new_state[key] = torch.stack(rows).to(t.dtype)
            elif key.startswith(f"{name}.gate.") and per_expert:
                if router_rows == "dominant" or all(len(grp) == 1 for grp in g):
                    new_state[key] = t[dominant].clone()
                else:
                    new_state[key] = torch.stack([t[grp].double().mean(0) for grp in g]).to(t.dtype)
    dtype = next(model.parameters()).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new_model = MoELM(config).to(dtype)
    missing, unexpected = new_model.load_state_dict(new_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"rebuilt model does not match its state: missing {missing[:3]}, unexpected {unexpected[:3]}")
    new_model.eval()
    return new_model


def prune_model(model: torch.nn.Module, keep: dict[int, list[int]], *, clamp_top_k: bool = False):
    """The model with only the experts ``keep[i]`` (original indices, any order; kept in increasing order) in
    MoE layer ``i``: expert weights and router rows sliced."""
    return rebuild_model(model, {i: [[e] for e in sorted(k)] for i, k in keep.items()}, clamp_top_k=clamp_top_k)


@contextlib.contextmanager
def masked_model(model: torch.nn.Module, keep: dict[int, list[int]]):
    """Within the block, the dropped experts of each MoE layer get ``-inf`` router logit offsets (they are never
    selected and softmax renormalises over the others): the reference a pruned model must equal."""
    layers = moe_layer_map(model)
    saved = {}
    try:
        for i, k in keep.items():
            router = layers[i][1].router
            saved[i] = router.logit_offset.clone()
            off = torch.full_like(router.logit_offset, float("-inf"))
            off[list(k)] = 0.0
            router.logit_offset.copy_(off + saved[i])
        yield model
    finally:
        for i, old in saved.items():
            layers[i][1].router.logit_offset.copy_(old)


# ------------------------------------------------------------------------------------------------ skipping
class DynamicSkip:
    """NAEE dynamic skipping installed as plan hooks (see :func:`enable_dynamic_skipping`): ``skipped_pairs`` /
    ``pairs`` (routed pairs seen), ``skipped_fraction``, ``remove()``."""

    def __init__(self, betas: dict[int, float]):
        self.betas = dict(betas)
        self.pairs = 0
        self.skipped_pairs = 0
        self._handles = []

    @property
    def skipped_fraction(self) -> float:
        return self.skipped_pairs / self.pairs if self.pairs else 0.0

    def hook(self, beta: float):
        def run(layer: MoE, x_TD: torch.Tensor, plan: DispatchPlan):
            if plan.capacity is not None or plan.token_S.numel() == 0:
                return None
            T = x_TD.shape[0]
            w = plan.weight_S.detach()
            w1_T = torch.full((T,), float("-inf"), dtype=w.dtype, device=w.device).scatter_reduce(
                0, plan.token_S, w, reduce="amax")
            skip_S = w < beta * w1_T[plan.token_S]
            self.pairs += int(w.numel())
            n_skip = int(skip_S.sum())
            self.skipped_pairs += n_skip
            if n_skip == 0:
                return None
            keep = ~skip_S
            expert_S = plan.expert_S[keep]
            counts_E = torch.bincount(expert_S, minlength=plan.num_experts)
            new = DispatchPlan(token_S=plan.token_S[keep], weight_S=plan.weight_S[keep], expert_S=expert_S,
                               counts_E=counts_E, offsets_E=torch.cumsum(counts_E, 0).to(torch.int32),
                               kept_E=counts_E, routed_E=plan.routed_E, num_tokens=plan.num_tokens,
                               num_pairs=plan.num_pairs, num_dropped=plan.num_dropped + n_skip, capacity=None)
            return layer.dispatcher(x_TD, new, layer.experts)
        return run

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def enable_dynamic_skipping(model: torch.nn.Module, betas: dict[int, float]) -> DynamicSkip:
    """NAEE dynamic skipping on the MoE layers of ``model``: a token's pair with weight ``w < beta_i * w1``
    (``w1`` the token's largest weight in layer ``i``) is not computed. ``betas`` by layer index, typically
    ``{i: stats.layer(i).ratio_median()}``. Returns the :class:`DynamicSkip` (counts, ``remove()``)."""
    skip = DynamicSkip(betas)
    for i, (_, layer) in moe_layer_map(model).items():
        if i in betas:
            skip._handles.append(layer.register_plan_hook(skip.hook(float(betas[i]))))
    return skip
