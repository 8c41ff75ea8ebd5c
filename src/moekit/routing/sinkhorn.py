"""Balanced assignment by Sinkhorn iterations (BASE layers, S-BASE; Megatron-Core ``sinkhorn``).

Papers: Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models", arXiv:2103.16716:
in training, token-to-expert assignment is a balanced linear assignment problem (every expert gets T/E
tokens, the summed token-expert affinity is maximal); at test time each token greedily takes its best expert.
BASE solves the assignment exactly with an auction algorithm; Clark et al. 2022, "Unified Scaling Laws for
Routed Language Models", arXiv:2202.01017 (S-BASE) and Megatron-Core's ``sinkhorn`` router approximate it
with Sinkhorn's entropic optimal transport (Cuturi 2013, "Sinkhorn Distances", arXiv:1306.0895), which is
what this module does.

Legend: T tokens, D model width, E experts, K experts per token.
"""
from __future__ import annotations

import math

import torch

from . import register
from ._common import (EVAL_ROUTINGS, check_choice, check_positive, merge_topk_rows, real_token_ids,
                      topk_renormalised_routing)
from .base import Router, Routing, RoutingContext

WEIGHT_SOURCES = ("softmax", "sigmoid", "plan")


def log_sinkhorn(scores_TE: torch.Tensor, log_row_T: torch.Tensor, log_col_E: torch.Tensor, n_iters: int,
                 tol: float = 0.0, f_T: torch.Tensor | None = None, return_duals: bool = False):
    """Log of the entropic transport plan ``P = diag(u) exp(scores) diag(v)`` with the given marginals.

    Alternately rescales columns then rows in the log domain (``g = log_col - logsumexp_t(scores + f)``,
    ``f = log_row - logsumexp_e(scores + g)``), so ``exp(scores)`` never overflows. Stops after ``n_iters``
    iterations, or earlier once every column sum is within relative ``tol`` of its marginal (rows are exact
    after each iteration). Differentiable through the iterations; float32 or float64 as ``scores_TE``.
    ``f_T`` warm-starts the row potential (``log u``; zeros by default); with ``return_duals`` the result is
    ``(log_plan, f_T, g_E)``.
    """
    f_T = torch.zeros_like(scores_TE[:, 0]) if f_T is None else f_T
    g_E = torch.zeros_like(scores_TE[0])
    for it in range(n_iters):
        lse_col_E = torch.logsumexp(scores_TE + f_T[:, None], dim=0)
        if it > 0 and tol > 0:
            with torch.no_grad():
                col_err = torch.expm1(g_E + lse_col_E - log_col_E).abs().max()
            if col_err <= tol:
                break
        g_E = log_col_E - lse_col_E
        f_T = log_row_T - torch.logsumexp(scores_TE + g_E[None, :], dim=1)
    log_plan_TE = scores_TE + f_T[:, None] + g_E[None, :]
    return (log_plan_TE, f_T, g_E) if return_duals else log_plan_TE


def annealed_log_sinkhorn(logits_TE: torch.Tensor, epsilon: float, log_row_T: torch.Tensor,
                          log_col_E: torch.Tensor, n_iters: int, tol: float = 0.0, start: float = 1.0,
                          factor: float = 0.5) -> torch.Tensor:
    """Log of the entropic plan of ``exp(logits / epsilon)`` reached by epsilon scaling.

    For ``epsilon < start`` Sinkhorn runs at the temperatures ``start, start * factor, start * factor**2, ...,
    epsilon`` (at most ``n_iters`` iterations each, ``tol`` as :func:`log_sinkhorn`), each stage warm-started
    from the previous stage's row potential converted to the new temperature (the potential in logit units,
    ``epsilon * f``, is what carries over). A cold start at a small temperature needs a number of iterations
    that grows like ``1 / epsilon``; the stages need about ``log2(start / epsilon)`` short runs (the
    epsilon-scaling heuristic, with the log-domain iterations, of Schmitzer, "Stabilized Sparse Scaling
    Algorithms for Entropy Regularized Transport Problems", arXiv:1610.06519; checked against its abstract).
    For ``epsilon >= start`` this is :func:`log_sinkhorn` on ``logits / epsilon``, nothing more.
    """
    temperatures = []
    temperature = float(start)
    while temperature > epsilon:
        temperatures.append(temperature)
        temperature *= factor
    temperatures.append(float(epsilon))
    potential_T = None  # the row potential in logit units
    for temperature in temperatures:
        f_T = None if potential_T is None else potential_T / temperature
        log_plan_TE, f_T, _ = log_sinkhorn(logits_TE / temperature, log_row_T, log_col_E, n_iters, tol, f_T,
                                           return_duals=True)
        potential_T = f_T * temperature
    return log_plan_TE


