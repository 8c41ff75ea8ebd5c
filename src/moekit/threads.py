"""The intra-op thread policy of inference (``moekit generate`` and ``moekit.generate``).

Decoding a few tokens is a chain of small matrix-vector products. Split over several OpenMP threads, each
product finishes only when its slowest thread does; on a machine where another process keeps the cores busy
one of those threads is often descheduled, and every product waits for it (measured here: 2 threads fell from
~275 to 77 tokens/s beside a busy process, 1 thread kept ~200). So the policy ``"auto"`` runs forward calls of
at most :data:`SMALL_CALL_ROWS` token rows on one thread, and larger calls (prefill of long prompts, big
batches) on torch's thread count as it was. ``--threads N`` fixes N threads for every call instead.
BENCHMARKS.md (section "Threads") has the idle and busy figures behind the threshold.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

#: forward calls with at most this many token rows (batch x new positions) run on one thread under "auto"
SMALL_CALL_ROWS = 8
MAX_THREADS = 1024


def parse_threads(value) -> int | None:
    """``"auto"`` / None -> None (the policy); an integer in [1, MAX_THREADS] -> that number; else ValueError."""
    if value is None or value == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--threads must be 'auto' or an integer in [1, {MAX_THREADS}], got {value!r}") from None
    if isinstance(value, bool) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"--threads must be 'auto' or an integer in [1, {MAX_THREADS}], got {value!r}")
    return n


class ThreadPolicy:
    """Chooses the thread count of each inference forward call; ``fixed`` None means the ``"auto"`` policy."""

    def __init__(self, fixed: int | None = None):
        self.fixed = fixed
        self.default = torch.get_num_threads()

    def threads_for(self, rows: int) -> int:
        if self.fixed is not None:
            return self.fixed
        return 1 if rows <= SMALL_CALL_ROWS else self.default

    @contextmanager
    def call(self, rows: int):
        """Run the body with the thread count for a call of ``rows`` token rows, then restore the previous one."""
        before = torch.get_num_threads()
        wanted = self.threads_for(rows)
        if wanted != before:
            torch.set_num_threads(wanted)
        try:
            yield
        finally:
            if wanted != before:
                torch.set_num_threads(before)

