"""All-to-all dispatch: experts sharded over an expert-parallel group of torch.distributed ranks.

Legend: T tokens, D model width, E experts in the model, P expert-parallel ranks, L = E / P experts on this
rank, S this rank's routed pairs (sorted by global expert, hence by destination rank), R rows this rank's
experts receive, r chunks.

Each rank routes its own tokens. ``x_SD`` (its pairs' rows, sorted by expert) goes to the ranks that hold
the experts with uneven splits (``torch.distributed.all_to_all_single``), the received rows are sorted by
local expert and run through the experts' grouped matrix products, and the outputs travel back along the
reverse splits; the gate weights are applied and the rows summed into tokens on the rank that owns them.
Ranks or experts that receive no rows take part in every exchange with zero-length splits.

Overlap (FSMoE, PAPERS.md item 26): the exchange is cut into ``r`` chunks, chunk ``c`` carrying the rows of
the ``c``-th block of each rank's local experts. The dispatch of chunk ``c + 1`` and the return of chunk
``c - 1`` are in flight (asynchronous collectives) while chunk ``c`` is computed, in the forward pass and in
the backward pass. Chunks are cut at expert boundaries so that every expert multiplies exactly the rows it
multiplies with ``r = 1``, with the same sizes, and every weight gradient sums the same rows in the same order:
results are bit-for-bit those of ``r = 1`` (tested in float32 and float64 on the CPU; a BLAS that picked
kernels by memory alignment could still differ in the last bits). FSMoE cuts by tokens instead, which changes
the matrix sizes and the weight gradients' summation order; cutting by experts bounds ``r`` by ``L``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused import expert_rows
from .local import _GatherRows, _ScatterAddRows
from .plan import DispatchPlan


def chunk_bounds(num_local_experts: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` near-equal blocks of local experts ``[(start, stop), ...]`` (at most one per expert)."""
    chunks = max(1, min(chunks, num_local_experts))
    base, extra = divmod(num_local_experts, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        stop = start + base + (1 if c < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass
class ExchangePlan:
    """Who sends which rows to whom, chunk by chunk.

    For chunk ``c``: ``send_index[c]`` lists the rows of ``x_SD`` it sends, in (destination rank, expert)
    order; ``send_splits[c][p]`` / ``recv_splits[c][p]`` count the rows sent to / received from rank ``p``;
    ``sort[c]`` puts the received rows, which arrive in (source rank, expert) order, into local-expert order
    and ``unsort[c]`` is its inverse; ``counts[c]`` has the rows of each local expert of the chunk, which are
    experts ``bounds[c][0] .. bounds[c][1] - 1`` of this rank.
    """

    bounds: list[tuple[int, int]]
    send_index: list[torch.Tensor]
    send_splits: list[list[int]]
    recv_splits: list[list[int]]
    sort: list[torch.Tensor]
    unsort: list[torch.Tensor]
    counts: list[torch.Tensor]

    @property
    def rows_received(self) -> int:
        return sum(sum(s) for s in self.recv_splits)


def exchange_counts(counts_E: torch.Tensor, ep_size: int, group) -> torch.Tensor:
    """``recv_PL[p, l]``: how many rows rank ``p`` sends to this rank's local expert ``l`` (one all-to-all)."""
    import torch.distributed as dist

    send_E = counts_E.to(torch.int64).contiguous()
    recv_E = torch.empty_like(send_E)
    dist.all_to_all_single(recv_E, send_E, group=group)
    return recv_E.view(ep_size, -1)


def make_exchange_plan(counts_E: torch.Tensor, recv_PL: torch.Tensor, chunks: int) -> ExchangePlan:
    """Build the per-chunk splits and permutations from this rank's ``counts_E`` (pairs per global expert,
    in the order of ``x_SD``) and the received counts ``recv_PL``."""
    ep_size, num_local = recv_PL.shape
    device = counts_E.device
    both = torch.stack([counts_E.to(torch.int64).view(ep_size, num_local), recv_PL.to(torch.int64)]).cpu()
    send_PL, recv_PL_cpu = both[0], both[1]  # one device-to-host copy for both
    starts_PL = (torch.cumsum(send_PL.reshape(-1), 0) - send_PL.reshape(-1)).view(ep_size, num_local)
    bounds = chunk_bounds(num_local, chunks)
    plan = ExchangePlan(bounds, [], [], [], [], [], [])
    for start, stop in bounds:
        sizes_P = send_PL[:, start:stop].sum(1)
        first_P = starts_PL[:, start]
        pieces = [torch.arange(int(first_P[p]), int(first_P[p] + sizes_P[p])) for p in range(ep_size)]
        plan.send_index.append(torch.cat(pieces).to(device))
        plan.send_splits.append(sizes_P.tolist())
        block_PX = recv_PL_cpu[:, start:stop]
        plan.recv_splits.append(block_PX.sum(1).tolist())
        expert_of_row = torch.arange(stop - start).repeat(ep_size).repeat_interleave(block_PX.reshape(-1))
        sort = torch.argsort(expert_of_row, stable=True)
        unsort = torch.empty_like(sort)
        unsort[sort] = torch.arange(sort.numel())
        plan.sort.append(sort.to(device))
        plan.unsort.append(unsort.to(device))
        plan.counts.append(block_PX.sum(0))
    return plan


def _start(out_shape_rows: int, send_XD: torch.Tensor, out_splits, in_splits, group):
    import torch.distributed as dist

    recv_XD = send_XD.new_empty(out_shape_rows, send_XD.shape[1])
    work = dist.all_to_all_single(recv_XD, send_XD, out_splits, in_splits, group=group, async_op=True)
    return recv_XD, work, send_XD


def _pipeline(rows_SD: torch.Tensor, xplan: ExchangePlan, group, compute) -> torch.Tensor:
    """Send chunk ``c`` of ``rows_SD`` out, ``compute(c, received rows in expert order)`` and send the result back;
    the next chunk's dispatch and the previous chunk's return are in flight while a chunk computes."""
    def dispatch(c):
        send = rows_SD.index_select(0, xplan.send_index[c])
        return _start(sum(xplan.recv_splits[c]), send, xplan.recv_splits[c], xplan.send_splits[c], group)

    result_SD = rows_SD.new_empty(rows_SD.shape[0], rows_SD.shape[1])
    returns = []
    pending = dispatch(0)
    for c in range(len(xplan.bounds)):
        recv_XD, work, _ = pending
        work.wait()
        if c + 1 < len(xplan.bounds):
            pending = dispatch(c + 1)
        out_XD = compute(c, recv_XD.index_select(0, xplan.sort[c]))
        back_XD = out_XD.index_select(0, xplan.unsort[c]).contiguous()
        returns.append((c, _start(len(xplan.send_index[c]), back_XD, xplan.send_splits[c], xplan.recv_splits[c],
                                  group)))
    for c, (recv_XD, work, _) in returns:
        work.wait()
        result_SD.index_copy_(0, xplan.send_index[c], recv_XD)
    return result_SD


class ExpertParallelFFN(torch.autograd.Function):
    """``x_SD -> y_SD``: the rows of this rank's pairs through the experts that own them, wherever they live.

    The forward keeps one small autograd graph per chunk (the expert FFN on the received rows); the backward
    exchanges the output gradients chunk by chunk, differentiates each chunk's graph and sends the input
    gradients back, with the same overlap as the forward.
    """

    @staticmethod
    def forward(ctx, x_SD, w_up_LHD, w_down_LDF, xplan: ExchangePlan, group, gate):
        build = any(ctx.needs_input_grad[:3])
        graphs = []

        def compute(c, x_XD):
            start, stop = xplan.bounds[c]
            if not build:
                return expert_rows(x_XD, w_up_LHD[start:stop], w_down_LDF[start:stop], xplan.counts[c], gate)
            with torch.enable_grad():
                leaves = (x_XD.requires_grad_(True), w_up_LHD[start:stop].detach().requires_grad_(True),
                          w_down_LDF[start:stop].detach().requires_grad_(True))
                y_XD = expert_rows(*leaves, xplan.counts[c], gate)
            graphs.append((leaves, y_XD))
            return y_XD.detach()

        y_SD = _pipeline(x_SD, xplan, group, compute)
        ctx.graphs, ctx.xplan, ctx.group = graphs, xplan, group
        ctx.weights = (w_up_LHD, w_down_LDF)
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        xplan, graphs = ctx.xplan, ctx.graphs
        if graphs is None:
            raise RuntimeError("expert-parallel dispatch is differentiated once per forward; backward through it "
                               "a second time (retain_graph=True) is not supported")
        w_up_LHD, w_down_LDF = ctx.weights
        dw_up = torch.zeros_like(w_up_LHD)
        dw_down = torch.zeros_like(w_down_LDF)

        def compute(c, dy_XD):
            start, stop = xplan.bounds[c]
            leaves, y_XD = graphs[c]
            dx_XD, dwu, dwd = torch.autograd.grad(y_XD, leaves, dy_XD, allow_unused=True)
            if dwu is not None:
                dw_up[start:stop] = dwu
            if dwd is not None:
                dw_down[start:stop] = dwd
            return dx_XD if dx_XD is not None else torch.zeros_like(dy_XD)

        dx_SD = _pipeline(dy_SD.contiguous(), xplan, ctx.group, compute)
        ctx.graphs = None
        return dx_SD, dw_up, dw_down, None, None, None


class AllToAllDispatcher:
    """The expert-parallel dispatcher of a :class:`moekit.MoE` layer whose ``experts`` hold this rank's shard.

    ``chunks`` is the overlap degree ``r`` (1: no overlap). The plan's expert ids are global; the layer's
    ``experts`` hold experts ``ep_rank * L .. (ep_rank + 1) * L - 1``.
    """

    def __init__(self, group, ep_size: int, chunks: int = 1):
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        self.group = group
        self.ep_size = ep_size
        self.chunks = chunks
        self.last_exchange: ExchangePlan | None = None

    def __call__(self, x_TD: torch.Tensor, plan: DispatchPlan, experts) -> torch.Tensor:
        if not hasattr(experts, "up_weight"):
            raise TypeError(f"expert parallelism needs dense experts, got {type(experts).__name__}")
        recv_PL = exchange_counts(plan.counts_E, self.ep_size, self.group)
        xplan = make_exchange_plan(plan.counts_E, recv_PL, self.chunks)
        self.last_exchange = xplan
        x_SD = _GatherRows.apply(x_TD, plan.token_S)
        y_SD = ExpertParallelFFN.apply(x_SD, experts.up_weight, experts.down_proj, xplan, self.group, experts.gate)
        y_SD = y_SD * plan.weight_S.to(y_SD.dtype).unsqueeze(-1)
        return _ScatterAddRows.apply(y_SD, plan.token_S, x_TD.shape[0])
