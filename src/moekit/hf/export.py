"""Export a moekit run folder as a Hugging Face transformers checkpoint (``Qwen3MoeForCausalLM``).

The folder holds ``config.json`` (a ``Qwen3MoeConfig`` from :func:`moekit.model.hf_mapping.to_qwen3_moe_config`)
and ``model.safetensors`` (:func:`moekit.model.hf_mapping.to_hf_state_dict`: the names and shapes are those
of transformers 5's fused experts, ``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``), so
``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it with no custom code and gives moekit's
logits to float32 rounding.

The export is atomic: everything is written into a new temporary folder beside ``OUT`` (a unique name from
``moekit.io.temp_sibling_dir``, so no folder of the user's is ever touched) and renamed onto ``OUT`` at the end; an
existing non-empty ``OUT`` is refused unless ``force``, and ``OUT`` may never be the run folder, lie inside it
or contain it. Models whose routing Qwen3-MoE cannot express (another router,
sigmoid scores, shared experts, capacity, bias balancing, ...) raise ``ValueError`` listing every reason, as do
models whose MoE layers differ in expert count, top-k, expert width or ``norm_topk`` (``ModelConfig.moe_overrides``:
Qwen3-MoE has one value of each for all MoE layers); the message names the layers and their values. MoE layers
that agree are exported with their common values, even where they differ from ``ModelConfig.moe``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..io import atomic_save_safetensors, atomic_write_json, temp_sibling_dir
from ..model.hf_mapping import qwen3_incompatibilities, qwen3_moe_config_dict, to_hf_state_dict

__all__ = ["export_hf", "export_model_hf"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _check_out(out: Path, force: bool) -> None:
    """``out`` may be written: a missing path or an empty folder, or anything but a folder's ancestor under
    ``force``; its parent must be a folder (or creatable)."""
    empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if (out.exists() or out.is_symlink()) and not empty_dir and not force:
        raise ValueError(f"{out} already exists and is not empty; pass --force to overwrite it")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{parent} is a file, not a folder, so {out} cannot be written")
            break


def _prepare_out(out: Path, force: bool) -> Path:
    """Check ``out`` may be written and return a new empty temporary folder beside it (a unique name)."""
    _check_out(out, force)
    return temp_sibling_dir(out)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder onto ``out`` (replacing an empty folder, or any ``out`` under --force).
    Under --force the old ``out`` is first moved to another unique name beside it, then removed."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if out.exists() or out.is_symlink():  # --force: swap, then remove the old copy
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.absolute().parent))
        old_out = old / out.name
        os.replace(out, old_out)
        os.replace(tmp, out)
        _remove(old_out)
        old.rmdir()
    else:
        os.replace(tmp, out)


def _check_apart(run_dir: Path, out: Path) -> None:
    """Refuse an ``out`` that is the run folder, lies inside it or contains it (--force would delete the run)."""
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target.is_relative_to(run) or run.is_relative_to(target):
        raise ValueError(f"OUT {out} must lie outside the run folder {run_dir} (and not contain it)")


def export_model_hf(model: torch.nn.Module, out: str | os.PathLike, force: bool = False) -> Path:
    """Write :class:`moekit.model.MoELM` ``model`` as a ``Qwen3MoeForCausalLM`` checkpoint folder ``out``.

    Raises ``ValueError`` when the model has no Qwen3-MoE equivalent (the message lists why) or when ``out``
    exists and is not empty and ``force`` is false. Returns the folder.
    """
    problems = qwen3_incompatibilities(model.config)
    if problems:
        raise ValueError("cannot export to Hugging Face format: the model has no Qwen3-MoE equivalent: "
                         + "; ".join(problems))
    out = Path(out)
    config = qwen3_moe_config_dict(model.config)
    dtype = next(model.parameters()).dtype
    state = to_hf_state_dict(model)
    _check_out(out, force)  # before the weights are converted
    tmp = _prepare_out(out, force)
    try:
        try:
            from transformers import Qwen3MoeConfig
        except ImportError:  # no transformers: write the same keys by hand
            cfg = {**config, "model_type": "qwen3_moe", "dtype": _DTYPE_NAMES.get(dtype, str(dtype))}
        else:
            hf = Qwen3MoeConfig(**config)
            hf.dtype = _DTYPE_NAMES.get(dtype, str(dtype))
            cfg = json.loads(hf.to_json_string(use_diff=False))
        atomic_write_json(tmp / "config.json", cfg)
        atomic_save_safetensors(tmp / "model.safetensors", state, metadata={"format": "pt"})
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Export the latest weights of the moekit run folder ``run_dir`` to ``out`` (see :func:`export_model_hf`)."""
    from ..train import load_run

    _check_apart(Path(run_dir), Path(out))
    model, _ = load_run(Path(run_dir))
    return export_model_hf(model, out, force=force)
