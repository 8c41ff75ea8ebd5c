"""Dynamic evaluation of all parameters, the strong reference for test-time rewiring.

Krause, Kahembwe, Murray, Renals 2018, "Dynamic Evaluation of Neural Sequence Models" (arXiv:1709.07432):
while a sequence is scored, the model takes gradient steps on the part already scored, so later predictions
use weights adapted to the sequence. Taken from the paper: the update rule ``theta <- theta - lr * grad +
decay * (theta_0 - theta)`` (SGD with a decay towards the original weights ``theta_0``; ``decay=0`` is plain
SGD dynamic evaluation), adaptation on segments already scored only. moekit's choices, for a like-for-like
comparison with :class:`moekit.adapt.Rewirer`: the same protocol as :func:`moekit.adapt.evaluate_streaming`
(the weights reset per window; before each chunk of ``every`` tokens, ``steps`` steps on the whole scored
prefix) -- "matched steps" -- and an optional Adam instead of the paper's SGD/RMS rule. The paper adapts on
the most recent segment and carries the weights across the whole test set; here they reset per window.

:class:`DynamicEvaluator` has the Rewirer's interface (``reset``, ``adapt``, ``every``, ``pad_id``), so
``evaluate_streaming(model, DynamicEvaluator(model, ...), windows)`` runs it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.tokenizer import PAD_ID
from .rewire import RewireReport, check_schedule, descend

__all__ = ["DynamicEvaluator"]


class DynamicEvaluator:
    """Dynamic evaluation of every floating-point parameter of ``model`` (see the module docstring).

    ``reset()`` puts the original weights back (bit-equal) and clears the optimiser; ``adapt(ids)`` runs
    ``steps`` steps on ``ids`` and returns a :class:`RewireReport` (no routing change, no offsets)."""

    OPTIMIZERS = ("sgd", "adam")

    def __init__(self, model: nn.Module, *, lr: float = 1e-4, steps: int = 3, every: int = 64,
                 optimizer: str = "sgd", decay: float = 0.0, pad_id: int | None = PAD_ID):
        check_schedule("DynamicEvaluator", steps=steps, every=every, lr=lr, optimizer=optimizer,
                       allowed=self.OPTIMIZERS)
        if not 0 <= decay < 1:
            raise ValueError(f"DynamicEvaluator: decay must be in [0, 1), got {decay!r}")
        self.model, self.lr, self.steps, self.every = model, float(lr), steps, every
        self.optimizer_name, self.decay, self.pad_id = optimizer, float(decay), pad_id
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.original = [p.detach().clone() for p in self.params]
        self.last_report: RewireReport | None = None
        self._optimizer = None
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        for p, p0 in zip(self.params, self.original):
            p.copy_(p0)
            p.grad = None
        cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.SGD
        self._optimizer = cls(self.params, lr=self.lr)

    def adapt(self, ids) -> RewireReport:
        device = self.params[0].device
        ids_BL = torch.as_tensor(ids, dtype=torch.int64, device=device)
        if ids_BL.dim() == 1:
            ids_BL = ids_BL[None]
        flags = [p.requires_grad for p in self.params]
        was_training = self.model.training
        self.model.eval()
        try:
            for p in self.params:
                p.requires_grad_(True)
            def pull_back():  # Krause et al.'s decay towards the original weights
                if self.decay:
                    for p, p0 in zip(self.params, self.original):
                        p.add_(p0 - p, alpha=self.decay)

            before, after = descend(self.model, self._optimizer, ids_BL, self.steps, self.pad_id, pull_back)
        finally:
            for p, flag in zip(self.params, flags):
                p.requires_grad_(flag)
                p.grad = None
            self.model.train(was_training)
        self.last_report = RewireReport(int(ids_BL.shape[1] - 1), before, after, [], [])
        return self.last_report
