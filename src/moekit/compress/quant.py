"""Low-bit quantisation of expert weights: packed storage, round-to-nearest, GPTQ / AGQ, ternary, and the MC
mixed-precision allocation.

Legend: R output rows of one expert matrix, C its input columns (the dimension the groups run along), G the
group size, E experts, T calibration tokens.

Grid. A weight matrix ``w [R, C]`` is cut into groups of ``G`` consecutive input columns; every (row, group) has
a scale ``s`` (float16) and a zero point ``z``; codes are unsigned integers ``u`` in ``[0, 2^b - 1]`` and the
weight is ``s * (u - z)``. Symmetric grids (the default) use ``s = max|w| / (2^(b-1) - 1)`` and the fixed zero
``z = 2^(b-1)`` with codes in ``[1, 2^b - 1]`` (levels symmetric around zero, as int8 weight-only kernels expect;
re-quantising dequantised weights gives them back exactly); asymmetric grids use
``s = (max - min) / (2^b - 1)`` and a stored zero ``z = round(-min / s)`` (uint8).
Ternary uses ``{-1, 0, 1}`` with the absmean scale ``s = mean|w|`` of the group (MoTE, "MoTE: Mixture of
Ternary Experts for Memory-efficient Large Multimodal Models", arXiv:2506.14435, which takes BitNet b1.58's
absmean quantiser), codes ``u = q + 1`` and ``z = 1``.

Packing (:func:`pack` / :func:`unpack`): the codes of one matrix, flattened row-major, are packed into uint8:
8 bits one per byte (stored as ``u ^ 0x80``, so that ``byte.view(int8) = u - 128``, the signed value
``_weight_int8pack_mm`` reads); 4 bits two per byte (low nibble first); 2 bits four per byte (lowest bits
first); 3 bits eight codes in three bytes (a little-endian 24-bit word, code ``i`` at bits ``3i``); ternary five
trits per byte (base 3, ``sum u_i 3^i <= 242``: 1.6 bits per weight). The tail is padded with zero codes.

Methods:

- :func:`rtn`: round to nearest on the grid fitted to each group.
- :func:`gptq`: GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers", arXiv:2210.17323): columns are quantised one at a time and the error of column ``i``, divided
  by the ``i``-th diagonal of the upper Cholesky factor of ``H^-1``, is pushed onto the columns not yet
  quantised (lazy batches of 128 columns; group scales fitted when a group starts, on the updated weights;
  dampening ``1%`` of the mean diagonal; columns whose Hessian diagonal is zero are zeroed). ``H = sum_t x_t
  x_t^T`` over the inputs of that matrix.
- AGQ, MoEQuant's affinity-guided GPTQ (Hu et al., "MoEQuant: Enhancing Quantization for Mixture-of-Experts
  Large Language Models via Expert-Balanced Sampling and Affinity Guidance", arXiv:2505.03804): the same
  algorithm on ``H_e = sum_t g_{t,e} x_t x_t^T`` with ``g`` the routing weight of token ``t`` for expert ``e``
  (:func:`collect_expert_hessians` with ``weighted=True``). EBSS, its self-sampled calibration set, is not built.
- :func:`mc_allocate`: MC-MoE's bit allocation (Huang et al., "Mixture Compressor for Mixture-of-Experts LLMs
  Gains More", arXiv:2410.06270): per layer choose ``b_e`` minimising ``sum_e f_e^a w_e^b q_e(b_e)`` subject to
  ``mean_e b_e <= budget`` (an integer program solved with ``scipy.optimize.milp``; ``a = 1``, ``b = 1.5``).
- :func:`hqq`: Half-Quadratic Quantization (Badri and Shaji, "Half-Quadratic Quantization of Large Machine
  Learning Models", mobiusml blog 2023; the ``hqq`` package, an optional extra: ``pip install 'moekit[hqq]'``),
  the data-free baseline. The package's ``Quantizer.quantize`` (``axis=1``: groups of ``G`` consecutive input
  columns, our grid; ``optimize=True``: its proximal solver of an l_p<1 error fits scale and zero; ``round_zero``
  off) gives codes in ``[0, 2^b - 1]``, an inverse-free scale and a fractional zero point; the codes are repacked
  in our layout and scale and zero stored as float16 (as the package's own ``HQQLinear`` keeps them in a
  float16 compute dtype). Asymmetric grid with float16 zero points (``PackedTensor.zero`` float16).
- EAQuant (:mod:`moekit.compress.eaquant`) and EBSS calibration (:mod:`moekit.compress.ebss`) have their own
  modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BITS", "METHODS", "PackedTensor", "bits_label", "check_bits", "collect_expert_hessians", "fit_grid",
           "gptq", "gptq_codes", "hessian_error", "hqq", "hqq_available", "hqq_codes", "mc_allocate", "mc_costs", "mixed_output_errors", "pack",
           "pack_codes", "packed_nbytes", "quantize_codes", "quantize_matrix", "rtn", "unpack", "unpack_codes"]

#: supported widths: integer bits, or "ternary" (1.6 bits stored)
BITS = (2, 3, 4, 8, "ternary")
# codes per packing unit and bytes per unit
_UNIT = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1), "ternary": (5, 1)}
_MIN_SCALE = 1e-7


def check_bits(bits) -> int | str:
    """``bits`` normalised (``"ternary"`` or an int in 2, 3, 4, 8); ``ValueError`` naming the allowed values."""
    if isinstance(bits, str) and bits.strip().isdigit():
        bits = int(bits)
    if isinstance(bits, str):
        bits = bits.strip().lower()
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of 2, 3, 4, 8 or 'ternary', got {bits!r}")
    return bits


def bits_label(bits) -> str:
    return "ternary" if bits == "ternary" else f"{bits}-bit"


def _maxq(bits) -> int:
    return 2 if bits == "ternary" else (1 << bits) - 1


def packed_nbytes(numel: int, bits) -> int:
    """Bytes that :func:`pack_codes` writes for ``numel`` codes."""
    per, nbytes = _UNIT[check_bits(bits)]
    return -(-numel // per) * nbytes


def pack_codes(u: torch.Tensor, bits) -> torch.Tensor:
    """uint8 bytes holding the integer codes ``u`` (any shape, flattened row-major; values in ``[0, maxq]``)."""
    bits = check_bits(bits)
    per, nbytes = _UNIT[bits]
    flat = u.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    v = flat.view(-1, per)
    if bits == 8:
        return (v[:, 0] ^ 0x80).to(torch.uint8)
    if bits == "ternary":
        weights = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
        return (v * weights).sum(1).to(torch.uint8)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    word = (v << shifts).sum(1)  # per * bits <= 24 bits: exact in int32
    if nbytes == 1:
        return word.to(torch.uint8)
    return torch.stack([(word >> (8 * k)) & 0xFF for k in range(nbytes)], 1).reshape(-1).to(torch.uint8)


def unpack_codes(data: torch.Tensor, bits, numel: int) -> torch.Tensor:
    """The first ``numel`` codes held in ``data`` (uint8, from :func:`pack_codes`), as int32."""
    bits = check_bits(bits)
    per, nbytes = _UNIT[bits]
    if bits == 8:
        return data[:numel].view(torch.int8).to(torch.int32) + 128
    if nbytes == 1 and bits != "ternary":  # 4 and 2 bits: shifts on the bytes themselves (no int32 copy)
        mask = (1 << bits) - 1
        parts = [(data >> (bits * k)) & mask for k in range(per)]
        return torch.stack(parts, 1).reshape(-1)[:numel].to(torch.int32)
    b = data.to(torch.int32)
    if bits == "ternary":
        digits = []
        for _ in range(per):
            digits.append(b % 3)
            b = torch.div(b, 3, rounding_mode="floor")
        return torch.stack(digits, 1).reshape(-1)[:numel]
    if nbytes == 1:
        word = b
    else:
        b = b.view(-1, nbytes)
        word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return ((word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]


def _group_of(group: int, cols: int) -> int:
    """The group size used for a matrix with ``cols`` input columns (``min(group, cols)``), checked to divide."""
    g = min(group, cols)
    if g < 1 or cols % g:
        raise ValueError(f"group must divide the input width {cols} (or be at least it), got {group}")
    return g


def fit_grid(w_RG: torch.Tensor, bits, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to float16, returned as float64/float32 like ``w``) and zero point of each row of
    ``w_RG [..., G]`` (one group per row): the grid the codes of that group live on."""
    bits = check_bits(bits)
    maxq = _maxq(bits)
    if bits == "ternary":
        if not symmetric:
            raise ValueError("ternary quantisation is symmetric only")
        scale = w_RG.abs().mean(-1)
        zero = torch.ones_like(scale)
    elif symmetric:  # levels -(2^(b-1) - 1) .. 2^(b-1) - 1: code 0 unused, so re-quantising is exact
        scale = w_RG.abs().amax(-1) / ((1 << (bits - 1)) - 1)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo = w_RG.amin(-1).clamp(max=0)
        hi = w_RG.amax(-1).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = scale.clamp(min=_MIN_SCALE).to(torch.float16).to(w_RG.dtype)
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits,
                   symmetric: bool = False) -> torch.Tensor:
    """Codes ``clamp(round(w / s) + z, lo, maxq)`` (broadcasting scale / zero against ``w``); ``lo`` is 1 on
    symmetric integer grids (their levels are symmetric around ``z``), else 0."""
    bits = check_bits(bits)
    lo = 1 if symmetric and bits != "ternary" else 0
    return torch.clamp(torch.round(w / scale) + zero, lo, _maxq(bits))


