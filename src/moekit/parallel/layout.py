"""Process layout of expert-parallel training on torch.distributed.

``world_size`` ranks form ``world_size / ep_size`` expert-parallel groups of ``ep_size`` consecutive ranks.
Inside a group, rank ``p`` (its ``ep_rank``) holds experts ``[p * E / ep_size, (p + 1) * E / ep_size)`` and
tokens are exchanged by all-to-all. Ranks with the same ``ep_rank`` in different groups hold the same
experts (the expert-data-parallel group) and all-reduce those experts' gradients; every other parameter is
replicated on every rank and all-reduced over the whole world (data parallelism).

Every check here runs before the first collective and gives the same answer on every rank, so a bad layout
is one clear error on every rank and never a hang.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

# Long enough for rank 0 to write a large checkpoint while the others wait; errors are found before any
# collective, so a timeout is a last resort, not the way bad input ends.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)


def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``), 1 outside torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def check_layout(world_size: int, ep_size: int, num_experts: int, batch_size: int | None = None) -> None:
    """``ValueError`` naming the problem when ``ep_size`` cannot shard ``num_experts`` over ``world_size``."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert_parallel must be an integer >= 1, got {ep_size!r}")
    if ep_size > 1 and world_size == 1:
        raise ValueError(f"expert_parallel={ep_size} needs {ep_size} processes; launch with "
                         f"torchrun --nproc-per-node {ep_size} -m moekit train --expert-parallel {ep_size}")
    if world_size % ep_size:
        raise ValueError(f"expert_parallel={ep_size} does not divide the world size {world_size} "
                         f"(processes started by torchrun)")
    if num_experts % ep_size:
        raise ValueError(f"expert_parallel={ep_size} does not divide num_experts={num_experts}")
    if batch_size is not None and batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} is not divisible by the world size {world_size}: every rank "
                         f"takes an equal share of the global batch")


@dataclass
class ParallelLayout:
    """Who this process is and the process groups it talks over (``None`` groups mean 'nobody to talk to')."""

    world_size: int
    rank: int
    ep_size: int
    ep_group: Any = None
    expert_data_group: Any = None
    data_group: Any = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def expert_data_size(self) -> int:
        """How many ranks hold the same experts."""
        return self.world_size // self.ep_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    @classmethod
    def single(cls) -> "ParallelLayout":
        return cls(world_size=1, rank=0, ep_size=1)

    @classmethod
    def initialise(cls, ep_size: int, num_experts: int, batch_size: int | None = None,
                   backend: str | None = None) -> "ParallelLayout":
        """Check the layout, join the default process group (torchrun's environment) and build the groups.

        ``backend`` defaults to NCCL when CUDA is available and gloo otherwise.
        """
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_initialized() else launched_world_size()
        check_layout(world_size, ep_size, num_experts, batch_size)
        if world_size == 1:
            return cls.single()
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        rank = dist.get_rank()
        layout = cls(world_size=world_size, rank=rank, ep_size=ep_size, data_group=dist.group.WORLD)
        # Every rank creates every group, in the same order (torch.distributed requires it).
        for start in range(0, world_size, ep_size):
            ranks = list(range(start, start + ep_size))
            group = dist.new_group(ranks) if ep_size > 1 else None
            if rank in ranks:
                layout.ep_group = group
        for ep_rank in range(ep_size):
            ranks = list(range(ep_rank, world_size, ep_size))
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                layout.expert_data_group = group
        return layout
