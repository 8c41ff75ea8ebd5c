"""Pieces shared by the batch-level routers (expert choice, Sinkhorn, SSR, sparsity-constrained OT).

Legend: T tokens, D model width, E experts, K experts per token, S routed (token, expert) pairs.
"""
from __future__ import annotations

import math

import torch

from .base import Routing

EVAL_ROUTINGS = ("token_choice", "batch")


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value >= 0 if allow_zero else value > 0))
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def softmax_topk_routing(logits_TE: torch.Tensor, top_k: int, renormalise: bool) -> Routing:
    """Token-choice top-k on softmax scores: the causal fallback of the batch-level routers.

    Gate weight = the softmax score of each chosen expert, renormalised over the K chosen when ``renormalise``.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    topk_ids_TK = torch.topk(probs_TE.detach(), top_k, dim=-1).indices
    weights_TK = probs_TE.gather(1, topk_ids_TK)
    if renormalise:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return Routing.from_topk(topk_ids_TK, weights_TK, logits_TE.shape[1], logits=logits_TE, probs=probs_TE)


def topk_renormalised_routing(log_plan_TE: torch.Tensor, top_k: int, num_experts: int, **kw) -> Routing:
    """Top-k of each row of a (log) transport plan, gate = the plan entries renormalised over the K chosen.

    ``softmax`` over the chosen log-plan entries equals ``plan / sum(chosen plan)`` and is differentiable
    wherever ``log_plan_TE`` is.
    """
    topk_ids_TK = torch.topk(log_plan_TE.detach(), top_k, dim=-1).indices
    weights_TK = torch.softmax(log_plan_TE.gather(1, topk_ids_TK), dim=-1)
    return Routing.from_topk(topk_ids_TK, weights_TK, num_experts, **kw)


def real_token_ids(mask_T: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor | None:
    """Indices of the real tokens (None when every token is real): the rows batch-level routers solve their
    assignment problem on, so padding takes neither capacity nor transport mass."""
    if mask_T is None or bool(mask_T.all()):
        return None
    return mask_T.nonzero().reshape(-1).to(device)


def merge_topk_rows(all_rows: Routing, real_ids_R: torch.Tensor, ids_RK: torch.Tensor,
                    weights_RK: torch.Tensor) -> Routing:
    """``all_rows`` (a token-choice routing of every token) with the rows ``real_ids_R`` replaced by
    ``(ids_RK, weights_RK)``: the batch-level choice for real tokens, the token-choice fallback for padding."""
    topk_ids_TK = all_rows.topk_ids.index_copy(0, real_ids_R, ids_RK)
    weights_TK = all_rows.topk_weights.index_copy(0, real_ids_R, weights_RK.to(all_rows.topk_weights.dtype))
    return Routing.from_topk(topk_ids_TK, weights_TK, all_rows.num_experts, logits=all_rows.logits,
                             probs=all_rows.probs, token_mask=all_rows.token_mask)
