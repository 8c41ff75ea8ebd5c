"""Expert-choice routing: each expert picks its top-C tokens.

Paper: Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", arXiv:2202.09368, section 3.2:
``S = Softmax(X W_g)`` (n x e token-to-expert scores), ``G, I = TopK(S^T, k)``, ``P = OneHot(I)``, with the
expert capacity ``k = n * c / e`` (n tokens in the batch, e experts, c the capacity factor = the average
number of experts per token). An expert's output for a token is weighted by the score ``G``.

Legend: T tokens, D model width, E experts, K experts per token, C capacity (tokens per expert).
"""
from __future__ import annotations

import math

import torch

from . import register
from ._common import EVAL_ROUTINGS, check_choice, check_positive, real_token_ids, softmax_topk_routing
from .base import Router, Routing, RoutingContext


@register("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes the ``C = ceil(T * capacity_factor / E)`` tokens with the highest softmax score.

    A token may be chosen by 0..E experts; every expert gets exactly ``C`` tokens, so the load is balanced by
    construction and no auxiliary loss is used (none is in the paper). Gate weight = the score (differentiable).

    Options:
        capacity_factor: the paper's ``c``, average experts per token. ``None`` (default) uses ``top_k``, so that
            the compute equals token-choice top-k (the paper compares EC with ``c = 2`` against top-2 gating).
            ``C`` is rounded up and clipped to ``[1, T]``.
        eval_routing: ``"token_choice"`` (default): in eval mode each token takes its own top-k experts on the
            same scores, which is causal; ``"batch"`` keeps expert choice in eval mode too.

    Not causal: an expert's choice of token t depends on every token of the batch, later ones included, so in
    autoregressive decoding training-time routing leaks information from future tokens and cannot be
    reproduced one token at a time (the paper lists autoregressive generation as a limitation). Use the
    token-choice eval fallback for generation.

    Checked against the paper: the score function (softmax over experts), the per-expert top-k over the
    batch, ``k = n c / e``, gates equal to the scores. Not implemented: the optional entropy-regularised LP
    that caps the experts per token (section 3.3).
    """

    causal = False
    balances_itself = True

    def __init__(self, dim: int, num_experts: int, top_k: int, *, capacity_factor: float | None = None,
                 eval_routing: str = "token_choice"):
        super().__init__(dim, num_experts, top_k)
        if capacity_factor is not None:
            check_positive("capacity_factor", capacity_factor)
        check_choice("eval_routing", eval_routing, EVAL_ROUTINGS)
        self.capacity_factor = capacity_factor
        self.eval_routing = eval_routing

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, eval_routing={self.eval_routing}")

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert: ``ceil(T * c / E)`` clipped to ``[1, T]`` (0 when there are no tokens)."""
        if num_tokens == 0:
            return 0
        factor = self.top_k if self.capacity_factor is None else self.capacity_factor
        return min(num_tokens, max(1, math.ceil(round(num_tokens * factor / self.num_experts, 9))))

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        logits_TE = self.logits(x_TD, ctx)
        mask_T = ctx.flat_mask(x_TD.shape[0], x_TD.device) if ctx is not None else None
        if not self.training and self.eval_routing == "token_choice":
            routing = softmax_topk_routing(logits_TE, self.top_k, renormalise=False)
            routing.token_mask = mask_T
            return routing
        probs_TE = torch.softmax(logits_TE, dim=-1)
        # experts choose among the real tokens only: padding takes no capacity (and gets no expert)
        real_R = real_token_ids(mask_T, logits_TE.shape[0], logits_TE.device)
        probs_RE = probs_TE if real_R is None else probs_TE[real_R]
        capacity = self.capacity(probs_RE.shape[0])
        weights_EC, token_EC = torch.topk(probs_RE.t(), capacity, dim=1)
        if real_R is not None:
            token_EC = real_R[token_EC]
        expert_EC = torch.arange(self.num_experts, device=x_TD.device)[:, None].expand_as(token_EC)
        return Routing(token_ids=token_EC.reshape(-1), expert_ids=expert_EC.reshape(-1),
                       weights=weights_EC.reshape(-1), num_tokens=logits_TE.shape[0],
                       num_experts=self.num_experts, logits=logits_TE, probs=probs_TE, token_mask=mask_T)
