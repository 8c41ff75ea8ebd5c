"""ModuleFormer's routing losses: mutual-information load balancing and load concentration.

Paper: Shen, Zhang, Cao, Tan, Chen, Gan 2023, "ModuleFormer: Modularity Emerges from Mixture-of-Experts"
(arXiv:2306.04640), its load balancing and load concentration losses (equation numbers not checked); code:
IBM/ModuleFormer ``moduleformer/utils/gate.py`` (``top_k_gating``, ``aux_loss='mi'``).

* Mutual-information loss (checked against ``gate.py`` and the paper's equation as quoted in a review of
  the paper): ``L_MI = -H(E) + H(E|X) = sum_e p(e) log p(e) - 1/|X| sum_x sum_e g(e|x) log g(e|x)``, with
  ``p(e)`` the batch mean of the routing probabilities ``g(e|x)``; minimising it maximises the mutual
  information between tokens and experts (balanced marginal, confident per-token choice). As in ``gate.py``
  the probabilities are the full softmax over experts (before top-k). ``gate.py`` adds ``1e-8`` inside the
  marginal's log; here ``0 log 0 = 0`` exactly (the log's argument is clamped at the smallest normal float).
* Load concentration (checked against the same review of the paper's equation): during fine-tuning on task
  data, minimise the marginal entropy ``L_conc = H(E) = -sum_e p(e) log p(e)`` so that the task uses few
  experts, which can then be pruned (``moekit prune``, :mod:`moekit.compress.prune`) [recon: that it replaces the
  MI loss during fine-tuning, rather than adds to it].

The router ``moduleformer`` is a token-choice top-k router (:class:`TopKRouter`: softmax, no
renormalisation of the K weights by default, as ``gate.py``) whose auxiliary loss is one of these.

Legend: T tokens, E experts, K experts per token.
"""
from __future__ import annotations

import torch

from . import register
from .base import Routing, RoutingContext
from .topk import TopKRouter

__all__ = ["entropy", "mi_loss", "concentration_loss", "ModuleFormerRouter", "BALANCES"]

BALANCES = ("mi", "concentration")


def entropy(p_XE: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last dimension, ``0 log 0 = 0``; differentiable (finite gradient at 0)."""
    tiny = torch.finfo(p_XE.dtype).tiny
    return -(p_XE * p_XE.clamp_min(tiny).log()).sum(dim=-1)


def _real_probs(probs_TE: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """float32 probabilities with masked rows zeroed, and the number of real rows."""
    probs_TE = probs_TE.float()
    if token_mask is None:
        return probs_TE, probs_TE.shape[0]
    real_T = token_mask.to(probs_TE.device).bool().reshape(-1)
    return probs_TE.masked_fill(~real_T[:, None], 0.0), int(real_T.sum())


def mi_loss(probs_TE: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``-H(E) + H(E|X)``: ``H`` of the batch-mean distribution ``p(e)`` minus the mean per-token entropy,
    both over the real tokens (``token_mask``, None = all); 0 without tokens.

    Ranges over ``[-log E, log E]``; ``-log E`` when every token picks one expert with certainty and the
    experts are used equally.
    """
    probs_TE, count = _real_probs(probs_TE, token_mask)
    if count == 0:
        return probs_TE.sum() * 0.0
    return -entropy(probs_TE.sum(dim=0) / count) + entropy(probs_TE).sum() / count


def concentration_loss(probs_TE: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``H(E)``: the entropy of the mean routing distribution of the real tokens (0 when every token uses one
    expert, and without tokens)."""
    probs_TE, count = _real_probs(probs_TE, token_mask)
    if count == 0:
        return probs_TE.sum() * 0.0
    return entropy(probs_TE.sum(dim=0) / count)


@register("moduleformer")
class ModuleFormerRouter(TopKRouter):
    """Top-k router whose auxiliary loss is ModuleFormer's (Shen et al. 2023, arXiv:2306.04640).

    ``balance="mi"`` (pre-training: loss ``"mi"``) or ``"concentration"`` (fine-tuning: loss
    ``"concentration"``), weighted by ``coef``; plus the router z-loss with ``z_loss_coef``. The other options
    are those of :class:`TopKRouter` without its own balancing (no switch loss, no selection bias).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        balance: str = "mi",
        coef: float = 1e-2,
        norm_topk: bool = False,
        scaling_factor: float = 1.0,
        jitter: float = 0.0,
        z_loss_coef: float = 0.0,
    ):
        super().__init__(dim, num_experts, top_k, norm_topk=norm_topk, scaling_factor=scaling_factor,
                         jitter=jitter, aux_loss=None, z_loss_coef=z_loss_coef)
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        if not (isinstance(coef, (int, float)) and coef >= 0):
            raise ValueError(f"coef must be >= 0, got {coef!r}")
        self.balance = balance
        self.coef = float(coef)

    def has_balancing(self) -> bool:
        # the MI loss balances the marginal; load concentration does the opposite on purpose
        return self.balance == "mi" and self.coef > 0

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, balance={self.balance}, "
                f"coef={self.coef}")

    global_batch_losses = False  # the MI and concentration losses are estimated on each rank's tokens

    def _aux_losses(self, routing: Routing, ctx: RoutingContext | None) -> dict[str, torch.Tensor]:
        losses = super()._aux_losses(routing, ctx)
        if self.coef > 0:
            loss_fn = mi_loss if self.balance == "mi" else concentration_loss
            losses[self.balance] = self.coef * loss_fn(routing.probs, routing.token_mask)
        return losses
