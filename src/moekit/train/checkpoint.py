"""Training checkpoints: model weights, AdamW state and trainer state, written atomically.

Layout of a run folder (``RUN_FORMAT`` version in ``config.json``)::

    runs/<name>/
      config.json            {"format": "moekit-run", "version": 1, "model": {...}, "train": {...}, "data": {...}}
      model.safetensors      the latest weights (also what `eval`, `generate`, `trace` read)
      metrics.jsonl          one JSON object per training step (and eval records)
      latest.json            {"step": N, "checkpoint": "checkpoints/step-0000N"}
      checkpoints/step-0000N/
        model.safetensors
        optimizer.safetensors   AdamW tensors as "state.<param index>.<name>"; param groups in its metadata
        state.json              step, sampler state, balancing counters, elapsed time
        rng.safetensors         the torch RNG state

A checkpoint folder is written under a temporary name and renamed to a name no folder has yet
(``step-N``, or ``step-N.v2`` ... when a checkpoint of that step exists); ``latest.json`` is replaced after it,
and old folders are removed last, so an interruption at any moment (kill -9 included) leaves ``latest.json``
pointing at a complete checkpoint. ``config.json`` may also list ``plugins``: Python files (absolute paths)
that register the run's custom routers; every command that opens the run loads them first
(:mod:`moekit.plugins`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

RUN_FORMAT = "moekit-run"
RUN_VERSION = 1


def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer state dict into safetensors tensors plus JSON metadata (no pickle)."""
    tensors = {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"state.{index}.{name}"] = value
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, path: Path, sharding=None) -> None:
    """Restore ``optimizer`` from ``path``; ``sharding`` (a :class:`moekit.parallel.ExpertSharding`) slices the
    single-process state to this rank's experts."""
    from safetensors import safe_open

    tensors = load_safetensors(path, "optimizer state")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "param_groups" not in meta:
        raise ValueError(f"optimizer state {path} has no param_groups metadata")
    from .checks import check_optimizer_state, optimizer_state_from_tensors

    state = optimizer_state_from_tensors(tensors, path)
    try:
        groups = json.loads(meta["param_groups"])
    except ValueError:
        raise ValueError(f"optimizer state {path}: its param_groups metadata is not valid JSON") from None
    full = {"state": state, "param_groups": groups}
    try:
        if sharding is not None:
            full = sharding.shard_optimizer_state(full, optimizer, f"optimizer state {path}")
        check_optimizer_state(full, optimizer, path)
        optimizer.load_state_dict(full)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"optimizer state {path} does not fit this model ({exc})") from None


def _step_of(path: Path) -> int | None:
    """The step of a checkpoint folder name ``step-N`` or ``step-N.vK`` (None for anything else)."""
    match = re.fullmatch(r"step-(\d+)(?:\.v\d+)?", path.name)
    return int(match.group(1)) if match else None


def _free_name(ckpt_root: Path, step: int) -> Path:
    """``step-N``, or ``step-N.vK`` with the smallest free K when ``step-N`` exists: an existing folder (which
    ``latest.json`` may point at) is never emptied or replaced."""
    final = ckpt_root / f"step-{step:07d}"
    version = 1
    while final.exists():
        version += 1
        final = ckpt_root / f"step-{step:07d}.v{version}"
    return final


