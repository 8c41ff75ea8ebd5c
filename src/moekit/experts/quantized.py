"""Quantised experts: packed low-bit expert weights that keep the fused expert path.

Legend: E experts, D model width, F expert hidden width, H = 2F for gated activations (else F), S routed rows
sorted by expert, G group size.

``QuantizedExperts`` (``MoEConfig(experts="quantized", experts_options={...})``) holds the same two matrices per
expert as :class:`moekit.experts.DenseExperts` (``gate_up_proj [H, D]`` / ``up_proj``, ``down_proj [D, F]``), each
quantised with :mod:`moekit.compress.quant` (packing, grids and methods are described there). Options:
``bits`` (2, 3, 4, 8 or ``"ternary"``), ``group`` (group size along the input dimension; a matrix narrower than
it uses its width; must divide the widths), ``symmetric`` (default True), ``expert_bits`` (optional list of E
widths: mixed precision, overrides ``bits`` per expert), ``method`` (recorded only: how the codes were found),
``zero_dtype`` (``"uint8"``, the default, or ``"float16"``: HQQ's fractional zero points; asymmetric only),
``act_bits`` (None, or 2..8: simulated activation quantisation, the inputs of both expert matrices fake-quantised
per token, :func:`moekit.compress.eaquant.fake_quant_act`), ``smooth`` (True: a buffer ``smooth [D]`` shared by
the layer's experts, EAQuant; the stored up matrices are ``W_up s`` and the experts compute
``Q_a(x / s) @ (W_up s)^T``, equal to ``x @ W_up^T`` before quantisation).

State dict (buffers, no parameters; ``P`` is ``gate_up_proj``, ``up_proj`` or ``down_proj``):

- ``P_packed``: uint8. ``[E, N]`` with ``N`` the packed bytes of one expert's matrix when every expert has the
  same width; ``[sum_e N_e]`` (experts one after another, in order) with mixed widths;
- ``P_scales``: float16 ``[E, rows, cols / G]``;
- ``P_zeros``: uint8 (float16 with ``zero_dtype="float16"``) ``[E, rows, cols / G]``, asymmetric grids only.

The products of :class:`moekit.dispatch.fused.ExpertProducts` are overridden: for every expert that has rows,
its matrix is dequantised into a scratch tensor and multiplied (experts without rows cost nothing). On the CPU
with ``kernel="auto"`` (the default), torch's weight-only kernels take over where they fit: 4-bit matrices with
groups of 32, 64, 128 or 256 go through ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (activations rounded to
bfloat16 for it: the float32 variant is slower than dequantising; the kernel's own weight layout is built from
the stored codes on first use of an expert and cached, which adds the packed 4-bit bytes once more in memory);
8-bit symmetric matrices with one group per row use ``torch.ops.aten._weight_int8pack_mm`` (float32 activations
rounded to bfloat16 for it, for the same reason). ``kernel="dequant"`` always dequantises (float32 exact).
Weights are frozen: :meth:`fused_weights` is ``(None, None)``, input gradients flow.
:meth:`shard` keeps a block of experts (expert-major storage).
"""
from __future__ import annotations

import torch

