"""Checks of what a checkpoint folder holds, run before any of it is used.

A checkpoint is user-visible data: it can be copied, edited, truncated or come from another model. Each check
raises ``ValueError`` naming the file and what is wrong, instead of a traceback (or, worse, training on with a
negative step's learning rate).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


def check_inside(path: Path, folder: Path, what: str) -> Path:
    """``path`` resolved, refused unless it lies inside ``folder`` (a pointer must not leave its run)."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise ValueError(f"{what} points outside {folder}: {path}")
    return resolved


def check_state(state: dict, path: Path) -> dict:
    """The ``state.json`` of a checkpoint: ``step`` an integer >= 0, ``batches`` an object with integer
    ``seed`` and ``step``, ``elapsed`` a finite number >= 0, ``balancing`` a list (of objects)."""
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path}: 'step' must be an integer >= 0, got {step!r}")
    batches = state.get("batches")
    if not isinstance(batches, dict):
        raise ValueError(f"{path}: 'batches' (the sampler state) is missing or not an object")
    for key in ("seed", "step"):
        value = batches.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: 'batches.{key}' must be an integer >= 0, got {value!r}")
    elapsed = state.get("elapsed", 0.0)
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed) \
            or elapsed < 0:
        raise ValueError(f"{path}: 'elapsed' must be a finite number >= 0, got {elapsed!r}")
    balancing = state.get("balancing", [])
    if not isinstance(balancing, list) or not all(isinstance(b, dict) for b in balancing):
        raise ValueError(f"{path}: 'balancing' must be a list of objects")
    return state


def check_rng(tensors: dict, path: Path) -> torch.Tensor:
    """The ``torch`` RNG state tensor of ``rng.safetensors``: uint8 and as long as this torch's state."""
    rng = tensors.get("torch")
    if rng is None:
        raise ValueError(f"RNG state {path} holds no 'torch' tensor")
    expected = torch.get_rng_state()
    if rng.dtype != expected.dtype or rng.dim() != 1 or rng.numel() != expected.numel():
        raise ValueError(f"RNG state {path}: 'torch' has dtype {rng.dtype} and shape {tuple(rng.shape)}, expected "
                         f"{expected.dtype} {tuple(expected.shape)}")
    return rng


def optimizer_state_from_tensors(tensors: dict, path: Path) -> dict[int, dict]:
    """``{param index: {name: tensor}}`` from the flat ``state.<index>.<name>`` keys."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or not parts[2]:
            raise ValueError(f"optimizer state {path}: unexpected tensor name {key!r} (expected state.<index>.<name>)")
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    return state


def check_optimizer_state(full: dict, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every per-parameter tensor of ``full`` (already in this process's layout) has its parameter's shape,
    and ``step`` is a finite scalar >= 0; the parameter groups hold as many parameters as the optimiser's."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = full.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError(f"optimizer state {path}: its param_groups do not match this model's "
                         f"{len(optimizer.param_groups)} groups")
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"optimizer state {path}: parameters per group "
                         f"{[len(g['params']) for g in groups]}, this model has "
                         f"{[len(g['params']) for g in optimizer.param_groups]}")
    for index, entries in full.get("state", {}).items():
        if not 0 <= int(index) < len(params):
            raise ValueError(f"optimizer state {path}: parameter index {index} does not exist "
                             f"(this model has {len(params)})")
        shape = tuple(params[int(index)].shape)
        for name, value in entries.items():
            if name == "step":
                if value.numel() != 1 or not bool(torch.isfinite(value.float()).all()) or float(value) < 0:
                    raise ValueError(f"optimizer state {path}: state.{index}.step must be one finite number >= 0")
            elif tuple(value.shape) != shape:
                raise ValueError(f"optimizer state {path}: state.{index}.{name} has shape {tuple(value.shape)}, "
                                 f"its parameter has {shape}")
