"""Inspect a local transformers Mixture-of-Experts checkpoint without loading its weights.

Only ``config.json`` and the safetensors headers (8-byte little-endian length, then a JSON table of tensor
names, dtypes and shapes) are read, so a 600 GB checkpoint is inspected in milliseconds. Sharded checkpoints
(``model.safetensors.index.json``) are supported. Nothing is imported from the checkpoint: no
``trust_remote_code``, no pickle.

The MoE structure is derived from tensor names and shapes, so it works across architectures:

* routed experts: ``<block>.experts.<name>`` fused 3-D tensors with the experts on the first axis (transformers 5:
  ``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``; GPT-OSS transposed, with biases), or per-expert tensors
  ``<block>.experts.<N>.<name>`` (older checkpoints and transformers 5's ``save_pretrained``);
* router: ``<block>.gate.weight`` or ``<block>.router.weight`` ``[E, D]`` (plus a bias or DeepSeek's
  ``e_score_correction_bias``);
* shared experts: tensors under ``<block>`` whose name contains ``shared_expert`` (Qwen2-MoE
  ``shared_expert`` + ``shared_expert_gate``, DeepSeek ``shared_experts``); their count comes from the config
  (``n_shared_experts``, ``num_shared_experts``), 1 when the config does not say.

``top_k`` comes from the config (``num_experts_per_tok`` and its aliases). Parameters are the elements of all
stored tensors (persistent buffers such as ``e_score_correction_bias`` included, a tied ``lm_head`` counted
once, as stored). Active parameters per token are all parameters except the routed experts a token does not
use: ``total - sum over MoE layers of (E - top_k) * params_per_expert``; embeddings, attention, norms, routers
and shared experts all count as active.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import read_json

__all__ = ["CheckpointInfo", "MoELayerInfo", "inspect_checkpoint", "read_safetensors_header", "format_info"]

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "num_selected_experts",
              "moe_top_k", "moe_topk", "router_topk", "top_k")
SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "shared_experts", "moe_num_shared_experts")
_MAX_HEADER = 100 * 2 ** 20  # safetensors itself refuses headers above 100 MB

_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<idx>\d+)\.(?P<rest>.+)$")
_FUSED = re.compile(r"^(?P<block>.+)\.experts\.(?P<rest>[^.]+)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class TensorInfo:
    """One stored tensor, from a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 0)


@dataclass
class MoELayerInfo:
    """One sparse MoE block of the checkpoint."""

    name: str                 # module name of the block, e.g. "model.layers.3.mlp"
    layer: int | None         # decoder layer index, when the name has "layers.N."
    num_experts: int
    params_per_expert: int
    bytes_per_expert: int
    router_params: int
    shared_params: int
    layer_params: int         # all parameters of the decoder layer (attention, norms, block)
    layer_bytes: int