from ..compress import quant as Q
from .base import GroupedExperts, register, set_ffn_shape

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@register("quantized")
class QuantizedExperts(GroupedExperts):
    """``E`` FFN experts on packed low-bit weights; see the module docstring."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "swiglu",
                 init_std: float = 0.02, *, bits=4, group: int = 128, symmetric: bool = True,
                 expert_bits: list | None = None, method: str = "rtn", kernel: str = "auto",
                 zero_dtype: str = "uint8", act_bits: int | None = None, smooth: bool = False):
        super().__init__()
        set_ffn_shape(self, num_experts, dim, hidden_dim, activation)
        self.bits = Q.check_bits(bits)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"experts_options.group must be a positive integer, got {group!r}")
        self.group = group
        self.symmetric = bool(symmetric)
        if expert_bits is None:
            expert_bits = [self.bits] * num_experts
        if not isinstance(expert_bits, (list, tuple)) or len(expert_bits) != num_experts:
            raise ValueError(f"experts_options.expert_bits must be a list of {num_experts} widths, got {expert_bits!r}")
        self.expert_bits = [Q.check_bits(b) for b in expert_bits]
        if not self.symmetric and "ternary" in self.expert_bits:
            raise ValueError("ternary quantisation is symmetric only (experts_options.symmetric must be true)")
        if kernel not in ("auto", "dequant"):
            raise ValueError(f"experts_options.kernel must be 'auto' or 'dequant', got {kernel!r}")
        self.kernel = kernel
        self.method = method
        if zero_dtype not in ("uint8", "float16"):
            raise ValueError(f"experts_options.zero_dtype must be 'uint8' or 'float16', got {zero_dtype!r}")
        self.zero_dtype = getattr(torch, zero_dtype)
        if act_bits is not None and (isinstance(act_bits, bool) or not isinstance(act_bits, int)
                                     or not 2 <= act_bits <= 8):
            raise ValueError(f"experts_options.act_bits must be None or an integer in 2..8, got {act_bits!r}")
        self.act_bits = act_bits
        self.smooth_enabled = bool(smooth)
        if self.smooth_enabled:
            self.register_buffer("smooth", torch.ones(dim, dtype=torch.float32))
        up_rows = 2 * hidden_dim if self.gated else hidden_dim
        self._shapes = {self.up_name: (up_rows, dim), "down_proj": (dim, hidden_dim)}
        self._groups = {name: Q._group_of(group, cols) for name, (_, cols) in self._shapes.items()}
        for name, (rows, cols) in self._shapes.items():
            g = self._groups[name]
            self.register_buffer(f"{name}_packed", self._empty_packed(rows * cols))
            self.register_buffer(f"{name}_scales", torch.ones(num_experts, rows, cols // g, dtype=torch.float16))
            if not self.symmetric:
                self.register_buffer(f"{name}_zeros", torch.zeros(num_experts, rows, cols // g,
                                                                  dtype=self.zero_dtype))
        self._int8_cache: dict = {}

    # ------------------------------------------------------------------------------------ layout
    @property
    def mixed(self) -> bool:
        return len(set(self.expert_bits)) > 1

    def _empty_packed(self, numel: int) -> torch.Tensor:
        sizes = [Q.packed_nbytes(numel, b) for b in self.expert_bits]
        if len(set(sizes)) == 1:
            return torch.zeros(len(sizes), sizes[0], dtype=torch.uint8)
        return torch.zeros(sum(sizes), dtype=torch.uint8)

    def _offsets(self, name: str) -> list[int]:
        rows, cols = self._shapes[name]
        out = [0]
        for b in self.expert_bits:
            out.append(out[-1] + Q.packed_nbytes(rows * cols, b))
        return out

    def packed(self, name: str, e: int) -> Q.PackedTensor:
        """Expert ``e``'s matrix ``name`` (``gate_up_proj`` / ``up_proj`` / ``down_proj``) as a PackedTensor
        (views of the buffers)."""
        off = self._offsets(name)
        data = getattr(self, f"{name}_packed").view(-1)[off[e]:off[e + 1]]
        zeros = None if self.symmetric else getattr(self, f"{name}_zeros")[e]
        return Q.PackedTensor(data, getattr(self, f"{name}_scales")[e], zeros, self._shapes[name],
                              self.expert_bits[e], self._groups[name], self.symmetric)

    @torch.no_grad()
    def set_packed(self, name: str, e: int, p: Q.PackedTensor) -> None:
        """Store ``p`` as expert ``e``'s matrix ``name`` (its width, group and grid must match the options)."""
        if p.shape != self._shapes[name] or p.bits != self.expert_bits[e] or p.group != self._groups[name] \
                or p.symmetric != self.symmetric or (p.zero is not None and p.zero.dtype != self.zero_dtype):
            raise ValueError(f"set_packed({name}, {e}): {p.shape} {p.bits} bits group {p.group} does not match "
                             f"{self._shapes[name]} {self.expert_bits[e]} bits group {self._groups[name]}")
        off = self._offsets(name)
        getattr(self, f"{name}_packed").view(-1)[off[e]:off[e + 1]].copy_(p.data)
        getattr(self, f"{name}_scales")[e].copy_(p.scale)
        if not self.symmetric:
            getattr(self, f"{name}_zeros")[e].copy_(p.zero)
        self._int8_cache.clear()

    def dequantize_expert(self, name: str, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed(name, e).dequantize(dtype)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_up [E, H, D], w_down [E, D, F])`` in float32: every expert dequantised (materialises them)."""
        return tuple(torch.stack([self.dequantize_expert(n, e) for e in range(self.num_experts)])
                     for n in (self.up_name, "down_proj"))

    @property
    def w_up(self) -> torch.Tensor:
        return self.dequantized()[0]

    @property
    def w_down(self) -> torch.Tensor:
        return self.dequantized()[1]

    def expert_nbytes(self) -> int:
        """Bytes of the expert weights as stored (packed codes, scales, zero points)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False) if n != "smooth")

    # ------------------------------------------------------------------------------------ products
    def fused_weights(self):
        return None, None

    def _int8(self, name: str, e: int, dtype: torch.dtype):
        """``(int8 codes [rows, cols], scales [rows])`` for the int8 kernel, or None where it does not fit."""
        if self.kernel != "auto" or self.expert_bits[e] != 8 or not self.symmetric \
                or self._groups[name] != self._shapes[name][1] or self._shapes[name][1] % 32 \
                or dtype not in _KERNEL_DTYPES:  # the kernel crashes or returns NaN for narrow inputs (K=4, 8)
            return None
        rows, cols = self._shapes[name]
        off = self._offsets(name)
        codes = getattr(self, f"{name}_packed").view(-1)[off[e]:off[e + 1]].view(torch.int8).view(rows, cols)
        kdtype = torch.bfloat16 if dtype == torch.float32 else dtype  # the float32 kernel is slow on the CPU
        key = (name, e, kdtype)
        scales = self._int8_cache.get(key)
        if scales is None:  # [rows] in the kernel's activation dtype (tiny)
            scales = self._int8_cache[key] = getattr(self, f"{name}_scales")[e, :, 0].to(kdtype)
        return codes, scales

    def _int4(self, name: str, e: int):
        """``(packed, scales_and_zeros, group)`` for torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``,
        bfloat16 activations), built on first use from the stored codes and cached; None where it does not fit
        (not 4 bits, a group size the kernel does not take, no such kernel)."""
        if self.kernel != "auto":
            return None
        key = (name, e, "int4")
        if key in self._int8_cache:
            return self._int8_cache[key]
        found = None
        g = self._groups[name]
        if self.kernel == "auto" and self.expert_bits[e] == 4 and g in (32, 64, 128, 256) \
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            try:
                p = self.packed(name, e)
                weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(p.codes(), 1)
                s = p.scale.to(torch.float32)
                # the kernel computes (u - 8) * s + zero: zero = s * (8 - z) for our s * (u - z)
                zero = s * (8 - p.zero_points())
                found = (weight, torch.stack([s.t(), zero.t()], -1).to(torch.bfloat16).contiguous(), g)
                x = torch.zeros(1, p.shape[1], dtype=torch.bfloat16)
                torch.ops.aten._weight_int4pack_mm_for_cpu(x, found[0], g, found[1])
            except (RuntimeError, NotImplementedError):
                found = None
        self._int8_cache[key] = found
        return found

    def _product(self, x_SX: torch.Tensor, offsets_E: torch.Tensor, name: str, transpose: bool) -> torch.Tensor:
        """Per expert ``x @ W^T`` (``transpose``: the forward products) or ``x @ W`` (input gradients)."""
        rows, cols = self._shapes[name]
        out_SY = x_SX.new_empty(x_SX.shape[0], rows if transpose else cols)
        start = 0
        for e, end in enumerate(offsets_E.tolist()):
            if end > start:
                x = x_SX[start:end]
                cpu = transpose and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
                fast = self._int8(name, e, x.dtype) if cpu else None
                int4 = self._int4(name, e) if cpu and fast is None else None
                if fast is not None:
                    out_SY[start:end] = torch.ops.aten._weight_int8pack_mm(x.to(fast[1].dtype).contiguous(), *fast)
                elif int4 is not None:
                    out_SY[start:end] = torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x.to(torch.bfloat16).contiguous(), int4[0], int4[2], int4[1])
                else:
                    w = self.dequantize_expert(name, e, x.dtype).to(x.device)
                    torch.mm(x, w.t() if transpose else w, out=out_SY[start:end])
            start = end
        return out_SY

    def _act_input(self, x: torch.Tensor, smooth: bool) -> torch.Tensor:
        if smooth and self.smooth_enabled:
            x = x / self.smooth.to(x.dtype)
        if self.act_bits is not None:
            from ..compress.eaquant import fake_quant_act

            x = fake_quant_act(x, self.act_bits)
        return x

    def up_product(self, x_SD, offsets_E):
        return self._product(self._act_input(x_SD, True), offsets_E, self.up_name, True)

    def down_product(self, a_SF, offsets_E):
        return self._product(self._act_input(a_SF, False), offsets_E, "down_proj", True)

    def up_input_grad(self, dh_SH, offsets_E):  # activation fake quantisation: straight through
        dx = self._product(dh_SH, offsets_E, self.up_name, False)
        return dx / self.smooth.to(dx.dtype) if self.smooth_enabled else dx

    def down_input_grad(self, dy_SD, offsets_E):
        return self._product(dy_SD, offsets_E, "down_proj", False)

    def up_weight_grad(self, dh_SH, x_SD, offsets_E):
        raise RuntimeError("quantized experts are frozen: their packed weights have no gradient")

    down_weight_grad = up_weight_grad

    # ------------------------------------------------------------------------------------ sharding
    def expert_parameter_names(self) -> list[str]:
        names = [n for n, _ in self.named_buffers(recurse=False) if n != "smooth"]
        if self.mixed:  # the flat packed buffers are not one slice per expert along dimension 0
            names = [n for n in names if not n.endswith("_packed")]
        return names

    @torch.no_grad()
    def shard(self, expert_ids: range) -> list[str]:
        if not isinstance(expert_ids, range) or expert_ids.step != 1 or len(expert_ids) == 0 \
                or expert_ids.start < 0 or expert_ids.stop > self.num_experts:
            raise ValueError(f"shard: expert_ids must be a non-empty contiguous range inside "
                             f"[0, {self.num_experts}), got {expert_ids!r}")
        lo, hi = expert_ids.start, expert_ids.stop
        for name in self._shapes:
            off = self._offsets(name)
            buf = getattr(self, f"{name}_packed")
            flat = buf.view(-1)[off[lo]:off[hi]].clone()
            setattr(self, f"{name}_packed", flat.view(hi - lo, -1) if buf.dim() == 2 else flat)
            for suffix in ("_scales", "_zeros"):
                if hasattr(self, name + suffix):
                    setattr(self, name + suffix, getattr(self, name + suffix)[lo:hi].clone())
        self.expert_bits = self.expert_bits[lo:hi]
        self.num_experts = hi - lo
        self._int8_cache.clear()
        return self.expert_parameter_names()

    def extra_repr(self) -> str:
        bits = (f"expert_bits={self.expert_bits}" if self.mixed else f"bits={self.bits}")
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}, {bits}, group={self.group}, symmetric={self.symmetric}")


@torch.no_grad()
def quantized_layer(moe, bits=4, group: int = 128, symmetric: bool = True, method: str = "rtn"):
    """A copy of the :class:`moekit.MoE` layer ``moe`` (dense experts) whose experts are packed by RTN to
    ``bits`` (the same router, shared experts and options): what ``moekit bench --decode --impls moekit-q4``
    times beside the float layer."""
    import dataclasses

    from ..layer import MoE

    cfg = dataclasses.replace(moe.config, experts="quantized",
                              experts_options={"bits": bits, "group": group, "symmetric": symmetric,
                                               "method": method})
    with torch.device("meta"):
        q = MoE(cfg)
    q = q.to_empty(device="cpu")
    state = {k: v for k, v in moe.state_dict().items() if not k.startswith("experts.")}
    q.load_state_dict(state, strict=False)
    ex, src = q.experts, moe.experts
    w_up, w_down = src.w_up.detach().float().cpu(), src.w_down.detach().float().cpu()
    for e in range(ex.num_experts):
        ex.set_packed(ex.up_name, e, Q.rtn(w_up[e], bits, group, symmetric))
        ex.set_packed("down_proj", e, Q.rtn(w_down[e], bits, group, symmetric))
    return q.eval()
