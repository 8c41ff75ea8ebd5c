"""The MoE layer: Router -> Routing -> DispatchPlan -> (plan hooks) -> Dispatcher(Experts) -> + shared experts.

Legend: see docs/architecture.md (T tokens, D model width, E experts).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import balance, routing
from . import experts as experts_registry
from .config import MoEConfig
from .dispatch.local import LocalDispatcher
from .dispatch.plan import DispatchPlan, make_plan
from .experts.base import Experts
from .experts.shared import SharedExpert
from .routing.base import Routing, RoutingContext


@dataclass
class LoadStats:
    """Load statistics of one forward call: assignments per expert before dropping, after dropping; pairs of
    masked tokens (``RoutingContext.token_mask``) are not counted."""

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

    The forward runs in named stages, each a method a subclass may override:

    1. :meth:`route` (``x_TD -> Routing``, the router),
    2. :meth:`make_plan` (``Routing -> DispatchPlan``: sort by expert, capacity),
    3. :meth:`run_experts` (``plan -> out_TD`` through :attr:`dispatcher` and :attr:`experts`; the plan hooks
       run first, see :meth:`register_plan_hook`),
    4. :meth:`add_shared_experts`,
    5. :meth:`record` (losses, routing and load statistics of the call).

    After each call: ``aux_losses`` (dict of named scalar tensors, coefficient applied), ``aux_loss`` (their
    sum, or None), ``last_routing`` (the :class:`Routing`), ``last_plan`` and ``load`` (:class:`LoadStats`:
    tokens per expert, MaxVio, fraction dropped). Parameter names follow Hugging Face transformers 5
    (``gate.weight [E, D]`` for the router, ``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``,
    ``shared_expert.*``, ``shared_expert_gate.weight``), so OLMoE / Mixtral / Qwen2-MoE block state dicts load
    directly; in code the router is :attr:`router` (the submodule is named ``gate`` only for those names).

    Capacity: ``config.capacity_factor`` applies in training; at inference ``config.eval_capacity_factor``
    (default None: dropless, so a token's output never depends on the other tokens of the call).

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
        experts_cls = experts_registry.get(config.experts)
        self.experts = experts_cls(num_experts=config.num_experts, dim=config.dim, hidden_dim=config.hidden_dim,
                                   activation=config.activation, init_std=config.init_std,
                                   **config.experts_options)
        if not isinstance(self.experts, Experts):
            raise TypeError(f"experts {config.experts!r} built a {type(self.experts).__name__}, not an Experts")
        if config.num_shared_experts > 0:
            width = config.num_shared_experts * (config.shared_hidden_dim or config.hidden_dim)
            self.shared_expert = SharedExpert(config.dim, width, config.activation, init_std=config.init_std)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.dim, 1, bias=False)
                nn.init.normal_(self.shared_expert_gate.weight, std=config.init_std)
        # ``dispatcher(x_TD, plan, experts) -> out_TD``: local by default, all-to-all under expert parallelism
        self.dispatcher = LocalDispatcher()
        self.data_parallel_size = 1  # ranks whose losses are summed (moekit.parallel sets it)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_routing: Routing | None = None
        self.last_plan: DispatchPlan | None = None
        self.load: LoadStats | None = None
        self._plan_hooks: OrderedDict[int, Callable] = OrderedDict()  # weak-referenceable, as torch hooks need
        self._warned_unbalanced = False

    @property
    def router(self) -> routing.Router:
        """The layer's router (the ``gate`` submodule)."""
        return self.gate

    @property
    def aux_loss(self) -> torch.Tensor | None:
        if not self.aux_losses:
            return None
        return sum(self.aux_losses.values())

    @property
    def moekit_router(self) -> routing.Router:
        """The router whose losses and ``end_step`` :func:`aux_loss` / :func:`end_step` look after."""
        return self.gate

    def register_plan_hook(self, hook: Callable) -> RemovableHandle:
        """Call ``hook(layer, x_TD, plan)`` after the plan is made and before any expert runs.

        A hook sees which experts are about to run and with how many rows (``plan.counts_E``, ``plan.expert_S``):
        the place to prefetch experts, compact the plan to the resident ones, or swap in a low-bit copy. It
        returns None to let the layer run its experts, or ``out_TD`` (``[T, D]``, the routing-weighted expert
        output, shared experts excluded) to replace the experts call; hooks run in registration order and the
        first that returns a tensor ends the experts stage. Returns a handle whose ``remove()`` unregisters it.
        """
        handle = RemovableHandle(self._plan_hooks)
        self._plan_hooks[handle.id] = hook
        return handle

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.config.dim:
            raise ValueError(f"x must have shape [..., dim={self.config.dim}], got {tuple(x.shape)}")

    # ------------------------------------------------------------------------------------ stages
    def route(self, x_TD: torch.Tensor, ctx: RoutingContext) -> Routing:
        """Stage 1: the router's choice of experts and routing weights for every token."""
        if self.training and not self._warned_unbalanced:
            self._warned_unbalanced = True
            if self.gate.learned and not self.gate.has_balancing() and torch.is_grad_enabled():
                warnings.warn("moekit.MoE: training with every load-balancing method off (aux_loss=None, "
                              "bias_update=None); experts may collapse", stacklevel=5)
        routing_out = self.gate(x_TD, ctx)
        if routing_out.token_mask is None and ctx.token_mask is not None:  # routers that do not set it
            routing_out.token_mask = ctx.flat_mask(x_TD.shape[0], x_TD.device)
        return routing_out

    def capacity_factor(self) -> float | None:
        """The capacity factor in force: ``capacity_factor`` in training, ``eval_capacity_factor`` otherwise."""
        return self.config.capacity_factor if self.training else self.config.eval_capacity_factor

    def make_plan(self, routing_out: Routing) -> DispatchPlan:
        """Stage 2: pairs sorted by expert, capacity applied. Pairs of masked tokens (``ctx.token_mask``) are left
        out: padding takes no capacity, its routed output is zero, and the load statistics count real tokens."""
        cfg = self.config
        return make_plan(routing_out.real_pairs(), self.capacity_factor(), cfg.drop_policy, cfg.pad_to_capacity)

    def run_experts(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Stage 3: the plan hooks, then (unless one answered) the dispatcher around the experts."""
        for hook in list(self._plan_hooks.values()):
            out_TD = hook(self, x_TD, plan)
            if out_TD is not None:
                return out_TD
        return self.dispatcher(x_TD, plan, self.experts)

    def add_shared_experts(self, x_TD: torch.Tensor, out_TD: torch.Tensor) -> torch.Tensor:
        """Stage 4: the always-on shared experts (optionally gated), added to the routed output."""
        if self.config.num_shared_experts == 0:
            return out_TD
        shared_TD = self.shared_expert(x_TD)
        if self.config.shared_expert_gate:
            shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
        return out_TD + shared_TD

    def record(self, routing_out: Routing, plan: DispatchPlan) -> None:
        """Stage 5: keep the call's losses, routing, plan and load statistics."""
        aux_losses = routing_out.aux_losses
        if self.data_parallel_size > 1 and self.gate.data_group is None:
            # The router's losses are means over this rank's tokens: each rank contributes its share of the
            # average over ranks (losses are summed over ranks, see moekit.parallel).
            aux_losses = {k: v / self.data_parallel_size for k, v in aux_losses.items()}
        # plain attributes (no parameter, buffer or module): set in __dict__, skipping nn.Module.__setattr__'s
        # bookkeeping on every call
        self.__dict__["aux_losses"] = aux_losses
        self.__dict__["last_routing"] = routing_out
        self.__dict__["last_plan"] = plan
        self.__dict__["load"] = LoadStats(plan.routed_E.detach(), plan.kept_E.detach(), plan.num_pairs,
                                          plan.num_dropped)

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
        routing_out = self.route(x_TD, ctx)
        plan = self.make_plan(routing_out)
        out_TD = self.run_experts(x_TD, plan)
        out_TD = self.add_shared_experts(x_TD, out_TD)
        self.record(routing_out, plan)
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
