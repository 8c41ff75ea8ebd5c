"""Selective Sinkhorn Routing (SSR): softmax top-k routing, replaced by optimal-transport routing on a random
fraction of the training calls.

Paper: Nguyen, Ta, Le Duc, Nguyen, Tran 2025, "Selective Sinkhorn Routing for Improved Sparse Mixture of
Experts", arXiv:2511.08972. Its abstract (read from a stored copy of arxiv.org/html/2511.08972v1): token-to-expert
assignment is an optimal-transport problem with balance constraints; "a minimal degree of optimal
transport-based routing" helps without auxiliary balancing losses; gating scores come directly from the
transport map; SSR "replaces auxiliary loss with lightweight Sinkhorn-based routing".

The body of the paper was not readable here. What follows comes from two independent secondary sources that
quote it (a written explanation of the method that reproduces its equations, and a third-party implementation
citing "Equations 3-6 and Algorithm 2" of arXiv:2511.08972v2); where they agree it is used as the definition:

* the plan (m tokens, n experts, compatibility ``C``, entropic weight ``xi``)
  ``Pi = argmax_{Pi > 0} <Pi, C> - xi <Pi, log Pi>`` s.t. ``Pi 1_n = 1_m`` and ``Pi^T 1_m = (m / n) 1_n``,
  solved by Sinkhorn scaling of ``exp(C / xi)``;
* gates from the plan: each token keeps the K largest entries of its row, renormalised to sum to one
  (``alpha_{i, i_r} = Pi_{i, i_r} / sum_j Pi_{i, i_j}``, a KL projection onto K-sparse distributions);
* "selective": during training each routing call uses the Sinkhorn plan with probability p and plain softmax
  top-k routing otherwise; inference always uses softmax top-k routing (no batch balancing at test time).

Reconstructed, not verified in the paper itself: whether ``C`` is the softmax scores or the raw logits
(option ``cost``; the implementation seen defaults to softmax scores), the default p (sources quote
0.001-0.01), the default ``xi`` and iteration count, whether the draw is per call or per optimiser step
(here: per call, i.e. per layer and micro-batch), whether gradients flow through the Sinkhorn iterations
(here: yes; the third-party implementation detaches them), and an optional Gaussian noise on the cost that
one source mentions (not implemented).

Legend: T tokens, D model width, E experts, K experts per token.
"""
from __future__ import annotations

import torch

from . import register
from ._common import (check_choice, check_positive, merge_topk_rows, real_token_ids, softmax_topk_routing,
                      topk_renormalised_routing)
from .base import Router, Routing, RoutingContext, recomputing
from .sinkhorn import balanced_marginals, log_sinkhorn

COSTS = ("softmax", "logits")


def ssr_log_plan(logits_TE: torch.Tensor, epsilon: float, cost: str, n_iters: int, tol: float) -> torch.Tensor:
    """Log of SSR's transport plan: rows sum to 1, columns to ``T / E``, ``Pi ~ exp(C / epsilon)``."""
    cost_TE = torch.softmax(logits_TE, dim=-1) if cost == "softmax" else logits_TE
    log_row_T, log_col_E = balanced_marginals(logits_TE.shape[0], logits_TE.shape[1], 1.0, logits_TE)
    return log_sinkhorn(cost_TE / epsilon, log_row_T, log_col_E, n_iters, tol)


