"""Sparsity-constrained optimal-transport routing: every expert takes at most k tokens.

Paper: Liu, Puigcerver, Blondel 2023, "Sparsity-Constrained Optimal Transport", ICLR 2023, arXiv:2209.15466
(the abstract was read; the formulation below is the paper's as summarised in moekit's notes, with the
semi-dual re-derived here; equation numbers were not checked). The primal problem, for a cost ``C``
(tokens x experts) and marginals ``a`` (tokens), ``b`` (experts):

    min_{P in U(a, b)}  <P, C> + sum_j Omega(p_j),   Omega(p) = (gamma / 2) ||p||^2 + [||p||_0 <= k]

(``p_j`` the column of expert j). It is non-convex; its semi-dual, the Lagrangian dual of the token-marginal
constraint ``P 1 = a`` with each column kept in ``b_j`` times the simplex,

    max_alpha  <alpha, a> - sum_j max_Omega(alpha - c_j),
    max_Omega(s) = max_{p >= 0, sum p = b_j, ||p||_0 <= k}  <s, p> - (gamma / 2) ||p||^2,

is concave and solved here with L-BFGS. ``max_Omega``'s maximiser is the projection of ``s / gamma`` onto the
k-sparse simplex of mass ``b_j``: keep the k largest entries and project them onto the simplex (Kyrillidis
et al. 2013, "Sparse projections onto the simplex", arXiv:1206.1529); the gradient of the semi-dual is
``a - P(alpha) 1``. The semi-dual value is a lower bound of the primal optimum (weak duality), equal to it
when the recovered plan ``P(alpha*)`` also meets the token marginals. Checked in the tests against a brute
force over column supports (exact primal optimum), against ``scipy.optimize.linprog`` (k = 1: the semi-dual
equals the unregularised OT semi-dual plus the constant ``(gamma / 2) sum_j b_j^2``, the paper's "unregularized
OT recovered when k is small enough"), and against the quadratically-regularised OT for k = T.

Routing choices (ours; the paper's MoE experiment was not read): cost ``C = -logits`` (``-log softmax`` gives the
same plan: a per-token shift of the cost is absorbed by alpha); every token carries mass K and every expert
receives ``T * K / E``; a token's experts are the nonzeros of its row of ``P(alpha)`` (0..E of them), its gate
weights that row renormalised to sum to one. Column sums and the k-sparsity hold exactly whatever the number
of solver iterations; the token marginals are met to the solver's tolerance. The solver runs without
gradient; the routing weights are then recomputed from the logits at the fixed alpha, so they carry gradients
to the router weight through the sparse projection (alpha's own dependence on the logits is ignored).

Legend: T tokens, D model width, E experts, K experts per token, k (``kk`` in names) tokens per expert,
X any row length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import register
from ._common import EVAL_ROUTINGS, check_choice, check_positive, real_token_ids, softmax_topk_routing
from .base import Router, Routing, RoutingContext


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (u * v).sum() rather than torch.dot: on a busy 2-core CPU, float64 torch.dot (BLAS, its own thread pool)
    # was measured at several milliseconds per call between torch's OpenMP kernels; this stays in torch's kernels.
    return (u * v).sum()


def simplex_projection_sorted(u_EX: torch.Tensor, mass_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project each row of ``u_EX`` (sorted in descending order) onto ``{p >= 0, sum p = mass}``.

    Returns the projection and ``rho_E``, its number of nonzeros (they are the first ``rho`` of each row):
    ``tau = (sum_{i <= rho} u_i - mass) / rho`` with ``rho = max{r : u_r > (sum_{i <= r} u_i - mass) / r}``,
    ``p = max(u - tau, 0)`` (the sort-based projection of Held et al. 1974 and Duchi et al. 2008).
    """
    rank_X = torch.arange(1, u_EX.shape[1] + 1, dtype=u_EX.dtype, device=u_EX.device)
    excess_EX = u_EX.cumsum(dim=1) - mass_E[:, None]
    rho_E = (u_EX * rank_X > excess_EX).sum(dim=1).clamp_min(1)
    tau_E = excess_EX.gather(1, (rho_E - 1)[:, None]) / rho_E[:, None]
    return (u_EX - tau_E).clamp_min(0), rho_E


