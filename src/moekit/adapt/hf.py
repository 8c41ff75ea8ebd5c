"""Test-time rewiring on transformers models, and where the learned deltas go.

After :func:`moekit.hf.surgery.replace_routers`, every MoE block's router is a moekit router (inside a
:class:`~moekit.hf.surgery.RouterAdapter`) with its own ``logit_offset``; :class:`moekit.adapt.Rewirer` and
:func:`moekit.adapt.evaluate_streaming` work on such a model as on a moekit one (pass ``pad_id`` = the
tokenizer's pad id, or None). The deltas can then be

* written back (:func:`write_back_offsets`) into the original router class when it can hold them: a linear
  router bias ``[E]`` (``logits = W x + b``, so ``b += delta`` gives the same logits). ``ValueError`` otherwise,
  naming the class: OLMoE's, Mixtral's and Qwen2/Qwen3-MoE's routers are bias-free linear layers, and
  DeepSeek-V3's ``e_score_correction_bias`` moves the selection only, not the routing weights, so it cannot hold
  a logit offset either (and :mod:`moekit.hf.surgery` refuses routers with a linear bias, e.g. gpt-oss's, so
  in practice no class the surgery accepts can hold them);
* saved beside the checkpoint (:func:`save_offsets`, ``moekit_logit_offsets.safetensors``, keys
  ``<router module name>.logit_offset``) and loaded into a freshly surgered model (:func:`load_offsets`).
  :func:`save_pretrained_with_offsets` writes the checkpoint (routers written back) and the offsets together.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..routing.offsets import load_logit_offsets, save_logit_offsets

__all__ = ["OFFSETS_FILE", "save_offsets", "load_offsets", "write_back_offsets", "save_pretrained_with_offsets"]

OFFSETS_FILE = "moekit_logit_offsets.safetensors"


def _path(path) -> Path:
    path = Path(path)
    return path / OFFSETS_FILE if path.is_dir() or not path.suffix else path


def _adapters(model: nn.Module):
    from ..hf.surgery import adapters

    found = adapters(model)
    if not found:
        raise ValueError("the model has no replaced routers: call moekit.hf.surgery.replace_routers first")
    return found


def save_offsets(model: nn.Module, path) -> Path:
    """Write the offsets of the replaced routers to ``path`` (a file, or a checkpoint folder that receives
    ``moekit_logit_offsets.safetensors``); returns the file."""
    _adapters(model)
    out = _path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_logit_offsets(model, out)
    return out


def load_offsets(model: nn.Module, path) -> Path:
    """Copy offsets saved by :func:`save_offsets` into the replaced routers of ``model`` (ValueError naming the
    mismatch when the routers differ)."""
    _adapters(model)
    file = _path(path)
    load_logit_offsets(model, file)
    return file


def _bias_of(original: nn.Module, num_experts: int):
    bias = getattr(original, "bias", None)
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) == (num_experts,):
        return bias
    return None


@torch.no_grad()
def write_back_offsets(model: nn.Module) -> list[str]:
    """Add every replaced router's offset to the linear bias of its original transformers router and zero the
    offset; returns the blocks changed. Checked for every block first: ``ValueError`` naming the classes
    without such a bias (use :func:`save_offsets` for those)."""
    found = _adapters(model)
    missing = sorted({type(a.original).__name__ for a in found
                      if _bias_of(a.original, a.router.num_experts) is None})
    if missing:
        raise ValueError(f"router class {', '.join(missing)} has no linear bias [E] to hold the logit offsets; "
                         f"save them beside the checkpoint with moekit.adapt.hf.save_offsets")
    for a in found:
        bias = _bias_of(a.original, a.router.num_experts)
        bias.add_(a.router.logit_offset.to(bias))
        a.router.logit_offset.zero_()
    return [a.block_name for a in found]


def save_pretrained_with_offsets(model: nn.Module, save_directory, **kwargs) -> Path:
    """:func:`moekit.hf.surgery.save_pretrained` (a normal checkpoint of the original class, trained router
    weights written back) plus the offsets in ``moekit_logit_offsets.safetensors`` beside it."""
    from ..hf.surgery import save_pretrained

    save_pretrained(model, save_directory, **kwargs)
    return save_offsets(model, save_directory)
