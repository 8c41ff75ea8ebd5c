"""Everything the report shows, computed once: trace statistics, the disparity profile, the metrics history.

:func:`analyse` takes a trace and/or a metrics file; :func:`moekit.report.build_report` and
:func:`moekit.report.summary_text` both accept its result (or compute it themselves).

Legend (docs/architecture.md): I layers, E experts, O domains.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..trace import stats
from ..trace.disparity import Disparity, disparity_by_domain, routing_disparity
from ..trace.format import Trace, load_trace
from .metrics import MetricsHistory, read_metrics

__all__ = ["TraceStats", "Analysis", "analyse", "resolve_groups", "report_inputs", "TRACE_FILE", "METRICS_FILE"]

TRACE_FILE = "trace.safetensors"  # conventional trace name inside a run folder
METRICS_FILE = "metrics.jsonl"


@dataclass
class TraceStats:
    """Statistics of one trace (see :mod:`moekit.trace.stats`)."""

    num_tokens: int
    num_layers: int
    num_experts: int
    top_k: int
    layer_names: list[str]
    domain_names: list[str]
    load: np.ndarray  # [I, E]
    max_vio: np.ndarray  # [L]
    load_entropy: np.ndarray  # [L] bits
    token_entropy: np.ndarray | None  # [L] bits
    coactivation: np.ndarray  # [I, E, E]
    transitions: np.ndarray  # [L-1, E, E]
    predictability: stats.Predictability
    domain_frequency: np.ndarray  # [I, O, E]
    domain_tokens: np.ndarray  # [D]
    num_experts_per_layer: list[int] | None = None  # [L]; None: num_experts for every layer

    def __post_init__(self):
        if self.num_experts_per_layer is None:
            self.num_experts_per_layer = [self.num_experts] * self.num_layers

    @property
    def uneven_experts(self) -> bool:
        """True when the MoE layers have different numbers of experts."""
        return len(set(self.num_experts_per_layer)) > 1

    @classmethod
    def of(cls, trace: Trace, seed: int = 0) -> "TraceStats":
        freq_IOE, tokens_O = stats.domain_expert_frequency(trace)
        names = [trace.domain_label(d) for d in range(tokens_O.size)]
        return cls(
            num_tokens=trace.num_tokens, num_layers=trace.num_layers, num_experts=trace.num_experts,
            top_k=trace.top_k, layer_names=list(trace.layer_names), domain_names=names,
            load=stats.expert_load(trace), max_vio=stats.max_violation(trace), load_entropy=stats.load_entropy(trace),
            token_entropy=stats.token_entropy(trace),
            coactivation=np.stack([stats.coactivation(trace, l) for l in range(trace.num_layers)]),
            transitions=stats.transition_matrices(trace),
            predictability=stats.cross_layer_predictability(trace, seed=seed),
            domain_frequency=freq_IOE, domain_tokens=tokens_O,
            num_experts_per_layer=list(trace.num_experts_per_layer))


@dataclass
class Analysis:
    """What a report shows: any of trace statistics, a disparity profile and a metrics history."""

    title: str
    trace: TraceStats | None = None
    disparity: Disparity | None = None
    metrics: MetricsHistory | None = None
    trace_source: dict | None = None
    trace_model: dict | None = None


def resolve_groups(trace: Trace | None, groups, labels: tuple[str, str] | None = None,
                   num_resamples: int = 1000, seed: int = 0) -> Disparity | None:
    """Turn the ``groups`` argument of the report into a :class:`Disparity` (or None).

    ``groups`` is None (the two domains of ``trace`` with the most tokens, when it has two), False (no
    disparity section), a pair of domain names or ids of ``trace``, a pair of :class:`Trace` (two input data
    sets, ``labels`` naming them), or a ready :class:`Disparity`.
    """
    if groups is False or (groups is None and trace is None):
        return None
    if isinstance(groups, Disparity):
        return groups
    kwargs = dict(num_resamples=num_resamples, seed=seed)
    if groups is None:
        domain_T = trace.domain_ids.numpy()
        tokens_O = np.bincount(domain_T[domain_T >= 0]) if (domain_T >= 0).any() else np.zeros(0, dtype=np.int64)
        present = [int(d) for d in np.argsort(-tokens_O, kind="stable") if tokens_O[d] > 0]
        if len(present) < 2:
            return None
        return disparity_by_domain(trace, present[0], present[1], **kwargs)
    if not isinstance(groups, (tuple, list)) or len(groups) != 2:
        raise ValueError("groups must be a pair: two domain names/ids of the trace, or two traces")
    a, b = groups
    if isinstance(a, Trace) and isinstance(b, Trace):
        return routing_disparity(a, b, labels=tuple(labels) if labels else ("A", "B"), **kwargs)
    if trace is None:
        raise ValueError("groups given as domains need a trace")
    if labels:
        kwargs["labels"] = tuple(labels)
    return disparity_by_domain(trace, a, b, **kwargs)


def analyse(trace: Trace | None = None, metrics_path: str | os.PathLike | None = None, groups=None, *,
            title: str = "moekit routing report", labels: tuple[str, str] | None = None,
            num_resamples: int = 1000, seed: int = 0) -> Analysis:
    """Compute the report's content from a trace and/or a ``metrics.jsonl`` (at least one)."""
    if trace is None and metrics_path is None:
        raise ValueError("a report needs a trace, a metrics file, or both")
    return Analysis(
        title=title,
        trace=TraceStats.of(trace, seed=seed) if trace is not None else None,
        disparity=resolve_groups(trace, groups, labels, num_resamples=num_resamples, seed=seed),
        metrics=read_metrics(metrics_path) if metrics_path is not None else None,
        trace_source=dict(trace.source) if trace is not None else None,
        trace_model=dict(trace.model) if trace is not None else None)


def report_inputs(path: str | os.PathLike) -> tuple[Trace | None, Path | None]:
    """What ``moekit report RUN|TRACE`` reads: ``(trace, metrics_path)``.

    A file is loaded as a trace. A folder (a run) gives its ``metrics.jsonl`` and, when present, its
    ``trace.safetensors``. ``ValueError`` (one sentence) when there is nothing to report on.
    """
    path = Path(path)
    if path.is_file():
        return load_trace(path), None
    if not path.is_dir():
        raise ValueError(f"{path} is neither a run folder nor a trace file")
    trace = load_trace(path / TRACE_FILE) if (path / TRACE_FILE).is_file() else None
    metrics = path / METRICS_FILE if (path / METRICS_FILE).is_file() else None
    if trace is None and metrics is None:
        raise ValueError(f"{path} holds neither {METRICS_FILE} nor {TRACE_FILE}")
    return trace, metrics
