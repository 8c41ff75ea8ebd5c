"""Per-layer logit offsets: the one knob test-time adaptation trains.

Every router with logits holds ``logit_offset`` (float32 ``[E]``, zero at construction), added to its logits
before scoring and selection (:meth:`moekit.routing.Router.logits`). It is a non-persistent buffer: it is not
among the model's ``parameters()``, so an optimiser over ``model.parameters()`` never touches it, and not in
its ``state_dict()``, so state dicts keep the transformers layout and checkpoints written before the offset
existed load strictly. These helpers collect, store and restore the offsets of a whole model.

Legend: E experts.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .. import io
from .base import Router

__all__ = ["offset_routers", "logit_offsets", "save_logit_offsets", "load_logit_offsets"]

_KEY_SUFFIX = "logit_offset"


def offset_routers(model: nn.Module) -> dict[str, Router]:
    """``{module name: router}`` for every router of ``model`` that has logits (hence an offset), in module
    order (a model that is itself a router maps ``""`` to it)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Router) and m.has_logits}


def logit_offsets(model: nn.Module, requires_grad: bool = True) -> list[torch.Tensor]:
    """The logit offsets of every router of ``model``, in module order, as the routers' own leaf tensors with
    ``requires_grad`` set (ready for ``torch.optim.SGD(logit_offsets(model), lr=...)``). Call it after moving
    the model to its device and dtype: a move replaces the tensors. ``requires_grad=False`` freezes them again.
    """
    offsets = []
    for router in offset_routers(model).values():
        offset = router.logit_offset
        offset.requires_grad_(requires_grad)
        offsets.append(offset)
    return offsets


def _key(name: str) -> str:
    return f"{name}.{_KEY_SUFFIX}" if name else _KEY_SUFFIX


def save_logit_offsets(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every router's offset to a safetensors file (keys ``<router module name>.logit_offset``)."""
    tensors = {_key(name): r.logit_offset.detach().float() for name, r in offset_routers(model).items()}
    if not tensors:
        raise ValueError(f"save_logit_offsets: {type(model).__name__} has no router with logits")
    io.atomic_save_safetensors(path, tensors, metadata={"format": "moekit.logit_offsets", "version": "1"})


@torch.no_grad()
def load_logit_offsets(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the offsets saved by :func:`save_logit_offsets` into ``model``'s routers (in place, so tensors
    handed to an optimiser stay valid). ``ValueError`` naming the mismatch when the file's routers or shapes
    are not the model's."""
    saved = io.load_safetensors(path, "logit offsets file")
    routers = {_key(name): r for name, r in offset_routers(model).items()}
    missing, unexpected = sorted(set(routers) - set(saved)), sorted(set(saved) - set(routers))
    if missing or unexpected:
        raise ValueError(f"load_logit_offsets: {path} does not match the model's routers (missing: "
                         f"{missing or 'none'}; unexpected: {unexpected or 'none'})")
    for key, router in routers.items():
        value = saved[key]
        if tuple(value.shape) != tuple(router.logit_offset.shape):
            raise ValueError(f"load_logit_offsets: {key} has shape {tuple(value.shape)}, the model's router "
                             f"expects {tuple(router.logit_offset.shape)}")
        router.logit_offset.copy_(value)
