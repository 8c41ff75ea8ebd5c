"""Experts: ``grouped_forward(x_SD sorted by expert, counts_E) -> y_SD``."""
from .activations import ACTIVATIONS, Activation, get_activation
from .dense import DenseExperts
from .shared import SharedExpert

__all__ = ["ACTIVATIONS", "Activation", "DenseExperts", "SharedExpert", "get_activation"]
