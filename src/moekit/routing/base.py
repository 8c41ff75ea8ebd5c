"""The router seam: ``x_TD -> Routing``.

Legend: T tokens, D model width, E experts, K experts per token, S routed (token, expert) pairs.

Vocabulary, the same in every router: ``logits`` (x W_g^T, float32) -> ``scores`` (softmax or sigmoid of the
logits) -> ``probs`` (scores normalised to sum to one over experts, used by balancing losses) -> assignments
(the flat ``token_ids``/``expert_ids``/``weights`` lists). Gate ``weights`` are what multiplies an expert's
output in the combine step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Routing", "RoutingContext", "MomentumState", "Router", "recomputing", "CountSnapshots"]


def recomputing() -> bool:
    """True while a forward runs inside a backward pass: the recomputation of activation checkpointing
    (``torch.utils.checkpoint``, reentrant or not, and transformers' ``gradient_checkpointing_enable()``, which
    uses it) replays forwards from the autograd engine. State that a forward accumulates (assignment counts,
    buffered contexts, call counters) is accumulated by the original forward only, so a recomputed forward
    must not add it again."""
    return torch._C._current_graph_task_id() != -1


class CountSnapshots:
    """The counts a stateful loss saw in each training forward, so that a checkpoint's recomputation of that
    forward sees the same counts (its loss then has the same value and gradient as the original).

    ``push(key, counts)`` after a real forward; ``pop(key)`` in a recomputation returns the latest snapshot
    pushed with the same key (the call's own routing counts: a recomputation routes exactly as the original),
    or None. Latest-first matches both orders of backward passes: each micro-batch's backward right after its
    forward, and one backward of the summed losses (recomputations then run last micro-batch first).
    Cleared after each optimiser step."""

    limit = 4096  # snapshots kept at most (the oldest go first), for loops that never call end_step

    def __init__(self):
        self._items: list[tuple[tuple, torch.Tensor]] = []

    def push(self, key: tuple, counts_E: torch.Tensor) -> None:
        self._items.append((key, counts_E.clone()))
        if len(self._items) > self.limit:
            del self._items[0]

    def pop(self, key: tuple) -> torch.Tensor | None:
        for i in range(len(self._items) - 1, -1, -1):
            if self._items[i][0] == key:
                return self._items.pop(i)[1]
        return None

    def clear(self) -> None:
        self._items.clear()


@dataclass
class MomentumState:
    """Residual-stream momentum shared by the MoE layers of one model call (MomentumSMoE / AdamSMoE,
    :mod:`moekit.routing.momentum`): ``p`` the heavy-ball momentum, ``m`` and ``v`` Adam's first and second
    moments (float32), ``adam_layers_seen`` how many Adam layers of this call ran so far. All empty at the
    start of a call; the model passes one instance to every layer's :class:`RoutingContext`."""

    p: torch.Tensor | None = None
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    adam_layers_seen: int = 0


@dataclass
class RoutingContext:
    """What a router may read besides ``x_TD``; passed explicitly by the caller, never kept in globals.

    Fields (all optional; :class:`moekit.model.MoELM` fills them, a standalone ``moekit.MoE`` gets what its
    caller passes):

    * ``batch_shape``: the leading shape of the layer input (``(B, L)`` for a batch of sequences), used by
      sequence-level losses and by routers that look along the sequence.
    * ``input_ids`` (shape ``batch_shape``): token ids, for token-id routers (hash routing).
    * ``layer_index``: the position of the layer in the model (keys per-layer state in ``kv_cache``).
    * ``token_mask`` (bool, shape ``batch_shape``; any tensor with one entry per token, nonzero = real): True
      for a real token, False for padding; None means every token is real. Padding counts in no auxiliary
      loss, load statistic, bias update, fitted state or trace, and batch-level routers leave it out of their
      assignment problem (see docs/architecture.md, "Padding").
    * ``attention_probs`` (``[B, L, J]``, rows sum to one): the head-averaged attention probabilities of the
      attention layer that precedes this MoE layer, ``J >= L`` key positions of which the last ``L`` are this
      call's tokens. Filled by the model for routers with ``needs_attention = True``.
    * ``kv_cache``: the model's cache during cached decoding, an object with
      ``update_routing(layer, name, value_BLX, start_pos) -> value_BJX`` that stores per-layer, per-position
      routing state and returns the stored earlier positions followed by ``value_BLX``; ``start_pos`` is the
      position of this call's first token.
    * ``momentum``: the :class:`MomentumState` of this model call, one object shared by all its layers (each
      context gets a fresh, empty one unless the caller passes a shared one).
    * ``extras``: a free dict for state of routers outside moekit (the built-in ones use the fields above).
    """

    batch_shape: tuple[int, ...] | None = None
    input_ids: torch.Tensor | None = None
    layer_index: int | None = None
    token_mask: torch.Tensor | None = None
    attention_probs: torch.Tensor | None = None
    kv_cache: Any = None
    start_pos: int = 0
    momentum: MomentumState = field(default_factory=MomentumState)
    extras: dict = field(default_factory=dict)

    def sequences(self, num_tokens: int) -> tuple[int, int]:
        """Return ``(num_sequences, seq_len)`` for ``num_tokens`` flat tokens (one sequence when unknown).

        Sequences of length zero (a ``[B, 0]`` batch) give ``(B, 0)``."""
        if self.batch_shape is None or len(self.batch_shape) < 2:
            return 1, num_tokens
        seq_len = int(self.batch_shape[-1])
        if seq_len == 0:
            rows = 1
            for d in self.batch_shape[:-1]:
                rows *= int(d)
            return rows, 0
        return num_tokens // seq_len, seq_len

    def flat_mask(self, num_tokens: int, device=None) -> torch.Tensor | None:
        """``token_mask`` flattened to ``[T]`` bool on ``device`` (None when there is no mask)."""
        mask = self.token_mask
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if mask.numel() != num_tokens:
            raise ValueError(f"RoutingContext.token_mask has {mask.numel()} entries (shape {tuple(mask.shape)}) "
                             f"for {num_tokens} tokens; it must have the batch shape")
        return mask.reshape(-1).to(device=device).bool()


@dataclass
class Routing:
    """The result of routing ``T`` tokens over ``E`` experts.

    Always present: the flat assignment list of ``S`` pairs ``token_ids[S]``, ``expert_ids[S]`` (int64) and
    gate ``weights[S]`` (differentiable where the router is). Token-choice routers also fill ``topk_ids`` and
    ``topk_weights`` (``[T, K]``). ``logits`` and ``probs`` (``[T, E]``, float32) where the router defines them.
    ``aux_losses`` maps a name to a scalar tensor already multiplied by its coefficient: their sum is what a
    training loop adds to the task loss. ``token_mask`` (``[T]`` bool, None = all real) marks the real tokens:
    pairs of masked tokens stay in the lists (token-choice routers route every token) but count in no loss or
    statistic, and :meth:`real_pairs` leaves them out of dispatch.
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
    token_mask: torch.Tensor | None = None

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

    def real_pair_mask(self) -> torch.Tensor | None:
        """``[S]`` bool: True for the pairs of real tokens (None when every token is real)."""
        if self.token_mask is None:
            return None
        return self.token_mask.to(self.token_ids.device)[self.token_ids]

    def real_counts(self) -> torch.Tensor:
        """``counts_E`` over the pairs of real tokens only."""
        keep_S = self.real_pair_mask()
        if keep_S is None:
            return self.tokens_per_expert()
        return torch.bincount(self.expert_ids[keep_S], minlength=self.num_experts)

    def num_real_tokens(self) -> int:
        """Tokens that are not padding."""
        return self.num_tokens if self.token_mask is None else int(self.token_mask.sum())

    def real_pairs(self) -> "Routing":
        """This routing without the pairs of masked tokens (itself when every token is real): what dispatch
        runs, so padding takes no expert capacity and its routed output is zero."""
        keep_S = self.real_pair_mask()
        if keep_S is None or bool(keep_S.all()):
            return self
        return Routing(token_ids=self.token_ids[keep_S], expert_ids=self.expert_ids[keep_S],
                       weights=self.weights[keep_S], num_tokens=self.num_tokens, num_experts=self.num_experts,
                       logits=self.logits, probs=self.probs, aux_losses=self.aux_losses, token_mask=self.token_mask)

    def aux_loss(self) -> torch.Tensor | None:
        """The sum of the auxiliary losses, or None when there are none."""
        if not self.aux_losses:
            return None
        return sum(self.aux_losses.values())


class Router(nn.Module):
    """Base class of every router: ``forward(x_TD, ctx=None) -> Routing``.

    Subclasses are constructed as ``cls(dim=..., num_experts=..., top_k=..., **options)``. Class attributes
    describe the method: ``causal`` is False for routers whose choice for a token depends on later tokens of
    the batch (expert choice, batch Sinkhorn), ``learned`` is False for routers with no trainable gate,
    ``has_logits`` is False for routers without a linear gate (hash routing).

    **The logits step.** Routers with ``has_logits`` own one linear gate, ``weight [E, D]`` (the Hugging Face
    ``gate.weight``; a trainable parameter when ``learned``, a buffer otherwise, plus ``bias [E]`` when
    ``gate_bias``), and compute their logits with :meth:`logits` only: multiplicative jitter
    ``x * U(1 - jitter, 1 + jitter)`` on the router input in training (Fedus et al. 2021, Switch Transformers,
    arXiv:2101.03961, section 2.4), ``x W^T (+ b)`` in float32 whatever the input dtype, plus the per-layer
    ``logit_offset``. Scores, selection and routing weights all start from these logits.

    **The logit offset.** ``logit_offset`` (float32 ``[E]``, zero by default) is added to the logits before
    scoring and selection: the knob test-time adaptation trains. It is a non-persistent buffer, so it is in
    neither ``parameters()`` nor ``state_dict()`` (state dicts stay transformers-compatible and older
    checkpoints load strictly); :func:`moekit.routing.logit_offsets` hands out the offsets of a model for an
    optimiser, :func:`moekit.routing.save_logit_offsets` / :func:`~moekit.routing.load_logit_offsets` store
    them. A zero offset leaves the logits unchanged bit for bit.

    **Router state keeps its dtype.** Floating buffers of a router (the offset, DeepSeek-V3's selection bias
    ``e_score_correction_bias``, MixER's fitted gate) stay float32 when the model is cast to another dtype
    (``.to(torch.bfloat16)``, ``.half()``); device moves apply as usual. Parameters follow the model.

    **Hooks a model reads** (:class:`moekit.model.MoELM` does, by plain attribute access):

    * ``needs_attention`` (default False): when True the model computes the preceding attention layer's
      probabilities explicitly and passes their head average in ``ctx.attention_probs``.
    * ``updates_residual`` (default False) and :meth:`residual_update`: the decoder adds
      ``residual_update(f, ctx)`` to the residual stream in place of the MoE output ``f``; the base method
      returns ``f`` itself (the plain residual ``x + f``). MomentumSMoE / AdamSMoE override it and keep their
      state in ``ctx.momentum``.
    * ``ctx.kv_cache`` / ``ctx.start_pos`` let routers keep per-position state for cached decoding (see
      :mod:`moekit.routing.graph`).
    """

    causal: bool = True
    learned: bool = True
    has_logits: bool = True
    gate_bias: bool = False
    balances_itself: bool = False
    needs_attention: bool = False
    updates_residual: bool = False
    # Data parallelism (moekit.parallel): routers that compute their losses over the global batch set
    # ``global_batch_losses = True``; ``moekit.parallel`` then gives them the process group in ``data_group``.
    global_batch_losses: bool = False
    data_group = None
    # Why this router cannot run with more than one process (None: it can).
    data_parallel_note: str | None = None

    def __init__(self, dim: int, num_experts: int, top_k: int, *, jitter: float = 0.0):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        if jitter and not self.has_logits:
            raise ValueError(f"jitter: {type(self).__name__} has no logits to jitter")
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter = float(jitter)
        if self.has_logits:
            if self.learned:
                self.weight = nn.Parameter(torch.empty(num_experts, dim))
                nn.init.normal_(self.weight, std=0.02)
                if self.gate_bias:
                    self.bias = nn.Parameter(torch.zeros(num_experts))
            else:  # fitted without gradient (MixER): buffers the subclass fills
                self.register_buffer("weight", torch.zeros(num_experts, dim))
                if self.gate_bias:
                    self.register_buffer("bias", torch.zeros(num_experts))
            self.register_buffer("logit_offset", torch.zeros(num_experts, dtype=torch.float32), persistent=False)

    def logits(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        """``logits_TE`` (float32): ``jitter(x) W^T (+ bias) + logit_offset``; jitter in training only."""
        if not self.has_logits:
            raise ValueError(f"{type(self).__name__} has no logits (no linear gate)")
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        bias = self.bias.float() if self.gate_bias else None
        logits_TE = torch.nn.functional.linear(x_TD.float(), self.weight.float(), bias)
        return logits_TE + self.logit_offset

    def residual_update(self, f: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """What the decoder adds to the residual stream for this layer's MoE output ``f``: ``f`` itself here.
        Routers that override it set ``updates_residual = True``."""
        return f

    def _apply(self, fn, recurse=True):
        # Keep router state (floating buffers) in its own dtype across dtype casts of the model, taking the
        # new device from the cast; a cast from the original tensor loses nothing. Buffers that an optimiser
        # trains (the logit offset) stay leaves with their requires_grad.
        before = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is old or new is None:
                continue
            if new.dtype != old.dtype:
                new = old.detach().to(device=new.device, dtype=old.dtype)
            self._buffers[name] = new.detach().requires_grad_(old.requires_grad)
        return self

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
