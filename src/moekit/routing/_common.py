"""Pieces shared by the batch-level routers (expert choice, Sinkhorn, SSR, sparsity-constrained OT).

Legend: T tokens, D model width, E experts, K experts per token, S routed (token, expert) pairs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router, Routing

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


class LinearGateRouter(Router):
    """A Router whose logits are ``x W^T`` in float32, ``weight [E, D]`` (Hugging Face ``gate.weight``)."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__(dim, num_experts, top_k)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=0.02)

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD.float(), self.weight.float())


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
