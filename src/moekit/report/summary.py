"""The short terminal summary of a report (a few lines of plain text)."""
from __future__ import annotations

import math
import os

import numpy as np

from ..trace.disparity import Disparity
from ..trace.format import Trace
from .analysis import Analysis, analyse

__all__ = ["summary_text", "format_disparate"]


def _nums(values, fmt: str = "{:.2f}") -> str:
    return " ".join("n/a" if not math.isfinite(float(v)) else fmt.format(float(v)) for v in values)


def format_disparate(d: Disparity, n: int = 5) -> str:
    """``L2 E7 +0.310 [+0.250, +0.370]`` for the ``n`` most disproportionate experts, comma-separated."""
    return ", ".join(f"L{x.layer} E{x.expert} {x.difference:+.3f} [{x.ci_low:+.3f}, {x.ci_high:+.3f}]"
                     for x in d.top(n))


def _trace_lines(an: Analysis) -> list[str]:
    ts = an.trace
    experts = ("/".join(map(str, ts.num_experts_per_layer)) if ts.uneven_experts else str(ts.num_experts))
    lines = [f"trace: {ts.num_tokens:,} tokens, {ts.num_layers} MoE layers x {experts} experts, "
             f"up to {ts.top_k} per token"]
    domains = [f"{name} ({int(n):,})" for name, n in zip(ts.domain_names, ts.domain_tokens) if n > 0]
    if domains:
        lines[-1] += "; domains: " + ", ".join(domains)
    lines.append(f"MaxVio per layer: {_nums(ts.max_vio)} (mean {float(np.mean(ts.max_vio)):.2f})")
    most = (_nums([math.log2(e) for e in ts.num_experts_per_layer]) if ts.uneven_experts
            else f"{math.log2(ts.num_experts):.2f}")
    entropy = f"routing entropy, bits (max {most}): load {_nums(ts.load_entropy)}"
    if ts.token_entropy is not None:
        entropy += f"; mean per token {_nums(ts.token_entropy)}"
    lines.append(entropy)
    p = ts.predictability
    if ts.num_layers > 1:
        pairs = ", ".join(f"L{l}->L{l + 1} {_nums([p.hit_rate[l]])}/{_nums([p.top1_accuracy[l]])} "
                          f"({_nums([p.baseline_hit_rate[l]])}/{_nums([p.baseline_top1_accuracy[l]])})"
                          for l in range(ts.num_layers - 1))
        lines.append(f"cross-layer prediction, hit rate/top-1 (popularity baseline): {pairs}")
    return lines


def _disparity_lines(d: Disparity) -> list[str]:
    sig = int(d.significant.sum())
    head = (f"disparity {d.label_a} - {d.label_b} (routing {d.measure}, {round(100 * d.confidence)}% CI, "
            f"{d.num_resamples} resamples of {d.unit}s): {sig} of {d.difference.size} (layer, expert) cells "
            f"differ")
    return [head + (f"; top: {format_disparate(d)}" if sig else "")]


def _metrics_lines(an: Analysis) -> list[str]:
    m = an.metrics
    line = f"training: {m.num_records} records up to step {int(np.nanmax(m.steps)):,}"
    finite = np.isfinite(m.loss)
    if finite.any():
        line += f", last loss {m.loss[finite][-1]:.3f}"
    bpb = np.isfinite(m.bits_per_byte)
    if bpb.any():
        line += f", bits/byte {m.bits_per_byte[bpb][-1]:.3f}"
    val = np.isfinite(m.val_bits_per_byte)
    if val.any():
        line += f", val bits/byte {m.val_bits_per_byte[val][-1]:.3f}"
    lines = [line]
    if m.has_max_vio:
        rows = np.isfinite(m.max_vio).all(axis=1)
        if rows.any():
            lines.append(f"training MaxVio per layer (last record): {_nums(m.max_vio[rows][-1])}")
    return lines


def summary_text(trace: Trace | None = None, metrics_path: str | os.PathLike | None = None, groups=None, *,
                 analysis: Analysis | None = None, **kwargs) -> str:
    """A few lines for the terminal: tokens and layers, MaxVio per layer, routing entropy, cross-layer
    predictability, the most disproportionate experts, and the last training metrics.

    Pass the ``analysis`` returned by :func:`moekit.report.analyse` to avoid recomputing; otherwise the
    arguments are those of :func:`moekit.report.build_report`.
    """
    an = analysis if analysis is not None else analyse(trace, metrics_path, groups, **kwargs)
    lines: list[str] = []
    if an.trace is not None:
        lines += _trace_lines(an)
    if an.disparity is not None:
        lines += _disparity_lines(an.disparity)
    if an.metrics is not None:
        lines += _metrics_lines(an)
    return "\n".join(lines)
