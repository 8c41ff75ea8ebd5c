"""One autograd function for the whole expert path: gather -> up (+bias) -> gate -> x weight -> down (+bias) ->
scatter-add.

Legend: T tokens, D model width, F expert hidden width, H up-projection width (2F gated, F ungated), E experts,
S routed pairs (sorted by expert).

:class:`FusedExperts` serves moekit's own dense experts and every transformers experts class
(:mod:`moekit.hf.experts`): weights in the transformers layout, ``w_up [E, H, D]`` and ``w_down [E, D, F]``, or
transposed (``[E, D, H]`` / ``[E, F, D]``); optional per-expert biases; any gate (a :class:`GateSpec`: moekit's
activations with their fused backward kernels, or an arbitrary function differentiated by autograd on a
recomputation, including the gradients of parameters it owns). With ``combine`` the routing weight multiplies
the activation (``F`` wide, instead of the ``D``-wide output: the same by linearity) and rows are scatter-added
into ``out_TD``; without it the unweighted ``y_SD`` comes back (post-expert norms, expert parallelism).

The backward is written out by hand: neither pass builds ``T x E`` one-hot tensors nor per-pair copies of
expert weights. Only ``h_SH`` (the up-projection output) is saved besides the inputs: the sorted copy of ``x``
is gathered again in backward instead of being kept, and the activation is recomputed. The gate-weight
gradient is ``<dz_s, a_s>`` with ``dz`` the gradient at the down-projection input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch.autograd.function import once_differentiable

from .grouped import gather_rows, grouped_mm, grouped_wgrad

if TYPE_CHECKING:
    from ..experts.activations import Activation


@dataclass(frozen=True)
class GatedActivation:
    """``act(gate) * up`` for ``h = [gate | up]`` (a module-level callable, so experts holding it pickle)."""

    act: Activation

    def __call__(self, h_SH: torch.Tensor) -> torch.Tensor:
        gate_SF, up_SF = h_SH.chunk(2, dim=-1)
        return self.act.fn(gate_SF) * up_SF


@dataclass(frozen=True)
class GateSpec:
    """How ``h_SH -> a_SF`` is computed.

    ``fn`` is the exact forward. ``fast`` is a moekit :class:`Activation` with a fused backward when ``fn`` is
    known to equal it (``fast.fn(gate) * up`` for gated activations, ``fast.fn(h)`` otherwise); ``None`` means
    autograd on a recomputation of ``fn``. ``params`` are trainable tensors ``fn`` reads (autograd path only).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    fast: Activation | None
    params: tuple[torch.Tensor, ...] = ()

    def __post_init__(self):
        if self.fast is not None and self.params:
            raise ValueError("a gate with trainable parameters needs the autograd path (fast=None)")

    @classmethod
    def from_activation(cls, act: Activation) -> "GateSpec":
        """The gate of moekit's dense experts."""
        fn = GatedActivation(act) if act.gated else act.fn
        return cls(fn, act if act.backward is not None else None)


