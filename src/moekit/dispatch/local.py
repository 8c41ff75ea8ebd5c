"""Local (single-process) dispatch: gather rows by expert, run the experts, scatter weighted rows back.

Legend: T tokens, D model width, F expert hidden width, H = 2F (gated) or F, E experts, S routed pairs
(sorted by expert).

:class:`GroupedGLUDispatch` is one autograd function for the whole dense-expert path
``x_TD -> gather -> up-projection -> activation -> * gate weight -> down-projection -> scatter-add -> out_TD``.
Its backward is written out by hand so that neither pass builds ``T x E`` one-hot tensors nor per-pair
copies of expert weights. It saves only ``h_SH`` (the up-projection output) besides its inputs: the sorted
copy of ``x`` is gathered again in backward instead of being kept, and the activation is recomputed. The
gate weight multiplies the activation (``F`` wide) instead of the expert output (``D`` wide); both give the
same result by linearity, and the gate-weight gradient is ``<dz_s, a_s>`` with ``dz`` the gradient at the
down-projection input.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .grouped import gather_rows, grouped_mm, grouped_wgrad
from .plan import DispatchPlan

if TYPE_CHECKING:
    from ..experts.activations import Activation


def apply_activation(h_SH: torch.Tensor, act: Activation) -> torch.Tensor:
    """``act(gate) * up`` for gated experts (``h = [gate | up]``), ``act(h)`` otherwise; a fresh tensor."""
    if act.gated:
        gate_SF, up_SF = h_SH.chunk(2, dim=-1)
        a_SF = act.fn(gate_SF)
        return a_SF.mul_(up_SF) if a_SF.data_ptr() != gate_SF.data_ptr() else a_SF * up_SF
    a_SF = act.fn(h_SH)
    return a_SF.clone() if a_SF.data_ptr() == h_SH.data_ptr() else a_SF


def _activation_backward(h_SH: torch.Tensor, da_SF: torch.Tensor, act: Activation,
                         act_gate_SF: torch.Tensor | None) -> torch.Tensor:
    """``dh_SH`` from ``da_SF`` (``da_SF`` may be overwritten). ``act_gate_SF`` is ``act(gate)`` (gated only)."""
    if act.backward is None:
        with torch.enable_grad():
            h_leaf = h_SH.detach().requires_grad_(True)
            a_SF = apply_activation(h_leaf, act)
        return torch.autograd.grad(a_SF, h_leaf, da_SF)[0]
    dh_SH = torch.empty_like(h_SH)
    if not act.gated:
        act.backward(da_SF, h_SH, dh_SH)
        return dh_SH
    hidden = h_SH.shape[-1] // 2
    gate_SF, up_SF = h_SH[:, :hidden], h_SH[:, hidden:]
    torch.mul(da_SF, act_gate_SF, out=dh_SH[:, hidden:])  # d up = da * act(gate)
    da_SF.mul_(up_SF)  # d act(gate) = da * up
    act.backward(da_SF, gate_SF, dh_SH[:, :hidden])
    return dh_SH


class GroupedGLUDispatch(torch.autograd.Function):
    """Fused dispatch through dense experts; see the module docstring."""

    @staticmethod
    def forward(ctx, x_TD, token_S, weight_S, offsets_E, w_up_EHD, w_down_EDF, act):
        x_SD = gather_rows(x_TD, token_S, "x")
        h_SH = grouped_mm(x_SD, w_up_EHD.transpose(1, 2), offsets_E)
        del x_SD
        a_SF = apply_activation(h_SH, act)
        a_SF.mul_(weight_S.to(a_SF.dtype).unsqueeze(-1))
        y_SD = grouped_mm(a_SF, w_down_EDF.transpose(1, 2), offsets_E)
        del a_SF
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_S, y_SD)
        ctx.save_for_backward(x_TD, token_S, weight_S, offsets_E, w_up_EHD, w_down_EDF, h_SH)
        ctx.act = act
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, token_S, weight_S, offsets_E, w_up_EHD, w_down_EDF, h_SH = ctx.saved_tensors
        act = ctx.act
        need_x, need_w, need_up, need_down = (ctx.needs_input_grad[i] for i in (0, 2, 4, 5))
        w_S1 = weight_S.to(h_SH.dtype).unsqueeze(-1)
        # Recompute the activation: act(gate) is kept for d up, a = act(gate) * up for the other gradients.
        if act.gated:
            hidden = h_SH.shape[-1] // 2
            act_gate_SF = act.fn(h_SH[:, :hidden])
            a_SF = act_gate_SF * h_SH[:, hidden:]
        else:
            act_gate_SF = None
            a_SF = act.fn(h_SH)
        dy_SD = gather_rows(dout_TD.contiguous(), token_S, "x")
        dz_SF = grouped_mm(dy_SD, w_down_EDF, offsets_E)  # gradient at the down-projection input
        dweight_S = torch.linalg.vecdot(dz_SF, a_SF).to(weight_S.dtype) if need_w else None
        dw_down = grouped_wgrad(dy_SD, a_SF.mul_(w_S1), offsets_E) if need_down else None
        del a_SF, dy_SD
        dh_SH = _activation_backward(h_SH, dz_SF.mul_(w_S1), act, act_gate_SF)
        del dz_SF, act_gate_SF
        dw_up = None
        if need_up:
            x_SD = gather_rows(x_TD, token_S, "x")  # reuses the buffer dy_SD lived in
            dw_up = grouped_wgrad(dh_SH, x_SD, offsets_E)
            del x_SD
        dx_TD = None
        if need_x:
            dx_SD = grouped_mm(dh_SH, w_up_EHD, offsets_E)
            del dh_SH
            dx_TD = torch.zeros_like(x_TD).index_add_(0, token_S, dx_SD)
        return dx_TD, None, dweight_S, None, dw_up, dw_down, None


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
