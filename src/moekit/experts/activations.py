"""Expert activations with hand-written backward passes.

An :class:`Activation` holds the elementwise function and, where PyTorch has one, its fused backward kernel
(``aten.silu_backward``, ``aten.gelu_backward``, ``aten.threshold_backward``) called with an ``out`` slice so
the gradient of a gated activation is written straight into its half of ``dh``. A custom activation with no
``backward`` falls back to autograd on a recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

_aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    """``fn(x)`` elementwise; ``backward(grad, x, out)`` writes ``grad * fn'(x)`` into ``out``; ``gated``: the
    expert computes ``fn(gate) * up`` from ``h = [gate | up]``."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None


def _silu_backward(grad, x, out):
    _aten.silu_backward.grad_input(grad, x, grad_input=out)


def _gelu_backward(grad, x, out):
    _aten.gelu_backward.grad_input(grad, x, approximate="none", grad_input=out)


def _relu_backward(grad, x, out):
    _aten.threshold_backward.grad_input(grad, x, 0, grad_input=out)


def _gelu(x):
    return F.gelu(x)


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation("swiglu", F.silu, True, _silu_backward),
    "geglu": Activation("geglu", _gelu, True, _gelu_backward),
    "gelu": Activation("gelu", _gelu, False, _gelu_backward),
    "relu": Activation("relu", F.relu, False, _relu_backward),
}


def get_activation(name_or_activation) -> Activation:
    if isinstance(name_or_activation, Activation):
        return name_or_activation
    try:
        return ACTIVATIONS[name_or_activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {name_or_activation!r}") from None
