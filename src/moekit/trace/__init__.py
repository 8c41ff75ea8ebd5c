"""Routing traces: the on-disk format (:mod:`.format`, documented in ``docs/trace-format.md``), the recorder
that fills it from a model's :class:`moekit.MoE` layers (:mod:`.recorder`), statistics (:mod:`.stats`), the
routing-disparity profiler (:mod:`.disparity`), and synthetic traces of known structure (:mod:`.synthetic`).
"""
from .disparity import DisparateExpert, Disparity, disparity_by_domain, routing_disparity
from .format import FORMAT, VERSION, Trace, TraceFormatError, load_trace, save_trace
from .recorder import RoutingRecorder, pad_assignments, record_routing, trace_model
from .stats import (Predictability, coactivation, cross_layer_predictability, domain_expert_frequency, expert_load,
                    load_entropy, max_violation, routed_mask, routing_frequency, token_entropy, transition_counts,
                    transition_matrices)
from .synthetic import synthetic_trace

__all__ = [
    "FORMAT", "VERSION", "Trace", "TraceFormatError", "load_trace", "save_trace",
    "RoutingRecorder", "record_routing", "pad_assignments", "trace_model",
    "expert_load", "routing_frequency", "max_violation", "load_entropy", "token_entropy", "coactivation",
    "transition_counts", "transition_matrices", "Predictability", "cross_layer_predictability",
    "domain_expert_frequency", "routed_mask",
    "DisparateExpert", "Disparity", "routing_disparity", "disparity_by_domain", "synthetic_trace",
]
