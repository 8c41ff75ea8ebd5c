"""Dispatch plan: sort routed pairs by expert, count them, apply capacity.

Legend: T tokens, E experts, S routed pairs, C capacity (pairs per expert).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..routing.base import Routing

DROP_POLICIES = ("position", "probs")


@dataclass
class DispatchPlan:
    """Pairs sorted by expert, ready for grouped matrix products.

    ``token_S`` and ``weight_S`` list the kept pairs (and zero-weight padding rows) in expert order;
    ``counts_E`` rows per expert; ``offsets_E`` their inclusive cumulative sum in int32 (the ``offs``
    argument of ``torch._grouped_mm``). ``kept_E`` counts real (unpadded) pairs per expert, ``routed_E`` the
    pairs routed to it before dropping.
    """

    token_S: torch.Tensor
    weight_S: torch.Tensor
    expert_S: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    kept_E: torch.Tensor
    routed_E: torch.Tensor
    num_tokens: int
    num_pairs: int
    num_dropped: int
    capacity: int | None

    @property
    def num_experts(self) -> int:
        return int(self.counts_E.numel())


def expert_capacity(capacity_factor: float, num_pairs: int, num_experts: int) -> int:
    """``C = ceil(capacity_factor * S / E)`` (``S = T * K`` for token choice), at least 1."""
    return max(1, math.ceil(capacity_factor * num_pairs / num_experts))


def make_plan(
    routing: Routing,
    capacity_factor: float | None = None,
    drop_policy: str = "position",
    pad_to_capacity: bool = False,
    *,
    foreign_ids: bool = False,
) -> DispatchPlan:
    """Turn a Routing into a DispatchPlan.

    Dropless when ``capacity_factor`` is None. Otherwise each expert keeps at most ``C`` pairs: the earliest
    tokens (``drop_policy="position"``, GShard / Switch) or the highest routing weights (``"probs"``,
    Megatron-Core's ``probs`` policy); with ``pad_to_capacity`` every expert gets exactly ``C`` rows, the
    missing ones zero-weight padding on token 0 (static shapes for compiled or expert-parallel code; no padding
    when there are no tokens). With ``foreign_ids`` (dropless only), expert ids ``>= E`` are allowed: the
    sentinels transformers' expert parallelism writes for experts on other ranks. They sort to the tail and are
    dropped (``num_dropped`` counts them).
    """
    num_experts = routing.num_experts
    expert_ids = routing.expert_ids
    weights = routing.weights
    num_pairs = int(expert_ids.numel())
    if capacity_factor is not None and drop_policy == "probs":
        by_weight = torch.argsort(weights.detach(), descending=True, stable=True)
        order = by_weight[torch.argsort(expert_ids[by_weight], stable=True)]
    else:
        order = torch.argsort(expert_ids, stable=True)
    capacity = None
    num_dropped = 0
    if foreign_ids:
        if capacity_factor is not None:
            raise ValueError("make_plan: foreign expert ids are only supported without capacity")
        counts_E = torch.bincount(expert_ids.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
        num_kept = int(counts_E.sum()) if num_experts > 0 else 0
        if num_kept < num_pairs:
            order = order[:num_kept]
            num_dropped = num_pairs - num_kept
    else:
        counts_E = torch.bincount(expert_ids, minlength=num_experts)
    routed_E = counts_E
    if capacity_factor is None:
        token_S = routing.token_ids[order]
        expert_S = expert_ids[order]
        weight_S = weights[order]
        kept_E = counts_E
    else:
        capacity = expert_capacity(capacity_factor, num_pairs, num_experts)
        expert_sorted = expert_ids[order]
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_S = torch.arange(num_pairs, device=expert_ids.device) - starts_E[expert_sorted]
        keep_S = rank_S < capacity
        order = order[keep_S]
        kept_E = counts_E.clamp(max=capacity)
        num_dropped = num_pairs - int(kept_E.sum())
        token_S = routing.token_ids[order]
        expert_S = expert_ids[order]
        weight_S = weights[order]
        counts_E = kept_E
        if pad_to_capacity and routing.num_tokens > 0:
            slot_S = expert_S * capacity + rank_S[keep_S]
            total = num_experts * capacity
            token_S = torch.zeros(total, dtype=token_S.dtype, device=token_S.device).index_copy(0, slot_S, token_S)
            weight_S = torch.zeros(total, dtype=weight_S.dtype, device=weight_S.device).index_copy(0, slot_S, weight_S)
            expert_S = torch.arange(num_experts, device=expert_S.device).repeat_interleave(capacity)
            counts_E = torch.full_like(counts_E, capacity)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return DispatchPlan(
        token_S=token_S,
        weight_S=weight_S,
        expert_S=expert_S,
        counts_E=counts_E,
        offsets_E=offsets_E,
        kept_E=kept_E,
        routed_E=routed_E,
        num_tokens=routing.num_tokens,
        num_pairs=num_pairs,
        num_dropped=num_dropped,
        capacity=capacity,
    )