def save_checkpoint(run_dir: Path, step: int, model_tensors: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict, keep: int = 2) -> Path:
    """Write a new checkpoint folder for ``step``, then ``model.safetensors`` and ``latest.json``; prune old ones.

    ``model_tensors`` is the model's state dict and ``optimizer_state`` the optimizer's, both in the
    single-process layout (expert-parallel runs gather them first), so that a checkpoint does not depend on
    the layout that wrote it. The folder is written under a temporary name and renamed to a name no folder
    has (``step-N``, else ``step-N.v2``, ...); ``latest.json`` is switched to it afterwards, and only then are
    other folders removed. So a kill at any moment leaves ``latest.json`` pointing at a complete checkpoint.
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".step-*.tmp"):  # left by an interrupted save; never pointed at
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".step-{step:07d}.tmp"
    tmp.mkdir()
    atomic_save_safetensors(tmp / "model.safetensors", model_tensors, {"format": RUN_FORMAT})
    opt_tensors, opt_meta = optimizer_tensors(optimizer_state)
    atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors, opt_meta)
    atomic_save_safetensors(tmp / "rng.safetensors", {"torch": torch.get_rng_state()})
    atomic_write_json(tmp / "state.json", {"step": step, **state})
    final = _free_name(ckpt_root, step)
    os.replace(tmp, final)
    atomic_save_safetensors(run_dir / "model.safetensors", model_tensors, {"format": RUN_FORMAT})
    atomic_write_json(run_dir / "latest.json", {"step": step, "checkpoint": str(final.relative_to(run_dir))})
    # Older versions of this step go first, then the oldest steps beyond ``keep``.
    others = [p for p in ckpt_root.iterdir() if p != final and _step_of(p) is not None]
    for p in [p for p in others if _step_of(p) == step]:
        shutil.rmtree(p, ignore_errors=True)
    old = sorted((p for p in others if _step_of(p) != step), key=lambda p: (_step_of(p), p.name))
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = run_dir / "latest.json"
    if not latest.exists():
        return None
    info = read_json(latest, "checkpoint pointer")
    target = info.get("checkpoint")
    if not isinstance(target, str) or not target:
        raise ValueError(f"{latest}: 'checkpoint' must be a path inside the run, got {target!r}")
    from .checks import check_inside

    check_inside(run_dir / target, run_dir / "checkpoints", f"{latest}")
    path = run_dir / target
    if not (path / "state.json").is_file():
        raise ValueError(f"{latest} points to a missing checkpoint {path}")
    return path


def latest_step(run_dir: Path) -> int | None:
    """The step of the checkpoint ``latest.json`` points at, or None when there is none (or it is unreadable)."""
    try:
        path = latest_checkpoint(Path(run_dir))
    except ValueError:
        return None
    if path is None:
        return None
    try:
        return int(read_json(path / "state.json", "checkpoint state")["step"])
    except (ValueError, KeyError, TypeError):
        return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    sharding=None) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder; returns its ``state.json``. ``sharding``
    (a :class:`moekit.parallel.ExpertSharding`) takes this rank's experts out of the single-process tensors."""
    from .checks import check_rng, check_state

    state = check_state(read_json(path / "state.json", "checkpoint state"), path / "state.json")
    rng = check_rng(load_safetensors(path / "rng.safetensors", "RNG state"), path / "rng.safetensors")
    load_model_weights(model, path / "model.safetensors", sharding)
    if optimizer is not None:
        load_optimizer_tensors(optimizer, path / "optimizer.safetensors", sharding)
    torch.set_rng_state(rng)
    return state


def load_model_weights(model: torch.nn.Module, path: Path, sharding=None) -> None:
    """Load a safetensors state dict strictly; ``ValueError`` naming the mismatch otherwise."""
    tensors = load_safetensors(path, "weights file")
    own = model.state_dict()
    if sharding is not None and not (set(own) - set(tensors)):
        tensors = sharding.shard_state_dict(tensors, f"weights file {path}")
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"weights file {path}: {key} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    model.load_state_dict(tensors, strict=True)


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def read_run_config(run_dir: Path, load_plugins: bool = True) -> dict:
    """``config.json`` of a run folder, checked for format and version; the plugin files it records are
    loaded (``ValueError`` when one is missing) unless ``load_plugins`` is False."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    cfg = read_json(run_dir / "config.json", "run config")
    if cfg.get("format") != RUN_FORMAT:
        raise ValueError(f"{run_dir}/config.json is not a moekit run (format {cfg.get('format')!r})")
    if cfg.get("version") != RUN_VERSION:
        raise ValueError(f"{run_dir} was written by run format version {cfg.get('version')!r}; "
                         f"this moekit reads version {RUN_VERSION}")
    if load_plugins:  # the run's custom routers must be registered before its model is built
        from ..plugins import load_run_plugins

        load_run_plugins(cfg, run_dir)
    return cfg
