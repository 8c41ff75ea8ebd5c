"""Sharding a model's experts over the expert-parallel group, synchronising gradients, and converting between
the sharded state and the layout-independent (single-process) state that checkpoints hold.

Loss convention under data parallelism: every rank's loss is its *share* of the global batch's loss (its
summed token losses divided by the global token count; routers' balancing losses likewise, see
:class:`moekit.routing.topk.TopKRouter`), so the shares sum to the single-process loss. Gradients are then
*summed*: replicated parameters by an all-reduce over all ranks, expert parameters by the all-to-all
backward itself (each expert's gradient gathers every rank's tokens) plus an all-reduce over the ranks that
hold the same experts.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..dispatch.all_to_all import AllToAllDispatcher
from ..layer import moe_layers
from .layout import ParallelLayout


class ExpertSharding:
    """The expert-parallel form of one model on one rank; see the module docstring.

    Construction slices every MoE layer's experts to this rank's block with ``Experts.shard`` (parameter names
    are unchanged, the first dimension shrinks from ``E`` to ``E / ep_size``), installs the all-to-all dispatcher with ``chunks``
    overlap chunks, and hands the data-parallel group to routers whose losses are global-batch losses.
    """

    def __init__(self, model: nn.Module, layout: ParallelLayout, chunks: int = 1):
        self.layout = layout
        self.model = model
        self.sharded: dict[str, int] = {}  # parameter name -> experts in the full model
        prefix = {id(m): name for name, m in model.named_modules()}
        if getattr(model, "_moekit_sharding", None) is not None:
            raise ValueError("this model is already sharded for expert parallelism")
        for layer in moe_layers(model):
            note = type(layer.router).data_parallel_note
            if layout.world_size > 1 and note:
                raise ValueError(f"router {type(layer.router).__name__} cannot run on {layout.world_size} processes: "
                                 f"it {note}")
        self.num_local_experts = None
        for layer in moe_layers(model):
            layer.data_parallel_size = layout.world_size
            if layout.world_size > 1 and layer.router.global_batch_losses:
                layer.router.data_group = layout.data_group
            if layout.ep_size == 1:
                continue
            experts = layer.experts
            num_experts = experts.num_experts
            if num_experts % layout.ep_size:  # layers may differ in expert count (ModelConfig.moe_overrides)
                raise ValueError(f"expert_parallel={layout.ep_size} does not divide the {num_experts} experts of "
                                 f"{prefix[id(experts)]}")
            local = layout.local_experts(num_experts)
            for name in experts.shard(local):
                self.sharded[f"{prefix[id(experts)]}.{name}".lstrip(".")] = num_experts
            self.num_local_experts = min(len(local), self.num_local_experts or len(local))  # the fewest caps r
            layer.dispatcher = AllToAllDispatcher(layout.ep_group, layout.ep_size, chunks)
        model._moekit_sharding = self

    def set_chunks(self, chunks: int) -> int:
        """Use ``chunks`` overlap chunks, capped at the experts per rank (chunks are blocks of local experts);
        returns the number in effect."""
        if self.num_local_experts is not None:
            chunks = max(1, min(chunks, self.num_local_experts))
        for layer in moe_layers(self.model):
            if isinstance(layer.dispatcher, AllToAllDispatcher):
                layer.dispatcher.chunks = chunks
        return chunks

    # ------------------------------------------------------------------------------------ gradients
    def _split_parameters(self):
        replicated, sharded = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (sharded if name in self.sharded else replicated).append(param)
        return replicated, sharded

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Sum gradients: replicated parameters over all ranks, expert shards over their replicas."""
        import torch.distributed as dist

        replicated, sharded = self._split_parameters()
        for param in replicated + sharded:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        if self.layout.world_size == 1:
            return
        for params, group, size in ((replicated, self.layout.data_group, self.layout.world_size),
                                    (sharded, self.layout.expert_data_group, self.layout.expert_data_size)):
            if not params or size == 1:
                continue
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model: the same norm on every rank."""
        import torch.distributed as dist

        replicated, sharded = self._split_parameters()
        rep_sq = sum((p.grad.float().square().sum() for p in replicated), torch.zeros(()))
        shard_sq = sum((p.grad.float().square().sum() for p in sharded), torch.zeros(()))
        if sharded and self.layout.ep_size > 1:
            shard_sq = shard_sq.to(sharded[0].grad.device)
            dist.all_reduce(shard_sq, group=self.layout.ep_group)
        total = math.sqrt(float(rep_sq) + float(shard_sq))
        coef = min(1.0, max_norm / (total + 1e-6))
        for p in replicated + sharded:
            p.grad.mul_(coef)
        return total

    # ------------------------------------------------------------------------------------ state
    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(self.layout.ep_size)]
        dist.all_gather(parts, local.contiguous(), group=self.layout.ep_group)
        return torch.cat(parts, dim=0)

    def _shard(self, name: str, full: torch.Tensor, what: str) -> torch.Tensor:
        num_experts = self.sharded[name]
        if full.dim() == 0 or full.shape[0] != num_experts:
            raise ValueError(f"{what}: {name} has shape {tuple(full.shape)}, the model has {num_experts} experts "
                             f"along the first dimension")
        local = self.layout.local_experts(num_experts)
        return full[local.start:local.stop].clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict in the single-process layout (a collective: every rank must call it)."""
        return {k: (self._gather(v) if k in self.sharded else v) for k, v in self.model.state_dict().items()}

    def shard_state_dict(self, tensors: dict[str, torch.Tensor], what: str = "weights") -> dict[str, torch.Tensor]:
        """Slice this rank's experts out of a single-process state dict (``ValueError`` if the shapes disagree)."""
        return {k: (self._shard(k, v, what) if k in self.sharded else v) for k, v in tensors.items()}

    def _param_names(self, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: names.get(id(p), "") for i, p in enumerate(order)}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` with expert tensors gathered to the single-process layout (collective)."""
        state = optimizer.state_dict()
        names = self._param_names(optimizer)
        full = {}
        for index, param_state in state["state"].items():
            sharded = names.get(index) in self.sharded
            full[index] = {k: (self._gather(v) if sharded and torch.is_tensor(v) and v.dim() > 0 else v)
                           for k, v in param_state.items()}
        return {"state": full, "param_groups": state["param_groups"]}

    def shard_optimizer_state(self, state: dict, optimizer: torch.optim.Optimizer, what: str) -> dict:
        names = self._param_names(optimizer)
        out = {}
        for index, param_state in state["state"].items():
            name = names.get(int(index))
            sharded = name in self.sharded
            out[index] = {k: (self._shard(name, v, what) if sharded and torch.is_tensor(v) and v.dim() > 0 else v)
                          for k, v in param_state.items()}
        return {"state": out, "param_groups": state["param_groups"]}


def expert_parallel(model: nn.Module, layout: ParallelLayout, chunks: int = 1) -> ExpertSharding:
    """Shard ``model`` (every :class:`moekit.MoE` inside it) for this rank of ``layout``; see
    :class:`ExpertSharding`."""
    return ExpertSharding(model, layout, chunks)
