"""Fine-tuning a trained run on new text (``moekit finetune``): all parameters or the routers only, with the
optional RoMA regulariser, through moekit's own trainer (:class:`moekit.train.Trainer`), so checkpoints,
resume, metrics and evaluation are those of ``moekit train``.

A fine-tune run folder is an ordinary run folder whose ``config.json`` holds a ``finetune`` table::

    {"source": "/abs/path/SRC", "init_step": 400, "trainable": "routers" | "all",
     "roma": null | lambda, "roma_k": 3, "roma_weight": "cosine"}

and whose ``data`` table names the text (``path``, plus ``include_domains`` for a domain of the source
run's corpus). The trainer calls :func:`setup_trainer` before it builds its optimiser (freezing every
parameter outside the routers for ``trainable="routers"``, so AdamW never sees them and they stay bit-equal)
and :func:`load_initial_weights` once, on a fresh start (a resume reads everything from the checkpoint, so
the source run need not exist any more).

RoMA (Li, Li, Zhou 2025, "Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs",
arXiv:2511.07419): ``lambda * sum_i sum_{j in kNN(i)} W_ij ||r_i - r_j||^2`` over the batch's sequences, as in
:mod:`moekit.adapt.roma` (routing vectors, task embeddings, successful neighbours and weights are documented
there). :class:`RomaRegulariser` computes it from the trainer's own forward pass (forward hooks keep the final
hidden states and the logits), so it costs no second forward. The paper fine-tunes the routers of the last
few layers with an external embedding model; moekit fine-tunes every MoE layer's router (all of them are
small here) and uses the model's own final hidden states as the task embedding.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenizer import IGNORE_INDEX, PAD_ID
from .roma import router_parameters, roma_term, routing_vectors

__all__ = ["TRAINABLE", "check_finetune_table", "setup_trainer", "load_initial_weights", "RomaRegulariser",
           "freeze_all_but_routers"]

TRAINABLE = ("all", "routers")
WEIGHTS = ("cosine", "heat")


def check_finetune_table(ft: dict, where: str = "finetune") -> dict:
    """The ``finetune`` table of a run config, checked (``ValueError`` naming the key)."""
    if not isinstance(ft, dict):
        raise ValueError(f"{where}: expected an object, got {type(ft).__name__}")
    if not isinstance(ft.get("source"), str) or not ft["source"]:
        raise ValueError(f"{where}: 'source' must be the source run folder")
    if ft.get("trainable", "all") not in TRAINABLE:
        raise ValueError(f"{where}: 'trainable' must be one of {TRAINABLE}, got {ft.get('trainable')!r}")
    lam = ft.get("roma")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0
                            or lam == float("inf")):
        raise ValueError(f"{where}: 'roma' must be a finite number >= 0 or null, got {lam!r}")
    k = ft.get("roma_k", 3)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: 'roma_k' must be an integer >= 1, got {k!r}")
    if ft.get("roma_weight", "cosine") not in WEIGHTS:
        raise ValueError(f"{where}: 'roma_weight' must be one of {WEIGHTS}, got {ft.get('roma_weight')!r}")
    return ft


def freeze_all_but_routers(model: nn.Module) -> list[nn.Parameter]:
    """``requires_grad=False`` on every parameter except the routers'; returns the routers' parameters."""
    keep = {id(p) for p in router_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if id(p) in keep]


class RomaRegulariser:
    """``lam * roma_term`` of the trainer's last forward pass (see the module docstring). Called by the
    trainer as ``extra_loss(model, input_ids_BL, targets_BL)`` right after its forward pass; ``metrics()``
    gives ``{"roma": term}`` for the step's record."""

    def __init__(self, model: nn.Module, lam: float, k: int = 3, weight: str = "cosine"):
        self.lam, self.k, self.weight = float(lam), k, weight
        self._hidden = self._logits = None
        self._last = float("nan")
        decoder = getattr(model, "model", None)
        if not isinstance(decoder, nn.Module):
            raise ValueError("RoMA fine-tuning needs a moekit MoELM (model.model returns the final hidden states)")
        decoder.register_forward_hook(self._keep_hidden)
        model.register_forward_hook(self._keep_logits)

    def _keep_hidden(self, module, args, output):
        self._hidden = output.detach()

    def _keep_logits(self, module, args, output):
        self._logits = output.detach()

    def __call__(self, model: nn.Module, input_ids_BL: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        mask_BL = input_ids_BL != PAD_ID
        r_BR = routing_vectors(model, mask_NL=mask_BL)
        m_BL1 = mask_BL[..., None].float()
        emb_BH = (self._hidden.float() * m_BL1).sum(1) / m_BL1.sum(1).clamp_min(1.0)
        nats_BL = F.cross_entropy(self._logits.float().transpose(1, 2), targets_BL, ignore_index=IGNORE_INDEX,
                                  reduction="none")
        real_BL = targets_BL != IGNORE_INDEX
        per_sample_B = (nats_BL * real_BL).sum(1) / real_BL.sum(1).clamp_min(1)
        candidates_B = per_sample_B <= per_sample_B.median()
        term = roma_term(r_BR, emb_BH, self.k, weight=self.weight, candidates=candidates_B)
        self._last = float(term.detach())
        return self.lam * term

    def metrics(self) -> dict:
        return {"roma": self._last}


def setup_trainer(trainer, ft: dict) -> None:
    """Apply the ``finetune`` table to a freshly built :class:`moekit.train.Trainer` (before its optimiser)."""
    check_finetune_table(ft)
    if trainer.layout.world_size > 1:
        raise ValueError("finetune: runs in one process (no expert parallelism)")
    if ft.get("trainable", "all") == "routers":
        freeze_all_but_routers(trainer.model)
    if ft.get("roma"):
        trainer.extra_loss = RomaRegulariser(trainer.model, ft["roma"], ft.get("roma_k", 3),
                                             ft.get("roma_weight", "cosine"))


def source_weights(source: str | Path) -> Path:
    path = Path(source) / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"finetune: source run {source} has no model.safetensors")
    return path


def load_initial_weights(trainer, ft: dict) -> None:
    """Copy the source run's weights into the trainer's model (in place: the optimiser's tensors stay)."""
    from ..train.checkpoint import load_model_weights

    load_model_weights(trainer.model, source_weights(ft["source"]))
