"""MixER: a top-1 gate fitted without gradients, by K-means on context vectors and least squares.

Paper: "Towards Foundational Models for Dynamical System Reconstruction: Hierarchical Meta-Learning via
Mixture of Experts" (2024; it introduces MixER, "Mixture of Expert Reconstructors"; listed in seed-papers.txt;
arXiv id and equation numbers not verified: the ``search`` tool found neither the full text nor code). Checked
against the abstract only: "a novel sparse top-1 MoE layer employing a custom gating update algorithm based on
K-means and least squares", the gating update replacing gradient descent, which the authors found slow and
conflicted for routing. The rest is a reconstruction [recon]: contexts are the router inputs seen in training,
kept in a ring buffer of the latest ``buffer_size``; every ``refit_every`` optimiser steps (:meth:`end_step`)
K-means (k-means++ start the first time, warm-started from the previous centroids afterwards so that an expert
keeps its cluster) clusters them into E groups, then ridge least squares maps ``[context, 1]`` to the cluster
one-hots; the gate routes a token to the expert with the largest least-squares score. Experts are trained by
gradient as usual.

``top_k > 1`` (not in the paper) routes to the K largest scores with weights ``1/K``; ``K = 1`` is MixER's
top-1 with weight 1. The gate (``weight [E, D]``, ``bias [E]``, ``centroids [E, D]``) is made of buffers:
no gradient reaches it and optimisers never see it. Before the first fit the gate is a fixed random
projection.

Legend (docs/architecture.md): T tokens (of the call, or the buffered contexts), D model width, E experts, K experts
per token, X = D + 1 (inputs with a bias column).
"""
from __future__ import annotations

import torch

from . import register
from .base import Router, Routing, RoutingContext, recomputing

__all__ = ["MixERRouter", "kmeans", "least_squares_gate"]


def _sq_distances(x_TD: torch.Tensor, c_ED: torch.Tensor) -> torch.Tensor:
    return (x_TD.square().sum(1, keepdim=True) - 2 * x_TD @ c_ED.T + c_ED.square().sum(1)).clamp_min(0)


