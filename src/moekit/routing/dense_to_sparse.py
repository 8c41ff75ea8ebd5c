"""Dense-to-sparse gates: a temperature softmax whose temperature is annealed, so that the number of experts a
token uses falls from all of them towards one; experts are used when their routing weight exceeds a threshold.

``dts`` -- EvoMoE's DTS-Gate. Paper: Nie, Miao, Cao, Ma, Liu, Xue, Miao, Liu, Yang, Cui 2021, "EvoMoE: An
Evolutional Mixture-of-Experts Training Framework via Dense-To-Sparse Gate" (arXiv:2112.14397), section on
the gate-sparsify phase: ``G = softmax((S + g) / tau)`` with Gumbel noise ``g`` and a temperature annealed
from high to low during training; experts whose weight exceeds a threshold are activated, so the gate starts
dense and becomes sparse. Checked against the authors' code (github.com/codecaution/EvoMoE,
``fairseq/modules/moe/topkgate.py``): the gate is ``F.gumbel_softmax(log_softmax(S), tau, hard=False)``
(equal to ``softmax((S + g) / tau)``), experts with ``G > GUMBEL_THRESHOLD = 0.02`` are kept, and the
temperature ("heat") follows a scheduler whose options include cosine annealing
(``optim/heat_scheduler/cosine_heat_scheduler.py``). Differences from that code, all options here:
the authors keep the unnormalised ``G`` of the kept experts (``renormalize=False`` reproduces it; the default
renormalises the kept weights to sum to one); they switch to top-1 gating at inference (``eval_mode="topk"``
with ``top_k=1``; the default keeps the threshold rule, without noise); their code guarantees no minimum
number of experts (here the token's highest-weight expert is always kept). The start/end temperatures
2.0 -> 0.3 are those of moekit's working notes on EvoMoE (Nie et al. 2021, "EvoMoE: An Evolutional
Mixture-of-Experts Training Framework via Dense-To-Sparse Gate", arXiv:2112.14397) [recon: not found in the
code, which takes them from the command line].

``activation_dts`` -- the activation dense-to-sparse gate. Paper: Nguyen, Akbarian, Ho 2024, "Is Temperature
Sample Efficient for Softmax Gaussian Mixture of Experts?" (ICML 2024, arXiv:2401.13875): the output of the
linear layer goes through an activation ``sigma`` before the temperature softmax, ``G = softmax(sigma(S) /
tau)``, which removes the interaction (a PDE ``tau dG/dtau = -S dG/dS`` for the plain gate, whose logits
are homogeneous in (W, 1/tau)) that makes the plain gate's parameter estimation slower than any polynomial
rate. Checked against the paper's abstract and its published summary (PMLR v235 PDF front page, "docs"
corpus): gate form and the claim (polynomial rates with the activation, as slow as O(1/log n) without).
The paper's condition on ``sigma`` is a linear-independence condition on it and its derivatives; the
activations offered here are non-homogeneous ones (tanh default, sigmoid, gelu, silu) [recon: which
activations the paper's theorems admit was not checked]. The threshold mechanics are those of ``dts``.

Legend: T tokens, D model width, E experts, K experts per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register
from .base import Routing, RoutingContext
from .topk import TopKRouter

__all__ = ["DenseToSparseRouter", "ActivationDenseToSparseRouter", "annealed_temperature", "SCHEDULES",
           "GATE_ACTIVATIONS"]

SCHEDULES = ("cosine", "linear", "exponential")
EVAL_MODES = ("threshold", "topk")
GATE_ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "silu": F.silu,
}


def annealed_temperature(step: int, tau_start: float, tau_end: float, anneal_steps: int, schedule: str) -> float:
    """The temperature after ``step`` optimiser steps: ``tau_start`` at 0, ``tau_end`` from ``anneal_steps`` on.

    ``cosine``: ``tau_end + (tau_start - tau_end) (1 + cos(pi s)) / 2``; ``linear``: straight line;
    ``exponential``: ``tau_start (tau_end / tau_start) ** s``; ``s = min(step / anneal_steps, 1)``.
    """
    frac = 1.0 if anneal_steps <= 0 else min(max(step, 0) / anneal_steps, 1.0)
    if schedule == "cosine":
        return tau_end + 0.5 * (tau_start - tau_end) * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":
        return tau_start + (tau_end - tau_start) * frac
    if schedule == "exponential":
        return tau_start * (tau_end / tau_start) ** frac
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(Exp(1))`` of ``x``'s shape (as ``torch.nn.functional.gumbel_softmax``)."""
    return -torch.empty_like(x).exponential_().log()


