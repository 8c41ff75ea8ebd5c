"""moekit: a toolkit for sparse Mixture-of-Experts models.

One MoE layer with pluggable routers (``moekit.routing``), dropless and capacity dispatch
(``moekit.dispatch``), dense and shared experts (``moekit.experts``) and load balancing (``moekit.balance``).
"""
from . import balance, dispatch, experts, routing
from .config import MoEConfig
from .layer import LoadStats, MoE, aux_loss, end_step, moe_layers, routed_modules
from .routing.base import Router, Routing, RoutingContext
from .model.generate import Generation, generate_batch as generate  # moekit.generate(model, prompts, ...)
from . import compare, plugins  # noqa: E402  (compare.register_method, --plugin files)
from ._hf_hook import install as _install_hf_hook

_install_hf_hook()  # experts_implementation="moekit" without importing moekit.hf (lazy: see moekit/_hf_hook.py)

__version__ = "0.1.0"

__all__ = [
    "Generation",
    "LoadStats",
    "MoE",
    "MoEConfig",
    "Router",
    "Routing",
    "RoutingContext",
    "aux_loss",
    "balance",
    "compare",
    "dispatch",
    "end_step",
    "experts",
    "generate",
    "moe_layers",
    "plugins",
    "routed_modules",
    "routing",
]
