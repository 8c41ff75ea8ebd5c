"""Dispatch: routing -> plan (sort by expert, capacity) -> dispatcher(experts) -> combine.

Every dispatcher is called as ``dispatcher(x_TD, plan, experts) -> out_TD``: :class:`LocalDispatcher` (the
default) and :class:`moekit.dispatch.all_to_all.AllToAllDispatcher` (expert parallelism).
"""
from .fused import ActivationSpec, ExpertProducts, FusedExperts, StackedWeights, expert_rows, fused_experts
from .grouped import grouped_mm, grouped_wgrad, workspace
from .local import LocalDispatcher
from .ops import GatherRows, ScatterAddRows, combine, gather, scatter_add
from .plan import DROP_POLICIES, DispatchPlan, expert_capacity, make_plan

__all__ = [
    "DROP_POLICIES",
    "ActivationSpec",
    "DispatchPlan",
    "ExpertProducts",
    "FusedExperts",
    "GatherRows",
    "LocalDispatcher",
    "ScatterAddRows",
    "StackedWeights",
    "combine",
    "expert_capacity",
    "expert_rows",
    "fused_experts",
    "gather",
    "grouped_mm",
    "grouped_wgrad",
    "make_plan",
    "scatter_add",
    "workspace",
]
