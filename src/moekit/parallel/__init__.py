"""Expert parallelism on torch.distributed (launched by torchrun): layout, sharding, overlap cost model.

See :mod:`moekit.parallel.layout` (who holds which experts), :mod:`moekit.parallel.sharding` (sharding a
model, gradient synchronisation, layout-independent checkpoints), :mod:`moekit.dispatch.all_to_all` (the
dispatcher) and :mod:`moekit.parallel.cost_model` (choosing the overlap degree).
"""
from .layout import ParallelLayout, check_layout, launched_world_size
from .sharding import ExpertSharding, expert_parallel

__all__ = ["ParallelLayout", "check_layout", "launched_world_size", "ExpertSharding", "expert_parallel"]
