"""The router seam: ``x_TD -> Routing``.

Legend: T tokens, D model width, E experts, K experts per token, S routed (token, expert) pairs.

Vocabulary, the same in every router: ``logits`` (x W_g^T, float32) -> ``scores`` (softmax or sigmoid of the
logits) -> ``probs`` (scores normalised to sum to one over experts, used by balancing losses) -> assignments
(the flat ``token_ids``/``expert_ids``/``weights`` lists). Gate ``weights`` are what multiplies an expert's
output in the combine step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Routing", "RoutingContext", "Router"]


@dataclass
class RoutingContext:
    """What a router may read besides ``x_TD``; passed explicitly by the caller, never kept in globals.

    ``batch_shape`` is the leading shape of the layer input (``(B, L)`` for a batch of sequences), used by
    sequence-level losses and by routers that look along the sequence. ``input_ids`` (shape ``batch_shape``)
    serves token-id routers (hash routing). ``extras`` carries cross-layer state for routers that need it.
    """

    batch_shape: tuple[int, ...] | None = None
    input_ids: torch.Tensor | None = None
    layer_index: int | None = None
    extras: dict = field(default_factory=dict)

    def sequences(self, num_tokens: int) -> tuple[int, int]:
        """Return ``(num_sequences, seq_len)`` for ``num_tokens`` flat tokens (one sequence when unknown)."""
        if self.batch_shape is None or len(self.batch_shape) < 2:
            return 1, num_tokens
        seq_len = int(self.batch_shape[-1])
        return num_tokens // seq_len, seq_len


@dataclass
class Routing:
    """The result of routing ``T`` tokens over ``E`` experts.

    Always present: the flat assignment list of ``S`` pairs ``token_ids[S]``, ``expert_ids[S]`` (int64) and
    gate ``weights[S]`` (differentiable where the router is). Token-choice routers also fill ``topk_ids`` and
    ``topk_weights`` (``[T, K]``). ``logits`` and ``probs`` (``[T, E]``, float32) where the router defines them.
    ``aux_losses`` maps a name to a scalar tensor already multiplied by its coefficient: their sum is what a
    training loop adds to the task loss.
    """

    token_ids: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    num_tokens: int
    num_experts: int
    topk_ids: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_topk(cls, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, **kw) -> "Routing":
        """Build the flat pair list of a token-choice routing (``S = T * K``, token-major order)."""
        num_tokens, top_k = topk_ids.shape
        token_ids = torch.arange(num_tokens, device=topk_ids.device).repeat_interleave(top_k)
        return cls(
            token_ids=token_ids,
            expert_ids=topk_ids.reshape(-1),
            weights=topk_weights.reshape(-1),
            num_tokens=num_tokens,
            num_experts=num_experts,
            topk_ids=topk_ids,
            topk_weights=topk_weights,
            **kw,
        )

    @property
    def num_pairs(self) -> int:
        return int(self.expert_ids.numel())

    def tokens_per_expert(self) -> torch.Tensor:
        """``counts_E``: how many pairs each expert received (before any capacity dropping)."""
        return torch.bincount(self.expert_ids, minlength=self.num_experts)

    def aux_loss(self) -> torch.Tensor | None:
        """The sum of the auxiliary losses, or None when there are none."""
        if not self.aux_losses:
            return None
        return sum(self.aux_losses.values())


class Router(nn.Module):
    """Base class of every router: ``forward(x_TD, ctx=None) -> Routing``.

    Subclasses are constructed as ``cls(dim=..., num_experts=..., top_k=..., **options)``. Class attributes
    describe the method: ``causal`` is False for routers whose choice for a token depends on later tokens of
    the batch (expert choice, batch Sinkhorn), ``learned`` is False for routers with no trainable gate.

    Optional hooks a model looks for (``moekit.model.MoELM`` does): ``needs_attention = True`` asks the model to
    put the preceding attention layer's head-averaged probabilities in ``ctx.extras["attention_probs"]``;
    ``residual_update(f_BLD, extras) -> delta_BLD`` replaces the plain residual ``x + f`` (MomentumSMoE keeps
    its momentum in ``extras``); ``extras["kv_cache"]`` / ``extras["start_pos"]`` let routers keep per-position
    state for cached decoding (see :mod:`moekit.routing.graph`).
    """

    causal: bool = True
    learned: bool = True
    balances_itself: bool = False
    # Data parallelism (moekit.parallel): routers that compute their losses over the global batch set
    # ``global_batch_losses = True``; ``moekit.parallel`` then gives them the process group in ``data_group``.
    global_batch_losses: bool = False
    data_group = None
    # Why this router cannot run with more than one process (None: it can).
    data_parallel_note: str | None = None

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}")
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k

    def has_balancing(self) -> bool:
        """True when the router applies some load-balancing method (or is balanced by construction)."""
        return self.balances_itself

    @torch.no_grad()
    def end_step(self) -> None:
        """Called once after each optimiser step (``moekit.end_step(model)``): update balancing state."""

    def balancing_state(self) -> dict:
        """JSON-safe balancing counters that are not tensors of the state dict (saved in checkpoints)."""
        return {}

    def load_balancing_state(self, state: dict) -> None:
        """Restore what :meth:`balancing_state` returned."""
