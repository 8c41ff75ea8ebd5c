"""Export a quantised moekit run (``moekit quantize``) as a transformers checkpoint in the compressed-tensors
``pack-quantized`` layout, the weight-only integer format vLLM loads (``moekit export --format
compressed-tensors``).

Layout (read from the compressed-tensors source, ``compressors/pack_quantized``, and vLLM's
``CompressedTensorsWNA16MoEMethod``; the package itself is not needed to write it):

* ``config.json``: the ``Qwen3MoeConfig`` of :mod:`moekit.hf.export` plus ``quantization_config`` =
  ``{"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
  "config_groups": {"group_0": {"targets": [regex of the expert projections], "weights": {"num_bits": b,
  "type": "int", "symmetric": ..., "strategy": "group", "group_size": G, ...}, "input_activations": null,
  "format": "pack-quantized"}}, "ignore": []}``. Only the routed experts are quantised; every other weight
  (attention, router, norms, embeddings) is written in float as in the plain export.
* experts one by one, as the transformers checkpoints on the Hub name them (vLLM maps them onto its fused MoE):
  ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.`` + ``weight_packed`` (int32 ``[rows, ceil(cols / p)]``,
  ``p = 32 // b`` codes per word, code ``i`` of a word at bits ``b*i``, each code the unsigned ``q + 2^(b-1)``
  of the signed value ``q``), ``weight_scale`` (float16 ``[rows, cols / G]``), ``weight_shape`` (int64
  ``[rows, cols]``) and, for asymmetric grids, ``weight_zero_point`` (the signed zero points packed the same way
  along the rows: int32 ``[ceil(rows / p), cols / G]``). The weight is ``(q - zero_point) * scale``.

From moekit's grid (:mod:`moekit.compress.quant`: ``w = s (u - z)`` with codes ``u`` in ``[0, 2^b - 1]``):
``q = u - 2^(b-1)`` and the signed zero point ``z - 2^(b-1)`` (0 on symmetric grids), so the packed word holds
``u`` itself. Ternary experts (``u`` in ``{0, 1, 2}``, ``z = 1``) are written as 2-bit symmetric (``q`` in
``{-1, 0, 1}``). EAQuant's shared smoothing is folded into the preceding RMSNorm (``weight / s``) and the router
(``gate.weight * s``), equal in float. Refused with a one-line reason: mixed widths (one scheme per checkpoint
here), HQQ's fractional zero points, simulated activation quantisation, a run that is not quantised.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..io import atomic_save_safetensors, atomic_write_json

__all__ = ["EXPERT_TARGET", "export_compressed_tensors", "pack_int32", "quantization_config"]

#: the config group's target: every routed expert projection
EXPERT_TARGET = r"re:.*mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"


def pack_int32(u: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned codes ``u`` (2-D, values < 2^bits) packed ``32 // bits`` per int32 along ``dim`` (1: columns,
    0: rows), code ``i`` of a word at bits ``bits * i``, the tail padded with zeros."""
    if dim == 0:
        return pack_int32(u.t(), bits, 1).t().contiguous()
    per = 32 // bits
    rows, cols = u.shape
    pad = (-cols) % per
    v = torch.nn.functional.pad(u.to(torch.int64), (0, pad)).view(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    word = (v << shifts).sum(-1)  # < 2^32
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def quantization_config(bits: int, group: int, symmetric: bool) -> dict:
    """The ``quantization_config`` entry of ``config.json`` (see the module docstring)."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}, "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": [EXPERT_TARGET], "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": "pack-quantized"}},
            "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}}


def _dense_config(cfg: dict) -> dict:
    """The run config with dense experts everywhere (for the Qwen3-MoE compatibility check and config)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["model"]["moe"]["experts"] = "dense"
    cfg["model"]["moe"]["experts_options"] = {}
    for settings in (cfg["model"].get("moe_overrides") or {}).values():
        settings.pop("experts", None)
        settings.pop("experts_options", None)
    cfg["model"]["moe_overrides"] = {k: v for k, v in (cfg["model"].get("moe_overrides") or {}).items() if v}
    return cfg


def _expert_tensors(experts, prefix: str) -> tuple[dict, tuple[int, int, bool]]:
    """Per-expert compressed-tensors tensors of one layer's :class:`QuantizedExperts`, and its scheme."""
    if experts.mixed:
        raise ValueError("compressed-tensors export needs one width for every expert (got mixed precision: "
                         f"{sorted(set(map(str, experts.expert_bits)))})")
    if experts.act_bits is not None:
        raise ValueError("compressed-tensors export: simulated activation quantisation (--act-bits) has no "
                         "weight-only equivalent; quantize without --act-bits")
    if not experts.symmetric and experts.zero_dtype != torch.uint8:
        raise ValueError("compressed-tensors export: HQQ's fractional zero points have no integer zero point in "
                         "the pack-quantized format; use --method rtn/gptq/agq")
    bits = experts.bits
    ternary = bits == "ternary"
    out_bits = 2 if ternary else bits
    tensors = {}
    groups = set()
    F = experts.hidden_dim
    for e in range(experts.num_experts):
        mats = {}
        for name in (experts.up_name, "down_proj"):
            p = experts.packed(name, e)
            u = p.codes()
            z = p.zero_points()
            scale = p.scale
            groups.add(p.group)
            if name == "gate_up_proj":
                mats["gate_proj"] = (u[:F], scale[:F], z[:F])
                mats["up_proj"] = (u[F:], scale[F:], z[F:])
            else:
                mats["up_proj" if name == "up_proj" else "down_proj"] = (u, scale, z)
        for proj, (u, scale, z) in mats.items():
            key = f"{prefix}.{e}.{proj}"
            offset = 1 << (out_bits - 1)
            if ternary:  # q = u - 1 in {-1, 0, 1}; stored unsigned as q + 2
                u = u - 1 + offset
            tensors[f"{key}.weight_packed"] = pack_int32(u, out_bits, 1)
            tensors[f"{key}.weight_scale"] = scale.to(torch.float16).contiguous()
            tensors[f"{key}.weight_shape"] = torch.tensor(list(u.shape), dtype=torch.int64)
            if not experts.symmetric:
                zp = (z.round().to(torch.int64) - offset)  # signed, in [-2^(b-1), 2^(b-1) - 1]
                tensors[f"{key}.weight_zero_point"] = pack_int32(zp + offset, out_bits, 0)
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors export needs one group size, got {sorted(groups)}")
    return tensors, (out_bits, groups.pop(), bool(experts.symmetric))


def export_compressed_tensors(run_dir, out, force: bool = False) -> Path:
    """Write the quantised run ``run_dir`` as a compressed-tensors ``pack-quantized`` checkpoint ``out``."""
    from ..experts import QuantizedExperts
    from ..layer import MoE
    from ..model.hf_mapping import qwen3_incompatibilities, qwen3_moe_config_dict
    from ..train import load_run
    from ..train.config import check_run_config
    from .export import _DTYPE_NAMES, _check_apart, _check_out, _move_into_place, _prepare_out

    run_dir, out = Path(run_dir), Path(out)
    _check_apart(run_dir, out)
    _check_out(out, force)
    model, cfg = load_run(run_dir)
    dense_cfg, _ = check_run_config(_dense_config(cfg), "compressed-tensors export")
    problems = qwen3_incompatibilities(dense_cfg)
    if problems:
        raise ValueError("cannot export to compressed-tensors: the model has no Qwen3-MoE equivalent: "
                         + "; ".join(problems))
    state = {k: v for k, v in model.state_dict().items() if ".mlp.experts." not in k}
    if dense_cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    schemes = set()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers or not all(isinstance(m.experts, QuantizedExperts) for _, m in layers):
        raise ValueError(f"{run_dir} has no quantised experts; run `moekit quantize` first (or export --format hf)")
    for name, layer in layers:
        tensors, scheme = _expert_tensors(layer.experts, f"{name}.experts")
        schemes.add(scheme)
        state.update(tensors)
        if layer.experts.smooth_enabled:  # fold EAQuant's shared smoothing: norm / s, router * s
            s = layer.experts.smooth.float()
            norm_key = name.rsplit(".", 1)[0] + ".post_attention_layernorm.weight"
            if norm_key not in state:
                raise ValueError(f"{name}: no post_attention_layernorm to fold the smoothing vector into")
            state[norm_key] = (state[norm_key].float() / s).to(state[norm_key].dtype)
            state[f"{name}.gate.weight"] = (state[f"{name}.gate.weight"].float() * s).to(
                state[f"{name}.gate.weight"].dtype)
    if len(schemes) != 1:
        raise ValueError(f"compressed-tensors export needs one scheme for every layer, got {sorted(schemes)}")
    bits, group, symmetric = schemes.pop()
    config = qwen3_moe_config_dict(dense_cfg)
    dtype = next(model.parameters()).dtype
    tmp = _prepare_out(out, force)
    try:
        try:
            from transformers import Qwen3MoeConfig
        except ImportError:
            hf_cfg = {**config, "model_type": "qwen3_moe", "dtype": _DTYPE_NAMES.get(dtype, str(dtype))}
        else:
            hf = Qwen3MoeConfig(**config)
            hf.dtype = _DTYPE_NAMES.get(dtype, str(dtype))
            hf_cfg = json.loads(hf.to_json_string(use_diff=False))
        hf_cfg["quantization_config"] = quantization_config(bits, group, symmetric)
        atomic_write_json(tmp / "config.json", hf_cfg)
        atomic_save_safetensors(tmp / "model.safetensors", {k: v.contiguous() for k, v in state.items()},
                                metadata={"format": "pt"})
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def dequantized_experts(folder, layer: int, expert: int, proj: str) -> torch.Tensor:
    """The float32 weight ``(q - zero_point) * scale`` of one expert projection of an exported folder, read by
    this module's own convention (for checks against the compressed-tensors package)."""
    from safetensors import safe_open

    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    bits, group = qc["weights"]["num_bits"], qc["weights"]["group_size"]
    key = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        packed = f.get_tensor(f"{key}.weight_packed")
        scale = f.get_tensor(f"{key}.weight_scale").float()
        rows, cols = f.get_tensor(f"{key}.weight_shape").tolist()
        zp = f.get_tensor(f"{key}.weight_zero_point") if f"{key}.weight_zero_point" in f.keys() else None
    per = 32 // bits
    mask = (1 << bits) - 1
    w = packed.to(torch.int64) & 0xFFFFFFFF
    u = torch.stack([(w >> (bits * i)) & mask for i in range(per)], -1).reshape(rows, -1)[:, :cols]
    q = u - (1 << (bits - 1))
    if zp is not None:
        zw = zp.to(torch.int64) & 0xFFFFFFFF
        z = torch.stack([(zw >> (bits * i)) & mask for i in range(per)], 1).reshape(-1, zp.shape[1])[:rows]
        z = z - (1 << (bits - 1))
    else:
        z = torch.zeros_like(scale, dtype=torch.int64)
    qg = (q - z.repeat_interleave(group, 1)).float()
    return qg * scale.repeat_interleave(group, 1)

