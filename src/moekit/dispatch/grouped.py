"""Grouped matrix products over rows sorted by expert.

Legend: S rows sorted by expert, E experts, X input width, Y output width.

``grouped_mm(a_SX, b_EXY, offsets_E)`` multiplies each expert's block of rows by its own matrix;
``grouped_wgrad(dy_SY, x_SX, offsets_E)`` returns the per-expert weight gradients ``[E, Y, X]``.
``torch._grouped_mm`` does the work on the CPU (float32/bfloat16/float16, torch >= 2.9) and on CUDA (bfloat16,
SM80+) when strides and data pointers are 16-byte aligned, as both kernels require; everything else (float64
in the tests, float32 on CUDA, unaligned widths, older builds) uses a loop of ``torch.mm`` over the experts.
"""
from __future__ import annotations

import threading

import torch

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _aligned(t: torch.Tensor) -> bool:
    """Data pointer and every stride but the unit one on 16-byte boundaries (the kernels' requirement)."""
    step = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(stride % step == 0 for stride in t.stride() if stride != 1)


def _use_kernel(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not _HAS_GROUPED_MM or a.dtype != b.dtype or a.dtype not in _GROUPED_DTYPES:
        return False
    if not (_aligned(a) and _aligned(b)):
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    return a.device.type == "cpu"


def grouped_mm(a_SX: torch.Tensor, b_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of expert ``e`` (``offsets_E[e-1]:offsets_E[e]``) times ``b_EXY[e]``; returns ``[S, Y]``."""
    num_rows = a_SX.shape[0]
    if num_rows == 0:
        return a_SX.new_zeros(0, b_EXY.shape[-1])
    if _use_kernel(a_SX, b_EXY):
        return torch._grouped_mm(a_SX, b_EXY, offs=offsets_E)
    out_SY = a_SX.new_empty(num_rows, b_EXY.shape[-1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(a_SX[start:end], b_EXY[e], out=out_SY[start:end])
        start = end
    return out_SY


def grouped_wgrad(dy_SY: torch.Tensor, x_SX: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``[E, Y, X]``: for each expert, ``dy_e^T @ x_e`` over its rows (zero for experts with no rows)."""
    num_experts = offsets_E.shape[0]
    if dy_SY.shape[0] > 0 and _use_kernel(dy_SY.t(), x_SX):
        out_EYX = torch._grouped_mm(dy_SY.t(), x_SX, offs=offsets_E)
        if out_EYX.device.type == "cuda":  # empty groups are not written by every CUDA kernel
            counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
            out_EYX = out_EYX * (counts_E > 0).to(out_EYX.dtype).view(-1, 1, 1)
        return out_EYX
    out_EYX = dy_SY.new_zeros(num_experts, dy_SY.shape[1], x_SX.shape[1])
    start = 0
    for e, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(dy_SY[start:end].t(), x_SX[start:end], out=out_EYX[e])
        start = end
    return out_EYX


class _Workspace(threading.local):
    """Per-thread scratch buffers reused across calls on the CPU.

    A fresh 64 MB tensor costs about as much in page faults as the gather that fills it, so on the CPU the
    transient sorted copy of the input lives in a buffer that grows on demand and is reused; CUDA's caching
    allocator already does this. Nothing that outlives one autograd call is ever kept in the workspace.
    Buffers under ``min_bytes`` are not worth keeping (the heap serves them without page faults).
    """

    min_bytes = 1 << 22

    def __init__(self):
        self.buffers: dict = {}

    def get(self, slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        if like.device.type != "cpu" or numel * like.element_size() < self.min_bytes:
            return like.new_empty(shape)
        key = (slot, like.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = like.new_empty(max(numel, 1))
            self.buffers[key] = buf
        return buf[:numel].view(shape)

    def clear(self) -> None:
        self.buffers.clear()


workspace = _Workspace()


def gather_rows(x_TD: torch.Tensor, index_S: torch.Tensor, slot: str = "rows") -> torch.Tensor:
    """``x_TD[index_S]`` written into the workspace slot (transient: valid until the slot is reused)."""
    out_SD = workspace.get(slot, (index_S.shape[0], x_TD.shape[1]), x_TD)
    return torch.index_select(x_TD, 0, index_S, out=out_SD)
