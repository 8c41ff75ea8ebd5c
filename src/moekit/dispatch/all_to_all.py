"""All-to-all dispatch: experts sharded over an expert-parallel group of torch.distributed ranks.

Legend: T tokens, D model width, E experts in the model, P expert-parallel ranks, M = E / P experts on this
rank, S this rank's routed pairs (sorted by global expert, hence by destination rank), X rows of one chunk (sent
or received), r chunks.

Each rank routes its own tokens. ``x_SD`` (its pairs' rows, sorted by expert) goes to the ranks that hold
the experts with uneven splits (``torch.distributed.all_to_all_single``), the received rows are sorted by
local expert and run through the experts' grouped matrix products, and the outputs travel back along the
reverse splits; the routing weights are applied and the rows summed into tokens on the rank that owns them.
Ranks or experts that receive no rows take part in every exchange with zero-length splits.

Overlap (FSMoE: "FSMoE: A Flexible and Scalable Training System for Sparse Mixture-of-Experts Models",
arXiv:2501.10714): the exchange is cut into ``r`` chunks, chunk ``c`` carrying the rows of
the ``c``-th block of each rank's local experts. The dispatch of chunk ``c + 1`` and the return of chunk
``c - 1`` are in flight (asynchronous collectives) while chunk ``c`` is computed, in the forward pass and in
the backward pass. Chunks are cut at expert boundaries so that every expert multiplies exactly the rows it
multiplies with ``r = 1``, with the same sizes, and every weight gradient sums the same rows in the same order:
results are bit-for-bit those of ``r = 1`` (tested in float32 and float64 on the CPU; a BLAS that picked
kernels by memory alignment could still differ in the last bits). FSMoE cuts by tokens instead, which changes
the matrix sizes and the weight gradients' summation order; cutting by experts bounds ``r`` by ``M``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import combine, gather
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
    """``recv_PM[p, l]``: how many rows rank ``p`` sends to this rank's local expert ``l`` (one all-to-all)."""
    import torch.distributed as dist

    send_E = counts_E.to(torch.int64).contiguous()
    recv_E = torch.empty_like(send_E)
    dist.all_to_all_single(recv_E, send_E, group=group)
    return recv_E.view(ep_size, -1)


def make_exchange_plan(counts_E: torch.Tensor, recv_PM: torch.Tensor, chunks: int) -> ExchangePlan:
    """Build the per-chunk splits and permutations from this rank's ``counts_E`` (pairs per global expert,
    in the order of ``x_SD``) and the received counts ``recv_PM``."""
    ep_size, num_local = recv_PM.shape
    device = counts_E.device
    both = torch.stack([counts_E.to(torch.int64).view(ep_size, num_local), recv_PM.to(torch.int64)]).cpu()
    send_PM, recv_PM_cpu = both[0], both[1]  # one device-to-host copy for both
    starts_PM = (torch.cumsum(send_PM.reshape(-1), 0) - send_PM.reshape(-1)).view(ep_size, num_local)
    bounds = chunk_bounds(num_local, chunks)
    plan = ExchangePlan(bounds, [], [], [], [], [], [])
    for start, stop in bounds:
        sizes_P = send_PM[:, start:stop].sum(1)
        first_P = starts_PM[:, start]
        pieces = [torch.arange(int(first_P[p]), int(first_P[p] + sizes_P[p])) for p in range(ep_size)]
        plan.send_index.append(torch.cat(pieces).to(device))
        plan.send_splits.append(sizes_P.tolist())
        block_PX = recv_PM_cpu[:, start:stop]
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

    The experts are any :class:`moekit.experts.Experts` holding this rank's shard; only their ``expert_rows``
    is called. The forward keeps one small autograd graph per chunk (the experts on the received rows, the
    chunk's counts with zeros for the other local experts); the backward exchanges the output gradients chunk
    by chunk, differentiates each chunk's graph with respect to its rows and the experts' parameters, and sends
    the input gradients back, with the same overlap as the forward. An expert's weight gradient comes from the
    one chunk that holds it (the other chunks add exact zeros).
    """

    @staticmethod
    def forward(ctx, x_SD, xplan: ExchangePlan, group, experts, *params):
        build = any(ctx.needs_input_grad)
        num_local = experts.num_experts
        graphs = []

        def counts_of(c):
            start, stop = xplan.bounds[c]
            counts_M = torch.zeros(num_local, dtype=torch.int64)
            counts_M[start:stop] = xplan.counts[c]
            return counts_M

        def compute(c, x_XD):
            if not build:
                return experts.expert_rows(x_XD, counts_of(c))
            with torch.enable_grad():
                x_leaf = x_XD.detach().requires_grad_(True)
                y_XD = experts.expert_rows(x_leaf, counts_of(c))
            graphs.append((x_leaf, y_XD))
            return y_XD.detach()

        y_SD = _pipeline(x_SD, xplan, group, compute)
        ctx.graphs, ctx.xplan, ctx.group, ctx.params = graphs, xplan, group, params
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD):
        xplan, graphs, params = ctx.xplan, ctx.graphs, ctx.params
        if graphs is None:
            raise RuntimeError("expert-parallel dispatch is differentiated once per forward; backward through it "
                               "a second time (retain_graph=True) is not supported")
        wanted = [i for i, p in enumerate(params) if ctx.needs_input_grad[4 + i]]
        dparams = [None] * len(params)

        def compute(c, dy_XD):
            x_leaf, y_XD = graphs[c]
            inputs = (x_leaf, *(params[i] for i in wanted))
            grads = torch.autograd.grad(y_XD, inputs, dy_XD, allow_unused=True)
            for i, g in zip(wanted, grads[1:]):
                if g is not None:
                    dparams[i] = g if dparams[i] is None else dparams[i] + g
            return grads[0] if grads[0] is not None else torch.zeros_like(dy_XD)

        dx_SD = _pipeline(dy_SD.contiguous(), xplan, ctx.group, compute)
        ctx.graphs = None
        for i in wanted:
            if dparams[i] is None:
                dparams[i] = torch.zeros_like(params[i])
        return (dx_SD, None, None, None, *dparams)


class AllToAllDispatcher:
    """The expert-parallel dispatcher of a :class:`moekit.MoE` layer whose ``experts`` hold this rank's shard.

    Same call as :class:`moekit.dispatch.local.LocalDispatcher`: ``dispatcher(x_TD, plan, experts) -> out_TD``.
    ``chunks`` is the overlap degree ``r`` (1: no overlap). The plan's expert ids are global; the layer's
    ``experts`` (any :class:`moekit.experts.Experts`, sharded with ``shard``) hold experts
    ``ep_rank * M .. (ep_rank + 1) * M - 1``.
    """

    def __init__(self, group, ep_size: int, chunks: int = 1):
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        self.group = group
        self.ep_size = ep_size
        self.chunks = chunks
        self.last_exchange: ExchangePlan | None = None

    def __call__(self, x_TD: torch.Tensor, plan: DispatchPlan, experts) -> torch.Tensor:
        recv_PM = exchange_counts(plan.counts_E, self.ep_size, self.group)
        xplan = make_exchange_plan(plan.counts_E, recv_PM, self.chunks)
        self.last_exchange = xplan
        x_SD = gather(x_TD, plan.token_S)
        params = [p for p in experts.parameters() if p.requires_grad]
        y_SD = ExpertParallelFFN.apply(x_SD, xplan, self.group, experts, *params)
        return combine(y_SD, plan.weight_S, plan.token_S, x_TD.shape[0])

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep_size={self.ep_size}, chunks={self.chunks})"