def kmeans(x_TD: torch.Tensor, num_clusters: int, *, init_ED: torch.Tensor | None = None, iters: int = 25,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's K-means; returns ``(centroids_ED, labels_T)``.

    Starts from ``init_ED`` when given, else from k-means++ seeding. An empty cluster is re-seeded with the
    point farthest from its current centroid.
    """
    x_TD = x_TD.double()
    num_points = x_TD.shape[0]
    if init_ED is None:
        first = int(torch.randint(num_points, (1,), generator=generator))
        centroids = [x_TD[first]]
        d2_T = _sq_distances(x_TD, x_TD[first:first + 1]).squeeze(1)
        for _ in range(1, num_clusters):
            total = float(d2_T.sum())
            if total > 0:
                nxt = int(torch.multinomial(d2_T / total, 1, generator=generator))
            else:
                nxt = int(torch.randint(num_points, (1,), generator=generator))
            centroids.append(x_TD[nxt])
            d2_T = torch.minimum(d2_T, _sq_distances(x_TD, x_TD[nxt:nxt + 1]).squeeze(1))
        c_ED = torch.stack(centroids)
    else:
        c_ED = init_ED.detach().double().clone()
    labels_T = None
    for _ in range(max(iters, 1)):
        d2_TE = _sq_distances(x_TD, c_ED)
        new_labels_T = d2_TE.argmin(dim=1)
        counts_E = torch.bincount(new_labels_T, minlength=num_clusters)
        for e in (counts_E == 0).nonzero().flatten().tolist():
            far = int(d2_TE.gather(1, new_labels_T[:, None]).squeeze(1).argmax())
            new_labels_T[far] = e
            d2_TE[far] = 0
        if labels_T is not None and torch.equal(new_labels_T, labels_T):
            break
        labels_T = new_labels_T
        sums_ED = torch.zeros_like(c_ED).index_add_(0, labels_T, x_TD)
        c_ED = sums_ED / torch.bincount(labels_T, minlength=num_clusters).clamp_min(1)[:, None].to(x_TD.dtype)
    return c_ED, labels_T


def least_squares_gate(x_TD: torch.Tensor, labels_T: torch.Tensor, num_experts: int,
                       ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``[x, 1] -> one_hot(label)``; returns ``(weight_ED, bias_E)`` (float64).

    Minimises ``||[X 1] B - Y||^2 + ridge * N * ||B||^2`` (the bias column is not penalised).
    """
    x_TD = x_TD.double()
    num_points, dim = x_TD.shape
    a_TX = torch.cat([x_TD, torch.ones(num_points, 1, dtype=x_TD.dtype, device=x_TD.device)], dim=1)
    y_TE = torch.nn.functional.one_hot(labels_T, num_experts).to(x_TD.dtype)
    penalty_X = torch.full((dim + 1,), ridge * num_points, dtype=x_TD.dtype, device=x_TD.device)
    penalty_X[-1] = 0
    gram_XX = a_TX.T @ a_TX + torch.diag(penalty_X)
    b_XE = torch.linalg.lstsq(gram_XX, a_TX.T @ y_TE).solution
    return b_XE[:-1].T.contiguous(), b_XE[-1].contiguous()


@register("mixer")
class MixERRouter(Router):
    """MixER gate (K-means + least squares, no gradients); see the module docstring.

    Options: ``refit_every`` (optimiser steps between refits), ``buffer_size`` (contexts kept, the latest
    ones), ``kmeans_iters``, ``ridge`` (least-squares penalty, relative to the number of contexts), ``seed``
    (k-means++ seeding and the initial random projection). :meth:`fit` fits on given contexts directly.
    """

    learned = False  # not trained by gradient; fitted in end_step (so Router makes weight and bias buffers)
    gate_bias = True
    balances_itself = False
    data_parallel_note = ("fits its gate on the contexts of its own process: ranks would diverge (gather the "
                          "contexts first; not built)")

    def __init__(self, dim: int, num_experts: int, top_k: int, *, refit_every: int = 100,
                 buffer_size: int = 4096, kmeans_iters: int = 25, ridge: float = 1e-4, seed: int = 0):
        super().__init__(dim, num_experts, top_k)
        for name, value, low in (("refit_every", refit_every, 1), ("buffer_size", buffer_size, num_experts),
                                 ("kmeans_iters", kmeans_iters, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(ridge, (int, float)) and ridge >= 0):
            raise ValueError(f"ridge must be >= 0, got {ridge!r}")
        self.refit_every = refit_every
        self.buffer_size = buffer_size
        self.kmeans_iters = kmeans_iters
        self.ridge = float(ridge)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.weight.copy_(torch.randn(num_experts, dim, generator=generator) / dim ** 0.5)  # gate buffers: Router
        self.register_buffer("centroids", torch.zeros(num_experts, dim))
        self.register_buffer("num_fits", torch.zeros((), dtype=torch.int64))
        self.register_buffer("contexts", torch.zeros(0, dim), persistent=False)
        self._write_pos = 0
        self._filled = 0
        self._steps = 0

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, refit_every={self.refit_every}, "
                f"buffer_size={self.buffer_size}, fits={int(self.num_fits)}")

    @property
    def num_buffered(self) -> int:
        """Contexts in the buffer (at most ``buffer_size``)."""
        return self._filled

    @torch.no_grad()
    def _record(self, x_TD: torch.Tensor) -> None:
        if self.contexts.shape[0] != self.buffer_size:
            self.contexts = torch.zeros(self.buffer_size, self.dim, device=x_TD.device)
        rows_TD = x_TD.detach().float()[-self.buffer_size:]
        count = rows_TD.shape[0]
        slots = (self._write_pos + torch.arange(count, device=rows_TD.device)) % self.buffer_size
        self.contexts[slots] = rows_TD.to(self.contexts.device)
        self._write_pos = (self._write_pos + count) % self.buffer_size
        self._filled = min(self._filled + count, self.buffer_size)

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Least-squares gate scores ``[T, E]`` (float32): :meth:`Router.logits`, plus the logit offset."""
        return self.logits(x_TD)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        mask_T = ctx.flat_mask(x_TD.shape[0], x_TD.device) if ctx is not None else None
        if self.training and not recomputing():  # a checkpoint's recomputation must not buffer its tokens again
            self._record(x_TD if mask_T is None else x_TD[mask_T])  # contexts of real tokens only
        scores_TE = self.logits(x_TD.detach(), ctx)
        topk_ids_TK = scores_TE.topk(self.top_k, dim=-1).indices
        weights_TK = torch.full(topk_ids_TK.shape, 1.0 / self.top_k, dtype=torch.float32, device=x_TD.device)
        return Routing.from_topk(topk_ids_TK, weights_TK, self.num_experts, logits=scores_TE, token_mask=mask_T)

    @torch.no_grad()
    def fit(self, contexts_TD: torch.Tensor) -> torch.Tensor:
        """Refit the gate on ``contexts_TD``: K-means, then least squares; returns the K-means labels."""
        if contexts_TD.shape[0] < self.num_experts:
            raise ValueError(f"fit needs at least num_experts={self.num_experts} contexts, got {contexts_TD.shape[0]}")
        generator = torch.Generator().manual_seed(self.seed + int(self.num_fits))
        init = self.centroids if int(self.num_fits) > 0 else None
        x_TD = contexts_TD.detach().to("cpu", torch.float64)
        centroids_ED, labels_T = kmeans(x_TD, self.num_experts, init_ED=None if init is None else init.cpu(),
                                        iters=self.kmeans_iters, generator=generator)
        weight_ED, bias_E = least_squares_gate(x_TD, labels_T, self.num_experts, self.ridge)
        self.centroids.copy_(centroids_ED.to(self.centroids))
        self.weight.copy_(weight_ED.to(self.weight))
        self.bias.copy_(bias_E.to(self.bias))
        self.num_fits += 1
        return labels_T

    def balancing_state(self) -> dict:
        return {"steps": self._steps}

    def load_balancing_state(self, state: dict) -> None:
        self._steps = int(state.get("steps", 0))

    @torch.no_grad()
    def end_step(self) -> None:
        """After an optimiser step: every ``refit_every`` steps, refit on the buffered contexts."""
        self._steps += 1
        if self._steps % self.refit_every == 0 and self._filled >= self.num_experts:
            self.fit(self.contexts[:self._filled])
