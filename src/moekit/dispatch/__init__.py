"""Dispatch: routing -> plan (sort by expert, capacity) -> experts -> combine."""
from .grouped import grouped_mm, grouped_wgrad, workspace
from .local import GroupedGLUDispatch, apply_activation, dispatch_local
from .plan import DROP_POLICIES, DispatchPlan, expert_capacity, make_plan

__all__ = [
    "DROP_POLICIES",
    "DispatchPlan",
    "GroupedGLUDispatch",
    "apply_activation",
    "dispatch_local",
    "expert_capacity",
    "grouped_mm",
    "grouped_wgrad",
    "make_plan",
    "workspace",
]
