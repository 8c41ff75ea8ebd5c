"""transformers integration: ``experts_implementation="moekit"`` and discovery of MoE classes.

Importing this package registers moekit's fused grouped dispatch with transformers (:func:`register`) when
transformers is installed; the other ``moekit.hf`` modules (inspect, export) keep working without it.
"""
from .experts import make_hf_plan, moekit_experts_forward, register
from . import surgery
from .record import record_routing

try:
    register()
except ImportError:  # transformers not installed: nothing to register with
    pass

__all__ = ["make_hf_plan", "moekit_experts_forward", "record_routing", "register", "surgery"]
