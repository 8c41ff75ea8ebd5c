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

A checkpoint folder is written under a temporary name and renamed into place; ``latest.json`` is replaced
after it, so an interruption at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
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
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    full = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    try:
        if sharding is not None:
            full = sharding.shard_optimizer_state(full, optimizer, f"optimizer state {path}")
        optimizer.load_state_dict(full)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"optimizer state {path} does not fit this model ({exc})") from None


def save_checkpoint(run_dir: Path, step: int, model_tensors: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step-N`` atomically, then ``model.safetensors`` and ``latest.json``; prune old ones.

    ``model_tensors`` is the model's state dict and ``optimizer_state`` the optimizer's, both in the
    single-process layout (expert-parallel runs gather them first), so that a checkpoint does not depend on
    the layout that wrote it.
    """
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    atomic_save_safetensors(tmp / "model.safetensors", model_tensors, {"format": RUN_FORMAT})
    opt_tensors, opt_meta = optimizer_tensors(optimizer_state)
    atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors, opt_meta)
    atomic_save_safetensors(tmp / "rng.safetensors", {"torch": torch.get_rng_state()})
    atomic_write_json(tmp / "state.json", {"step": step, **state})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_save_safetensors(run_dir / "model.safetensors", model_tensors, {"format": RUN_FORMAT})
    atomic_write_json(run_dir / "latest.json", {"step": step, "checkpoint": str(final.relative_to(run_dir))})
    old = sorted(p for p in ckpt_root.glob("step-*") if p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = run_dir / "latest.json"
    if not latest.exists():
        return None
    info = read_json(latest, "checkpoint pointer")
    path = run_dir / str(info.get("checkpoint", ""))
    if not (path / "state.json").is_file():
        raise ValueError(f"{latest} points to a missing checkpoint {path}")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    sharding=None) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder; returns its ``state.json``. ``sharding``
    (a :class:`moekit.parallel.ExpertSharding`) takes this rank's experts out of the single-process tensors."""
    state = read_json(path / "state.json", "checkpoint state")
    load_model_weights(model, path / "model.safetensors", sharding)
    if optimizer is not None:
        load_optimizer_tensors(optimizer, path / "optimizer.safetensors", sharding)
    rng = load_safetensors(path / "rng.safetensors", "RNG state")
    torch.set_rng_state(rng["torch"])
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


def read_run_config(run_dir: Path) -> dict:
    """``config.json`` of a run folder, checked for format and version."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    cfg = read_json(run_dir / "config.json", "run config")
    if cfg.get("format") != RUN_FORMAT:
        raise ValueError(f"{run_dir}/config.json is not a moekit run (format {cfg.get('format')!r})")
    if cfg.get("version") != RUN_VERSION:
        raise ValueError(f"{run_dir} was written by run format version {cfg.get('version')!r}; "
                         f"this moekit reads version {RUN_VERSION}")
    return cfg
