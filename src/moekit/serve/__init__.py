"""Serving under a memory budget, offline half: expert-cache simulation on routing traces
(:mod:`moekit.serve.simulate`) and expert placement on devices (:mod:`moekit.serve.place`)."""
from .place import eplb, expert_loads, milp_placement, placement_stats, round_robin, sglang_json, transitions
from .simulate import POLICIES, PREFETCHERS, LayerStats, SimResult, layer_slots, simulate
from .cost import CostModel  # trace simulator: two-tier cost model
from .importers import load_any as load_any_trace  # SGLang / vLLM routing dumps
from .schedule import schedule_trace  # ExpertFlow token scheduling

__all__ = ["POLICIES", "PREFETCHERS", "LayerStats", "SimResult", "layer_slots", "simulate", "eplb",
           "expert_loads", "milp_placement", "placement_stats", "round_robin", "sglang_json", "transitions",
           "CostModel", "load_any_trace", "schedule_trace"]
# online half (issue 15): expert store, cache, prefetchers, offloaded generation
from .cache import ExpertCache  # noqa: E402
from .offload import load_hf_from_store, load_offloaded_run, offload  # noqa: E402
from .store import ExpertStore  # noqa: E402

__all__ += ["ExpertCache", "ExpertStore", "load_hf_from_store", "load_offloaded_run", "offload"]
