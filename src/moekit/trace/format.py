"""The routing-trace format: one safetensors file, tensors plus a JSON header (see ``docs/trace-format.md``).

A trace records, for ``T`` tokens and ``L`` MoE layers, the experts each token was routed to and their gate
weights (optionally the router logits), with each token's id, position, document, domain and sequence. It is
what ``moekit trace`` writes and what the report, the Hugging Face integration, compression and serving read.

Legend (docs/architecture.md): I MoE layers, T tokens, K experts per token (the maximum over tokens; shorter rows are padded with
expert ``-1``, weight 0), E experts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..io import atomic_save_safetensors

__all__ = ["FORMAT", "VERSION", "HEADER_KEY", "TOKEN_FIELDS", "Trace", "TraceFormatError", "save_trace",
           "load_trace"]

FORMAT = "moekit-trace"
VERSION = 1
HEADER_KEY = "moekit_trace"  # the one key of the safetensors ``__metadata__`` that holds the JSON header
TOKEN_FIELDS = ("tokens", "positions", "doc_ids", "domain_ids", "seq_ids")  # int32 [T], -1 = unknown
_INT16_MAX_EXPERTS = 32767  # expert ids fit int16 up to here; beyond, ``experts`` is int32


class TraceFormatError(ValueError):
    """A trace file that cannot be read: wrong format or version, truncated, corrupt or incomplete."""


def _int_tensor(name: str, value, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).detach().cpu()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.numel() and (int(t.min()) < torch.iinfo(dtype).min or int(t.max()) > torch.iinfo(dtype).max):
        raise ValueError(f"{name} holds values outside the range of {dtype}")
    return t.to(dtype).contiguous()


def _float_tensor(name: str, value, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).detach().cpu()
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return (t if t.dtype in dtypes else t.to(dtypes[-1])).contiguous()


def _json_dict(name: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be JSON-serialisable") from None


@dataclass
class Trace:
    """Routing of ``T`` tokens through ``L`` MoE layers (all tensors on the CPU).

    Tensors (the names are those of the file):
        experts: ``[I, T, K]`` int16 (int32 when ``num_experts > 32767``): the experts of each token, sorted by
            descending routing weight; ``-1`` pads rows with fewer than ``K`` experts (pads come last).
        weights: ``[I, T, K]`` float32 routing weights, 0 at pads.
        logits: optional ``[I, T, E]`` float16 or float32 router logits (``E = num_experts``).
        tokens, positions, doc_ids, domain_ids, seq_ids: ``[T]`` int32 per-token annotations, ``-1`` unknown.
    Header: ``num_experts`` (E, the widest layer), ``num_experts_per_layer`` (defaults to E for every layer),
    ``layer_names`` (module names, ``L`` of them), ``domain_names`` (index = domain id), ``model`` and ``source``
    (free-form JSON dicts).

    Values are validated and converted to the file's dtypes on construction; an inconsistent trace raises
    ``ValueError`` naming the field.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    num_experts: int
    layer_names: list[str]
    tokens: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    domain_ids: torch.Tensor | None = None
    seq_ids: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    domain_names: list[str] = field(default_factory=list)
    num_experts_per_layer: list[int] | None = None
    model: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, (int, np.integer)) \
                or self.num_experts <= 0:
            raise ValueError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        self.num_experts = int(self.num_experts)
        expert_dtype = torch.int16 if self.num_experts <= _INT16_MAX_EXPERTS else torch.int32
        self.experts = _int_tensor("experts", self.experts, expert_dtype)
        if self.experts.dim() != 3 or self.experts.shape[0] < 1 or self.experts.shape[2] < 1:
            raise ValueError(f"experts must have shape [layers >= 1, tokens, k >= 1], got {tuple(self.experts.shape)}")
        L, T, _ = self.experts.shape
        self.weights = _float_tensor("weights", self.weights, (torch.float32,))
        if self.weights.shape != self.experts.shape:
            raise ValueError(f"weights must have the shape of experts {tuple(self.experts.shape)}, "
                             f"got {tuple(self.weights.shape)}")
        for name in TOKEN_FIELDS:
            value = getattr(self, name)
            value = torch.full((T,), -1, dtype=torch.int32) if value is None else _int_tensor(name, value, torch.int32)
            if value.shape != (T,):
                raise ValueError(f"{name} must have shape [tokens={T}], got {tuple(value.shape)}")
            if value.numel() and int(value.min()) < -1:
                raise ValueError(f"{name} must be >= -1 (-1 = unknown)")
            setattr(self, name, value)
        if self.logits is not None:
            self.logits = _float_tensor("logits", self.logits, (torch.float16, torch.float32))
            if self.logits.shape != (L, T, self.num_experts):
                raise ValueError(f"logits must have shape [layers={L}, tokens={T}, experts={self.num_experts}], "
                                 f"got {tuple(self.logits.shape)}")
        self.layer_names = [str(n) for n in self.layer_names]
        if len(self.layer_names) != L:
            raise ValueError(f"layer_names must name the {L} layers, got {len(self.layer_names)} names")
        self.domain_names = [str(n) for n in self.domain_names]
        if self.num_experts_per_layer is None:
            self.num_experts_per_layer = [self.num_experts] * L
        self.num_experts_per_layer = [int(e) for e in self.num_experts_per_layer]
        if len(self.num_experts_per_layer) != L or any(not 1 <= e <= self.num_experts
                                                       for e in self.num_experts_per_layer):
            raise ValueError(f"num_experts_per_layer must hold {L} integers in [1, num_experts={self.num_experts}]")
        if self.domain_names and self.domain_ids.numel() and int(self.domain_ids.max()) >= len(self.domain_names):
            raise ValueError(f"domain_ids must be < len(domain_names)={len(self.domain_names)}")
        self.model = _json_dict("model", self.model)
        self.source = _json_dict("source", self.source)
        self._check_assignments()

    def _check_assignments(self) -> None:
        experts = self.experts.to(torch.int64)
        valid = experts >= 0
        if experts.numel() and int(experts.min()) < -1:
            raise ValueError("experts must be >= -1 (-1 pads)")
        limit_I11 = torch.tensor(self.num_experts_per_layer).view(-1, 1, 1)
        if bool((experts >= limit_I11).any()):
            raise ValueError("experts holds an expert id >= the layer's number of experts")
        if bool((valid[..., 1:] & ~valid[..., :-1]).any()):
            raise ValueError("experts: -1 pads must come after a token's experts")
        if bool((self.weights[~valid] != 0).any()):
            raise ValueError("weights must be 0 where experts is -1")
        if experts.shape[-1] > 1:
            ordered = torch.where(valid, experts, -1 - torch.arange(experts.shape[-1])).sort(dim=-1).values
            if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
                raise ValueError("experts lists an expert twice for one token")

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        """K: the width of ``experts`` (the most experts any token got)."""
        return int(self.experts.shape[2])

    @property
    def has_logits(self) -> bool:
        return self.logits is not None

    def header(self) -> dict:
        """The JSON header written to the file."""
        return {
            "format": FORMAT, "version": VERSION, "num_layers": self.num_layers, "num_tokens": self.num_tokens,
            "num_experts": self.num_experts, "top_k": self.top_k,
            "num_experts_per_layer": list(self.num_experts_per_layer), "layer_names": list(self.layer_names),
            "domain_names": list(self.domain_names), "model": self.model, "source": self.source,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to the file, by name."""
        out = {"experts": self.experts, "weights": self.weights}
        out.update({name: getattr(self, name) for name in TOKEN_FIELDS})
        if self.logits is not None:
            out["logits"] = self.logits
        return out

    # ------------------------------------------------------------------ views
    def domain_id(self, domain: str | int) -> int:
        """The id of a domain given by name or id; ``ValueError`` when unknown."""
        if isinstance(domain, (int, np.integer)) and not isinstance(domain, bool):
            if domain < 0 or (self.domain_names and domain >= len(self.domain_names)):
                raise ValueError(f"domain id {domain} is not in this trace")
            return int(domain)
        if domain in self.domain_names:
            return self.domain_names.index(domain)
        raise ValueError(f"domain {domain!r} is not in this trace; domains: {', '.join(self.domain_names) or 'none'}")

    def domain_label(self, domain_id: int) -> str:
        return self.domain_names[domain_id] if 0 <= domain_id < len(self.domain_names) else f"domain {domain_id}"

    def pairs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flat assignment list of one layer, as in :class:`moekit.Routing`: ``(token_ids[S],
        expert_ids[S], weights[S])`` (int64, int64, float32), token-major."""
        experts_TK = self.experts[layer].to(torch.int64)
        valid_TK = experts_TK >= 0
        token_TK = torch.arange(self.num_tokens).view(-1, 1).expand_as(experts_TK)
        return token_TK[valid_TK], experts_TK[valid_TK], self.weights[layer][valid_TK]

    def select(self, index) -> "Trace":
        """The trace of a subset of tokens: ``index`` is a boolean mask ``[T]`` or integer indices."""
        index = torch.as_tensor(np.asarray(index) if not isinstance(index, torch.Tensor) else index)
        if index.dtype == torch.bool and index.shape != (self.num_tokens,):
            raise ValueError(f"a token mask must have shape [{self.num_tokens}], got {tuple(index.shape)}")
        experts = self.experts[:, index]
        width = max(1, int((experts >= 0).sum(-1).max())) if experts.numel() else 1
        return Trace(
            experts=experts[..., :width], weights=self.weights[:, index][..., :width], num_experts=self.num_experts,
            layer_names=self.layer_names, logits=None if self.logits is None else self.logits[:, index],
            domain_names=self.domain_names, num_experts_per_layer=self.num_experts_per_layer, model=self.model,
            source=self.source, **{name: getattr(self, name)[index] for name in TOKEN_FIELDS})

    @classmethod
    def concat(cls, traces: Sequence["Trace"]) -> "Trace":
        """Join traces of the same model along the token axis.

        Sequence ids of each later trace are shifted past the earlier ones so they stay distinct; document and
        domain ids are kept (they refer to the same corpus). All traces must have the same layers, experts and
        domain names, and all or none must have logits; ``model`` and ``source`` come from the first.
        """
        traces = list(traces)
        if not traces:
            raise ValueError("concat needs at least one trace")
        first = traces[0]
        for t in traces[1:]:
            if (t.layer_names != first.layer_names or t.num_experts != first.num_experts
                    or t.num_experts_per_layer != first.num_experts_per_layer):
                raise ValueError("concat: traces have different layers or numbers of experts")
            if t.domain_names != first.domain_names:
                raise ValueError("concat: traces have different domain names")
            if t.has_logits != first.has_logits:
                raise ValueError("concat: all traces or none must have logits")
        width = max(t.top_k for t in traces)

        def pad(x: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=value)

        seq_ids, offset = [], 0
        for t in traces:
            s = t.seq_ids.clone()
            s[s >= 0] += offset
            seq_ids.append(s)
            offset = max(offset, int(s.max()) + 1 if s.numel() else offset)
        token_fields = {name: torch.cat([getattr(t, name) for t in traces]) for name in TOKEN_FIELDS[:-1]}
        return cls(
            experts=torch.cat([pad(t.experts, -1) for t in traces], dim=1),
            weights=torch.cat([pad(t.weights, 0.0) for t in traces], dim=1),
            num_experts=first.num_experts, layer_names=first.layer_names,
            logits=torch.cat([t.logits.float() for t in traces], dim=1).to(first.logits.dtype)
            if first.has_logits else None,
            domain_names=first.domain_names, num_experts_per_layer=first.num_experts_per_layer,
            model=first.model, source=first.source, seq_ids=torch.cat(seq_ids), **token_fields)


# ---------------------------------------------------------------------- file I/O
def save_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` to ``path`` (safetensors; written to a temporary file in the same folder, then renamed)."""
    path = Path(path)
    atomic_save_safetensors(path, trace.tensors(), metadata={HEADER_KEY: json.dumps(trace.header())})
    return path


def _read_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if HEADER_KEY not in metadata:
                raise TraceFormatError(f"{path} is not a moekit trace (its safetensors header has no "
                                       f"'{HEADER_KEY}' entry)")
            header = json.loads(metadata[HEADER_KEY])
            if not isinstance(header, dict):
                raise TraceFormatError(f"{path} has a malformed trace header (not a JSON object)")
            _check_version(path, header)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except TraceFormatError:
        raise
    except json.JSONDecodeError:
        raise TraceFormatError(f"{path} has a malformed trace header (invalid JSON)") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        detail = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise TraceFormatError(f"{path} is not a readable safetensors file, it may be truncated or corrupt "
                               f"({detail})") from None
    return header, tensors


def _check_version(path: Path, header: dict) -> None:
    if header.get("format") != FORMAT:
        raise TraceFormatError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != VERSION:
        raise TraceFormatError(f"{path} is a {FORMAT} file of version {header.get('version')!r}; this moekit "
                               f"reads version {VERSION}")


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace written by :func:`save_trace`.

    Raises :class:`TraceFormatError` (a ``ValueError``) with one sentence when the file is missing, is not a
    safetensors file, is truncated or corrupt, has another format or version, or lacks a required tensor or
    header field.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(f"trace file {path} does not exist")
    header, tensors = _read_file(path)
    missing = [n for n in ("experts", "weights", *TOKEN_FIELDS) if n not in tensors]
    if missing:
        raise TraceFormatError(f"{path} lacks the trace tensor(s) {', '.join(missing)}")
    needed = ("num_layers", "num_tokens", "num_experts", "top_k", "layer_names", "domain_names")
    absent = [k for k in needed if k not in header]
    if absent:
        raise TraceFormatError(f"{path} lacks the header field(s) {', '.join(absent)}")
    try:
        trace = Trace(
            experts=tensors["experts"], weights=tensors["weights"], num_experts=header["num_experts"],
            layer_names=header["layer_names"], logits=tensors.get("logits"), domain_names=header["domain_names"],
            num_experts_per_layer=header.get("num_experts_per_layer"), model=header.get("model") or {},
            source=header.get("source") or {}, **{name: tensors[name] for name in TOKEN_FIELDS})
    except (ValueError, TypeError) as exc:
        raise TraceFormatError(f"{path} is inconsistent: {exc}") from None
    shape = (header["num_layers"], header["num_tokens"], header["top_k"])
    if (trace.num_layers, trace.num_tokens, trace.top_k) != tuple(shape):
        raise TraceFormatError(f"{path}: the header says [layers, tokens, k] = {list(shape)} but experts has "
                               f"shape {list(trace.experts.shape)}")
    return trace
