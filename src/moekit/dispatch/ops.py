"""Small autograd ops for moving rows between token order and pair order.

Legend: T tokens, D model width, S routed pairs.

``gather(x_TD, token_S)`` copies each pair's token row (backward: scatter-add, no one-hot);
``scatter_add(y_SD, token_S, T)`` sums pair rows into their tokens (backward: gather). Experts that are not
fused (any :class:`moekit.experts.Experts` relying on the base class's ``forward``), the all-to-all dispatcher
and post-expert norms of transformers models are built from these two.
"""
from __future__ import annotations

import torch


class GatherRows(torch.autograd.Function):
    """``x_TD[token_S]`` with a scatter-add backward."""

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


class ScatterAddRows(torch.autograd.Function):
    """``out_TD[token_S[s]] += y_SD[s]`` with a gather backward."""

    @staticmethod
    def forward(ctx, y_SD, token_S, num_tokens):
        ctx.save_for_backward(token_S)
        return y_SD.new_zeros(num_tokens, y_SD.shape[1]).index_add_(0, token_S, y_SD)

    @staticmethod
    def backward(ctx, dout_TD):
        token_S, = ctx.saved_tensors
        return dout_TD.index_select(0, token_S), None, None


def gather(x_TD: torch.Tensor, token_S: torch.Tensor) -> torch.Tensor:
    """``x_TD[token_S]`` (differentiable in ``x_TD``)."""
    return GatherRows.apply(x_TD, token_S)


def scatter_add(y_SD: torch.Tensor, token_S: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``out_TD`` with ``out_TD[t] = sum of y_SD[s] over the pairs s of token t`` (differentiable in ``y_SD``)."""
    return ScatterAddRows.apply(y_SD, token_S, num_tokens)


def combine(y_SD: torch.Tensor, weight_S: torch.Tensor, token_S: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The weighted combine ``out_t = sum_s weight_s * y_s`` over the pairs of each token."""
    return scatter_add(y_SD * weight_S.to(y_SD.dtype).unsqueeze(-1), token_S, num_tokens)
