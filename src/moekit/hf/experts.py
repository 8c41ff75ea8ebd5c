"""moekit's fused grouped dispatch as a transformers experts implementation (``experts_implementation="moekit"``).

Legend: T tokens, D model width, F expert hidden width, H up-projection width (2F gated, F ungated),
E experts, K top-k, S routed pairs (sorted by expert).

transformers 5 decorates each MoE experts module with ``use_experts_implementation``; its forward then looks up
``config._experts_implementation`` in ``ALL_EXPERTS_FUNCTIONS``. :func:`register` adds ``"moekit"`` there, so
``from_pretrained(..., experts_implementation="moekit")`` and ``model.set_experts_implementation("moekit")`` both
route every decorated experts module through :func:`moekit_experts_forward`.

Every variant the decorator describes runs through moekit's one fused function,
:class:`moekit.dispatch.fused.FusedExperts` (the one moekit's own dense experts use): concatenated or interleaved
gate/up (the layout is the module's own ``_apply_gate``'s business, which is called as is so clamped / custom
activations are exact), transposed weights (``[E, D, H]`` / ``[E, F, D]``), per-expert biases, ungated experts
(``up_proj`` + ``act_fn``), and post-expert norms (the function then returns the unweighted expert rows and the
norm, routing weights and scatter run through ordinary autograd). Activations with a fused PyTorch backward
(SiLU, GELU, ReLU behind the default gate) use it (:func:`activation_spec`); any other activation goes through autograd on
a recomputation, including the gradients of parameters the activation module owns.
"""
from __future__ import annotations

import torch
from torch import nn

from ..dispatch.fused import ActivationSpec, StackedWeights, fused_experts
from ..dispatch.ops import combine as combine_rows
from ..dispatch.plan import DispatchPlan, make_plan
from ..experts.activations import ACTIVATIONS, Activation
from ..routing.base import Routing

IMPLEMENTATION_NAME = "moekit"


# ----------------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------------


def make_hf_plan(top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """moekit's dropless :class:`DispatchPlan` from transformers' ``(top_k_index, top_k_weights)``: the routing
    as a :class:`moekit.routing.Routing` through :func:`moekit.dispatch.make_plan`, whose ``foreign_ids`` drops
    the ids ``>= num_experts`` that expert parallelism writes for experts living on other ranks."""
    routing_out = Routing.from_topk(top_k_index_TK, top_k_weights_TK, num_experts)
    return make_plan(routing_out, foreign_ids=True)


# ----------------------------------------------------------------------------------------------------------------
# Activation
# ----------------------------------------------------------------------------------------------------------------


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


def activation_spec(module: nn.Module) -> ActivationSpec:
    """The :class:`ActivationSpec` of a decorated transformers experts module (its ``_apply_gate`` on both halves
    of ``gate_up_proj``'s output, or ``act_fn`` when ungated)."""
    from transformers.integrations.moe import _default_apply_gate

    act_fn = getattr(module, "act_fn", None)
    params = tuple(p for p in act_fn.parameters() if p.requires_grad) if isinstance(act_fn, nn.Module) else ()
    in_place = bool(getattr(act_fn, "inplace", False))  # e.g. nn.SiLU(inplace=True): would overwrite h_SH
    known = None if params or in_place else _known_activation(act_fn)
    fn = module._apply_gate if module.has_gate else act_fn
    if in_place:
        exact = fn
        fn = lambda h_SH: exact(h_SH.clone())  # noqa: E731  (h_SH is saved for backward)
    if module.has_gate:
        apply_gate = type(module)._apply_gate
        default_gate = getattr(apply_gate, "__func__", apply_gate) is _default_apply_gate
        fast = None
        if default_gate and known is not None:
            fast = Activation(f"{known}-glu", _FUSED[known][0], True, _FUSED[known][1])
        return ActivationSpec(fn, fast, params)
    fast = Activation(known, _FUSED[known][0], False, _FUSED[known][1]) if known is not None else None
    return ActivationSpec(fn, fast, params)


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
    act_spec = activation_spec(self)
    combine = not self.has_post_expert_norm
    products = StackedWeights(w_up, w_down, bool(self.is_transposed))
    out = fused_experts(x_TD, plan.token_S, plan.weight_S, plan.expert_S, plan.offsets_E, w_up, w_down, act_spec,
                        b_up=b_up, b_down=b_down, combine=combine, products=products)
    if combine:
        out_TD = out
    else:
        out_TD = combine_rows(self.post_expert_norm(out), plan.weight_S, plan.token_S, x_TD.shape[0])
    return out_TD.to(hidden_states.dtype).reshape(shape)


def register() -> None:
    """Make ``"moekit"`` a valid ``experts_implementation`` in transformers (idempotent).

    ``ExpertsInterface.register`` updates the class-wide mapping behind ``ALL_EXPERTS_FUNCTIONS``, which is what
    both the decorated forwards and ``PreTrainedModel.get_correct_experts_implementation`` consult.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION_NAME) is not moekit_experts_forward:
        ExpertsInterface.register(IMPLEMENTATION_NAME, moekit_experts_forward)