@register("dts")
class DenseToSparseRouter(TopKRouter):
    """EvoMoE's dense-to-sparse gate (Nie et al. 2021, arXiv:2112.14397).

    ``G = softmax((S + g) / tau)`` (Gumbel noise ``g`` in training only, when ``gumbel``); a token uses every
    expert with ``G > threshold`` and always its highest-weight one; routing weights are ``G`` of the used experts,
    renormalised to sum to one when ``renormalize``. ``tau`` follows ``schedule`` from ``tau_start`` to
    ``tau_end`` over ``anneal_steps`` optimiser steps, advanced by :meth:`end_step` (the step count is saved
    in :meth:`balancing_state`). ``eval_mode="topk"`` routes to the ``top_k`` highest ``G`` at inference
    (EvoMoE's code uses top-1 at inference); ``"threshold"`` keeps the threshold rule without noise.
    ``probs`` is the noise-free gate ``softmax(S / tau)``; balancing: ``aux_loss`` ``"switch"``,
    ``"global"`` or None, and ``z_loss_coef``, as :class:`TopKRouter`.

    ``topk_ids``/``topk_weights`` are None (a token has a variable number of experts) except with
    ``eval_mode="topk"`` at inference; ``top_k`` is used by that mode only. The default threshold (0.02, the
    authors' value) is below the uniform weight ``1/E`` only for ``E < 50``; with more experts lower it (for
    example to ``0.5 / E``) so that the gate starts dense. With near-zero logits the Gumbel noise alone leaves
    about 2.3 experts per token at ``tau = 0.3`` (the runner-up passes 0.02 with probability ~0.7); learned
    logits make it sparser.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        tau_start: float = 2.0,
        tau_end: float = 0.3,
        anneal_steps: int = 10_000,
        schedule: str = "cosine",
        threshold: float = 0.02,
        renormalize: bool = True,
        gumbel: bool = True,
        eval_mode: str = "threshold",
        jitter: float = 0.0,
        aux_loss: str | None = "switch",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
    ):
        if aux_loss == "sequence":
            raise ValueError("aux_loss: 'sequence' needs a fixed number of experts per token; "
                             "use 'switch', 'global' or None with this router")
        super().__init__(dim, num_experts, top_k, jitter=jitter, aux_loss=aux_loss, aux_loss_coef=aux_loss_coef,
                         z_loss_coef=z_loss_coef)
        for name, value in (("tau_start", tau_start), ("tau_end", tau_end)):
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
            raise ValueError(f"anneal_steps must be an integer >= 0, got {anneal_steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
            raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        self.tau_start = float(tau_start)
        self.tau_end = float(tau_end)
        self.anneal_steps = anneal_steps
        self.schedule = schedule
        self.threshold = float(threshold)
        self.renormalize = bool(renormalize)
        self.gumbel = bool(gumbel)
        self.eval_mode = eval_mode
        self.anneal_step = 0

    @property
    def temperature(self) -> float:
        """The current temperature ``tau``."""
        return annealed_temperature(self.anneal_step, self.tau_start, self.tau_end, self.anneal_steps,
                                    self.schedule)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, tau={self.temperature:.4g} "
                f"({self.tau_start}->{self.tau_end} over {self.anneal_steps} steps, {self.schedule}), "
                f"threshold={self.threshold}, step={self.anneal_step}")

    def gate_input(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """What the temperature softmax is applied to: the logits themselves here."""
        return logits_TE

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        logits_TE = self.logits(x_TD, ctx)
        mask_T = ctx.flat_mask(x_TD.shape[0], x_TD.device) if ctx is not None else None
        gate_in_TE = self.gate_input(logits_TE)
        tau = self.temperature
        probs_TE = torch.softmax(gate_in_TE / tau, dim=-1)
        gate_TE = probs_TE
        if self.training and self.gumbel:
            gate_TE = torch.softmax((gate_in_TE + gumbel_like(gate_in_TE)) / tau, dim=-1)
        if not self.training and self.eval_mode == "topk":
            topk_weights_TK, topk_ids_TK = gate_TE.topk(self.top_k, dim=-1)
            if self.renormalize:
                topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
            return Routing.from_topk(topk_ids_TK, topk_weights_TK, self.num_experts, logits=logits_TE,
                                     probs=probs_TE, token_mask=mask_T)
        gate_detached_TE = gate_TE.detach()
        mask_TE = gate_detached_TE > self.threshold
        mask_TE.scatter_(1, gate_detached_TE.argmax(dim=-1, keepdim=True), True)  # at least one expert
        token_ids, expert_ids = mask_TE.nonzero(as_tuple=True)  # token-major, experts ascending
        weights_TE = gate_TE
        if self.renormalize:
            weights_TE = gate_TE / (gate_TE * mask_TE).sum(dim=-1, keepdim=True)
        routing = Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights_TE[token_ids, expert_ids],
                          num_tokens=x_TD.shape[0], num_experts=self.num_experts, logits=logits_TE,
                          probs=probs_TE, token_mask=mask_T)
        if self.training:
            routing.aux_losses = self._aux_losses(routing, ctx)
        return routing

    def balancing_state(self) -> dict:
        return {**super().balancing_state(), "anneal_step": self.anneal_step}

    def load_balancing_state(self, state: dict) -> None:
        super().load_balancing_state(state)
        self.anneal_step = int(state.get("anneal_step", 0))

    @torch.no_grad()
    def end_step(self) -> None:
        """After an optimiser step: advance the temperature schedule (and reset the global-batch counts)."""
        super().end_step()
        self.anneal_step += 1


@register("activation_dts")
class ActivationDenseToSparseRouter(DenseToSparseRouter):
    """Activation dense-to-sparse gate (Nguyen, Akbarian, Ho 2024, arXiv:2401.13875): ``G = softmax(sigma(S)
    / tau)``, ``sigma`` = ``activation`` (``tanh`` default, ``sigmoid``, ``gelu``, ``silu``), with the threshold,
    annealing and Gumbel options of :class:`DenseToSparseRouter` (the paper's statistical gate has no noise:
    ``gumbel=False`` gives it exactly). ``logits`` are ``S``; ``probs`` the noise-free ``G``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "tanh",
        tau_start: float = 2.0,
        tau_end: float = 0.3,
        anneal_steps: int = 10_000,
        schedule: str = "cosine",
        threshold: float = 0.02,
        renormalize: bool = True,
        gumbel: bool = True,
        eval_mode: str = "threshold",
        jitter: float = 0.0,
        aux_loss: str | None = "switch",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
    ):
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(GATE_ACTIVATIONS)}, got {activation!r}")
        super().__init__(dim, num_experts, top_k, tau_start=tau_start, tau_end=tau_end, anneal_steps=anneal_steps,
                         schedule=schedule, threshold=threshold, renormalize=renormalize, gumbel=gumbel,
                         eval_mode=eval_mode, jitter=jitter, aux_loss=aux_loss, aux_loss_coef=aux_loss_coef,
                         z_loss_coef=z_loss_coef)
        self.activation = activation

    def gate_input(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return GATE_ACTIVATIONS[self.activation](logits_TE)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, " + super().extra_repr()
