"""Local (single-process) dispatch: the experts run on this process's own tokens.

Legend: T tokens, D model width.

Every dispatcher has one call, ``dispatcher(x_TD, plan, experts) -> out_TD``: :class:`LocalDispatcher` (the
default of :attr:`moekit.MoE.dispatcher`) hands the plan to the experts, whose ``forward`` gathers, computes
and combines (fused for dense experts); :class:`moekit.dispatch.all_to_all.AllToAllDispatcher` sends rows to
the ranks that hold their experts around the experts' ``expert_rows``.
"""
from __future__ import annotations

import torch

from .plan import DispatchPlan


class LocalDispatcher:
    """``out_TD = experts(x_TD, plan)``: all experts live in this process."""

    def __call__(self, x_TD: torch.Tensor, plan: DispatchPlan, experts) -> torch.Tensor:
        return experts(x_TD, plan)

    def __repr__(self) -> str:
        return "LocalDispatcher()"

