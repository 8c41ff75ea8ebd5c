"""Routing over a graph of tokens: Similarity-Aware and Attention-Aware (S)MoE, and the routing fluctuation rate.

Paper: Tam Nguyen, Ngoc N. Tran, Khai Nguyen, Richard G. Baraniuk, "Improving Routing in Sparse Mixture of
Experts with Graph of Tokens", ICML 2025, arXiv:2505.00792.

The paper's point (abstract, checked): a softmax router chooses each token's experts independently of the
other tokens, which leaves routing free to fluctuate late in training; letting a token's choice depend on
similar tokens lowers the entropy of expert selection. With ``s_j = softmax(x_j W_g^T)`` the router scores of
token ``j`` and ``A`` a row-stochastic token graph, both routers here use::

    P_i = sum_j A_ij s_j                 (P = A S, one graph per sequence)
    experts_i = top-k of P_i,   routing weights = P_i at those experts (then ``norm_topk`` / ``scaling_factor``)

- ``similarity`` (Similarity-Aware SMoE): ``A = softmax_row(X W_s X^T / tau)`` with a learned ``W_s [D, D]``.
- ``attention`` (Attention-Aware SMoE): ``A`` is the attention matrix of the attention layer just before the MoE
  layer, averaged over heads; the model supplies it in ``ctx.attention_probs``.

What was verified: the arXiv id, title, authors and abstract. The formulas above are the reconstruction of
moekit's working notes on the paper (a reconstruction); the paper's equations and the authors' code could
not be read here, so the learned form of ``W_s``, its initialisation (identity) and ``tau`` (default
``sqrt(D)``, as scaled dot-product attention) are moekit's choices, not the paper's. For decoders ``A`` is
causal (``A_ij = 0`` for ``j > i``): the similarity router masks later tokens itself (``causal=True``,
default), the model's attention matrix is causal already, so no token's route depends on later tokens.

Incremental decoding: ``P_i`` needs the scores (and, for ``similarity``, the router inputs) of earlier
positions. When the model passes its KV cache (``RoutingContext.kv_cache`` and ``start_pos``) the routers
store them there per layer, so cached decoding routes exactly as a full forward. Without a cache each call is one self-contained set of sequences (``ctx.batch_shape``; a flat input
is one sequence).

Legend: T tokens, B sequences, L positions of this call, J positions attended (cache included), D model width,
E experts, K experts per token.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import register
from .base import Routing, RoutingContext
from .topk import TopKRouter

class _GraphRouter(TopKRouter):
    """Top-k routing on ``P = A softmax(logits)`` for a token graph ``A`` given by :meth:`mix_scores`.

    Every :class:`~moekit.routing.topk.TopKRouter` option applies to ``P`` in place of the scores: selection
    (with the auxiliary-loss-free bias and group limits), routing weights, and the balancing losses (``probs`` is
    ``P``; the z-loss uses the raw logits).
    """

    @staticmethod
    def _with_past(ctx: RoutingContext, name: str, value_BLX: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``value_BLX`` preceded by the cached earlier positions (and stored for later calls) when the model
        passed a KV cache; returns the values and the number of earlier positions."""
        cache = ctx.kv_cache
        if cache is None:
            return value_BLX, 0
        start = int(ctx.start_pos)
        layer = -1 if ctx.layer_index is None else ctx.layer_index
        return cache.update_routing(layer, name, value_BLX, start), start


