"""Ternary experts for quantisation-aware training (MoTE).

MoTE (Wang et al., "MoTE: Mixture of Ternary Experts for Memory-efficient Large Multimodal Models",
arXiv:2506.14435) trains routed experts whose weights are ternary, ``{-1, 0, 1}`` times an absmean scale (the
quantiser of BitNet b1.58, Ma et al., "The Era of 1-bit LLMs", arXiv:2402.17764), with a straight-through
estimator, beside a full-precision shared expert. Taken from it: the ternary absmean forward
``w_q = s * clamp(round(w / s), -1, 1)`` with ``s = mean |w|``, latent float weights updated through the STE
(``w + (w_q - w).detach()``: the forward sees ``w_q``, the gradient reaches ``w`` unchanged), the shared expert
left in float (``--num-shared-experts 1``: :class:`moekit.experts.SharedExpert` is not touched). Not taken: its
up-cycling from a dense model and its activation quantisation.

Scale granularity: one absmean per group of ``group`` consecutive input columns of each row (option ``group``,
default 128, as :func:`moekit.compress.quant.rtn` with ``bits="ternary"``; ``group=0`` means one scale per expert
matrix, BitNet's per-tensor scale), so that ``moekit quantize --method ternary --group G`` of a trained run packs
exactly the weights the training forward used (up to the float16 rounding of the stored scales).

``MoEConfig(experts="ternary", experts_options={"group": 128})``; ``moekit train --ternary-experts`` sets it.
The state dict is that of :class:`moekit.experts.DenseExperts` (the latent float weights).
"""
from __future__ import annotations

import torch

from ..dispatch.fused import StackedWeights, expert_rows, fused_experts
from .base import register
from .dense import DenseExperts

__all__ = ["TernaryExperts", "ternary_weight", "ternary_ste"]

_EPS = 1e-8


def ternary_weight(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    """``s * clamp(round(w / s), -1, 1)`` with ``s`` the mean ``|w|`` over each group of ``group`` input columns
    (last dimension) of each row; ``group=0``: one scale per matrix (the last two dimensions)."""
    if group == 0:
        s = w.abs().mean(dim=(-2, -1), keepdim=True).clamp(min=_EPS)
        return s * torch.clamp(torch.round(w / s), -1, 1)
    cols = w.shape[-1]
    g = min(group, cols)
    if cols % g:
        raise ValueError(f"ternary experts: group {group} does not divide the input width {cols}")
    w_g = w.reshape(*w.shape[:-1], cols // g, g)
    s = w_g.abs().mean(-1, keepdim=True).clamp(min=_EPS)
    return (s * torch.clamp(torch.round(w_g / s), -1, 1)).reshape(w.shape)


def ternary_ste(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    """The ternary weight in the forward, the identity in the backward (straight-through estimator)."""
    return w + (ternary_weight(w.detach(), group) - w).detach()


@register("ternary")
class TernaryExperts(DenseExperts):
    """Dense experts whose forward uses ternary weights (see the module docstring)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "swiglu",
                 init_std: float = 0.02, *, group: int = 128):
        super().__init__(num_experts, dim, hidden_dim, activation, init_std)
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise ValueError(f"experts_options.group must be a non-negative integer, got {group!r}")
        for name, cols in (("dim", dim), ("hidden_dim", hidden_dim)):
            if group and group < cols and cols % group:
                raise ValueError(f"experts_options.group {group} does not divide {name}={cols}")
        self.group = group
        self.small_batch = "off"  # the loop path reads the latent weights

    def ternary_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_up, w_down)`` as the forward uses them (ternary x scale, STE to the latent weights)."""
        return ternary_ste(self.w_up, self.group), ternary_ste(self.w_down, self.group)

    def forward(self, x_TD, plan):
        self.__dict__["last_path"] = "grouped"
        w_up, w_down = self.ternary_weights()
        return fused_experts(x_TD, plan.token_S, plan.weight_S, plan.expert_S, plan.offsets_E, w_up, w_down,
                             self.act_spec)

    def expert_rows(self, x_SD, counts_E):
        w_up, w_down = self.ternary_weights()
        return expert_rows(x_SD, counts_E, self.act_spec, StackedWeights(w_up, w_down))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ternary group={self.group}"