def column_plans(alpha_T: torch.Tensor, scores_ET: torch.Tensor, mass_E: torch.Tensor, max_tokens: int,
                 gamma: float):
    """``argmax max_Omega(alpha - c_j)`` for every expert column at once (``c_j = -scores_j``).

    Returns ``token_Ekk`` (each expert's k best tokens, best first), ``s_Ekk`` (their ``alpha + score``) and the
    plan entries ``p_Ekk`` (nonzero on the first ``rho_E`` of each row).
    """
    s_Ekk, token_Ekk = torch.topk(alpha_T[None, :] + scores_ET, max_tokens, dim=1, sorted=True)
    p_Ekk, _ = simplex_projection_sorted(s_Ekk / gamma, mass_E)
    return token_Ekk, s_Ekk, p_Ekk


def semi_dual(alpha_T, scores_ET, a_T, b_E, max_tokens, gamma):
    """Value and gradient of the semi-dual at ``alpha_T``, with the column plans it induces."""
    token_Ekk, s_Ekk, p_Ekk = column_plans(alpha_T, scores_ET, b_E, max_tokens, gamma)
    max_omega = _dot(s_Ekk, p_Ekk) - 0.5 * gamma * _dot(p_Ekk, p_Ekk)
    value = _dot(alpha_T, a_T) - max_omega
    rows_T = torch.zeros_like(alpha_T).index_add_(0, token_Ekk.reshape(-1), p_Ekk.reshape(-1))
    return value, a_T - rows_T, (token_Ekk, p_Ekk)


def lbfgs_maximise(fn, x0: torch.Tensor, max_evals: int, grad_tol: float, first_step: float, history: int = 10):
    """Maximise a concave ``fn(x) -> (value, grad, aux)`` by L-BFGS with Armijo backtracking.

    Stops when ``sum |grad| <= grad_tol``, after ``max_evals`` evaluations, or when no ascent step is found.
    Returns ``(x, value, grad, aux, evals)``; the first step is ``first_step * grad``.
    """
    x = x0
    value, grad, aux = fn(x)
    evals = 1
    steps, grad_changes = [], []
    while evals < max_evals and grad.abs().sum() > grad_tol:
        direction = grad.clone()  # two-loop recursion on the (convex) negated objective
        coefs = []
        for s, y in zip(reversed(steps), reversed(grad_changes)):
            rho = 1.0 / _dot(y, s)
            coef = rho * _dot(s, direction)
            direction -= coef * y
            coefs.append((rho, coef))
        direction *= (_dot(steps[-1], grad_changes[-1]) / _dot(grad_changes[-1], grad_changes[-1])
                      if steps else first_step)
        for (s, y), (rho, coef) in zip(zip(steps, grad_changes), reversed(coefs)):
            direction += (coef - rho * _dot(y, direction)) * s
        slope = _dot(grad, direction)
        if slope <= 0:  # lost curvature information: restart from a gradient step
            steps.clear()
            grad_changes.clear()
            direction, slope = first_step * grad, first_step * _dot(grad, grad)
        step = 1.0
        while True:
            x_new = x + step * direction
            value_new, grad_new, aux_new = fn(x_new)
            evals += 1
            if value_new >= value + 1e-4 * step * slope:
                break
            step *= 0.5
            if evals >= max_evals or step < 1e-6:
                return x, value, grad, aux, evals
        s, y = x_new - x, grad - grad_new
        if _dot(s, y) > 1e-12 * _dot(s, s).sqrt() * _dot(y, y).sqrt():
            steps.append(s)
            grad_changes.append(y)
            if len(steps) > history:
                del steps[0], grad_changes[0]
        x, value, grad, aux = x_new, value_new, grad_new, aux_new
    return x, value, grad, aux, evals


