"""Dispatch: routing -> plan (sort by expert, capacity) -> experts -> combine."""
from .grouped import grouped_mm, grouped_wgrad, workspace
from .fused import FusedExperts, GateSpec, fused_experts
from .local import dispatch_local
from .plan import DROP_POLICIES, DispatchPlan, expert_capacity, make_plan

__all__ = [
    "DROP_POLICIES",
    "DispatchPlan",
    "FusedExperts",
    "GateSpec",
    "dispatch_local",
    "expert_capacity",
    "fused_experts",
    "grouped_mm",
    "grouped_wgrad",
    "make_plan",
    "workspace",
]
