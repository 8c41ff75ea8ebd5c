"""Top-any routing: a learned keep/drop mask over each token's top-k experts, so that at inference a token
keeps any non-empty subset of its top-k.

Paper: "MC#: Mixture Compressor for Mixture-of-Experts Large Models" (2025, arXiv:2510.10962), Online Top-any
Pruning (OTP). Checked against the paper's abstract (via the ``search`` tool, "pages" corpus): OTP "uses
Gumbel-Softmax sampling to dynamically select a subset of experts per token"; reported: over 20% fewer
activated experts with under 1% accuracy loss. Everything else here is a reconstruction [recon]: the mask
generator's inputs (the token's hidden state, the rank of the slot, and the weight ratio ``w_k / w_1`` that
MC's earlier online dynamic pruning thresholded, github.com/Aaronhuang-778/MC-MoE ``models/wrapper.py``), the
binary Gumbel-softmax (logistic noise) with a straight-through hard mask, the keep-rate penalty, and the rule
that a token keeps at least its most-likely-kept expert.

The mask logit of slot ``k`` (expert ``e_k``, top-k weight ``w_k``) is ``keep_weight[e_k] . x + keep_bias[k] +
keep_ratio_scale * log(w_k / w_1)``; ``keep_bias`` starts at ``init_keep_logit`` (so every expert is kept at
first) and ``keep_weight``/``keep_ratio_scale`` at zero. The routing weights enter the mask detached: the mask
learns from the task loss through the expert outputs it scales, and from the keep-rate penalty, without
pulling on the router. To train the mask alone on a trained model (MC# applies OTP to pretrained models),
freeze ``weight`` (``router.weight.requires_grad_(False)``).

Legend: T tokens, D model width, E experts, K experts per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import Routing, RoutingContext
from .topk import TopKRouter

__all__ = ["TopAnyRouter"]


@register("top_any")
class TopAnyRouter(TopKRouter):
    """MC# online top-any pruning (arXiv:2510.10962) over a :class:`TopKRouter` (all of its options).

    Training: a binary Gumbel-softmax sample ``m = sigmoid((l + logistic noise) / mask_tau)`` per top-k slot,
    hardened to ``m > 0.5`` with a straight-through gradient (a token with no slot kept keeps its highest
    ``m``); the routing weight of slot ``k`` is ``w_k * m_k``. Every top-k pair stays in the routing (weight 0
    when dropped) so the straight-through gradient reaches the mask. Auxiliary loss ``"keep"``:
    ``sparsity_coef * mean(sigmoid(l))``, the expected kept fraction, on top of the top-k router's own losses
    (computed on the unpruned top-k).
    Inference: slot ``k`` kept when ``l_k > 0`` (at least the slot with the largest ``l``); only kept pairs are
    routed, so ``topk_ids``/``topk_weights`` are None. ``renormalize_kept`` rescales the kept weights to the
    sum of the token's top-k weights.
    After each call: ``last_keep_mask`` (``[T, K]`` bool) and ``last_skipped_fraction`` (0-d tensor: dropped
    pairs / ``T*K``).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        mask_tau: float = 1.0,
        init_keep_logit: float = 3.0,
        sparsity_coef: float = 1e-2,
        renormalize_kept: bool = False,
        **topk_options,
    ):
        super().__init__(dim, num_experts, top_k, **topk_options)
        if not (isinstance(mask_tau, (int, float)) and mask_tau > 0):
            raise ValueError(f"mask_tau must be > 0, got {mask_tau!r}")
        if not (isinstance(sparsity_coef, (int, float)) and sparsity_coef >= 0):
            raise ValueError(f"sparsity_coef must be >= 0, got {sparsity_coef!r}")
        self.mask_tau = float(mask_tau)
        self.sparsity_coef = float(sparsity_coef)
        self.renormalize_kept = bool(renormalize_kept)
        self.keep_weight = nn.Parameter(torch.zeros(num_experts, dim))
        self.keep_bias = nn.Parameter(torch.full((top_k,), float(init_keep_logit)))
        self.keep_ratio_scale = nn.Parameter(torch.zeros(()))
        self.last_keep_mask: torch.Tensor | None = None
        self.last_skipped_fraction: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask_tau={self.mask_tau}, sparsity_coef={self.sparsity_coef}"

    def keep_logits(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        """Mask logits ``l [T, K]``: ``sigmoid(l)`` is the probability that a top-k slot is kept."""
        per_expert_TE = F.linear(x_TD.float(), self.keep_weight.float())
        weights_TK = topk_weights_TK.detach().float().clamp_min(1e-20)
        log_ratio_TK = weights_TK.log() - weights_TK[:, :1].log()
        return (per_expert_TE.gather(1, topk_ids_TK) + self.keep_bias.float()
                + self.keep_ratio_scale.float() * log_ratio_TK)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        base = super().forward(x_TD, ctx)
        topk_ids_TK, topk_weights_TK = base.topk_ids, base.topk_weights
        logits_TK = self.keep_logits(x_TD, topk_ids_TK, topk_weights_TK)
        if self.training:
            uniform_TK = torch.rand_like(logits_TK).clamp(1e-6, 1 - 1e-6)
            soft_TK = torch.sigmoid((logits_TK + uniform_TK.log() - (-uniform_TK).log1p()) / self.mask_tau)
            score_TK = soft_TK.detach()
        else:
            score_TK = logits_TK.detach()
        keep_TK = score_TK > (0.5 if self.training else 0.0)
        empty_T = ~keep_TK.any(dim=-1)
        fallback_TK = F.one_hot(score_TK.argmax(dim=-1), self.top_k).bool()
        keep_TK = torch.where(empty_T[:, None], fallback_TK, keep_TK)
        self.last_keep_mask = keep_TK
        real_keep = keep_TK if base.token_mask is None else keep_TK[base.token_mask]  # real tokens only
        self.last_skipped_fraction = (1.0 - real_keep.float().mean() if real_keep.numel()
                                      else torch.zeros((), device=keep_TK.device))

        if self.training:
            mask_TK = keep_TK.float() - soft_TK.detach() + soft_TK  # straight-through: value 0/1, grad of soft
        else:
            mask_TK = keep_TK.float()
        kept_weights_TK = topk_weights_TK * mask_TK
        if self.renormalize_kept:
            kept_weights_TK = kept_weights_TK * (topk_weights_TK.sum(dim=-1, keepdim=True)
                                                 / kept_weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20))
        if self.training:
            routing = Routing.from_topk(topk_ids_TK, kept_weights_TK, self.num_experts, logits=base.logits,
                                        probs=base.probs, token_mask=base.token_mask)
            routing.aux_losses = dict(base.aux_losses)
            if self.sparsity_coef > 0:
                # a mean over the batch's slots (the global batch's under data parallelism: this rank's share)
                # over the real tokens' slots (base.token_mask; batch_tokens counts real tokens only)
                slots = self.batch_tokens * self.top_k
                keep_prob_TK = torch.sigmoid(logits_TK)
                if base.token_mask is not None:
                    keep_prob_TK = keep_prob_TK.masked_fill(~base.token_mask[:, None], 0.0)
                routing.aux_losses["keep"] = self.sparsity_coef * keep_prob_TK.sum() / max(slots, 1)
            return routing
        token_ids, slot_ids = keep_TK.nonzero(as_tuple=True)
        return Routing(token_ids=token_ids, expert_ids=topk_ids_TK[token_ids, slot_ids],
                       weights=kept_weights_TK[token_ids, slot_ids], num_tokens=base.num_tokens,
                       num_experts=self.num_experts, logits=base.logits, probs=base.probs, token_mask=base.token_mask)