def balanced_marginals(num_tokens: int, num_experts: int, token_mass: float, like: torch.Tensor):
    """Log-marginals: every token carries ``token_mass``, every expert receives ``T * token_mass / E``."""
    log_row_T = torch.full((num_tokens,), math.log(token_mass), dtype=like.dtype, device=like.device)
    log_col_E = torch.full((num_experts,), math.log(num_tokens * token_mass / num_experts), dtype=like.dtype,
                           device=like.device)
    return log_row_T, log_col_E


@register("sinkhorn")
class SinkhornRouter(Router):
    """Top-k of a balanced transport plan for selection; routing weights from the softmax (Megatron) or the plan.

    In training, the plan ``P`` (``T x E``) maximises ``<P, logits> + epsilon * H(P)`` with every token
    carrying mass K and every expert receiving ``T * K / E`` (the balanced load of top-k routing); each token
    takes the K experts with the largest ``P`` entries of its row. Since row scaling does not change a row's
    order, this is top-k of ``logits / epsilon + g_E`` for a per-expert offset ``g_E`` found by Sinkhorn: a
    balancing bias computed per batch.

    Options:
        n_iters: maximum Sinkhorn iterations (per temperature stage below 1); tol: stop once every column sum
            is within this relative error (Megatron-Core iterates until its scaling vectors change by less
            than 1e-4, with no cap).
        epsilon: the entropic temperature, ``P ~ exp(logits / epsilon)``; 1.0 is Megatron-Core's. As it goes
            to zero the selection tends to BASE layers' exact balanced assignment (the maximum-affinity
            assignment with T*K/E tokens per expert). A temperature only means something relative to the
            logits: untrained routers have small logits (a standard deviation of about 0.1-0.2 at moekit's
            initialisation), where 1.0 is hot (in the tests, top-1 agrees with the exact assignment for
            about 90% of the tokens) and 1e-3 to 1e-4 agrees for 99-100%. Below 1 the plan is reached by
            epsilon scaling (:func:`annealed_log_sinkhorn`: temperatures 1, 1/2, 1/4, ... down to ``epsilon``,
            each warm-started), about ``log2(1 / epsilon)`` stages of at most ``n_iters`` iterations each
            instead of the ~``1 / epsilon`` iterations a cold start needs; a small ``tol`` (1e-5) makes the
            agreement exact more often. Trade-offs: compute grows with the number of stages; with
            ``weights_from="plan"`` the backward pass goes through every iteration of every stage (memory grows
            likewise) and the plan's gradient vanishes as the plan hardens to 0/1, so small temperatures suit
            the default ``weights_from="softmax"`` (plan without gradient).
        weights_from: where the routing weights come from: ``"softmax"`` (default): the softmax score of each chosen expert, the plan computed without
            gradient (Megatron-Core for K > 1); ``"sigmoid"``: the sigmoid of the logit (Megatron-Core for
            K = 1); ``"plan"``: the chosen plan entries renormalised over the K chosen, differentiable through
            the Sinkhorn iterations.
        eval_routing: ``"token_choice"`` (default): in eval mode, top-k of the scores without balancing (BASE's
            greedy test-time assignment, Megatron-Core's eval path), which is causal; ``"batch"``: the
            balanced assignment in eval mode too.

    Balanced by construction, so no auxiliary loss. Not causal in training: a token's experts depend on the
    whole batch, later tokens included (document this for autoregressive models; use the eval fallback for
    generation). Checked against Megatron-Core (``sinkhorn`` and ``sinkhorn_load_balancing``: plan on fp32
    logits, top-k of the plan, routing weights from the activation of the logits, plain top-k in eval) and against the
    optimal balanced assignment (``scipy.optimize.linear_sum_assignment``) in the tests.
    """

    causal = False
    balances_itself = True

    def __init__(self, dim: int, num_experts: int, top_k: int, *, n_iters: int = 50, epsilon: float = 1.0,
                 tol: float = 1e-4, weights_from: str = "softmax", eval_routing: str = "token_choice"):
        super().__init__(dim, num_experts, top_k)
        check_positive("n_iters", n_iters, integer=True)
        check_positive("epsilon", epsilon)
        check_positive("tol", tol, allow_zero=True)
        check_choice("weights_from", weights_from, WEIGHT_SOURCES)
        check_choice("eval_routing", eval_routing, EVAL_ROUTINGS)
        self.n_iters = n_iters
        self.epsilon = float(epsilon)
        self.tol = float(tol)
        self.weights_from = weights_from
        self.eval_routing = eval_routing

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, n_iters={self.n_iters}, "
                f"epsilon={self.epsilon}, weights_from={self.weights_from}, eval_routing={self.eval_routing}")

    def log_plan(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Log of the balanced plan: rows sum to K, columns to ``T * K / E``."""
        log_row_T, log_col_E = balanced_marginals(logits_TE.shape[0], self.num_experts, self.top_k, logits_TE)
        return annealed_log_sinkhorn(logits_TE, self.epsilon, log_row_T, log_col_E, self.n_iters, self.tol)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        logits_TE = self.logits(x_TD, ctx)
        mask_T = ctx.flat_mask(x_TD.shape[0], x_TD.device) if ctx is not None else None
        balanced = self.training or self.eval_routing == "batch"
        real_R = real_token_ids(mask_T, logits_TE.shape[0], logits_TE.device) if balanced else None
        if real_R is not None:
            # the balanced plan is over the real tokens only (padding takes no transport mass); padding keeps
            # the token-choice eval routing of its scores
            fallback = self._route(logits_TE, False)
            fallback.token_mask = mask_T
            if real_R.numel() == 0:
                return fallback
            planned = self._route(logits_TE[real_R], True)
            return merge_topk_rows(fallback, real_R, planned.topk_ids, planned.topk_weights)
        routing = self._route(logits_TE, balanced)
        routing.token_mask = mask_T
        return routing

    def _route(self, logits_TE: torch.Tensor, balanced: bool) -> Routing:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if balanced and self.weights_from == "plan" and logits_TE.shape[0] > 0:
            return topk_renormalised_routing(self.log_plan(logits_TE), self.top_k, self.num_experts,
                                             logits=logits_TE, probs=probs_TE)
        scores_TE = torch.sigmoid(logits_TE) if self.weights_from == "sigmoid" else probs_TE
        if balanced and logits_TE.shape[0] > 0:
            with torch.no_grad():
                choice_TE = self.log_plan(logits_TE.detach())
        else:
            choice_TE = scores_TE.detach()
        topk_ids_TK = torch.topk(choice_TE, self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, topk_ids_TK)
        if self.weights_from == "plan":  # eval fallback of plan weights: renormalised like the plan weights
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return Routing.from_topk(topk_ids_TK, weights_TK, self.num_experts, logits=logits_TE, probs=probs_TE)
