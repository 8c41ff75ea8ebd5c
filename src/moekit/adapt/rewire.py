"""Test-time rewiring of the routers: data-free online adaptation of the router logit offsets.

Method: Su, Yang, Shen, Yin, Liu, Geiping 2025, "Rewiring Experts on the Fly: Continuous Rerouting for Better
Online Adaptation in Mixture-of-Expert models" (October 2025; cited by title, the arXiv id was not checked
here). Per selected MoE layer a vector ``delta_E``, zero at the start of every prompt, is added to the router
logits (moekit's :attr:`moekit.routing.Router.logit_offset`); only these vectors are trained, by the next-token
loss on the text the model already has (the prompt, then what it generated or, in streaming evaluation,
what was already scored). Every other weight and buffer stays bit-equal.

The paper's knobs (which layers, how many steps, learning rate) are tuned per model there; moekit's defaults
are its own, chosen on tiny byte-level runs, and all are arguments:

- ``layers=None``: every MoE layer whose router has logits (the paper adapts a selected subset of layers;
  pass MoE-layer positions, 0-based in model order, to do the same);
- ``optimizer="adam"``, ``lr=0.01``, ``steps=3`` optimiser steps per adaptation (on a 300-step byte-level
  run, lr 0.05 and 0.2 raised validation bits per byte, 0.01 lowered them slightly), ``every=64`` tokens
  between adaptations (the interval :func:`moekit.adapt.evaluate_streaming` uses as its chunk by default);
- over-adaptation is limited as in the paper by the few steps on few parameters, plus an optional
  ``max_norm`` that projects each ``delta_E`` back onto a ball of that L2 radius after every step.

Transformers models: after :func:`moekit.hf.surgery.replace_routers` the moekit routers inside the
:class:`~moekit.hf.surgery.RouterAdapter` modules carry the offsets, and the Rewirer adapts them the same way
(``layers`` then counts the replaced routers in module order; pass ``pad_id`` = the tokenizer's pad id, or
None, since moekit's byte PAD id means nothing there). :mod:`moekit.adapt.hf` writes the deltas back or saves
them beside the checkpoint.

Legend: B batch, L length, E experts, K top-k, V vocabulary.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenizer import PAD_ID
from ..layer import moe_layers

__all__ = ["Rewirer", "RewireReport", "evaluate_streaming", "frozen_weights", "next_token_loss", "windows_from_corpus"]


@contextlib.contextmanager
def frozen_weights(model: nn.Module):
    """Set ``requires_grad=False`` on every parameter of ``model`` for the duration, then restore each flag:
    backward passes then compute gradients for the logit offsets only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def model_logits(model: nn.Module, ids_BL: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """``logits [B, L, V]`` of a moekit model (a tensor) or a transformers model (``.logits``)."""
    out = model(ids_BL, attention_mask=attention_mask) if attention_mask is not None else model(ids_BL)
    return out.logits if hasattr(out, "logits") else out


class _Slot:
    """A replaced transformers router seen as a MoE layer: ``gate`` (the moekit router) and ``last_routing``."""

    def __init__(self, adapter: nn.Module):
        self.adapter, self.gate = adapter, adapter.router

    @property
    def last_routing(self):
        return self.adapter.last_routing


def routed_layers(model: nn.Module) -> list:
    """moekit's MoE layers of ``model``, or else the router adapters of a transformers model after
    :func:`moekit.hf.surgery.replace_routers` (each with ``gate`` and ``last_routing``), in module order."""
    layers = moe_layers(model)
    if layers:
        return layers
    from ..hf.surgery import adapters

    return [_Slot(a) for a in adapters(model)]


def next_token_loss(model: nn.Module, ids_BL: torch.Tensor, pad_id: int | None = PAD_ID) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``model`` on ``ids_BL``, ``pad_id`` positions masked out."""
    inputs_BL, targets_BL = ids_BL[:, :-1], ids_BL[:, 1:].clone()
    mask = None
    if pad_id is not None:
        real_BL = inputs_BL != pad_id
        mask = None if bool(real_BL.all()) else real_BL
        targets_BL[targets_BL == pad_id] = -100
    logits_BLV = model_logits(model, inputs_BL, mask)
    return F.cross_entropy(logits_BLV.float().transpose(1, 2), targets_BL, ignore_index=-100)


@dataclass
class RewireReport:
    """What the last :meth:`Rewirer.adapt` did: the loss on the adaptation text before and after (nats), the
    L2 norm of each selected layer's offset, and per MoE layer the fraction of top-k choices on the
    adaptation text that differ from the unadapted model's (``routing_change``; overall mean in
    ``routing_change_mean``)."""

    tokens: int
    loss_before: float
    loss_after: float
    delta_norms: list[float] = field(default_factory=list)
    routing_change: list[float] = field(default_factory=list)

    @property
    def routing_change_mean(self) -> float:
        return sum(self.routing_change) / len(self.routing_change) if self.routing_change else 0.0

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "loss_before": self.loss_before, "loss_after": self.loss_after,
                "delta_norms": self.delta_norms, "routing_change": self.routing_change,
                "routing_change_mean": self.routing_change_mean}



def check_schedule(who: str, *, steps, every, lr, optimizer: str, allowed: tuple[str, ...]) -> None:
    """The adaptation schedule shared by :class:`Rewirer` and the dynamic evaluator: ``steps`` an integer >= 0,
    ``every`` an integer >= 1, ``lr`` > 0, ``optimizer`` one of ``allowed``; ``ValueError`` naming ``who``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{who}: steps must be an integer >= 0, got {steps!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{who}: every must be an integer >= 1, got {every!r}")
    if not lr > 0:
        raise ValueError(f"{who}: lr must be > 0, got {lr!r}")
    if optimizer not in allowed:
        raise ValueError(f"{who}: optimizer must be one of {allowed}, got {optimizer!r}")


def descend(model: nn.Module, optimizer: torch.optim.Optimizer, ids_BL: torch.Tensor, steps: int,
            pad_id: int | None, after_step=None) -> tuple[float, float]:
    """``steps`` optimiser steps of next-token loss on ``ids_BL`` (``after_step()`` run without grad after each,
    e.g. a projection); returns the loss before the first step and after the last (equal when ``steps`` is 0).
    The adaptation loop of :class:`Rewirer` and :class:`moekit.adapt.dynamic_eval.DynamicEvaluator`."""
    before = None
    with torch.enable_grad():
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = next_token_loss(model, ids_BL, pad_id)
            if step == 0:
                before = float(loss.detach())
            loss.backward()
            optimizer.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
    with torch.no_grad():
        after = float(next_token_loss(model, ids_BL, pad_id))
    return (after if before is None else before), after

class Rewirer:
    """Online adaptation of the router logit offsets of ``model`` (see the module docstring for the method and
    the defaults).

    ``reset()`` zeroes the offsets and the optimiser state (call it per prompt or document); ``adapt(ids)``
    runs ``steps`` optimiser steps of next-token loss on ``ids`` (``[L]`` or ``[B, L]`` token ids, the text
    so far) and returns a :class:`RewireReport` (also kept as ``last_report``). The model is run in eval mode
    during adaptation (no jitter, no balancing-bias updates) and its mode is restored afterwards.
    ``detach()`` zeroes the offsets and clears their ``requires_grad``, leaving the model as it was.
    """

    OPTIMIZERS = ("adam", "sgd")

    def __init__(self, model: nn.Module, layers: list[int] | None = None, *, lr: float = 0.01, steps: int = 3,
                 every: int = 64, optimizer: str = "adam", max_norm: float | None = None,
                 report_routing: bool = True, pad_id: int | None | str = "auto"):
        layers_all = routed_layers(model)
        if not layers_all:
            raise ValueError(f"Rewirer: {type(model).__name__} has no MoE layer")
        check_schedule("Rewirer", steps=steps, every=every, lr=lr, optimizer=optimizer, allowed=self.OPTIMIZERS)
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"Rewirer: max_norm must be > 0 or None, got {max_norm!r}")
        chosen = list(range(len(layers_all))) if layers is None else list(layers)
        for i in chosen:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(layers_all):
                raise ValueError(f"Rewirer: layers holds {i!r}; MoE layer positions run from 0 to "
                                 f"{len(layers_all) - 1}")
        if not chosen:
            raise ValueError("Rewirer: layers is empty")
        for i in chosen:
            if not layers_all[i].gate.has_logits:
                raise ValueError(f"Rewirer: the router of MoE layer {i} ({type(layers_all[i].gate).__name__}) "
                                 "has no logits, so it has no offset to adapt")
        self.model = model
        self.layers = sorted(set(chosen))
        self.all_layers = layers_all
        self.lr, self.steps, self.every = float(lr), steps, every
        self.optimizer_name, self.max_norm = optimizer, max_norm
        self.report_routing = report_routing
        self.pad_id = (PAD_ID if moe_layers(model) else None) if pad_id == "auto" else pad_id
        self.last_report: RewireReport | None = None
        self._optimizer = None
        self.reset()

    @property
    def offsets(self) -> list[torch.Tensor]:
        """The selected layers' offset tensors (the routers' own leaves), in :attr:`layers` order."""
        return [self.all_layers[i].gate.logit_offset for i in self.layers]

    def reset(self) -> None:
        with torch.no_grad():
            for layer in self.all_layers:
                if layer.gate.has_logits:
                    layer.gate.logit_offset.zero_()
        offsets = self.offsets
        for t in offsets:
            t.requires_grad_(True)
            t.grad = None
        if self.optimizer_name == "adam":
            self._optimizer = torch.optim.Adam(offsets, lr=self.lr)
        else:
            self._optimizer = torch.optim.SGD(offsets, lr=self.lr)

    def detach(self) -> None:
        self.reset()
        for t in self.offsets:
            t.requires_grad_(False)

    def delta_norms(self) -> list[float]:
        return [float(t.detach().norm()) for t in self.offsets]

    def _ids(self, ids) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = torch.as_tensor(ids, dtype=torch.int64, device=device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"Rewirer.adapt: ids must be [L] or [B, L], got {tuple(ids.shape)}")
        return ids

    @torch.no_grad()
    def _topk(self, ids_BL: torch.Tensor) -> list[torch.Tensor | None]:
        model_logits(self.model, ids_BL[:, :-1])
        return [None if layer.last_routing is None or layer.last_routing.topk_ids is None
                else layer.last_routing.topk_ids.clone() for layer in self.all_layers]

    @torch.no_grad()
    def routing_change(self, ids) -> list[float]:
        """Per MoE layer, the fraction of top-k choices on ``ids`` (the input positions) that differ between
        the model with the current offsets and with zero offsets (NaN for routers without top-k lists)."""
        ids_BL = self._ids(ids)
        was_training = self.model.training
        self.model.eval()
        adapted = self._topk(ids_BL)
        saved = [layer.gate.logit_offset.detach().clone() if layer.gate.has_logits else None
                 for layer in self.all_layers]
        for layer in self.all_layers:
            if layer.gate.has_logits:
                layer.gate.logit_offset.zero_()
        try:
            base = self._topk(ids_BL)
        finally:
            for layer, value in zip(self.all_layers, saved):
                if value is not None:
                    layer.gate.logit_offset.copy_(value)
            self.model.train(was_training)
        out = []
        for a_TK, b_TK in zip(adapted, base):
            if a_TK is None or b_TK is None:
                out.append(float("nan"))
                continue
            kept_TK = (a_TK[:, :, None] == b_TK[:, None, :]).any(-1)  # adapted choice also among base choices
            out.append(float(1.0 - kept_TK.float().mean()))
        return out

    def adapt(self, ids) -> RewireReport:
        ids_BL = self._ids(ids)
        if ids_BL.shape[1] < 2:
            raise ValueError("Rewirer.adapt: needs at least two tokens (one prediction)")
        was_training = self.model.training
        self.model.eval()
        offsets = self.offsets
        try:
            def clip():
                if self.max_norm is not None:
                    for t in offsets:
                        norm = t.norm()
                        if norm > self.max_norm:
                            t.mul_(self.max_norm / norm)

            with frozen_weights(self.model):
                before, after = descend(self.model, self._optimizer, ids_BL, self.steps, self.pad_id, clip)
        finally:
            self.model.train(was_training)
        change = self.routing_change(ids_BL) if self.report_routing else []
        real = ids_BL[:, 1:] != self.pad_id if self.pad_id is not None else torch.ones_like(ids_BL[:, 1:], dtype=torch.bool)
        self.last_report = RewireReport(int(real.sum()), before, after, self.delta_norms(),
                                        change)
        return self.last_report


