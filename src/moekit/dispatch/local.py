"""Local (single-process) dispatch: gather rows by expert, run the experts, scatter weighted rows back.

Legend: T tokens, D model width, S routed pairs (sorted by expert).

Dense experts take one fused autograd function for the whole path (:class:`moekit.dispatch.fused.FusedExperts`);
any other Experts gets the generic path below, built from two small autograd functions.
"""
from __future__ import annotations

import torch

from .plan import DispatchPlan


class _GatherRows(torch.autograd.Function):
    """``x_TD[token_S]`` with a scatter-add backward (no one-hot)."""

    @staticmethod
    def forward(ctx, x_TD, token_S):
        ctx.save_for_backward(token_S)
        ctx.num_tokens = x_TD.shape[0]
        return x_TD.index_select(0, token_S)

    @staticmethod
    def backward(ctx, dx_SD):
        token_S, = ctx.saved_tensors
        dx_TD = dx_SD.new_zeros(ctx.num_tokens, dx_SD.shape[1]).index_add_(0, token_S, dx_SD)
        return dx_TD, None


class _ScatterAddRows(torch.autograd.Function):
    """``out_TD[token_S[s]] += y_SD[s]`` with a gather backward."""

    @staticmethod
    def forward(ctx, y_SD, token_S, num_tokens):
        ctx.save_for_backward(token_S)
        return y_SD.new_zeros(num_tokens, y_SD.shape[1]).index_add_(0, token_S, y_SD)

    @staticmethod
    def backward(ctx, dout_TD):
        token_S, = ctx.saved_tensors
        return dout_TD.index_select(0, token_S), None, None


def dispatch_local(x_TD: torch.Tensor, plan: DispatchPlan, experts) -> torch.Tensor:
    """Run ``experts`` on the pairs of ``plan`` and combine: ``out_t = sum_s w_s * expert_{e_s}(x_t)``.

    Experts that offer ``fused_dispatch`` (the dense experts) take the fused path; any other Experts only needs
    ``grouped_forward(x_SD, counts_E) -> y_SD`` and gets the generic gather / weight / scatter path.
    """
    fused = getattr(experts, "fused_dispatch", None)
    if fused is not None:
        return fused(x_TD, plan)
    x_SD = _GatherRows.apply(x_TD, plan.token_S)
    y_SD = experts.grouped_forward(x_SD, plan.counts_E)
    y_SD = y_SD * plan.weight_S.to(y_SD.dtype).unsqueeze(-1)
    return _ScatterAddRows.apply(y_SD, plan.token_S, x_TD.shape[0])
