"""moekit: a toolkit for sparse Mixture-of-Experts models.

One MoE layer with pluggable routers (``moekit.routing``), dropless and capacity dispatch
(``moekit.dispatch``), dense and shared experts (``moekit.experts``) and load balancing (``moekit.balance``).
"""
from . import balance, dispatch, experts, routing
from .config import MoEConfig
from .layer import LoadStats, MoE, aux_loss, end_step, moe_layers, routed_modules
from .routing.base import Router, Routing, RoutingContext

__version__ = "0.1.0"

__all__ = [
    "LoadStats",
    "MoE",
    "MoEConfig",
    "Router",
    "Routing",
    "RoutingContext",
    "aux_loss",
    "balance",
    "dispatch",
    "end_step",
    "experts",
    "moe_layers",
    "routed_modules",
    "routing",
]
