"""Read a training run's ``metrics.jsonl`` into arrays for the report.

Each line is one JSON object; training records look like ``{"step": int, "loss": float, "bits_per_byte": float,
"max_vio": [per layer], "load": [[per expert counts] per layer], ...}`` and may carry ``val_bits_per_byte``.
Blank or unparsable lines (a line being written while training runs) are skipped and counted.

Legend (docs/architecture.md): W logged steps (records), I layers, E experts.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MetricsHistory", "read_metrics"]


@dataclass
class MetricsHistory:
    """Per-step series of a run; missing values are NaN.

    ``steps [W]``; ``loss``, ``bits_per_byte``, ``val_bits_per_byte`` ``[W]``; ``max_vio [W, I]`` (from the
    record, or computed from its ``load``); ``load [N, L, E]`` assignment counts (NaN rows where a record had
    none); ``skipped_lines``: lines that were not JSON objects.
    """

    path: str
    steps: np.ndarray
    loss: np.ndarray
    bits_per_byte: np.ndarray
    val_bits_per_byte: np.ndarray
    max_vio: np.ndarray
    load: np.ndarray
    skipped_lines: int = 0

    @property
    def num_records(self) -> int:
        return int(self.steps.size)

    @property
    def has_load(self) -> bool:
        return self.load.size > 0 and bool(np.isfinite(self.load).any())

    @property
    def has_max_vio(self) -> bool:
        return self.max_vio.size > 0 and bool(np.isfinite(self.max_vio).any())


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _max_vio_from_load(load_IE: np.ndarray) -> np.ndarray:
    """MaxVio per layer over the layer's own experts (NaN columns: experts a narrower layer does not have)."""
    with np.errstate(invalid="ignore"):
        mean_I = np.nanmean(load_IE, axis=1)
        return np.where(mean_I > 0, (np.nanmax(load_IE, axis=1) - mean_I) / np.where(mean_I > 0, mean_I, 1.0), 0.0)


def _matrix(value) -> np.ndarray | None:
    """``[I, E]`` float64 from a list of per-layer lists; layers with fewer experts (per-layer expert counts)
    are padded with NaN to the widest."""
    if isinstance(value, list) and value and all(isinstance(row, list) and row for row in value):
        width = max(len(row) for row in value)
        value = [row + [math.nan] * (width - len(row)) for row in value]
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.ndim == 2 else None


def read_metrics(path: str | os.PathLike) -> MetricsHistory:
    """Parse ``metrics.jsonl``; ``ValueError`` (one sentence) when missing, unreadable or without any record."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"metrics file {path} is unreadable ({exc.__class__.__name__})") from None
    records, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and not isinstance(rec["step"], bool):
            records.append(rec)
        else:
            skipped += 1
    if not records:
        raise ValueError(f"metrics file {path} holds no training record (JSON lines with a 'step')")
    loads = [_matrix(r.get("load")) for r in records]
    shapes = Counter(m.shape for m in loads if m is not None)
    load_shape = shapes.most_common(1)[0][0] if shapes else (0, 0)
    N = len(records)
    load_XIE = np.full((N, *load_shape), np.nan)
    for i, m in enumerate(loads):
        if m is not None and m.shape == load_shape:
            load_XIE[i] = m
    vio_len = Counter(len(r["max_vio"]) for r in records if isinstance(r.get("max_vio"), list))
    num_layers = load_shape[0] or (vio_len.most_common(1)[0][0] if vio_len else 0)
    vio_XI = np.full((N, num_layers), np.nan)
    for i, r in enumerate(records):
        vio = r.get("max_vio")
        if isinstance(vio, list) and len(vio) == num_layers:
            vio_XI[i] = [_number(v) for v in vio]
        elif load_shape[0] and np.isfinite(load_XIE[i]).any(axis=1).all():
            vio_XI[i] = _max_vio_from_load(load_XIE[i])
    return MetricsHistory(
        path=str(path), steps=np.array([float(r["step"]) for r in records]),
        loss=np.array([_number(r.get("loss")) for r in records]),
        bits_per_byte=np.array([_number(r.get("bits_per_byte")) for r in records]),
        val_bits_per_byte=np.array([_number(r.get("val_bits_per_byte")) for r in records]),
        max_vio=vio_XI, load=load_XIE, skipped_lines=skipped)
