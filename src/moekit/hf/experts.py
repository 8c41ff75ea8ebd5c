"""moekit's fused grouped dispatch as a transformers experts implementation (``experts_implementation="moekit"``).

Legend: T tokens, D model width, F expert hidden width, H up-projection width (2F gated, F ungated),
E experts, K top-k, S routed pairs (sorted by expert).

transformers 5 decorates each MoE experts module with ``use_experts_implementation``; its forward then looks up
``config._experts_implementation`` in ``ALL_EXPERTS_FUNCTIONS``. :func:`register` adds ``"moekit"`` there, so
``from_pretrained(..., experts_implementation="moekit")`` and ``model.set_experts_implementation("moekit")`` both
route every decorated experts module through :func:`moekit_experts_forward`.

:class:`HFGroupedExperts` generalises :class:`moekit.dispatch.GroupedGLUDispatch` to every variant the decorator
describes: concatenated or interleaved gate/up (the layout is the module's own ``_apply_gate``'s business, which
is called as is so clamped / custom activations are exact), transposed weights (``[E, D, H]`` / ``[E, F, D]``),
per-expert biases, ungated experts (``up_proj`` + ``act_fn``), and post-expert norms (the function then returns
the unweighted expert rows and the norm, routing weights and scatter run through ordinary autograd). Like the core
function it saves only ``h_SH`` besides its inputs, regathers ``x`` in backward and recomputes the activation.
Activations with a fused PyTorch backward (SiLU, GELU, ReLU behind the default gate) use it; any other gate goes
through autograd on a recomputation, including the gradients of parameters the activation module owns.

Could replace the core function later: ``GroupedGLUDispatch`` is the special case ``transposed=False``,
no biases, ``combine=True`` and a moekit :class:`~moekit.experts.activations.Activation` as the gate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..dispatch.grouped import gather_rows, grouped_mm, grouped_wgrad
from ..dispatch.local import _ScatterAddRows
from ..dispatch.plan import DispatchPlan
from ..experts.activations import ACTIVATIONS, Activation

IMPLEMENTATION_NAME = "moekit"


# ----------------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------------


def make_hf_plan(top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """moekit's dropless :class:`DispatchPlan` from transformers' ``(top_k_index, top_k_weights)``.

    Pairs are sorted by expert (stable, so token order is kept inside each expert). Ids ``>= num_experts`` are
    the sentinels expert parallelism writes for experts living on other ranks: they sort to the tail and are
    dropped (``num_dropped`` counts them).
    """
    num_tokens, top_k = top_k_index_TK.shape[0], top_k_index_TK.shape[-1]
    expert_ids_S = top_k_index_TK.reshape(-1)
    weights_S = top_k_weights_TK.reshape(-1)
    num_pairs = expert_ids_S.numel()
    order_S = torch.argsort(expert_ids_S, stable=True)
    routed_E1 = torch.bincount(expert_ids_S.clamp(max=num_experts), minlength=num_experts + 1)
    counts_E = routed_E1[:num_experts]
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    num_kept = int(offsets_E[-1]) if num_experts > 0 else 0
    if num_kept < num_pairs:
        order_S = order_S[:num_kept]
    return DispatchPlan(
        token_S=torch.div(order_S, top_k, rounding_mode="floor"),
        weight_S=weights_S[order_S],
        expert_S=expert_ids_S[order_S],
        counts_E=counts_E,
        offsets_E=offsets_E,
        kept_E=counts_E,
        routed_E=counts_E,
        num_tokens=num_tokens,
        num_pairs=num_pairs,
        num_dropped=num_pairs - num_kept,
        capacity=None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Gate / activation
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSpec:
    """How ``h_SH -> a_SF`` is computed.

    ``fn`` is the exact forward (the module's ``_apply_gate`` for gated experts, its ``act_fn`` otherwise).
    ``fast`` is a moekit :class:`Activation` with a fused backward when ``fn`` is known to equal it (default
    concatenated gate with SiLU/GELU/ReLU, or such a plain activation); ``None`` means autograd on a
    recomputation of ``fn``. ``params`` are trainable tensors ``fn`` reads (an activation with parameters).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    fast: Activation | None
    params: tuple[torch.Tensor, ...] = ()


# moekit's fused backward kernels (``aten.*_backward`` writing into an ``out`` slice), keyed by activation.
_FUSED = {
    "silu": (nn.functional.silu, ACTIVATIONS["swiglu"].backward),
    "gelu": (nn.functional.gelu, ACTIVATIONS["gelu"].backward),
    "relu": (nn.functional.relu, ACTIVATIONS["relu"].backward),
}


def _known_activation(act_fn) -> str | None:
    """Key of ``_FUSED`` for a transformers activation module computing exactly that function, else None."""
    if act_fn is None:
        return None
    if act_fn in (nn.functional.silu, nn.functional.gelu, nn.functional.relu):  # plain functions
        return act_fn.__name__
    name = type(act_fn).__name__
    if isinstance(act_fn, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if type(act_fn) is nn.GELU and act_fn.approximate == "none":
        return "gelu"
    if name == "GELUActivation" and getattr(act_fn, "act", None) is nn.functional.gelu:
        return "gelu"
    if type(act_fn) is nn.ReLU:
        return "relu"
    return None


def gate_spec(module: nn.Module) -> GateSpec:
    """The :class:`GateSpec` of a decorated transformers experts module."""
    from transformers.integrations.moe import _default_apply_gate

    act_fn = getattr(module, "act_fn", None)
    params = tuple(p for p in act_fn.parameters() if p.requires_grad) if isinstance(act_fn, nn.Module) else ()
    known = None if params else _known_activation(act_fn)
    if module.has_gate:
        apply_gate = type(module)._apply_gate
        default_gate = getattr(apply_gate, "__func__", apply_gate) is _default_apply_gate
        fast = None
        if default_gate and known is not None:
            fast = Activation(f"{known}-glu", _FUSED[known][0], True, _FUSED[known][1])
        return GateSpec(module._apply_gate, fast, params)
    fast = Activation(known, _FUSED[known][0], False, _FUSED[known][1]) if known is not None else None
    return GateSpec(act_fn, fast, params)


def _gate_forward(h_SH: torch.Tensor, gate: GateSpec) -> torch.Tensor:
    """``a_SF`` as a fresh tensor (safe to modify in place)."""
    a_SF = gate.fn(h_SH)
    aliases = a_SF.untyped_storage().data_ptr() == h_SH.untyped_storage().data_ptr()
    return a_SF.clone() if aliases else a_SF


def _gate_backward(h_SH: torch.Tensor, da_SF: torch.Tensor, gate: GateSpec,
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
    torch.mul(da_SF, fast.fn(gate_SF), out=dh_SH[:, hidden:])  # d up = da * act(gate)
    da_SF.mul_(up_SF)  # d act(gate) = da * up
    fast.backward(da_SF, gate_SF, dh_SH[:, :hidden])
    return dh_SH, ()


# ----------------------------------------------------------------------------------------------------------------
# Fused autograd function
# ----------------------------------------------------------------------------------------------------------------


def _bias_rows(b_EY: torch.Tensor, expert_S: torch.Tensor, slot: str) -> torch.Tensor:
    """``b_EY[expert_S]`` (transient workspace copy)."""
    return gather_rows(b_EY, expert_S, slot)


def _bias_grad(dy_SY: torch.Tensor, expert_S: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E, Y]``: per-expert sum of ``dy`` rows."""
    return dy_SY.new_zeros(num_experts, dy_SY.shape[1]).index_add_(0, expert_S, dy_SY)


class HFGroupedExperts(torch.autograd.Function):
    """Gather -> up (+bias) -> gate -> (x weight) -> down (+bias) -> (scatter-add), one autograd node.

    Weights in transformers' layout: ``w_up`` is ``[E, H, D]`` (``[E, D, H]`` when ``transposed``), ``w_down``
    ``[E, D, F]`` (``[E, F, D]``). With ``combine`` the routing weight multiplies the activation (and the down
    bias) and rows are scatter-added into ``out_TD``; without it the unweighted ``y_SD`` is returned (for a
    post-expert norm) and ``weight_S`` is ignored. ``gate_params`` are the gate's own trainable tensors.
    """

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
            a_SF = _gate_forward(h_SH, gate)
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
        ctx.has_up_bias = b_up_EH is not None
        if not combine:
            return y_SD
        return torch.zeros_like(x_TD).index_add_(0, token_S, y_SD)

    @staticmethod
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
            a_SF = _gate_forward(h_SH, gate)
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
        dh_SH, dparams = _gate_backward(h_SH, dz_SF, gate, need_params)
        del dz_SF
        db_up = _bias_grad(dh_SH, expert_S, num_experts) if need_bup else None
        dw_up = None
        if need_up:
            x_SD = gather_rows(x_TD, token_S, "x")
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


# ----------------------------------------------------------------------------------------------------------------
# transformers entry point
# ----------------------------------------------------------------------------------------------------------------


def moekit_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward (``ExpertsInterface`` signature) running moekit's fused grouped dispatch.

    ``self`` is a module decorated with ``use_experts_implementation``; its flags (``has_gate``, ``has_bias``,
    ``is_transposed``, ``is_concatenated``, ``has_post_expert_norm``) pick the weights and the path.
    """
    shape = hidden_states.shape
    x_TD = hidden_states.reshape(-1, shape[-1])
    num_experts = self.num_experts
    top_k_index_TK = top_k_index.reshape(x_TD.shape[0], -1)
    top_k_weights_TK = top_k_weights.reshape(x_TD.shape[0], -1)
    plan = make_hf_plan(top_k_index_TK, top_k_weights_TK, num_experts)
    if self.has_gate:
        w_up = self.gate_up_proj
        b_up = self.gate_up_proj_bias if self.has_bias else None
    else:
        w_up = self.up_proj
        b_up = self.up_proj_bias if self.has_bias else None
    b_down = self.down_proj_bias if self.has_bias else None
    w_down = self.down_proj
    x_TD = x_TD.to(w_up.dtype)
    gate = gate_spec(self)
    transposed = bool(self.is_transposed)
    if not self.has_post_expert_norm:
        out_TD = HFGroupedExperts.apply(x_TD, plan.token_S, plan.weight_S, plan.expert_S, plan.offsets_E, w_up,
                                        b_up, w_down, b_down, gate, transposed, True, *gate.params)
    else:
        y_SD = HFGroupedExperts.apply(x_TD, plan.token_S, plan.weight_S, plan.expert_S, plan.offsets_E, w_up,
                                      b_up, w_down, b_down, gate, transposed, False, *gate.params)
        y_SD = self.post_expert_norm(y_SD)
        y_SD = y_SD * plan.weight_S.to(y_SD.dtype).unsqueeze(-1)
        out_TD = _ScatterAddRows.apply(y_SD, plan.token_S, x_TD.shape[0])
    return out_TD.to(hidden_states.dtype).reshape(shape)


def register() -> None:
    """Make ``"moekit"`` a valid ``experts_implementation`` in transformers (idempotent).

    ``ExpertsInterface.register`` updates the class-wide mapping behind ``ALL_EXPERTS_FUNCTIONS``, which is what
    both the decorated forwards and ``PreTrainedModel.get_correct_experts_implementation`` consult.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION_NAME) is not moekit_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION_NAME, moekit_experts_forward)