@register("similarity")
class SimilarityRouter(_GraphRouter):
    """Similarity-Aware SMoE (Nguyen et al., "Improving Routing in Sparse Mixture of Experts with Graph of
    Tokens", ICML 2025, arXiv:2505.00792): top-k of ``P = A softmax(x W_g^T)`` with
    ``A = softmax_row(X W_s X^T / tau)`` over the tokens of each sequence, causally masked.

    Options: ``tau`` (temperature, > 0; default ``sqrt(dim)``), ``causal`` (default True: token ``i`` sees
    tokens ``j <= i`` only; False lets every token of the sequence in, which leaks future tokens in a
    decoder), and every :class:`~moekit.routing.topk.TopKRouter` option. ``W_s`` is the parameter
    ``similarity_weight [D, D]``, initialised to the identity. With ``W_s = 0``, ``P_i`` is the mean of the
    scores of tokens ``0..i``.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, *, tau: float | None = None, causal: bool = True,
                 **topk_options):
        super().__init__(dim, num_experts, top_k, **topk_options)
        if tau is None:
            tau = math.sqrt(dim)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau < math.inf:
            raise ValueError(f"tau must be a finite number > 0 or None (sqrt(dim)), got {tau!r}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        self.tau = float(tau)
        self.causal = causal
        self.similarity_weight = torch.nn.Parameter(torch.eye(dim))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau:.4g}, causal={self.causal}"

    def mix_scores(self, x_TD: torch.Tensor, scores_TE: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        num_tokens = x_TD.shape[0]
        B, L = ctx.sequences(num_tokens)
        x_BLD = x_TD.float().reshape(B, L, x_TD.shape[-1])
        scores_BLE = scores_TE.reshape(B, L, scores_TE.shape[-1])
        x_BJD, past = self._with_past(ctx, "similarity.x", x_BLD)
        scores_BJE, _ = self._with_past(ctx, "similarity.scores", scores_BLE)
        query_BLD = x_BLD @ self.similarity_weight.float()
        sim_BLJ = (query_BLD @ x_BJD.transpose(1, 2)) / self.tau
        if self.causal:
            S = x_BJD.shape[1]
            query_pos_L = torch.arange(past, past + L, device=x_TD.device)
            allowed_LJ = torch.arange(S, device=x_TD.device)[None, :] <= query_pos_L[:, None]
            sim_BLJ = sim_BLJ.masked_fill(~allowed_LJ, float("-inf"))
        mask_T = ctx.flat_mask(num_tokens, x_TD.device)
        if mask_T is not None and num_tokens:
            # padding of this call is no neighbour of any token (cached earlier positions count as real); a token
            # always sees itself, so no row is empty
            S = x_BJD.shape[1]
            key_real_BJ = torch.ones(B, S, dtype=torch.bool, device=x_TD.device)
            key_real_BJ[:, past:] = mask_T.reshape(B, L)
            self_LJ = torch.arange(S, device=x_TD.device)[None, :] == torch.arange(past, past + L,
                                                                                   device=x_TD.device)[:, None]
            sim_BLJ = sim_BLJ.masked_fill(~(key_real_BJ[:, None, :] | self_LJ[None]), float("-inf"))
        graph_BLJ = torch.softmax(sim_BLJ, dim=-1)
        return (graph_BLJ @ scores_BJE).reshape(num_tokens, scores_TE.shape[-1])


@register("attention")
class AttentionRouter(_GraphRouter):
    """Attention-Aware SMoE (Nguyen et al., "Improving Routing in Sparse Mixture of Experts with Graph of
    Tokens", ICML 2025, arXiv:2505.00792): top-k of ``P = A softmax(x W_g^T)`` with ``A`` the head-averaged
    attention probabilities of the preceding attention layer.

    The caller supplies ``A`` as ``ctx.attention_probs``, shape ``[B, L, J]`` (``J >= L``; the last
    ``L`` key positions are this call's tokens, earlier ones come from the KV cache, whose scores the router
    stored in earlier calls). :class:`moekit.model.MoELM` does so for every MoE layer whose router has
    ``needs_attention = True``; its attention is causal, so the routing is. Options: every
    :class:`~moekit.routing.topk.TopKRouter` option.
    """

    needs_attention = True

    def mix_scores(self, x_TD: torch.Tensor, scores_TE: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        graph_BLJ = ctx.attention_probs
        if graph_BLJ is None:
            raise ValueError("router 'attention' needs the preceding attention layer's head-averaged attention "
                             "probabilities [B, L, J] in ctx.attention_probs; moekit.model.MoELM supplies them, "
                             "a standalone moekit.MoE needs them passed in its RoutingContext")
        num_tokens = x_TD.shape[0]
        if graph_BLJ.dim() == 2:
            graph_BLJ = graph_BLJ.unsqueeze(0)
        B, L, S = graph_BLJ.shape
        if B * L != num_tokens or S < L:
            raise ValueError(f"ctx.attention_probs has shape {tuple(graph_BLJ.shape)}; expected "
                             f"[B, L, J] with B * L = {num_tokens} routed tokens and J >= L")
        scores_BJE, past = self._with_past(ctx, "attention.scores", scores_TE.reshape(B, L, scores_TE.shape[-1]))
        if scores_BJE.shape[1] != S:
            raise ValueError(f"the attention matrix covers {S} key positions, but the router has scores for "
                             f"{scores_BJE.shape[1]} ({past} cached + {L} new); pass the model's KV cache in "
                             "ctx.kv_cache when attending to earlier positions")
        return (graph_BLJ.float() @ scores_BJE).reshape(num_tokens, scores_TE.shape[-1])


def _top1_ids(routing) -> torch.Tensor:
    if isinstance(routing, Routing):
        if routing.topk_ids is not None:
            return routing.topk_ids[:, 0]
        if routing.probs is None:
            raise ValueError("a Routing without topk_ids or probs has no top-1 expert")
        return routing.probs.argmax(dim=-1)
    if isinstance(routing, torch.Tensor):
        if routing.dim() == 1 and not routing.is_floating_point():
            return routing
        if routing.dim() == 2:
            return routing.argmax(dim=-1) if routing.is_floating_point() else routing[:, 0]
        raise ValueError(f"expected expert ids [T], top-k ids [T, K] or probabilities [T, E], "
                         f"got a tensor of shape {tuple(routing.shape)} and dtype {routing.dtype}")
    if isinstance(routing, (list, tuple)):
        if not routing:
            raise ValueError("an empty sequence of routings has no tokens")
        return torch.cat([_top1_ids(r).reshape(-1) for r in routing])
    raise ValueError(f"expected a Routing, a tensor or a sequence of them, got {type(routing).__name__}")


def routing_fluctuation_rate(before: Routing | torch.Tensor | Sequence, after: Routing | torch.Tensor | Sequence
                             ) -> float:
    """Routing fluctuation rate (Nguyen et al., ICML 2025, arXiv:2505.00792): the fraction of tokens whose
    top-1 expert differs between two routings of the same tokens, for example by two checkpoints.

    Each side is a :class:`Routing` (top-1 = its first selected expert, or the argmax of ``probs`` for routers
    without ``topk_ids``), expert ids ``[T]``, top-k ids ``[T, K]`` (first column), probabilities ``[T, E]``
    (argmax), or a list of these (one per layer: the rate over all of their tokens).
    """
    ids_a, ids_b = _top1_ids(before).reshape(-1), _top1_ids(after).reshape(-1)
    if ids_a.shape != ids_b.shape:
        raise ValueError(f"the two routings cover different numbers of tokens: {ids_a.numel()} and {ids_b.numel()}")
    if ids_a.numel() == 0:
        raise ValueError("the routings cover no tokens")
    return float((ids_a.cpu() != ids_b.cpu()).double().mean())
