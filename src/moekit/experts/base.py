"""The Experts seam: one interface for every kind of experts, and a registry by name.

Legend: T tokens, D model width, E experts (on this process), S routed pairs (sorted by expert).

An Experts module holds ``num_experts`` expert functions ``R^D -> R^D`` and answers two calls:

- ``forward(x_TD, plan) -> out_TD``: the layer's call, the routing-weighted combine
  ``out_t = sum_s weight_s * expert_{e_s}(x_t)`` over the plan's pairs (:class:`moekit.dispatch.DispatchPlan`);
- ``expert_rows(x_SD, counts_E) -> y_SD``: unweighted outputs for rows already sorted by expert, ``counts_E``
  rows each (expert parallelism, post-expert norms, calibration).

and ``shard(expert_ids)`` keeps only the given experts (expert parallelism; parameter names unchanged). The
base class implements ``forward`` from ``expert_rows`` with the gather / scatter ops of
:mod:`moekit.dispatch.ops`, so a new kind of experts only needs ``expert_rows``. Experts computed as
``down(act(up(x)))`` with grouped products subclass :class:`GroupedExperts` instead and get the fused forward and
hand-written backward of :class:`moekit.dispatch.fused.FusedExperts`; one that only stores its weights
differently (packed, on disk) overrides the products of :class:`moekit.dispatch.fused.ExpertProducts`.

Registered kinds are chosen by ``MoEConfig.experts`` (default ``"dense"``) with ``MoEConfig.experts_options``;
each is constructed as ``cls(num_experts=E, dim=D, hidden_dim=F, activation=name, init_std=std, **options)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..dispatch.fused import ActivationSpec, ExpertProducts, expert_rows, fused_experts
from ..dispatch.ops import combine, gather
from ..dispatch.plan import DispatchPlan
from ..registry import Registry
from .activations import get_activation

__all__ = ["Experts", "GroupedExperts", "get", "names", "register"]

def register(name: str):
    """Class decorator: make an Experts class available as ``moekit.experts.get(name)`` and as
    ``MoEConfig(experts=name)``."""
    return _EXPERTS.register(name)


def names() -> list[str]:
    """The registered experts names, sorted."""
    return _EXPERTS.names()


def get(name: str) -> type["Experts"]:
    """The Experts class registered as ``name``; ``ValueError`` naming the allowed values otherwise."""
    return _EXPERTS.get(name)


class Experts(nn.Module):
    """Base class of every kind of experts; see the module docstring.

    Subclasses set ``num_experts`` and ``dim`` and implement :meth:`expert_rows`.
    """

    num_experts: int
    dim: int

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``out_TD``: the routing-weighted sum of each token's experts' outputs."""
        y_SD = self.expert_rows(gather(x_TD, plan.token_S), plan.counts_E)
        return combine(y_SD, plan.weight_S, plan.token_S, x_TD.shape[0])

    def expert_rows(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs ``y_SD`` for rows sorted by expert, ``counts_E[e]`` rows for expert ``e``. Must be
        differentiable in ``x_SD`` and in the experts' parameters, also for zero rows."""
        raise NotImplementedError(f"{type(self).__name__} must implement expert_rows(x_SD, counts_E)")

    def expert_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the tensors that hold one slice per expert along dimension 0: the
        ones :meth:`shard` slices and checkpoints gather under expert parallelism. Default: every parameter
        registered directly on this module."""
        return [name for name, _ in self.named_parameters(recurse=False)]

    @torch.no_grad()
    def shard(self, expert_ids: range) -> list[str]:
        """Keep only experts ``expert_ids`` (a contiguous range), renumbered from 0; returns the names of the
        tensors sliced (see :meth:`expert_parameter_names`). Parameter names do not change."""
        if not isinstance(expert_ids, range) or expert_ids.step != 1 or len(expert_ids) == 0 \
                or expert_ids.start < 0 or expert_ids.stop > self.num_experts:
            raise ValueError(f"shard: expert_ids must be a non-empty contiguous range inside "
                             f"[0, {self.num_experts}), got {expert_ids!r}")
        names = self.expert_parameter_names()
        for name in names:
            param = getattr(self, name)
            if param.dim() == 0 or param.shape[0] != self.num_experts:
                raise ValueError(f"shard: {type(self).__name__}.{name} has shape {tuple(param.shape)}, not one "
                                 f"slice per expert along dimension 0")
            setattr(self, name, nn.Parameter(param.detach()[expert_ids.start:expert_ids.stop].clone(),
                                             requires_grad=param.requires_grad))
        self.num_experts = len(expert_ids)
        return names


def set_ffn_shape(experts: nn.Module, num_experts: int, dim: int, hidden_dim: int, activation: str) -> None:
    """The attributes every FFN experts kind carries: ``num_experts``, ``dim``, ``hidden_dim``, ``act`` (the
    activation object), ``activation`` (its name), ``gated``, ``act_spec`` (for the fused path) and ``up_name``
    (``gate_up_proj`` when gated, else ``up_proj``: the transformers name of the up weight)."""
    experts.num_experts, experts.dim, experts.hidden_dim = num_experts, dim, hidden_dim
    experts.act = get_activation(activation)
    experts.activation = experts.act.name
    experts.gated = experts.act.gated
    experts.act_spec = ActivationSpec.from_activation(experts.act)
    experts.up_name = "gate_up_proj" if experts.gated else "up_proj"


_EXPERTS = Registry("experts", Experts)


class GroupedExperts(Experts, ExpertProducts):
    """Experts computed as ``down(act(up(x)))`` per expert with grouped products, through the fused autograd
    function (one node for gather, both products, activation, routing weight and scatter).

    Subclasses set ``act_spec`` (an :class:`moekit.dispatch.fused.ActivationSpec`) and either the stacked
    weights ``w_up`` / ``w_down`` (properties are fine) or their own products (the methods of
    :class:`moekit.dispatch.fused.ExpertProducts`, with :meth:`fused_weights` naming the tensors they
    differentiate).
    """

    act_spec: ActivationSpec
    #: ``"auto"`` (the default), ``"on"`` or ``"off"``: see :meth:`uses_small_batch_path`.
    small_batch: str = "auto"
    #: ``"auto"`` takes the small-batch path when ``rows * small_batch_rows_divisor <= num_experts``
    small_batch_rows_divisor: int = 8
    #: which path the last forward took: ``"grouped"`` or ``"small-batch"``
    last_path: str | None = None

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if self.uses_small_batch_path(x_TD, plan):
            self.__dict__["last_path"] = "small-batch"  # a plain attribute: no nn.Module bookkeeping
            return self.small_batch_forward(x_TD, plan)
        self.__dict__["last_path"] = "grouped"
        w_up, w_down = self.fused_weights()
        return fused_experts(x_TD, plan.token_S, plan.weight_S, plan.expert_S, plan.offsets_E, w_up, w_down,
                             self.act_spec, products=self)

    def _default_products(self) -> bool:
        cls = type(self)
        return all(getattr(cls, name) is getattr(ExpertProducts, name)
                   for name in ("up_product", "down_product", "fused_weights"))

    def uses_small_batch_path(self, x_TD: torch.Tensor, plan: DispatchPlan) -> bool:
        """Whether :meth:`forward` runs :meth:`small_batch_forward` for this plan.

        ``small_batch="off"`` never, ``"on"`` whenever the experts use the default products on stacked weights;
        ``"auto"`` also needs inference (no autograd graph), the CPU, and few rows (at most one per
        ``small_batch_rows_divisor`` experts, so most experts are idle): then a loop over the used experts'
        weight views skips the idle experts the grouped product visits. On CUDA the grouped kernel is kept
        (one launch, no host synchronisation).
        """
        mode = self.small_batch
        if mode == "off" or not self._default_products():
            return False
        if mode == "on":
            return True
        if torch.is_grad_enabled() or x_TD.device.type != "cpu":
            return False
        # rows <= E / 8: at most an eighth of the experts can have rows (measured: a loop wins only there)
        return plan.token_S.shape[0] * self.small_batch_rows_divisor <= self.num_experts

    def small_batch_forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The layer's call as a loop over the experts that have rows: two matrix products per used expert on
        views of the stacked weights (no copy of any weight, nothing done for unused experts). The same
        numbers as the grouped path up to summation order; differentiable through ordinary autograd."""
        w_up_EHD, w_down_EDF = self.w_up, self.w_down
        if self.transposed:
            w_up_EHD, w_down_EDF = w_up_EHD.transpose(1, 2), w_down_EDF.transpose(1, 2)
        token_S = plan.token_S
        x_SD = x_TD.index_select(0, token_S)
        w_S1 = plan.weight_S.to(x_TD.dtype).unsqueeze(-1)
        pieces = []
        start = 0
        for e, n in enumerate(plan.counts_E.tolist()):
            if n:
                stop = start + n
                a_SF = self.act_spec.fn(x_SD[start:stop] @ w_up_EHD[e].t()) * w_S1[start:stop]
                pieces.append(a_SF @ w_down_EDF[e].t())
                start = stop
        if not pieces:
            return torch.zeros_like(x_TD)
        y_SD = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return torch.zeros_like(x_TD).index_add_(0, token_S, y_SD.to(x_TD.dtype))

    def expert_rows(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return expert_rows(x_SD, counts_E, self.act_spec, self)