@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` finds; every size is derived from headers only."""

    path: str
    architecture: str
    model_type: str | None
    num_layers: int | None
    num_moe_layers: int
    num_experts: int                      # routed experts of the widest MoE layer
    experts_per_layer: list[int]
    top_k: int | None
    num_shared_experts: int
    total_params: int
    active_params: int | None             # per token; None when top_k is unknown
    checkpoint_bytes: int
    dtypes: dict[str, int]                # stored dtype -> number of elements
    bytes_per_expert: int
    bytes_per_moe_layer: int              # the largest MoE decoder layer, at the stored dtypes
    memory_bytes: dict[str, int]          # weights at 16, 8 and 4 bits per parameter
    files: list[str]
    moe_layers: list[MoELayerInfo] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file, reading only its header.

    Raises ``ValueError`` naming the file when it is missing, shorter than its header or the header is not a
    valid safetensors JSON table.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"safetensors file {path} does not exist")
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path} has an unreadable safetensors header (length {n} exceeds the file)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} has an unreadable safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has an unreadable safetensors header (not a JSON object)")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, dtype, offsets = entry["shape"], entry["dtype"], entry["data_offsets"]
            begin, end = offsets
            ok = (isinstance(shape, list) and all(_is_count(d) for d in shape) and isinstance(dtype, str)
                  and _is_count(begin) and _is_count(end) and begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path} has an unreadable safetensors header (bad entry for {name!r})") from None
        if end > size - 8 - n:
            raise ValueError(f"{path} is truncated (tensor {name!r} ends past the end of the file)")
        info = TensorInfo(dtype, tuple(shape), path.name)
        if dtype in DTYPE_BYTES and info.nbytes != end - begin:  # a header may not claim more (or less) data than the file holds
            raise ValueError(f"{path}: tensor {name!r} of shape {tuple(shape)} ({dtype}) needs {info.nbytes} bytes, "
                             f"its data_offsets span {end - begin}")
        out[name] = info
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            values = list(weight_map.values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a valid safetensors index (no weight_map)") from None
        bad = [v for v in values if not isinstance(v, str) or not v or Path(v).name != v or v in (".", "..")]
        if bad:  # shard names are plain file names of this folder: nothing outside it is read
            raise ValueError(f"{index}: weight_map values must be file names inside {folder}, got {bad[0]!r}")
        files = sorted(set(values))
        if not files:
            raise ValueError(f"{index}: weight_map is empty")
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"sharded checkpoint {folder} is missing {len(missing)} of {len(files)} shards: "
                             + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        return files
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    singles = sorted(p.name for p in folder.glob("*.safetensors"))
    if singles:
        return singles
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {', '.join(others[:3])}: pickle checkpoints are not read)" if others else ""
    raise ValueError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a transformers checkpoint: config.json is missing")
    cfg = read_json(path, "checkpoint config")
    for sub in ("text_config", "language_config", "llm_config"):  # multimodal wrappers: the LM's fields win
        if isinstance(cfg.get(sub), dict):
            cfg = {**cfg, **cfg[sub]}
    return cfg


def _first_int(cfg: dict, keys, low: int = 0) -> int | None:
    """The first of ``keys`` that holds an integer >= ``low`` (other values are not counts: ignored)."""
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= low:
            return v
    return None


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Architecture, MoE structure, parameter counts and memory of a local transformers checkpoint folder.

    Reads ``config.json`` and safetensors headers only. Raises ``ValueError`` with one sentence for a folder
    that is not a transformers checkpoint, a missing shard, an unreadable header, or a dense (non-MoE) model.
    """
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (expected a transformers checkpoint folder)")
    cfg = _read_config(folder)
    files = _weight_files(folder)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        tensors.update(read_safetensors_header(folder / f))
    if not tensors:
        raise ValueError(f"{folder} holds no tensors")
    archs = cfg.get("architectures")
    if isinstance(archs, str):
        archs = [archs]
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{folder / 'config.json'}: 'architectures' must be a list of class names, got {archs!r}")
    model_type = cfg.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"{folder / 'config.json'}: 'model_type' must be a string, got {model_type!r}")
    architecture = (archs or [None])[0] or model_type or "unknown"

    # Routed experts per block: per-expert ids seen, and the tensors that belong to experts.
    expert_tensors: dict[str, list[tuple[str, TensorInfo]]] = {}
    expert_ids: dict[str, set[int]] = {}
    fused_E: dict[str, int] = {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m:
            expert_tensors.setdefault(m["block"], []).append((name, t))
            expert_ids.setdefault(m["block"], set()).add(int(m["idx"]))
            continue
        m = _FUSED.match(name)
        if m and len(t.shape) >= 2:
            if t.shape[0] < 1:
                raise ValueError(f"{folder}: expert tensor {name!r} has shape {t.shape}: no experts on its first axis")
            expert_tensors.setdefault(m["block"], []).append((name, t))
            fused_E[m["block"]] = max(fused_E.get(m["block"], 0), t.shape[0])
    if not expert_tensors:
        raise ValueError(f"{folder} is a dense model ({architecture}): no routed expert tensors "
                         "(*.experts.*) found, so there is nothing MoE to inspect")

    top_k = _first_int(cfg, TOP_K_KEYS, low=1)
    n_shared_cfg = _first_int(cfg, SHARED_KEYS)
    layer_totals: dict[int, list[int]] = {}
    for name, t in tensors.items():
        m = _LAYER.search(name)
        if m:
            acc = layer_totals.setdefault(int(m.group(1)), [0, 0])
            acc[0] += t.numel
            acc[1] += t.nbytes

    moe_layers = []
    for block in sorted(expert_tensors, key=lambda b: (_layer_of(b) is None, _layer_of(b) or 0, b)):
        items = expert_tensors[block]
        if block in expert_ids:
            E = len(expert_ids[block])
        else:
            E = fused_E[block]
        n_params = sum(t.numel for _, t in items)
        n_bytes = sum(t.nbytes for _, t in items)
        router = sum(t.numel for n, t in tensors.items()
                     if n.startswith(block + ".gate.") or n.startswith(block + ".router."))
        shared = sum(t.numel for n, t in tensors.items()
                     if n.startswith(block + ".") and "shared_expert" in n[len(block) + 1:])
        layer = _layer_of(block)
        lp, lb = layer_totals.get(layer, (n_params + router + shared, n_bytes))  # no "layers.N": the block
        moe_layers.append(MoELayerInfo(block, layer, E, n_params // E, n_bytes // E, router, shared, lp, lb))

    total = sum(t.numel for t in tensors.values())
    active = None
    if top_k is not None:
        active = total - sum(max(0, L.num_experts - top_k) * L.params_per_expert for L in moe_layers)
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    has_shared = any(L.shared_params for L in moe_layers)
    num_shared = (n_shared_cfg if n_shared_cfg is not None else 1) if has_shared else 0
    layers = _first_int(cfg, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"), low=1)
    return CheckpointInfo(
        path=str(folder), architecture=architecture, model_type=model_type,
        num_layers=layers if layers is not None else (len(layer_totals) or None),
        num_moe_layers=len(moe_layers), num_experts=max(L.num_experts for L in moe_layers),
        experts_per_layer=[L.num_experts for L in moe_layers], top_k=top_k, num_shared_experts=num_shared,
        total_params=total, active_params=active, checkpoint_bytes=sum(t.nbytes for t in tensors.values()),
        dtypes=dtypes, bytes_per_expert=max(L.bytes_per_expert for L in moe_layers),
        bytes_per_moe_layer=max(L.layer_bytes for L in moe_layers),
        memory_bytes={f"{b}bit": total * b // 8 for b in (16, 8, 4)}, files=files, moe_layers=moe_layers,
    )


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name + ".")
    return int(m.group(1)) if m else None


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.2f} {prefix}{unit}"
        n /= 1000
    return f"{n} {unit}"


def _count(n: int) -> str:
    return f"{n:,} ({_human(n, '').strip()})" if n >= 1000 else f"{n:,}"


def format_info(info: CheckpointInfo) -> str:
    """A short human-readable summary of :func:`inspect_checkpoint`'s result."""
    per_layer = sorted(set(info.experts_per_layer))
    experts = str(per_layer[0]) if len(per_layer) == 1 else ", ".join(map(str, info.experts_per_layer))
    lines = [
        f"checkpoint:        {info.path} ({len(info.files)} file{'s' if len(info.files) > 1 else ''})",
        f"architecture:      {info.architecture} (model_type {info.model_type})",
        f"layers:            {info.num_layers} ({info.num_moe_layers} MoE)",
        f"experts per layer: {experts} routed, top-k {info.top_k if info.top_k is not None else 'unknown'}, "
        f"{info.num_shared_experts} shared",
        f"parameters:        {_count(info.total_params)} total",
        "active per token:  " + (_count(info.active_params) + f" ({100 * info.active_params / info.total_params:.1f}%)"
                                  if info.active_params is not None else "unknown (no top-k in config.json)"),
        "stored dtypes:     " + ", ".join(f"{k} {_count(v)}" for k, v in sorted(info.dtypes.items())),
        f"bytes per expert:  {_human(info.bytes_per_expert)} (as stored)",
        f"bytes per layer:   {_human(info.bytes_per_moe_layer)} (largest MoE layer, as stored)",
        f"checkpoint size:   {_human(info.checkpoint_bytes)}",
        "weights memory:    " + ", ".join(f"{k.replace('bit', '')}-bit {_human(v)}"
                                          for k, v in info.memory_bytes.items()),
    ]
    return "\n".join(lines)