@dataclass
class SparseOTSolution:
    """A solved semi-dual: ``alpha_T`` and its plan, columns as ``token_Ekk``/``mass_Ekk`` (zeros padded)."""

    alpha_T: torch.Tensor
    token_Ekk: torch.Tensor
    mass_Ekk: torch.Tensor
    value: float
    row_error: float
    evals: int

    def dense(self, num_tokens: int) -> torch.Tensor:
        """The plan as a dense ``[T, E]`` tensor."""
        num_experts = self.token_Ekk.shape[0]
        plan_ET = self.mass_Ekk.new_zeros(num_experts, num_tokens).scatter_(1, self.token_Ekk, self.mass_Ekk)
        return plan_ET.t()


def solve_sparse_ot(scores_TE: torch.Tensor, a_T: torch.Tensor, b_E: torch.Tensor, max_tokens: int,
                    gamma: float, max_evals: int = 10, tol: float = 1e-3,
                    alpha0_T: torch.Tensor | None = None) -> SparseOTSolution:
    """Solve the semi-dual for cost ``C = -scores_TE`` in float64; ``tol`` bounds ``|a - P 1|_1 / |a|_1``.

    ``alpha0_T`` defaults to ``-logsumexp(scores)`` per token (the scores become log-softmax values).
    """
    scores_ET = scores_TE.detach().to(torch.float64).t().contiguous()
    a_T, b_E = a_T.to(scores_ET), b_E.to(scores_ET)
    max_tokens = min(max_tokens, scores_ET.shape[1])
    if alpha0_T is None:
        alpha0_T = -torch.logsumexp(scores_ET, dim=0)

    def fn(alpha_T):
        return semi_dual(alpha_T, scores_ET, a_T, b_E, max_tokens, gamma)

    total = float(a_T.sum())
    alpha_T, value, grad_T, (token_Ekk, mass_Ekk), evals = lbfgs_maximise(
        fn, alpha0_T.to(scores_ET), max_evals, tol * total, first_step=gamma)
    return SparseOTSolution(alpha_T, token_Ekk, mass_Ekk, float(value), float(grad_T.abs().sum()) / total, evals)


