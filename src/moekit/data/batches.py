"""Batches for language-model training and evaluation.

Legend: B sequences per batch, L sequence length (tokens fed to the model).

* :class:`TrainBatches` -- random contiguous windows of ``L + 1`` tokens from the training split; batch ``i``
  draws its ``B`` start offsets from ``numpy.random.default_rng([seed, i])`` (PCG64 seeded through
  ``SeedSequence``, identical on every platform). The whole state is ``{"seed", "step"}`` (plain ints, JSON
  safe), so resuming from a checkpoint replays exactly the batches an uninterrupted run would have seen.
* :func:`val_batches` -- the validation split cut into fixed, non-overlapping windows (window ``w`` predicts
  targets ``w*L + 1 ... w*L + L``), so every validation target is scored exactly once; the last window is
  padded (inputs ``PAD``, targets ``IGNORE_INDEX``). Each batch carries the domain id of every target token
  (``-1`` where the target is not scored) for per-domain evaluation. ``max_windows`` evaluates an evenly spaced,
  deterministic subset of the windows instead (the split is sorted by path, so the first windows would cover
  only a few domains).

Targets equal to ``BOS`` are set to ``IGNORE_INDEX`` in both (see :mod:`moekit.data.tokenizer`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .corpus import Corpus
from .tokenizer import BOS_ID, IGNORE_INDEX, PAD_ID


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _split_window(window_BX: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    window_BX = torch.from_numpy(window_BX.astype(np.int64))
    input_ids_BL = window_BX[:, :-1].contiguous()
    targets_BL = window_BX[:, 1:].clone()
    targets_BL[targets_BL == BOS_ID] = IGNORE_INDEX
    return input_ids_BL, targets_BL


class TrainBatches:
    """Seeded random windows from ``tokens``: ``next(batches) -> (input_ids [B, L], targets [B, L])`` (int64).

    ``batch(step)`` is a pure function of ``(seed, step)``; iteration advances ``step``. ``state_dict()`` /
    ``load_state_dict()`` save and restore the position as ``{"seed": int, "step": int}``.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        _positive_int("batch_size", batch_size)
        _positive_int("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"seq_len={seq_len} needs at least {seq_len + 1} tokens; the split has {len(tokens)}")
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.step = 0
        self._offsets_X = np.arange(self.seq_len + 1, dtype=np.int64)

    def starts(self, step: int) -> np.ndarray:
        """Start offsets ``[B]`` of the windows of batch ``step``."""
        rng = np.random.default_rng([self.seed, int(step)])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index_BX = self.starts(step)[:, None] + self._offsets_X
        return _split_window(np.asarray(self.tokens[index_BX]))

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "seed" not in state or "step" not in state:
            raise ValueError("batch state must be an object with 'seed' and 'step'")
        seed, step = state["seed"], state["step"]
        for name, value in (("seed", seed), ("step", step)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"batch state: {name} must be an integer, got {value!r}")
        if int(seed) != self.seed:
            raise ValueError(f"batch state was saved with seed={seed}, this sampler has seed={self.seed}")
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        self.step = int(step)


@dataclass
class ValBatch:
    """``input_ids``, ``targets`` and ``domain_ids`` (domain of each target; -1 where not scored), all ``[B, L]``."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    domain_ids: torch.Tensor


def val_window_starts(num_tokens: int, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Start offsets of the fixed validation windows (an evenly spaced subset when ``max_windows`` is set)."""
    _positive_int("seq_len", seq_len)
    if num_tokens < 2:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, num_tokens - 1, seq_len, dtype=np.int64)
    if max_windows is not None:
        _positive_int("max_windows", max_windows)
        if max_windows < len(starts):
            picks = np.unique(np.linspace(0, len(starts) - 1, max_windows).round().astype(np.int64))
            starts = starts[picks]
    return starts


def val_batches(corpus: Corpus, batch_size: int, seq_len: int, max_windows: int | None = None,
                split: str = "val") -> Iterator[ValBatch]:
    """Deterministic batches of fixed windows over ``split`` (see the module docstring)."""
    _positive_int("batch_size", batch_size)
    tokens = corpus.tokens(split)
    num_tokens = len(tokens)
    starts = val_window_starts(num_tokens, seq_len, max_windows)
    offsets_X = np.arange(seq_len + 1, dtype=np.int64)
    for first in range(0, len(starts), batch_size):
        index_BX = starts[first:first + batch_size, None] + offsets_X
        valid_BX = index_BX < num_tokens
        window_BX = np.full(index_BX.shape, PAD_ID, dtype=np.int64)
        window_BX[valid_BX] = tokens[index_BX[valid_BX]]
        input_ids_BL, targets_BL = _split_window(window_BX)
        targets_BL[torch.from_numpy(~valid_BX[:, 1:])] = IGNORE_INDEX
        domains_BL = torch.from_numpy(corpus.domain_ids(split, np.minimum(index_BX[:, 1:], num_tokens - 1)))
        domains_BL[targets_BL == IGNORE_INDEX] = -1
        yield ValBatch(input_ids_BL, targets_BL, domains_BL)
