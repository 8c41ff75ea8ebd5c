"""One autograd function for the whole expert path: gather -> up (+bias) -> activation -> x routing weight ->
down (+bias) -> scatter-add.

Legend: see docs/architecture.md (T tokens, D model width, F expert hidden width, H up-projection width: 2F
gated, F ungated, E experts, S routed pairs sorted by expert).

:class:`FusedExperts` serves moekit's own dense experts, any Experts that only stores its weights differently
(it overrides the six products of :class:`ExpertProducts`), and every transformers experts class
(:mod:`moekit.hf.experts`, through :class:`StackedWeights`): weights in the transformers layout,
``w_up [E, H, D]`` and ``w_down [E, D, F]``, or transposed (``[E, D, H]`` / ``[E, F, D]``); optional per-expert
biases; any activation (an :class:`ActivationSpec`: moekit's activations with their fused backward kernels, or
an arbitrary function differentiated by autograd on a recomputation, including the gradients of parameters it
owns). With ``combine`` the routing weight multiplies the activation (``F`` wide, instead of the ``D``-wide
output: the same by linearity) and rows are scatter-added into ``out_TD``; without it the unweighted ``y_SD``
comes back (post-expert norms, expert parallelism).

The backward is written out by hand: neither pass builds ``T x E`` one-hot tensors nor per-pair copies of
expert weights. Only ``h_SH`` (the up-projection output) is saved besides the inputs: the sorted copy of ``x``
is gathered again in backward instead of being kept, and the activation is recomputed. The routing-weight
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
    """``act(gate half) * up half`` for ``h = [gate half | up half]`` (a module-level callable, so experts holding
    it pickle)."""

    act: Activation

    def __call__(self, h_SH: torch.Tensor) -> torch.Tensor:
        gate_SF, up_SF = h_SH.chunk(2, dim=-1)
        return self.act.fn(gate_SF) * up_SF


@dataclass(frozen=True)
class ActivationSpec:
    """How the expert activation ``h_SH -> a_SF`` is computed (for gated experts, from both halves of ``h``).

    ``fn`` is the exact forward. ``fast`` is a moekit :class:`Activation` with a fused backward when ``fn`` is
    known to equal it (``fast.fn(gate) * up`` for gated activations, ``fast.fn(h)`` otherwise); ``None`` means
    autograd on a recomputation of ``fn``. ``params`` are trainable tensors ``fn`` reads (autograd path only).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    fast: Activation | None
    params: tuple[torch.Tensor, ...] = ()

    def __post_init__(self):
        if self.fast is not None and self.params:
            raise ValueError("an activation with trainable parameters needs the autograd path (fast=None)")

    @classmethod
    def from_activation(cls, act: Activation) -> "ActivationSpec":
        """The activation spec of moekit's dense experts."""
        fn = GatedActivation(act) if act.gated else act.fn
        return cls(fn, act if act.backward is not None else None)