def differentiable_masses(logits_TE: torch.Tensor, solution: SparseOTSolution, b_E: torch.Tensor,
                          gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzero plan entries as ``(token_S, expert_S, mass_S)``, ``mass_S`` differentiable in the logits.

    Recomputes the column projection at the solution's alpha on the same supports: for the first ``rho`` tokens
    of column j, ``p = (alpha + logit) / gamma - tau_j`` with ``tau_j`` their mean excess over ``b_j``.
    """
    keep_Ekk = solution.mass_Ekk > 0
    rho_E = keep_Ekk.sum(dim=1).clamp_min(1)
    token_Ekk = solution.token_Ekk
    logit_Ekk = logits_TE.t().gather(1, token_Ekk).to(torch.float64)
    u_Ekk = (solution.alpha_T[token_Ekk] + logit_Ekk) / gamma
    tau_E = ((u_Ekk * keep_Ekk).sum(dim=1) - b_E.to(u_Ekk)) / rho_E
    mass_Ekk = (u_Ekk - tau_E[:, None]).clamp_min(0)
    expert_Ekk = torch.arange(token_Ekk.shape[0], device=token_Ekk.device)[:, None].expand_as(token_Ekk)
    return token_Ekk[keep_Ekk], expert_Ekk[keep_Ekk], mass_Ekk[keep_Ekk]


@register("sparse_ot")
class SparseOTRouter(Router):
    """Routing by sparsity-constrained OT: each expert takes at most ``max_tokens_per_expert`` tokens.

    The plan moves mass K from every token to the experts, ``T * K / E`` to every expert, minimising
    ``<P, -logits> + (gamma / 2) sum_j ||p_j||^2`` under the k-nonzeros-per-column constraint (see the module
    docstring). A token's experts are the nonzeros of its row, 0..E of them; gates are the row renormalised.
    Balanced by construction (each expert receives exactly its mass); no auxiliary loss.

    Options:
        max_tokens_per_expert: the paper's k; ``None`` (default) uses ``ceil(T * K / E)``, the balanced load
            of top-k routing, so the total number of (token, expert) pairs is at most ``T * K`` rounded up.
        gamma: weight of the quadratic regulariser, in logit units. Small gamma gives an almost unregularised
            (vertex) plan with about one expert per token; large gamma spreads each column over its k tokens.
        max_evals, tol: the solver's budget (semi-dual evaluations, each a top-k over ``E x T``) and its
            tolerance on the relative token-marginal error.
        eval_routing: ``"token_choice"`` (default): in eval mode, softmax top-k with renormalised weights,
            which is causal; ``"batch"``: solve the transport problem in eval mode too.

    Not causal in training: a token's experts depend on the whole batch, later tokens included.
    """

    causal = False
    balances_itself = True

    def __init__(self, dim: int, num_experts: int, top_k: int, *, max_tokens_per_expert: int | None = None,
                 gamma: float = 1.0, max_evals: int = 10, tol: float = 1e-3, eval_routing: str = "token_choice"):
        super().__init__(dim, num_experts, top_k)
        if max_tokens_per_expert is not None:
            check_positive("max_tokens_per_expert", max_tokens_per_expert, integer=True)
        check_positive("gamma", gamma)
        check_positive("max_evals", max_evals, integer=True)
        check_positive("tol", tol, allow_zero=True)
        check_choice("eval_routing", eval_routing, EVAL_ROUTINGS)
        self.max_tokens_per_expert = max_tokens_per_expert
        self.gamma = float(gamma)
        self.max_evals = max_evals
        self.tol = float(tol)
        self.eval_routing = eval_routing

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"max_tokens_per_expert={self.max_tokens_per_expert}, gamma={self.gamma}")

    def tokens_per_expert(self, num_tokens: int) -> int:
        """k for a batch of ``num_tokens``: the option, or ``ceil(T * K / E)``; within ``[1, T]``."""
        k = self.max_tokens_per_expert
        if k is None:
            k = math.ceil(num_tokens * self.top_k / self.num_experts)
        return max(1, min(k, num_tokens))

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        logits_TE = self.logits(x_TD, ctx)
        mask_T = ctx.flat_mask(x_TD.shape[0], x_TD.device) if ctx is not None else None
        num_tokens = logits_TE.shape[0]
        # the transport problem is over the real tokens only: padding carries no mass and gets no expert
        real_R = real_token_ids(mask_T, num_tokens, logits_TE.device)
        num_real = num_tokens if real_R is None else real_R.numel()
        if (not self.training and self.eval_routing == "token_choice") or num_real == 0:
            routing = softmax_topk_routing(logits_TE, self.top_k, renormalise=True)
            if self.training or self.eval_routing != "token_choice":  # no real token: nothing is routed
                routing = Routing(token_ids=routing.token_ids[:0], expert_ids=routing.expert_ids[:0],
                                  weights=routing.weights[:0], num_tokens=num_tokens, num_experts=self.num_experts,
                                  logits=logits_TE, probs=routing.probs)
            routing.token_mask = mask_T
            return routing
        logits_RE = logits_TE if real_R is None else logits_TE[real_R]
        a_R = logits_TE.new_full((num_real,), float(self.top_k), dtype=torch.float64)
        b_E = logits_TE.new_full((self.num_experts,), num_real * self.top_k / self.num_experts,
                                 dtype=torch.float64)
        with torch.no_grad():
            solution = solve_sparse_ot(logits_RE, a_R, b_E, self.tokens_per_expert(num_real), self.gamma,
                                       self.max_evals, self.tol)
        token_S, expert_S, mass_S = differentiable_masses(logits_RE, solution, b_E, self.gamma)
        row_R = mass_S.new_zeros(num_real).index_add(0, token_S, mass_S)
        weights_S = (mass_S / row_R[token_S]).float()
        if real_R is not None:
            token_S = real_R[token_S]
        return Routing(token_ids=token_S, expert_ids=expert_S, weights=weights_S, num_tokens=num_tokens,
                       num_experts=self.num_experts, logits=logits_TE, probs=torch.softmax(logits_TE, dim=-1),
                       token_mask=mask_T)