@dataclass
class PackedTensor:
    """One quantised matrix ``[rows, cols]``: ``data`` (uint8 packed codes), ``scale [rows, cols / group]``
    (float16), ``zero`` (uint8, same shape; float16 for HQQ's fractional zero points; None for symmetric grids,
    whose zero is fixed)."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int]
    bits: int | str
    group: int
    symmetric: bool

    @property
    def nbytes(self) -> int:
        """Storage in bytes: packed codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)

    def codes(self) -> torch.Tensor:
        rows, cols = self.shape
        return unpack_codes(self.data, self.bits, rows * cols).view(rows, cols)

    def zero_points(self) -> torch.Tensor:
        if self.zero is not None:
            return self.zero.to(torch.float32)
        value = 1.0 if self.bits == "ternary" else float(1 << (self.bits - 1))
        return torch.full(self.scale.shape, value)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        u = self.codes().to(dtype).view(rows, cols // self.group, self.group)
        w = (u - self.zero_points().to(dtype).unsqueeze(-1)) * self.scale.to(dtype).unsqueeze(-1)
        return w.view(rows, cols)


def _make_packed(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits, group: int,
                 symmetric: bool) -> PackedTensor:
    rows, cols = u.shape
    return PackedTensor(pack_codes(u, bits), scale.to(torch.float16),
                        None if symmetric else zero.to(torch.uint8), (rows, cols), bits, group, symmetric)


def pack(w: torch.Tensor, bits, group: int = 128, symmetric: bool = True) -> PackedTensor:
    """Round-to-nearest quantisation of ``w [R, C]`` onto the grid of each group, packed."""
    return rtn(w, bits, group, symmetric)


def unpack(p: PackedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantised matrix of ``p``."""
    return p.dequantize(dtype)


def rtn(w: torch.Tensor, bits, group: int = 128, symmetric: bool = True) -> PackedTensor:
    """Round to nearest, group-wise (the baseline)."""
    bits = check_bits(bits)
    rows, cols = w.shape
    g = _group_of(group, cols)
    w_RNG = w.detach().to(torch.float32).reshape(rows, cols // g, g)
    scale, zero = fit_grid(w_RNG, bits, symmetric)
    u = quantize_codes(w_RNG, scale.unsqueeze(-1), zero.unsqueeze(-1), bits, symmetric).reshape(rows, cols)
    return _make_packed(u, scale, zero, bits, g, symmetric)


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, bits, group: int = 128, symmetric: bool = True,
               damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on ``w [R, C]`` with ``hessian [C, C]`` (``sum x x^T`` of the matrix's inputs); returns ``(codes
    [R, C], scale [R, C/G], zero [R, C/G])`` in float64. See the module docstring."""
    bits = check_bits(bits)
    rows, cols = w.shape
    g = _group_of(group, cols)
    W = w.detach().to(torch.float64).clone()
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)  # upper Cholesky factor of H^-1
    block = g * max(1, block // g)  # whole groups per block: a group's grid is fitted on updated weights
    codes = torch.zeros_like(W)
    scale = W.new_zeros(rows, cols // g)
    zero = W.new_zeros(rows, cols // g)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        Wb = W[:, start:stop].clone()
        Ub = U[start:stop, start:stop]
        Eb = torch.zeros_like(Wb)
        for j in range(stop - start):
            i = start + j
            if i % g == 0:  # fit this group's grid on the weights as updated so far
                s, z = fit_grid(Wb[:, j:j + g], bits, symmetric)
                scale[:, i // g], zero[:, i // g] = s, z
            s, z = scale[:, i // g], zero[:, i // g]
            u = quantize_codes(Wb[:, j], s, z, bits, symmetric)
            codes[:, i] = u
            err = (Wb[:, j] - s * (u - z)) / Ub[j, j]
            Wb[:, j:] -= err.unsqueeze(1) * Ub[j, j:].unsqueeze(0)
            Eb[:, j] = err
        W[:, stop:] -= Eb @ U[start:stop, stop:]
    return codes, scale, zero


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits, group: int = 128, symmetric: bool = True,
         damp: float = 0.01) -> PackedTensor:
    """GPTQ (see the module docstring), packed. Ternary uses the same error feedback on the absmean grid."""
    bits = check_bits(bits)
    codes, scale, zero = gptq_codes(w, hessian, bits, group, symmetric, damp)
    return _make_packed(codes, scale, zero, bits, _group_of(group, w.shape[1]), symmetric)


HQQ_BITS = (2, 3, 4, 8)


def hqq_missing_message() -> str:
    return "--method hqq needs the optional hqq package: pip install 'moekit[hqq]' (or pip install hqq)"


def hqq_available() -> bool:
    try:
        from hqq.core.quantize import Quantizer  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def hqq(w: torch.Tensor, bits, group: int = 128) -> PackedTensor:
    """HQQ (see the module docstring) of ``w [R, C]`` through the ``hqq`` package, packed in our layout with
    float16 scale and zero point. ``ValueError`` when the package is missing or ``bits`` is ternary."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as exc:
        raise ValueError(hqq_missing_message()) from exc
    bits = check_bits(bits)
    if bits not in HQQ_BITS:
        raise ValueError(f"hqq quantises to {', '.join(map(str, HQQ_BITS))} bits, got {bits!r}")
    rows, cols = w.shape
    g = _group_of(group, cols)
    w_q, meta = Quantizer.quantize(w.detach().to(torch.float32).contiguous(), nbits=bits, channel_wise=True,
                                   group_size=g, optimize=True, round_zero=False, axis=1, bitpack=True,
                                   compute_dtype=torch.float32, device=str(w.device))
    u = hqq_codes(w_q, meta)
    scale = meta["scale"].reshape(rows, cols // g)
    zero = meta["zero"].reshape(rows, cols // g)
    return PackedTensor(pack_codes(u.to(torch.int32), bits), scale.to(torch.float16), zero.to(torch.float16),
                        (rows, cols), bits, g, False)


def hqq_codes(w_q: torch.Tensor, meta: dict) -> torch.Tensor:
    """The integer codes ``[R, C]`` of an ``hqq`` ``(W_q, meta)`` pair (``axis=1``), unpacked by the package."""
    from hqq.core.quantize import Quantizer

    rows, cols = meta["shape"]
    u = Quantizer.unpack[meta["packing"]](w_q, dtype=torch.float32) if meta["packing"] else w_q.float()
    return u.reshape(-1)[: rows * cols].reshape(rows, cols)


# ------------------------------------------------------------------------------------------------ calibration
@torch.no_grad()
def collect_expert_hessians(model: torch.nn.Module, batches, *, weighted: bool = False,
                            stats: bool = False, keep_rows: int = 0) -> dict[str, dict]:
    """Per MoE layer (keyed by module name) and per expert, the Hessians GPTQ needs, in one pass over
    ``batches`` (token id tensors ``[B, L]``): ``up [E, D, D] = sum x x^T`` over the tokens routed to the expert
    (its input), ``down [E, F, F] = sum a a^T`` with ``a = act(gate) * up`` its activation; with ``weighted``
    each token counts with its routing weight ``g`` (AGQ). With ``stats``, also ``count [E]`` (routed pairs),
    ``weight_sum [E]`` (sum of routing weights) and ``tokens`` (tokens seen by the layer). With ``keep_rows``,
    also ``rows`` / ``row_weights``: the first ``keep_rows`` inputs routed to each expert and their routing
    weights (for measuring output errors). Streamed: memory is ``E (D^2 + F^2)`` per layer plus the kept
    rows, never all the activations. (:func:`moekit.compress.calibrate` records the input Hessians too, but not
    the down projection's, which GPTQ needs here.)"""
    from ..experts.base import GroupedExperts
    from ..layer import MoE

    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    out: dict[str, dict] = {}
    hooks = []

    def make_hook(name, experts):
        def hook(module, args, _result):
            x_TD, plan = args[0], args[1]
            w_up, w_down = _float_weights(experts)
            x_SD = x_TD.index_select(0, plan.token_S).to(torch.float64)
            g_S = plan.weight_S.to(torch.float64)
            E = experts.num_experts
            rec = out.setdefault(name, {
                "up": torch.zeros(E, w_up.shape[2], w_up.shape[2], dtype=torch.float64),
                "down": torch.zeros(E, w_down.shape[2], w_down.shape[2], dtype=torch.float64),
                "count": torch.zeros(E, dtype=torch.float64), "weight_sum": torch.zeros(E, dtype=torch.float64),
                "tokens": 0, "rows": [[] for _ in range(E)], "row_weights": [[] for _ in range(E)]})
            rec["tokens"] += x_TD.shape[0]
            start = 0
            for e, n in enumerate(plan.counts_E.tolist()):
                if n:
                    xe = x_SD[start:start + n]
                    ge = g_S[start:start + n]
                    a = experts.act_spec.fn(xe @ w_up[e].t().to(torch.float64))
                    sw = ge.sqrt().unsqueeze(1) if weighted else None
                    xw, aw = (xe * sw, a * sw) if weighted else (xe, a)
                    rec["up"][e] += xw.t() @ xw
                    rec["down"][e] += aw.t() @ aw
                    rec["count"][e] += n
                    rec["weight_sum"][e] += ge.sum()
                    have = sum(r.shape[0] for r in rec["rows"][e])
                    if have < keep_rows:
                        rec["rows"][e].append(xe[:keep_rows - have].to(torch.float32))
                        rec["row_weights"][e].append(ge[:keep_rows - have].to(torch.float32))
                start += n

        return hook

    for name, layer in layers.items():
        if not isinstance(layer.experts, GroupedExperts):
            raise ValueError(f"{name}: experts of kind {type(layer.experts).__name__} cannot be calibrated")
        hooks.append(layer.experts.register_forward_hook(make_hook(name, layer.experts)))
    try:
        for batch in batches:
            if isinstance(batch, dict):
                mask = batch.get("attention_mask")
                model(batch["input_ids"], **({"attention_mask": mask} if mask is not None else {}))
            else:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    for rec in out.values():
        for key in ("rows", "row_weights"):
            rec[key] = [torch.cat(r) if r else torch.zeros(0) for r in rec[key]]
        if not keep_rows:
            rec.pop("rows"), rec.pop("row_weights")
        if not stats:
            for key in ("count", "weight_sum", "tokens"):
                rec.pop(key)
    return out


def _float_weights(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_up [E, H, D], w_down [E, D, F])`` of dense (or quantised: dequantised) grouped experts."""
    if hasattr(experts, "dequantized"):
        return experts.dequantized()
    w_up, w_down = experts.w_up, experts.w_down
    if getattr(experts, "transposed", False):
        w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)
    return w_up.detach(), w_down.detach()


# ------------------------------------------------------------------------------------------------ MC allocation
def mc_allocate(cost_EB: torch.Tensor, choices: tuple[int, ...], budget: float) -> list[int]:
    """The bits of each expert minimising ``sum_e cost_EB[e, k(e)]`` with ``mean_e choices[k(e)] <= budget``:
    MC-MoE's integer program, solved exactly with ``scipy.optimize.milp`` (binary ``x[e, k]``, one choice per
    expert, one budget row). ``cost_EB[e, k]`` is the weighted error ``f_e^a w_e^b q_e(choices[k])``."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    cost = np.asarray(cost_EB, dtype=np.float64)
    E, K = cost.shape
    if K != len(choices):
        raise ValueError(f"cost has {K} columns for {len(choices)} choices")
    if budget < min(choices) - 1e-9:
        raise ValueError(f"budget {budget} is below the smallest choice {min(choices)}")
    one = np.zeros((E, E * K))
    for e in range(E):
        one[e, e * K:(e + 1) * K] = 1
    bits_row = np.tile(np.asarray(choices, dtype=np.float64), E)[None, :]
    constraints = [LinearConstraint(one, 1, 1), LinearConstraint(bits_row, -np.inf, budget * E + 1e-9)]
    res = milp(cost.reshape(-1), constraints=constraints, integrality=np.ones(E * K),
               bounds=Bounds(0, 1))
    if not res.success:
        raise ValueError(f"mixed-precision allocation failed: {res.message}")
    x = np.round(res.x).reshape(E, K)
    return [int(choices[int(k)]) for k in x.argmax(1)]


def mc_costs(freq_E, mean_weight_E, q_EB, a: float = 1.0, b: float = 1.5) -> torch.Tensor:
    """``f_e^a w_e^b q_e(b)`` (MC-MoE's importance-weighted error)."""
    f = torch.as_tensor(freq_E, dtype=torch.float64)
    w = torch.as_tensor(mean_weight_E, dtype=torch.float64)
    return (f.pow(a) * w.pow(b)).unsqueeze(1) * torch.as_tensor(q_EB, dtype=torch.float64)


def hessian_error(w: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((w - w_q) H (w - w_q)^T)``: the summed squared output error over the calibration inputs."""
    d = (w.to(torch.float64) - w_q.to(torch.float64))
    return float(torch.einsum("rc,cd,rd->", d, hessian.to(torch.float64), d))




# ------------------------------------------------------------------------------------------------ experts
METHODS = ("rtn", "gptq", "agq", "ternary", "hqq", "eaquant")


def quantize_matrix(w: torch.Tensor, method: str, bits, group: int, symmetric: bool,
                    hessian: torch.Tensor | None = None) -> PackedTensor:
    """One expert matrix by ``method``: ``rtn`` / ``ternary`` round to nearest; ``gptq`` / ``agq`` run GPTQ on
    ``hessian`` (plain or routing-weighted: the caller chooses), falling back to RTN without one."""
    if method == "hqq":
        return hqq(w, bits, group)
    if method in ("rtn", "ternary") or hessian is None:
        return rtn(w, bits, group, symmetric)
    if method not in ("gptq", "agq", "eaquant"):
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return gptq(w, hessian, bits, group, symmetric)


def expert_forward(w_up: torch.Tensor, w_down: torch.Tensor, act_fn, x: torch.Tensor) -> torch.Tensor:
    """``down(act(up(x)))`` of one expert (float64 helper for error measurements)."""
    return act_fn(x.to(w_up.dtype) @ w_up.t()) @ w_down.t()


def mixed_output_errors(w_up_EHD, w_down_EDF, act_fn, rec: dict, choices, quantize) -> torch.Tensor:
    """``q [E, len(choices)]``: the mean squared change of the layer's output over the calibration tokens when
    expert ``e`` alone is quantised to ``choices[k]`` bits by ``quantize(e, bits) -> (PackedTensor up, down)``.
    Measured on the kept rows (``rec["rows"]``, weights ``rec["row_weights"]``) and scaled to all of the expert's
    routed tokens: ``count_e / kept_e * sum_t g_t^2 ||f_e(x_t) - f_e^q(x_t)||^2 / tokens``."""
    E = w_up_EHD.shape[0]
    q = torch.zeros(E, len(choices), dtype=torch.float64)
    for e in range(E):
        x = rec["rows"][e].to(torch.float64)
        if x.shape[0] == 0:
            continue
        g2 = rec["row_weights"][e].to(torch.float64).square()
        y = expert_forward(w_up_EHD[e].double(), w_down_EDF[e].double(), act_fn, x)
        for k, bits in enumerate(choices):
            up, down = quantize(e, bits)
            yq = expert_forward(up.dequantize(torch.float64), down.dequantize(torch.float64), act_fn, x)
            err = (g2 * (y - yq).square().sum(1)).sum()
            q[e, k] = err * float(rec["count"][e]) / x.shape[0] / max(1, rec["tokens"])
    return q