def _act_forward(h_SH: torch.Tensor, spec: ActivationSpec,
                  keep_act_gate: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(a_SF, act(gate)_SF)``: ``a_SF`` a fresh tensor (safe to modify in place); the second, for the backward
    of fast gated activations, only with ``keep_act_gate`` (else None, and ``a_SF`` is computed in place)."""
    fast = spec.fast
    if fast is not None and fast.gated:
        hidden = h_SH.shape[-1] // 2
        act_gate_SF = fast.fn(h_SH[:, :hidden])
        if keep_act_gate or _shares_storage(act_gate_SF, h_SH):  # never write into h_SH (it is saved)
            return act_gate_SF * h_SH[:, hidden:], (act_gate_SF if keep_act_gate else None)
        return act_gate_SF.mul_(h_SH[:, hidden:]), None
    a_SF = spec.fn(h_SH)
    return (a_SF.clone() if _shares_storage(a_SF, h_SH) else a_SF), None


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _act_backward(h_SH: torch.Tensor, da_SF: torch.Tensor, spec: ActivationSpec, act_gate_SF: torch.Tensor | None,
                  need_params: bool) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """``dh_SH`` (and gradients of the activation's parameters) from ``da_SF``; ``da_SF`` may be overwritten."""
    fast = spec.fast
    if fast is None:
        with torch.enable_grad():
            h_leaf = h_SH.detach().requires_grad_(True)
            a_SF = spec.fn(h_leaf)
            params = spec.params if need_params else ()
            grads = torch.autograd.grad(a_SF, (h_leaf, *params), da_SF, allow_unused=True)
        param_grads = tuple(grads[1:]) if need_params else (None,) * len(spec.params)
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


class ExpertProducts:
    """The six grouped products of the fused expert path, over rows sorted by expert (``offsets_E`` as for
    ``torch._grouped_mm``).

    The defaults multiply by stacked weights ``w_up`` / ``w_down`` in the transformers layout (``[E, H, D]`` and
    ``[E, D, F]``, or ``[E, D, H]`` / ``[E, F, D]`` when ``transposed``). An Experts class that stores its weights
    in another form (packed low-bit, memory-mapped, scaled) overrides these methods and keeps the fused forward
    and hand-written backward of :class:`FusedExperts`. The weight gradients are returned in the layout of the
    tensors :meth:`fused_weights` gives (those are what autograd credits them to).
    """

    w_up: torch.Tensor
    w_down: torch.Tensor
    transposed: bool = False

    def fused_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(up, down)``: the tensors whose gradients :meth:`up_weight_grad` / :meth:`down_weight_grad` return
        (None: nothing to differentiate, e.g. frozen packed weights)."""
        return self.w_up, self.w_down

    def up_product(self, x_SD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """``h_SH``: each expert's rows times its up projection."""
        w = self.w_up
        return grouped_mm(x_SD, w if self.transposed else w.transpose(1, 2), offsets_E)

    def down_product(self, a_SF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """``y_SD``: each expert's activations times its down projection."""
        w = self.w_down
        return grouped_mm(a_SF, w if self.transposed else w.transpose(1, 2), offsets_E)

    def up_input_grad(self, dh_SH: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """``dx_SD = dh_SH @ W_up`` per expert."""
        w = self.w_up
        return grouped_mm(dh_SH, w.transpose(1, 2) if self.transposed else w, offsets_E)

    def down_input_grad(self, dy_SD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """``dz_SF = dy_SD @ W_down`` per expert (the gradient at the down projection's input)."""
        w = self.w_down
        return grouped_mm(dy_SD, w.transpose(1, 2) if self.transposed else w, offsets_E)

    def up_weight_grad(self, dh_SH: torch.Tensor, x_SD: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Gradient of the up weight (``[E, H, D]``, or ``[E, D, H]`` when transposed)."""
        dw_EHD = grouped_wgrad(dh_SH, x_SD, offsets_E)
        return dw_EHD.transpose(1, 2).contiguous() if self.transposed else dw_EHD

    def down_weight_grad(self, dy_SD: torch.Tensor, a_SF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """Gradient of the down weight (``[E, D, F]``, or ``[E, F, D]`` when transposed)."""
        dw_EDF = grouped_wgrad(dy_SD, a_SF, offsets_E)
        return dw_EDF.transpose(1, 2).contiguous() if self.transposed else dw_EDF


class StackedWeights(ExpertProducts):
    """:class:`ExpertProducts` over two given stacked weight tensors (transformers experts modules, slices of
    moekit's weights)."""

    def __init__(self, w_up: torch.Tensor, w_down: torch.Tensor, transposed: bool = False):
        self.w_up, self.w_down, self.transposed = w_up, w_down, transposed


class FusedExperts(torch.autograd.Function):
    """See the module docstring. Arguments: ``x_TD, token_S, weight_S, expert_S, offsets_E, products, b_up_EH,
    b_down_ED, act_spec, combine, w_up, w_down, *act_spec.params``: ``products`` an :class:`ExpertProducts`,
    ``w_up`` / ``w_down`` its :meth:`~ExpertProducts.fused_weights` (passed so that autograd credits their
    gradients; may be None); biases may be None; ``expert_S`` is read only for the biases; ``weight_S`` is
    ignored without ``combine``."""

    @staticmethod
    def forward(ctx, x_TD, token_S, weight_S, expert_S, offsets_E, products, b_up_EH, b_down_ED, act_spec, combine,
                w_up, w_down, *act_params):
        num_experts = offsets_E.shape[0]
        x_SD = gather_rows(x_TD, token_S, "x")
        h_SH = products.up_product(x_SD, offsets_E)
        del x_SD
        if b_up_EH is not None:
            h_SH.add_(_bias_rows(b_up_EH, expert_S, "bias"))
        with torch.no_grad():
            a_SF, _ = _act_forward(h_SH, act_spec)
        if combine:
            w_S1 = weight_S.to(a_SF.dtype).unsqueeze(-1)
            a_SF.mul_(w_S1)
        y_SD = products.down_product(a_SF, offsets_E)
        del a_SF
        if b_down_ED is not None:
            b_SD = _bias_rows(b_down_ED, expert_S, "bias")
            if combine:
                y_SD.addcmul_(b_SD, w_S1)
            else:
                y_SD.add_(b_SD)
        ctx.save_for_backward(x_TD, token_S, weight_S, expert_S, offsets_E, h_SH, b_down_ED)
        ctx.products, ctx.act_spec, ctx.combine = products, act_spec, combine
        ctx.num_experts = num_experts
        if not combine:
            return y_SD
        return torch.zeros_like(x_TD).index_add_(0, token_S, y_SD)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x_TD, token_S, weight_S, expert_S, offsets_E, h_SH, b_down_ED = ctx.saved_tensors
        products, act_spec, combine, num_experts = ctx.products, ctx.act_spec, ctx.combine, ctx.num_experts
        needs = ctx.needs_input_grad
        need_x, need_w, need_bup, need_bdown, need_up, need_down = (needs[i] for i in (0, 2, 6, 7, 10, 11))
        need_params = any(needs[12:])
        # dy_SD: gradient at the (unweighted when combine) expert output rows.
        dy_SD = gather_rows(dout.contiguous(), token_S, "x") if combine else dout.contiguous()
        with torch.no_grad():
            a_SF, act_gate_SF = _act_forward(h_SH, act_spec, keep_act_gate=True)
        dz_SF = products.down_input_grad(dy_SD, offsets_E)  # gradient at the down-projection input (unweighted)
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
        dw_down = products.down_weight_grad(dy_SD, a_SF, offsets_E) if need_down else None
        del a_SF, dy_SD
        dh_SH, dparams = _act_backward(h_SH, dz_SF, act_spec, act_gate_SF, need_params)
        del dz_SF, act_gate_SF
        db_up = _bias_grad(dh_SH, expert_S, num_experts) if need_bup else None
        dw_up = None
        if need_up:
            x_SD = gather_rows(x_TD, token_S, "x")  # reuses the buffer dy_SD lived in
            dw_up = products.up_weight_grad(dh_SH, x_SD, offsets_E)
            del x_SD
        dx_TD = None
        if need_x:
            dx_SD = products.up_input_grad(dh_SH, offsets_E)
            del dh_SH
            dx_TD = torch.zeros_like(x_TD).index_add_(0, token_S, dx_SD)
        return (dx_TD, None, dweight_S, None, None, None, db_up, db_down, None, None, dw_up, dw_down, *dparams)


def fused_experts(x_TD, token_S, weight_S, expert_S, offsets_E, w_up, w_down, act_spec: ActivationSpec, *,
                  b_up=None, b_down=None, transposed: bool = False, combine: bool = True,
                  products: ExpertProducts | None = None) -> torch.Tensor:
    """Keyword-friendly entry to :class:`FusedExperts`. ``products`` defaults to :class:`StackedWeights` over
    ``w_up`` / ``w_down``; when given, ``w_up`` / ``w_down`` must be its ``fused_weights()``."""
    if products is None:
        products = StackedWeights(w_up, w_down, transposed)
    return FusedExperts.apply(x_TD, token_S, weight_S, expert_S, offsets_E, products, b_up, b_down, act_spec,
                              combine, w_up, w_down, *act_spec.params)


def expert_rows(x_SD: torch.Tensor, counts_E: torch.Tensor, act_spec: ActivationSpec,
                products: ExpertProducts) -> torch.Tensor:
    """Unweighted expert outputs for rows sorted by expert (``counts_E`` each), through ``products``."""
    w_up, w_down = products.fused_weights()
    num_rows = x_SD.shape[0]
    if num_rows == 0:  # still a function of the weights, so that they get (zero) gradients
        out_SD = x_SD.new_zeros(0, x_SD.shape[1])
        for w in (w_up, w_down):
            if w is not None:
                out_SD = out_SD + 0 * w.sum()
        return out_SD
    rows_S = torch.arange(num_rows, device=x_SD.device)
    offsets_E = torch.cumsum(counts_E.to(x_SD.device), 0).to(torch.int32)
    return fused_experts(x_SD, rows_S, None, None, offsets_E, w_up, w_down, act_spec, combine=False,
                         products=products)
