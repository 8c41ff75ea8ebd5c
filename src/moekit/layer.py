"""The MoE layer: Router -> Routing -> DispatchPlan -> Experts -> combine (+ shared experts).

Legend: T tokens, D model width, E experts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import balance, routing
from .config import MoEConfig
from .dispatch.local import dispatch_local
from .dispatch.plan import make_plan
from .experts.dense import DenseExperts
from .experts.shared import SharedExpert
from .routing.base import Routing, RoutingContext


@dataclass
class LoadStats:
    """Load statistics of one forward call: assignments per expert before dropping, after dropping."""

    routed_E: torch.Tensor
    kept_E: torch.Tensor
    num_pairs: int
    num_dropped: int

    @property
    def max_violation(self) -> float:
        """MaxVio of the routed load: (max - mean) / mean."""
        return balance.max_violation(self.routed_E)

    @property
    def dropped_fraction(self) -> float:
        return self.num_dropped / self.num_pairs if self.num_pairs else 0.0


class MoE(nn.Module):
    """A sparse Mixture-of-Experts FFN: ``forward(x[..., dim]) -> [..., dim]``.

    After each call: ``aux_losses`` (dict of named scalar tensors, coefficient applied), ``aux_loss`` (their
    sum, or None), ``last_routing`` (the :class:`Routing`) and ``load`` (:class:`LoadStats`: tokens per
    expert, MaxVio, fraction dropped). Parameter names follow Hugging Face transformers 5
    (``gate.weight [E, D]``, ``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``,
    ``shared_expert.*``, ``shared_expert_gate.weight``), so OLMoE / Mixtral / Qwen2-MoE block state dicts load
    directly.

    NaN in the input propagates to the output rows of the affected tokens; nothing raises.
    """

    def __init__(self, config: MoEConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = MoEConfig(**kwargs)
        elif kwargs:
            raise ValueError("pass either a MoEConfig or keyword settings, not both")
        self.config = config
        router_cls = routing.get(config.router)
        self.gate = router_cls(dim=config.dim, num_experts=config.num_experts, top_k=config.top_k,
                               **config.router_kwargs())
        self.experts = DenseExperts(config.num_experts, config.dim, config.hidden_dim, config.activation,
                                    init_std=config.init_std)
        if config.num_shared_experts > 0:
            width = config.num_shared_experts * (config.shared_hidden_dim or config.hidden_dim)
            self.shared_expert = SharedExpert(config.dim, width, config.activation, init_std=config.init_std)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.dim, 1, bias=False)
                nn.init.normal_(self.shared_expert_gate.weight, std=config.init_std)
        self.dispatcher = None  # None: local dispatch; an AllToAllDispatcher under expert parallelism
        self.data_parallel_size = 1  # ranks whose losses are summed (moekit.parallel sets it)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_routing: Routing | None = None
        self.load: LoadStats | None = None
        self._warned_unbalanced = False

    @property
    def aux_loss(self) -> torch.Tensor | None:
        if not self.aux_losses:
            return None
        return sum(self.aux_losses.values())

    @property
    def moekit_router(self) -> routing.Router:
        """The router whose losses and ``end_step`` :func:`aux_loss` / :func:`end_step` look after."""
        return self.gate

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.config.dim:
            raise ValueError(f"x must have shape [..., dim={self.config.dim}], got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        self._check_input(x)
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        if not x_TD.is_contiguous():
            x_TD = x_TD.contiguous()
        if ctx is None:
            ctx = RoutingContext(batch_shape=tuple(shape[:-1]))
        elif ctx.batch_shape is None:
            ctx.batch_shape = tuple(shape[:-1])
        if self.training and not self._warned_unbalanced:
            self._warned_unbalanced = True
            if self.gate.learned and not self.gate.has_balancing() and torch.is_grad_enabled():
                warnings.warn("moekit.MoE: training with every load-balancing method off (aux_loss=None, "
                              "bias_update=None); experts may collapse", stacklevel=4)
        routing_out = self.gate(x_TD, ctx)
        cfg = self.config
        plan = make_plan(routing_out, cfg.capacity_factor, cfg.drop_policy, cfg.pad_to_capacity)
        if self.dispatcher is None:
            out_TD = dispatch_local(x_TD, plan, self.experts)
        else:
            out_TD = self.dispatcher(x_TD, plan, self.experts)
        if cfg.num_shared_experts > 0:
            shared_TD = self.shared_expert(x_TD)
            if cfg.shared_expert_gate:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        self.aux_losses = routing_out.aux_losses
        if self.data_parallel_size > 1 and self.gate.data_group is None:
            # The router's losses are means over this rank's tokens: each rank contributes its share of the
            # average over ranks (losses are summed over ranks, see moekit.parallel).
            self.aux_losses = {k: v / self.data_parallel_size for k, v in self.aux_losses.items()}
        self.last_routing = routing_out
        self.load = LoadStats(plan.routed_E.detach(), plan.kept_E.detach(), plan.num_pairs, plan.num_dropped)
        return out_TD.view(shape)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every :class:`MoE` layer inside ``model`` (``model`` itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def routed_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that routes with a moekit router: :class:`MoE` layers and anything else exposing
    ``moekit_router`` and ``aux_loss`` (the router adapters of :mod:`moekit.hf.surgery`)."""
    return [m for m in model.modules() if hasattr(m, "moekit_router")]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of the last call of every routed module (MoE layers, surgered HF routers);
    a zero tensor when there are none."""
    total = None
    for layer in routed_modules(model):
        loss = layer.aux_loss
        if loss is not None:
            total = loss if total is None else total + loss
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


@torch.no_grad()
def end_step(model: nn.Module) -> None:
    """Call after each optimiser step: auxiliary-loss-free bias updates, reset of global-batch counters, for every
    routed module (MoE layers, surgered HF routers)."""
    for module in routed_modules(model):
        module.moekit_router.end_step()
