"""Experts: one interface (:class:`Experts`), kinds registered by name (``moekit.experts.get(name)``)."""
from .activations import ACTIVATIONS, Activation, get_activation
from .base import Experts, GroupedExperts, get, names, register
from .dense import DenseExperts
from .quantized import QuantizedExperts
from .shared import SharedExpert
from .ternary import TernaryExperts

__all__ = ["ACTIVATIONS", "Activation", "DenseExperts", "Experts", "GroupedExperts", "QuantizedExperts",
           "SharedExpert", "TernaryExperts", "get", "get_activation", "names", "register"]
