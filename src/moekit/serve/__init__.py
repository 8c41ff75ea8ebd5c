"""Serving under a memory budget, offline half: expert-cache simulation on routing traces
(:mod:`moekit.serve.simulate`) and expert placement on devices (:mod:`moekit.serve.place`)."""
from .place import eplb, expert_loads, milp_placement, placement_stats, round_robin, sglang_json, transitions
from .simulate import POLICIES, PREFETCHERS, LayerStats, SimResult, layer_slots, simulate

__all__ = ["POLICIES", "PREFETCHERS", "LayerStats", "SimResult", "layer_slots", "simulate", "eplb",
           "expert_loads", "milp_placement", "placement_stats", "round_robin", "sglang_json", "transitions"]