def _gate_forward(h_SH: torch.Tensor, gate: GateSpec,
                  keep_act_gate: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(a_SF, act(gate)_SF)``: ``a_SF`` a fresh tensor (safe to modify in place); the second, for the backward
    of fast gated activations, only with ``keep_act_gate`` (else None, and ``a_SF`` is computed in place)."""
    fast = gate.fast
    if fast is not None and fast.gated:
        hidden = h_SH.shape[-1] // 2
        act_gate_SF = fast.fn(h_SH[:, :hidden])
        if keep_act_gate or _shares_storage(act_gate_SF, h_SH):  # never write into h_SH (it is saved)
            return act_gate_SF * h_SH[:, hidden:], (act_gate_SF if keep_act_gate else None)
        return act_gate_SF.mul_(h_SH[:, hidden:]), None
    a_SF = gate.fn(h_SH)
    return (a_SF.clone() if _shares_storage(a_SF, h_SH) else a_SF), None


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _gate_backward(h_SH: torch.Tensor, da_SF: torch.Tensor, gate: GateSpec, act_gate_SF: torch.Tensor | None,
                   need_params: bool) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """``dh_SH`` (and gradients of the gate's parameters) from ``da_SF``; ``da_SF`` may be overwritten."""
    fast = gate.fast
    if fast is None:
        with torch.enable_grad():
            h_leaf = h_SH.detach().requires_grad_(True)
            a_SF = gate.fn(h_leaf)
            params = gate.params if need_params else ()
            grads = torch.autograd.grad(a_SF, (h_leaf, *params), da_SF, allow_unused=True)
        param_grads = tuple(grads[1:]) if need_params else (None,) * len(gate.params)
        return grads[0], param_grads
    dh_SH = torch.empty_like(h_SH)
    if not fast.gated:
        fast.backward(da_SF, h_SH, dh_SH)
        return dh_SH, ()
    hidden = h_SH.shape[-1] // 2
    gate_SF, up_SF = h_SH[:, :hidden], h_SH[:, hidden:]
    torch.mul(da_SF, act_gate_SF, out=dh_SH[:, hidden:])  # d up = da * act(gate)
    da_SF.mul_(up_SF)  # d act(gate) = da * up
    fast.backward(da_SF, gate_SF, dh_SH[:, :hidden])
    return dh_SH, ()


def _bias_rows(b_EY: torch.Tensor, expert_S: torch.Tensor, slot: str) -> torch.Tensor:
    """``b_EY[expert_S]`` (transient workspace copy)."""
    return gather_rows(b_EY, expert_S, slot)


def _bias_grad(dy_SY: torch.Tensor, expert_S: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E, Y]``: per-expert sum of ``dy`` rows."""
    return dy_SY.new_zeros(num_experts, dy_SY.shape[1]).index_add_(0, expert_S, dy_SY)


class FusedExperts(torch.autograd.Function):
    """See the module docstring. Arguments: ``x_TD, token_S, weight_S, expert_S, offsets_E, w_up, b_up_EH,
    w_down, b_down_ED, gate, transposed, combine, *gate.params`` (biases may be None; ``expert_S`` is read only
    for the biases; ``weight_S`` is ignored without ``combine``)."""

    @staticmethod
    def forward(ctx, x_TD, token_S, weight_S, expert_S, offsets_E, w_up, b_up_EH, w_down, b_down_ED,
                gate, transposed, combine, *gate_params):
        num_experts = offsets_E.shape[0]
        w_up_EDH = w_up if transposed else w_up.transpose(1, 2)
        w_down_EFD = w_down if transposed else w_down.transpose(1, 2)
        x_SD = gather_rows(x_TD, token_S, "x")
        h_SH = grouped_mm(x_SD, w_up_EDH, offsets_E)
        del x_SD
        if b_up_EH is not None:
            h_SH.add_(_bias_rows(b_up_EH, expert_S, "bias"))
        with torch.no_grad():
            a_SF, _ = _gate_forward(h_SH, gate)
        if combine:
            w_S1 = weight_S.to(a_SF.dtype).unsqueeze(-1)
            a_SF.mul_(w_S1)
        y_SD = grouped_mm(a_SF, w_down_EFD, offsets_E)
        del a_SF
        if b_down_ED is not None:
            b_SD = _bias_rows(b_down_ED, expert_S, "bias")
            if combine:
                y_SD.addcmul_(b_SD, w_S1)
            else:
                y_SD.add_(b_SD)
        ctx.save_for_backward(x_TD, token_S, weight_S, expert_S, offsets_E, w_up, w_down, h_SH, b_down_ED)
        ctx.gate, ctx.transposed, ctx.combine = gate, transposed, combine
        ctx.num_experts = num_experts
        if not combine:
            return y_SD
        return torch.zeros_like(x_TD).index_add_(0, token_S, y_SD)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x_TD, token_S, weight_S, expert_S, offsets_E, w_up, w_down, h_SH, b_down_ED = ctx.saved_tensors
        gate, transposed, combine, num_experts = ctx.gate, ctx.transposed, ctx.combine, ctx.num_experts
        needs = ctx.needs_input_grad
        need_x, need_w, need_up, need_bup, need_down, need_bdown = (needs[i] for i in (0, 2, 5, 6, 7, 8))
        need_params = any(needs[12:])
        # dy_SD: gradient at the (unweighted when combine) expert output rows.
        dy_SD = gather_rows(dout.contiguous(), token_S, "x") if combine else dout.contiguous()
        w_down_EDF = w_down.transpose(1, 2) if transposed else w_down
        with torch.no_grad():
            a_SF, act_gate_SF = _gate_forward(h_SH, gate, keep_act_gate=True)
        dz_SF = grouped_mm(dy_SD, w_down_EDF, offsets_E)  # gradient at the down-projection input (unweighted)
        dweight_S = None
        if combine:
            w_S1 = weight_S.to(h_SH.dtype).unsqueeze(-1)
            if need_w:
                dweight_S = torch.linalg.vecdot(dz_SF, a_SF)
                if b_down_ED is not None:
                    dweight_S += torch.linalg.vecdot(dy_SD, _bias_rows(b_down_ED, expert_S, "bias"))
                dweight_S = dweight_S.to(weight_S.dtype)
            a_SF.mul_(w_S1)
            dz_SF.mul_(w_S1)
        db_down = None
        if need_bdown:
            db_down = _bias_grad(dy_SD * w_S1 if combine else dy_SD, expert_S, num_experts)
        dw_down = None
        if need_down:
            dw_down_EDF = grouped_wgrad(dy_SD, a_SF, offsets_E)
            dw_down = dw_down_EDF.transpose(1, 2).contiguous() if transposed else dw_down_EDF
        del a_SF, dy_SD
        dh_SH, dparams = _gate_backward(h_SH, dz_SF, gate, act_gate_SF, need_params)
        del dz_SF, act_gate_SF
        db_up = _bias_grad(dh_SH, expert_S, num_experts) if need_bup else None
        dw_up = None
        if need_up:
            x_SD = gather_rows(x_TD, token_S, "x")  # reuses the buffer dy_SD lived in
            dw_up_EHD = grouped_wgrad(dh_SH, x_SD, offsets_E)
            dw_up = dw_up_EHD.transpose(1, 2).contiguous() if transposed else dw_up_EHD
            del x_SD
        dx_TD = None
        if need_x:
            w_up_EHD = w_up.transpose(1, 2) if transposed else w_up
            dx_SD = grouped_mm(dh_SH, w_up_EHD, offsets_E)
            del dh_SH
            dx_TD = torch.zeros_like(x_TD).index_add_(0, token_S, dx_SD)
        return (dx_TD, None, dweight_S, None, None, dw_up, db_up, dw_down, db_down, None, None, None, *dparams)


def fused_experts(x_TD, token_S, weight_S, expert_S, offsets_E, w_up, w_down, gate: GateSpec, *, b_up=None,
                  b_down=None, transposed: bool = False, combine: bool = True) -> torch.Tensor:
    """Keyword-friendly entry to :class:`FusedExperts` (see its argument list)."""
    return FusedExperts.apply(x_TD, token_S, weight_S, expert_S, offsets_E, w_up, b_up, w_down, b_down, gate,
                              transposed, combine, *gate.params)


def expert_rows(x_SD: torch.Tensor, w_up_EHD: torch.Tensor, w_down_EDF: torch.Tensor, counts_E: torch.Tensor,
                gate: GateSpec) -> torch.Tensor:
    """Unweighted outputs of the experts whose weights are given, for rows sorted by expert (``counts_E`` each)."""
    num_rows = x_SD.shape[0]
    if num_rows == 0:  # still a function of the weights, so that they get (zero) gradients
        return x_SD.new_zeros(0, w_down_EDF.shape[1]) + 0 * (w_up_EHD.sum() + w_down_EDF.sum())
    rows_S = torch.arange(num_rows, device=x_SD.device)
    offsets_E = torch.cumsum(counts_E.to(x_SD.device), 0).to(torch.int32)
    return fused_experts(x_SD, rows_S, None, None, offsets_E, w_up_EHD, w_down_EDF, gate, combine=False)
