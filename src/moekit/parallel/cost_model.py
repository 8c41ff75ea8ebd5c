"""Choosing the overlap degree r of the chunked all-to-all from fitted linear cost models (FSMoE).

Paper: FSMoE ("FSMoE: A Flexible and Scalable Training System for Sparse Mixture-of-Experts Models",
arXiv:2501.10714, read from its abstract): split the exchange into r chunks so that the
all-to-all of one chunk overlaps the expert computation of another, and pick r from a linear cost model
``t = alpha + beta * bytes`` fitted to measured collectives.

Here both sides are linear fits: ``comm(bytes) = alpha + beta * bytes`` for one all-to-all and
``compute(rows) = gamma + delta * rows`` for the experts on the rows of one chunk. The schedule of
:func:`moekit.dispatch.all_to_all._pipeline` is then simulated exactly: the link carries, in issue order,
dispatch 0, dispatch 1, return 0, dispatch 2, return 1, ... one at a time; the device computes chunk c once
its dispatch has arrived; dispatch c + 1 is issued when dispatch c has arrived, return c when chunk c is
computed. ``alpha`` (a per-message latency) is what stops r from growing without end.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearCost:
    """``t(x) = intercept + slope * x`` seconds."""

    intercept: float
    slope: float

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x

    @classmethod
    def fit(cls, xs, ts) -> "LinearCost":
        """Least-squares line through ``(xs, ts)`` with both coefficients clamped at >= 0."""
        xs, ts = np.asarray(xs, dtype=float), np.asarray(ts, dtype=float)
        if len(xs) < 2 or np.ptp(xs) == 0:
            raise ValueError("fitting a line needs at least two distinct sizes")
        slope, intercept = np.polyfit(xs, ts, 1)
        if intercept < 0:  # refit through the origin
            intercept, slope = 0.0, float(np.dot(xs, ts) / np.dot(xs, xs))
        return cls(float(max(intercept, 0.0)), float(max(slope, 0.0)))


@dataclass(frozen=True)
class OverlapCostModel:
    """Predicted time of one chunked exchange + expert computation (one layer, one direction)."""

    comm: LinearCost  # seconds for one all-to-all carrying x bytes from this rank
    compute: LinearCost  # seconds for the experts on x rows

    def time(self, chunks: int, bytes_sent: float, rows: float) -> float:
        """Simulated time of the pipeline with ``chunks`` equal chunks (see the module docstring)."""
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        c = self.comm(bytes_sent / chunks)
        g = self.compute(rows / chunks)
        compute_free = 0.0
        arrived = [0.0] * chunks
        link_free = arrived[0] = c  # dispatch 0
        for k in range(chunks):
            if k + 1 < chunks:  # issued once dispatch k has arrived
                start = max(link_free, arrived[k])
                link_free = arrived[k + 1] = start + c
            compute_free = max(compute_free, arrived[k]) + g
            link_free = max(link_free, compute_free) + c  # return k
        return link_free

    def best_chunks(self, bytes_sent: float, rows: float, max_chunks: int) -> int:
        """The r in ``1..max_chunks`` with the lowest predicted time (the smallest on ties)."""
        times = {r: self.time(r, bytes_sent, rows) for r in range(1, max(1, max_chunks) + 1)}
        return min(times, key=lambda r: (times[r], r))

    def gain(self, chunks: int, bytes_sent: float, rows: float) -> float:
        """Predicted speed-up of ``chunks`` chunks over no overlap."""
        return self.time(1, bytes_sent, rows) / self.time(chunks, bytes_sent, rows)


def _median_time(fn, repeats: int, device=None) -> float:
    """Median seconds of ``fn()`` after one warm-up call (CUDA work waited for on ``device``)."""
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"

    def run():
        fn()
        if cuda:
            torch.cuda.synchronize(device)

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_all_to_all(group, ep_size: int, dim: int, row_counts, repeats: int = 5, dtype=None,
                       device=None) -> list[tuple[int, float]]:
    """``[(bytes sent by this rank, median seconds)]`` of ``all_to_all_single`` with ``rows`` rows per peer,
    the maximum over the ranks of ``group`` (a collective: every rank of the group must call it)."""
    import torch
    import torch.distributed as dist

    dtype = dtype or torch.float32
    out = []
    for rows in row_counts:
        send = torch.randn(rows * ep_size, dim, dtype=dtype, device=device)
        recv = torch.empty_like(send)

        def run():
            dist.all_to_all_single(recv, send, group=group)

        seconds = torch.tensor([_median_time(run, repeats, device)], dtype=torch.float64, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=group)
        out.append((send.numel() * send.element_size(), float(seconds)))
    return out


def measure_experts(experts, row_counts, repeats: int = 5) -> list[tuple[int, float]]:
    """``[(rows, median seconds)]`` of the experts' forward on ``rows`` rows spread evenly over them."""
    import torch

    weight = next(experts.parameters())
    out = []
    for rows in row_counts:
        per = torch.full((experts.num_experts,), rows // experts.num_experts, dtype=torch.int64)
        per[: rows % experts.num_experts] += 1
        x = torch.randn(rows, experts.dim, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            seconds = _median_time(lambda: experts.expert_rows(x, per), repeats, weight.device)
        out.append((rows, seconds))
    return out


def fit_cost_model(group, ep_size: int, experts, rows_per_step: int, repeats: int = 5) -> OverlapCostModel:
    """Fit :class:`OverlapCostModel` on this machine around ``rows_per_step`` rows (a collective)."""
    # four distinct sizes around rows_per_step, at least one row per peer each
    base = max(rows_per_step // 8, ep_size)
    sizes = [base * f for f in (1, 2, 4, 8)]
    comm = measure_all_to_all(group, ep_size, experts.dim, [max(1, s // ep_size) for s in sizes], repeats,
                              dtype=next(experts.parameters()).dtype, device=next(experts.parameters()).device)
    comp = measure_experts(experts, sizes, repeats)
    return OverlapCostModel(LinearCost.fit(*zip(*comm)), LinearCost.fit(*zip(*comp)))


def choose_chunks(layout, experts, rows_per_step: int, repeats: int = 5) -> tuple[int, OverlapCostModel]:
    """Fit the cost model on this machine and pick r for ``rows_per_step`` rows sent per layer and rank;
    rank 0's choice is broadcast so that every rank pipelines the same way (a collective)."""
    import torch
    import torch.distributed as dist

    model = fit_cost_model(layout.ep_group, layout.ep_size, experts, rows_per_step, repeats)
    weight = next(experts.parameters())
    bytes_sent = rows_per_step * experts.dim * weight.element_size()
    chunks = torch.tensor([model.best_chunks(bytes_sent, rows_per_step, experts.num_experts)], dtype=torch.int64,
                          device=weight.device)
    dist.broadcast(chunks, src=0)
    return int(chunks), model


def from_hardware(bandwidth_gb_s: float, latency_us: float, tflop_s: float, dim: int, hidden_dim: int,
                  gated: bool = True, launch_us: float = 0.0) -> OverlapCostModel:
    """A cost model from assumed hardware figures instead of measurements: all-to-all at ``bandwidth_gb_s``
    GB/s per rank with ``latency_us`` per message, experts at ``tflop_s`` TFLOP/s (forward: ``2 * D * (H + F)``
    flops per row, ``H = 2F`` when gated) plus ``launch_us`` per chunk."""
    flops_per_row = 2 * dim * ((2 if gated else 1) * hidden_dim + hidden_dim)
    return OverlapCostModel(LinearCost(latency_us * 1e-6, 1.0 / (bandwidth_gb_s * 1e9)),
                            LinearCost(launch_us * 1e-6, flops_per_row / (tflop_s * 1e12)))