# ------------------------------------------------------------------------------------- streaming evaluation
def windows_from_corpus(corpus, seq_len: int, max_windows: int | None = None, split: str = "val") -> list[list[int]]:
    """The validation windows of :func:`moekit.train.evaluate` (``seq_len + 1`` tokens each, the trailing PAD
    of the last one dropped), as lists of token ids."""
    from ..data.batches import val_batches

    out = []
    for vb in val_batches(corpus, 64, seq_len, max_windows, split=split):
        full_BX = torch.cat([vb.input_ids, vb.targets[:, -1:]], dim=1)
        for row_X, tgt_L in zip(full_BX, vb.targets):
            n = int((tgt_L != -100).sum()) + 1
            out.append(row_X[:n].tolist())
    return [w for w in out if len(w) >= 2]


def _nats(logits_LV: torch.Tensor, targets_L: torch.Tensor, pad_id: int | None = PAD_ID) -> torch.Tensor:
    targets_L = targets_L.clone()
    if pad_id is not None:
        targets_L[targets_L == pad_id] = -100
    return F.cross_entropy(logits_LV.float(), targets_L, ignore_index=-100, reduction="none")


def evaluate_streaming(model: nn.Module, rewirer: Rewirer, windows, chunk: int | None = None,
                       trace: list | None = None, per_token: bool = False) -> dict:
    """Bits per byte of ``model`` on ``windows`` (sequences of token ids, scored left to right) with streaming
    rewiring, and without (the plain model, offsets zero).

    Each window starts from zero offsets (``rewirer.reset()``). Its targets are scored in chunks of ``chunk``
    tokens (default ``rewirer.every``); before chunk ``c`` (targets ``c+1 .. c+chunk``) the offsets adapt
    on ``window[:c+1]``, i.e. on the targets already scored and never on the ones about to be scored; the
    chunk is then scored by a forward pass over ``window[:c+chunk]`` with the adapted offsets. ``trace`` (a
    list) receives ``("adapt", window, last_position)`` and ``("score", window, first, last)`` events
    (token positions within the window) in the order they happen. The offsets are zero again on return.

    Returns ``bits_per_byte`` (rewired), ``bits_per_byte_plain``, ``tokens``, ``adaptations``,
    ``routing_change`` (mean fraction of changed top-k choices over the adaptations, when the rewirer reports
    it), the wall time of the plain scoring (``seconds_plain``, one forward per window), of the adaptations
    (``seconds_adapt``, routing-change measurement included when reported) and of the chunked rewired
    scoring (``seconds_score``), and, with ``per_token``, the per-target nats of both as lists per window.
    ``rewirer`` may be any object with ``reset()``, ``adapt(ids)`` and ``every`` (e.g.
    :class:`moekit.adapt.DynamicEvaluator`).
    """
    chunk = rewirer.every if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"evaluate_streaming: chunk must be an integer >= 1, got {chunk!r}")
    device = next(model.parameters()).device
    pad_id = getattr(rewirer, "pad_id", PAD_ID)
    was_training = model.training
    model.eval()
    nats_plain = nats_rewired = 0.0
    count = adaptations = 0
    t_plain = t_adapt = t_score = 0.0
    changes: list[float] = []
    per_plain, per_rewired = [], []
    try:
        for w, window in enumerate(windows):
            ids_N = torch.as_tensor(window, dtype=torch.int64, device=device)
            N = ids_N.numel()
            if N < 2:
                continue
            rewirer.reset()
            t0 = time.perf_counter()
            with torch.no_grad():
                plain_L = _nats(model_logits(model, ids_N[None, :-1])[0], ids_N[1:], pad_id)
            t_plain += time.perf_counter() - t0
            pieces = []
            for c in range(0, N - 1, chunk):
                end = min(c + chunk, N - 1)
                t0 = time.perf_counter()
                if c > 0:
                    report = rewirer.adapt(ids_N[:c + 1])
                    adaptations += 1
                    if report is not None and report.routing_change:
                        changes.append(report.routing_change_mean)
                    if trace is not None:
                        trace.append(("adapt", w, c))
                t1 = time.perf_counter()
                with torch.no_grad():
                    logits_LV = model_logits(model, ids_N[None, :end])[0, c:end]
                pieces.append(_nats(logits_LV, ids_N[c + 1:end + 1], pad_id))
                t2 = time.perf_counter()
                t_adapt += t1 - t0
                t_score += t2 - t1
                if trace is not None:
                    trace.append(("score", w, c + 1, end))
            rewired_L = torch.cat(pieces)
            scored_L = (ids_N[1:] != pad_id) if pad_id is not None else torch.ones_like(ids_N[1:], dtype=torch.bool)
            nats_plain += float(plain_L[scored_L].double().sum())
            nats_rewired += float(rewired_L[scored_L].double().sum())
            count += int(scored_L.sum())
            if per_token:
                per_plain.append(plain_L.tolist())
                per_rewired.append(rewired_L.tolist())
    finally:
        rewirer.reset()
        model.train(was_training)
    ln2 = math.log(2)
    out = {"bits_per_byte": nats_rewired / count / ln2 if count else float("nan"),
           "bits_per_byte_plain": nats_plain / count / ln2 if count else float("nan"),
           "tokens": count, "adaptations": adaptations,
           "routing_change": sum(changes) / len(changes) if changes else float("nan"),
           "seconds_plain": t_plain, "seconds_adapt": t_adapt, "seconds_score": t_score}
    if per_token:
        out["nats"], out["nats_plain"] = per_rewired, per_plain
    return out
