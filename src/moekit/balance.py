"""Load balancing: auxiliary losses and the auxiliary-loss-free expert bias.

Legend: T tokens, E experts, K experts per token, S routed pairs.

Losses (all return an unscaled scalar; routers multiply by their coefficient):

* ``switch_loss`` -- Switch Transformer / GShard load-balancing loss (Fedus et al. 2021, arXiv:2101.03961,
  eq. 4; Lepikhin et al. 2020, arXiv:2006.16668): ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of the
  ``S`` assignments that went to expert ``e`` and ``P_e`` the mean routing probability of ``e``. It equals 1
  for perfectly uniform routing (Megatron-Core's normalisation; Hugging Face's ``load_balancing_loss_func``
  is ``K`` times this).
* ``sequence_loss`` -- the same quantity computed per sequence and averaged (DeepSeek-V3, arXiv:2412.19437,
  eqs. 17-20, "complementary sequence-wise auxiliary loss").
* global-batch loss -- ``f`` taken over all micro-batches of the optimiser step so far (Qiu et al. 2025,
  "Demons in the Detail", arXiv:2501.11873); see :class:`LoadAccumulator`.
* ``z_loss`` -- router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE, Zoph et al. 2022, arXiv:2202.08906,
  eq. 5).

Padding: every loss takes ``token_mask`` (``[T]`` bool, True = a real token, None = all real) and is then the
unmasked loss of the real tokens alone: means are over real tokens, counts come from real tokens' pairs,
sequences are the real tokens of each row (rows without one are left out). With no token at all every loss
is an exact zero, never NaN.

Auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts", arXiv:2408.15664, Algorithm 1): a per-expert bias ``b`` is added to the scores for
top-k *selection only*; after each optimiser step ``b_e += u * sign(mean_load - load_e)``. Han & Zhong 2025
("A Theoretical Framework for Auxiliary-Loss-Free Load Balancing of Sparse Mixture-of-Experts") read the
same update as a dual (price) step ``b_e += eps_k * (L - A_e)``; the sign rule is ``eps_k = u / |L - A_e|``.
``bias_step`` offers ``sign``, ``proportional`` (constant ``eps = u / L``, the load gap measured in units
of the mean load) and ``decaying`` (``eps_k = u / (L * k)`` at update ``k``, the decaying step the paper's
online analysis uses; moekit's working notes on the paper mark the exact schedule as a reconstruction).
"""
from __future__ import annotations

import torch

__all__ = [
    "BIAS_RULES",
    "AUX_LOSSES",
    "switch_loss",
    "sequence_loss",
    "z_loss",
    "max_violation",
    "bias_step",
    "LoadAccumulator",
    "global_counts",
]

AUX_LOSSES = ("switch", "sequence", "global")
BIAS_RULES = ("sign", "proportional", "decaying")


