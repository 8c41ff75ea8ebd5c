"""Hash routing: each token goes to a fixed expert chosen by hashing its token id; no learned router.

Paper: Roller, Sukhbaatar, Szlam, Weston 2021, "Hash Layers For Large Sparse Models" (NeurIPS 2021,
arXiv:2106.04426), the Hash Layer (section and equation numbers not checked): the feedforward layer of a token
is selected by a fixed hash of the current token id, decided before training; no routing parameters, no load-
balancing loss. Checked against the paper's abstract and overview (via the ``search`` tool, "pages" corpus):
routing by the token id (not the hidden state), no routing parameters or balancing loss, "random" and
"balanced" hashes. The paper's random hash maps each token id to a random expert fixed before training; here
the default is an integer mixing function of the id (murmur3's 32-bit finaliser), which behaves like a random
table but needs no vocabulary size. The paper's balanced hash ("Balanced assignment": fill experts greedily by
training-set token frequency) is :func:`balanced_table`, given as a lookup table with
:meth:`HashRouter.set_table`; the exact greedy order of the paper is a reconstruction [recon].

``top_k > 1`` is not the paper's MultiHash layer (which splits one FFN into segments, each hashed
separately). Here a token takes ``K`` distinct experts from ``K`` independent hashes: hash ``k`` picks among
the experts hashes ``0..k-1`` did not take, so the K experts are a hashed draw without replacement (each one
uniform on its own), and each gets weight ``1/K`` so that the output scale does not depend on ``K``.

Legend: T tokens, D model width, E experts, K experts per token, V vocabulary.
"""
from __future__ import annotations

import heapq

import torch

from . import register
from .base import Router, Routing, RoutingContext

__all__ = ["HashRouter", "mix32", "balanced_table"]

_MASK32 = 0xFFFFFFFF


def _mulmod32(x: torch.Tensor, const: int) -> torch.Tensor:
    """``(x * const) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow."""
    lo, hi = const & 0xFFFF, const >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser (fmix32) on int64 values in ``[0, 2**32)``: a bijection that mixes bits."""
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mulmod32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _mix32_int(value: int) -> int:
    """:func:`mix32` on one Python integer."""
    value &= _MASK32
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & _MASK32
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & _MASK32
    return value ^ (value >> 16)


def _hash_ids(ids: torch.Tensor, salt: int) -> torch.Tensor:
    """A 32-bit hash (as int64) of int64 token ids, different for each ``salt``."""
    folded = (ids ^ (ids >> 32)) & _MASK32  # ids >= 2**32 (or negative padding ids) fold into 32 bits
    return mix32(mix32(folded ^ _mix32_int(salt)) ^ 0x9E3779B9)


def balanced_table(token_counts_V: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Balanced hash of Roller et al. ("Balanced assignment") [recon: the greedy rule below is assumed].

    Tokens in decreasing order of training-set frequency go one by one to the expert with the least total
    frequency so far (ties to the lowest index). Returns the lookup table ``expert_V`` (int64).
    """
    counts = token_counts_V.detach().to("cpu", torch.float64)
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    heap = [(0.0, expert) for expert in range(num_experts)]  # (load, expert): least loaded, then lowest index
    table = [0] * counts.numel()
    values = counts.tolist()
    for token in order:
        load, expert = heapq.heappop(heap)
        table[token] = expert
        heapq.heappush(heap, (load + values[token], expert))
    return torch.tensor(table, dtype=torch.int64)


@register("hash")
class HashRouter(Router):
    """Hash routing (Roller et al. 2021, arXiv:2106.04426): expert = fixed hash of the token id.

    Needs ``ctx.input_ids`` (shape ``ctx.batch_shape``; :class:`moekit.model` passes it); raises ``ValueError``
    without it. Options: ``seed`` (selects a different fixed hash function). With a lookup table installed by
    :meth:`set_table` (for example :func:`balanced_table`), hash 0 is the table lookup. No parameters, no
    auxiliary loss; ``logits``/``probs`` are None (the router defines no scores). Each of a token's ``K``
    experts has weight ``1/K`` (1 for ``K = 1``).
    """

    learned = False
    has_logits = False  # no gate, no logits, no logit offset
    balances_itself = True  # uniform in expectation over token ids; no balancing method applies

    def __init__(self, dim: int, num_experts: int, top_k: int, *, seed: int = 0):
        super().__init__(dim, num_experts, top_k)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed
        self.register_buffer("table", torch.empty(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        table = f", table={self.table.numel()} ids" if self.table.numel() else ""
        return f"num_experts={self.num_experts}, top_k={self.top_k}, seed={self.seed}{table}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the table's length is the vocabulary's, unknown at construction: take the saved one's shape
        saved = state_dict.get(prefix + "table")
        if isinstance(saved, torch.Tensor):
            self.table = torch.empty_like(saved, dtype=torch.int64, device=self.table.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_table(self, expert_V: torch.Tensor) -> None:
        """Install a token-id -> expert lookup table (ids outside it fall back to the hash function)."""
        expert_V = torch.as_tensor(expert_V, dtype=torch.int64)
        if expert_V.dim() != 1 or (expert_V.numel() and not 0 <= int(expert_V.min()) <= int(expert_V.max())
                                   < self.num_experts):
            raise ValueError(f"table must be a 1-D tensor of expert ids in [0, {self.num_experts})")
        self.table = expert_V.to(self.table.device)

    def expert_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``expert_TK`` for flat int64 token ids ``[T]``: K distinct experts per id, deterministic."""
        num_experts = self.num_experts
        ids = ids.to(torch.int64)
        chosen = []
        taken_TE = torch.zeros(ids.numel(), num_experts, dtype=torch.bool, device=ids.device)
        for k in range(self.top_k):
            hashed = _hash_ids(ids, self.seed * 1_000_003 + k)
            rank = hashed % (num_experts - k)  # index among the experts not taken yet
            if k == 0:
                expert = rank
                if self.table.numel():
                    table = self.table.to(ids.device)
                    inside = (ids >= 0) & (ids < table.numel())
                    expert = torch.where(inside, table[ids.clamp(0, table.numel() - 1)], expert)
            else:
                free_rank_TE = torch.cumsum((~taken_TE).to(torch.int64), dim=1) - 1
                is_pick_TE = (~taken_TE) & (free_rank_TE == rank[:, None])
                expert = is_pick_TE.to(torch.int64).argmax(dim=1)
            taken_TE[torch.arange(ids.numel(), device=ids.device), expert] = True
            chosen.append(expert)
        return torch.stack(chosen, dim=1)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        num_tokens = x_TD.shape[0]
        if ctx is None or ctx.input_ids is None:
            raise ValueError("hash router: needs the token ids; pass RoutingContext(input_ids=...) to the layer "
                             "(moekit.model passes them itself)")
        ids = ctx.input_ids
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise ValueError("hash router: ctx.input_ids must be an integer tensor")
        if ids.numel() != num_tokens:
            raise ValueError(f"hash router: ctx.input_ids has {ids.numel()} ids (shape {tuple(ids.shape)}) for "
                             f"{num_tokens} tokens")
        topk_ids_TK = self.expert_ids(ids.reshape(-1).to(x_TD.device))
        topk_weights_TK = torch.full(topk_ids_TK.shape, 1.0 / self.top_k, dtype=torch.float32, device=x_TD.device)
        return Routing.from_topk(topk_ids_TK, topk_weights_TK, self.num_experts,
                                 token_mask=ctx.flat_mask(num_tokens, x_TD.device))