@register("ssr")
class SelectiveSinkhornRouter(Router):
    """Softmax top-k routing; on a fraction ``sinkhorn_prob`` of training calls, top-k of a balanced OT plan.

    On a Sinkhorn call the routing weights are the plan entries renormalised over the K chosen experts and carry
    gradients through the Sinkhorn iterations; on the other calls, and always in eval mode, each token takes
    its top-k softmax experts with the K scores renormalised (softmax over the chosen logits). No auxiliary
    loss. Balanced by construction only on Sinkhorn calls (``balances_itself`` is False, but
    :meth:`has_balancing` is True while ``sinkhorn_prob > 0``).

    Options:
        sinkhorn_prob: probability that a training call uses the Sinkhorn plan (0 = plain softmax top-k,
            1 = Sinkhorn routing on every training call). Drawn from torch's global generator, like dropout.
        epsilon: the entropic weight ``xi``; cost: ``"softmax"`` (``C`` = softmax scores, default) or
            ``"logits"``; n_iters, tol: maximum Sinkhorn iterations and the relative column-sum tolerance.

    Not causal on Sinkhorn calls (a token's experts depend on the whole batch); eval mode is causal.
    ``sinkhorn_calls`` and ``train_calls`` count the calls of each kind (saved by :meth:`balancing_state`).
    """

    causal = False

    def __init__(self, dim: int, num_experts: int, top_k: int, *, sinkhorn_prob: float = 0.01,
                 epsilon: float = 0.05, cost: str = "softmax", n_iters: int = 100, tol: float = 1e-4):
        super().__init__(dim, num_experts, top_k)
        if not (isinstance(sinkhorn_prob, (int, float)) and not isinstance(sinkhorn_prob, bool)
                and 0.0 <= sinkhorn_prob <= 1.0):
            raise ValueError(f"sinkhorn_prob must be a number in [0, 1], got {sinkhorn_prob!r}")
        check_positive("epsilon", epsilon)
        check_choice("cost", cost, COSTS)
        check_positive("n_iters", n_iters, integer=True)
        check_positive("tol", tol, allow_zero=True)
        self.sinkhorn_prob = float(sinkhorn_prob)
        self.epsilon = float(epsilon)
        self.cost = cost
        self.n_iters = n_iters
        self.tol = float(tol)
        self.sinkhorn_calls = 0
        self.train_calls = 0

    def has_balancing(self) -> bool:
        return self.sinkhorn_prob > 0

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"sinkhorn_prob={self.sinkhorn_prob}, epsilon={self.epsilon}, cost={self.cost}")

    def _use_sinkhorn(self) -> bool:
        """The selective rule: a Bernoulli(``sinkhorn_prob``) draw per training call."""
        if not self.training or self.sinkhorn_prob == 0.0:
            return False
        return self.sinkhorn_prob == 1.0 or torch.rand(()).item() < self.sinkhorn_prob

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        logits_TE = self.logits(x_TD, ctx)
        mask_T = ctx.flat_mask(x_TD.shape[0], x_TD.device) if ctx is not None else None
        again = recomputing()  # a checkpoint's recomputation counts no call (its draw repeats: RNG restored)
        if self.training and not again:
            self.train_calls += 1
        fallback = softmax_topk_routing(logits_TE, self.top_k, renormalise=True)
        fallback.token_mask = mask_T
        real_R = real_token_ids(mask_T, logits_TE.shape[0], logits_TE.device)
        num_real = logits_TE.shape[0] if real_R is None else real_R.numel()
        if not self._use_sinkhorn() or num_real == 0:
            return fallback
        if not again:
            self.sinkhorn_calls += 1
        # the transport problem is over the real tokens; padding keeps the softmax top-k fallback
        plan_logits_RE = logits_TE if real_R is None else logits_TE[real_R]
        log_plan_RE = ssr_log_plan(plan_logits_RE, self.epsilon, self.cost, self.n_iters, self.tol)
        planned = topk_renormalised_routing(log_plan_RE, self.top_k, self.num_experts, logits=logits_TE,
                                            probs=fallback.probs, token_mask=mask_T)
        if real_R is None:
            return planned
        return merge_topk_rows(fallback, real_R, planned.topk_ids, planned.topk_weights)

    def balancing_state(self) -> dict:
        return {"sinkhorn_calls": self.sinkhorn_calls, "train_calls": self.train_calls}

    def load_balancing_state(self, state: dict) -> None:
        self.sinkhorn_calls = int(state.get("sinkhorn_calls", 0))
        self.train_calls = int(state.get("train_calls", 0))