def _real_rows(x_TX: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``x_TX`` with the rows of masked tokens set to zero (not multiplied: padding may hold inf or NaN)."""
    if token_mask is None:
        return x_TX
    return x_TX.masked_fill(~token_mask.to(x_TX.device).bool().reshape(-1, *([1] * (x_TX.dim() - 1))), 0.0)


def _num_real(num_rows: int, token_mask: torch.Tensor | None) -> int:
    return num_rows if token_mask is None else int(token_mask.sum())


def switch_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, num_tokens: int | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``E * sum_e f_e * P_e``: ``f_e = counts_E[e] / sum(counts_E)``, ``P_e = sum_t probs_TE[t, e] / num_tokens``.

    ``num_tokens`` defaults to the number of real tokens (the mean over them; all ``T`` without
    ``token_mask``); ``counts_E`` must count the real tokens' pairs only. Under data parallelism it is the
    global batch's real token count and ``counts_E`` the global counts: each rank's value is then its share of
    the global loss, the shares summing to it (zero, not NaN, for a rank with no tokens).
    """
    num_experts = probs_TE.shape[-1]
    denominator = _num_real(probs_TE.shape[0], token_mask) if num_tokens is None else num_tokens
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp(min=1).to(probs_TE.dtype)
    P_E = _real_rows(probs_TE, token_mask).sum(dim=0) / max(denominator, 1)
    return num_experts * torch.dot(f_E, P_E)


def sequence_loss(probs_TE: torch.Tensor, expert_TK: torch.Tensor, num_sequences: int,
                  total_sequences: int | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch loss per sequence over ``num_sequences`` equal-length rows (token-major order), summed and divided
    by ``total_sequences``.

    With ``token_mask`` a sequence is the real tokens of its row (its ``f`` and ``P`` are means over them) and
    rows without a real token are left out. ``total_sequences`` defaults to the number of sequences with at
    least one real token (the mean over them); under data parallelism it is the global count, making each
    rank's value its share."""
    num_tokens, num_experts = probs_TE.shape
    if num_sequences == 0 or num_tokens == 0:
        return probs_TE.sum() * 0.0
    seq_len = num_tokens // num_sequences
    top_k = expert_TK.shape[-1]
    real_T = (torch.ones(num_tokens, dtype=torch.bool, device=probs_TE.device) if token_mask is None
              else token_mask.to(probs_TE.device).bool().reshape(-1))
    real_BL = real_T.reshape(num_sequences, seq_len).to(probs_TE.dtype)
    probs_BLE = _real_rows(probs_TE, real_T).reshape(num_sequences, seq_len, num_experts)
    expert_BX = expert_TK.reshape(num_sequences, seq_len * top_k)
    counts_BE = torch.zeros(num_sequences, num_experts, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_BE.scatter_add_(1, expert_BX, real_BL.repeat_interleave(top_k, dim=1))
    n_B = real_BL.sum(dim=1)
    f_BE = counts_BE / (n_B.clamp(min=1) * top_k)[:, None]
    P_BE = probs_BLE.sum(dim=1) / n_B.clamp(min=1)[:, None]
    total = int((n_B > 0).sum()) if total_sequences is None else total_sequences
    return num_experts * (f_BE * P_BE).sum() / max(total, 1)


def z_loss(logits_TE: torch.Tensor, num_tokens: int | None = None,
           token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: ``sum_t (logsumexp_e logits[t, e])^2 / num_tokens`` over the real tokens (default: the
    mean over them)."""
    denominator = _num_real(logits_TE.shape[0], token_mask) if num_tokens is None else num_tokens
    lse_T = _real_rows(torch.logsumexp(logits_TE.float(), dim=-1), token_mask)
    return lse_T.square().sum() / max(denominator, 1)


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = (max_e load_e - mean load) / mean load; 0 for perfect balance (and for no tokens)."""
    counts = counts_E.double()
    mean = counts.mean()
    if mean <= 0:
        return 0.0
    return float((counts.max() - mean) / mean)


@torch.no_grad()
def bias_step(bias_E: torch.Tensor, load_E: torch.Tensor, rule: str, rate: float, step: int) -> torch.Tensor:
    """One auxiliary-loss-free bias update in place; returns ``bias_E``.

    ``load_E`` is the number of assignments each expert received since the last update, ``step`` the 1-based
    index of this update (used by ``decaying``).
    """
    load = load_E.to(bias_E.dtype)
    mean = load.mean()
    gap_E = mean - load
    if rule == "sign":
        bias_E.add_(rate * torch.sign(gap_E))
    elif rule == "proportional":
        if mean > 0:
            bias_E.add_(rate * gap_E / mean)
    elif rule == "decaying":
        if mean > 0:
            bias_E.add_((rate / max(step, 1)) * gap_E / mean)
    else:
        raise ValueError(f"bias_update must be one of {BIAS_RULES}, got {rule!r}")
    return bias_E


class LoadAccumulator:
    """Counts assignments per expert across the micro-batches of one optimiser step.

    Serves the global-batch auxiliary loss (``f`` over everything seen since the last step) and the
    auxiliary-loss-free bias (load since the last update). Under data parallelism the router adds counts
    already summed over the ranks (:func:`global_counts`), so every rank applies the same update.

    Routers call :meth:`update` once per forward: a forward recomputed by activation checkpointing adds nothing
    and sees the counts its original forward saw.
    """

    def __init__(self, num_experts: int):
        from .routing.base import CountSnapshots

        self.counts_E = torch.zeros(num_experts, dtype=torch.float64)
        self._seen = CountSnapshots()

    def update(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Add one forward's counts (unless this forward is a recomputation) and return the accumulated counts
        that forward sees (for the global-batch loss)."""
        from .routing.base import recomputing

        key = tuple(counts_E.detach().to("cpu", torch.float64).tolist())
        if recomputing():
            seen = self._seen.pop(key)
            return seen if seen is not None else self.counts_E.clone()
        self.add(counts_E)
        self._seen.push(key, self.counts_E)
        return self.counts_E.clone()

    def add(self, counts_E: torch.Tensor) -> None:
        if self.counts_E.device != counts_E.device:
            self.counts_E = self.counts_E.to(counts_E.device)
        self.counts_E += counts_E.detach().to(torch.float64)

    def reset(self) -> None:
        self.counts_E.zero_()
        self._seen.clear()


@torch.no_grad()
def global_counts(counts_E: torch.Tensor, num_tokens: int, num_sequences: int, group) -> tuple[torch.Tensor, int, int]:
    """``(counts_E, tokens, sequences)`` summed over the ranks of ``group``, in one all-reduce."""
    import torch.distributed as dist

    both = torch.cat([counts_E.detach().to(torch.float64),
                      counts_E.new_tensor([num_tokens, num_sequences], dtype=torch.float64)])
    dist.all_reduce(both, group=group)
    return both[:-2].to(counts_E.dtype), int(both[-2]), int(both[-1])
