"""Autoregressive sampling from a :class:`moekit.model.MoELM`: greedy, temperature and nucleus (top-p).

Nucleus sampling follows Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"
(arXiv:1904.09751): keep the smallest set of most likely tokens whose probability reaches ``top_p``.
Sampling draws from a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives the same tokens on any
device for the same logits.

Legend: B batch, L length, V vocabulary.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .cache import KVCache


def _as_batch(prompt_ids) -> tuple[torch.Tensor, bool]:
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    if ids.dim() == 1:
        return ids[None, :], True
    if ids.dim() != 2:
        raise ValueError(f"prompt_ids must be a sequence of ids or a [batch, length] tensor, got {tuple(ids.shape)}")
    return ids, False


def top_p_filter(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus of mass ``top_p`` and renormalise."""
    if top_p >= 1.0:
        return probs_BV
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    sorted_BV = sorted_BV.masked_fill(mass_before_BV >= top_p, 0.0)  # the top token always stays
    kept_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return kept_BV / kept_BV.sum(dim=-1, keepdim=True)


def next_token(logits_BV: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """Token ids ``[B]``: argmax when ``temperature == 0``, else a draw from the tempered nucleus."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float().cpu() / temperature, dim=-1)
    probs_BV = top_p_filter(probs_BV, top_p)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1).to(logits_BV.device)


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, use_cache: bool = True, eos_id: int | None = None) -> torch.Tensor:
    """Continue ``prompt_ids`` (ids ``[L]`` or ``[B, L]``) by up to ``max_new_tokens`` tokens.

    Returns the prompt followed by the new tokens, with the prompt's rank (``[L + n]`` or ``[B, L + n]``).
    ``temperature=0`` is greedy; ``use_cache`` decodes incrementally with a :class:`KVCache` (greedy gives the
    same tokens either way). With ``eos_id``, a sequence that produced it is continued with ``eos_id`` and
    generation stops once every sequence has. The model runs in eval mode and is put back as it was.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    ids_BL, single = _as_batch(prompt_ids)
    if ids_BL.shape[1] == 0:
        raise ValueError("prompt_ids must hold at least one token (for example BOS)")
    device = next(model.parameters()).device
    ids_BL = ids_BL.to(device)
    generator = torch.Generator().manual_seed(int(seed)) if temperature > 0 else None
    was_training = model.training
    model.eval()
    try:
        B, prompt_len = ids_BL.shape
        cache = KVCache.for_model(model, B, prompt_len + max_new_tokens) if use_cache else None
        finished_B = torch.zeros(B, dtype=torch.bool, device=device)
        out = [ids_BL]
        step_input_BL, pos = ids_BL, 0
        for _ in range(max_new_tokens):
            if cache is not None:
                logits_BLV = model(step_input_BL, kv_cache=cache, start_pos=pos)
                pos += step_input_BL.shape[1]
            else:
                logits_BLV = model(torch.cat(out, dim=1))
            token_B = next_token(logits_BLV[:, -1], temperature, top_p, generator)
            if eos_id is not None:
                token_B = torch.where(finished_B, torch.full_like(token_B, eos_id), token_B)
                finished_B |= token_B == eos_id
            step_input_BL = token_B[:, None]
            out.append(step_input_BL)
            if eos_id is not None and bool(finished_B.all()):
                break
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if single else result
