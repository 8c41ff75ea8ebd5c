"""``build_report``: an ``index.html`` with PNG plots (relative links) and a ``summary.txt`` in one folder.

Sections, each present when its input is: training (MaxVio and loss over steps, expert-load share over steps,
from ``metrics.jsonl``); load and balance per layer (load bars, MaxVio, routing entropy); co-activation within
a layer; cross-layer transitions and predictability (after Fate, 2025); domain x expert specialisation; the
routing-disparity profile of two input groups (GateBreaker, arXiv:2512.21008; EASY-EP, 2025).

Legend (docs/architecture.md): I layers, E experts, O domains.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from ..trace.format import Trace
from .analysis import Analysis, analyse
from .summary import summary_text

__all__ = ["build_report"]

plots = None  # moekit.report.plots, imported by build_report (matplotlib is needed only to draw)


def _import_plots() -> None:
    global plots
    if plots is None:
        try:
            from . import plots as module
        except ImportError as exc:
            raise ImportError(f"moekit report needs matplotlib to draw its plots (pip install matplotlib): "
                              f"{exc}") from None
        plots = module


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .9em; margin: .8em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; } th { background: #f4f4f4; }
td.l, th.l { text-align: left; } img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; } p.note { color: #555; }
"""


class _Page:
    """Accumulates HTML sections."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def p(self, text: str, note: bool = False) -> None:
        self.parts.append(f"<p{' class=note' if note else ''}>{html.escape(text)}</p>")

    def img(self, path: Path, alt: str) -> None:
        self.parts.append(f'<img src="{html.escape(path.name)}" alt="{html.escape(alt)}">')

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, header: list[str], rows: list[list], left: int = 1) -> None:
        def cell(tag: str, i: int, v) -> str:
            cls = " class=l" if i < left else ""
            return f"<{tag}{cls}>{html.escape(v if isinstance(v, str) else _fmt(v))}</{tag}>"

        head = "".join(cell("th", i, h) for i, h in enumerate(header))
        body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def render(self) -> str:
        return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(self.title)}</h1>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")


def _fmt(v) -> str:
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    v = float(v)
    return "n/a" if not np.isfinite(v) else f"{v:.3f}"


def _layer_labels(names: list[str]) -> list[str]:
    return [f"L{l} {name}" if name else f"L{l}" for l, name in enumerate(names)]


def _row_normalise(mats: np.ndarray) -> np.ndarray:
    totals = mats.sum(axis=-1, keepdims=True).astype(np.float64)
    return np.divide(mats, totals, out=np.zeros(mats.shape), where=totals > 0)


def _training_section(page: _Page, an: Analysis, out: Path) -> None:
    m = an.metrics
    page.h2("Training (metrics.jsonl)")
    page.p(f"{m.num_records} records from {m.path}" + (f"; {m.skipped_lines} unreadable lines skipped"
                                                       if m.skipped_lines else ""), note=True)
    if m.has_max_vio:
        page.img(plots.step_lines(out / "train_max_vio.png", m.steps, {"layer": m.max_vio},
                                  "MaxVio per layer over training", "MaxVio"), "MaxVio over steps")
    series = {k: v for k, v in (("loss", m.loss), ("bits/byte", m.bits_per_byte),
                                ("val bits/byte", m.val_bits_per_byte)) if np.isfinite(v).any()}
    if series:
        page.img(plots.step_lines(out / "train_loss.png", m.steps, series, "loss over training", "value"),
                 "loss over steps")
    if m.has_load:
        labels = _layer_labels([""] * m.load.shape[1])
        page.img(plots.load_evolution(out / "train_load.png", m.steps, m.load, labels), "load share over steps")


def _uniform_entropy(ts) -> str:
    """``log2 E = 4.00``, or per layer when the layers have different expert counts."""
    if not ts.uneven_experts:
        return f"log2 E = {np.log2(ts.num_experts):.2f}"
    return "log2 E per layer = " + ", ".join(f"{np.log2(e):.2f}" for e in ts.num_experts_per_layer)


def _load_section(page: _Page, an: Analysis, out: Path, labels: list[str]) -> None:
    ts = an.trace
    page.h2("Expert load and balance")
    page.p("Share of the routed (token, expert) assignments per expert; the dashed line is the uniform share "
           "1/E. MaxVio = (max load - mean load) / mean load. Entropy in bits of the mean routing distribution "
           f"({_uniform_entropy(ts)} when uniform) and, with logits, the mean per-token entropy "
           "of softmax(logits).", note=True)
    share = _row_normalise(ts.load)
    page.img(plots.bars_per_layer(out / "load.png", share, labels, "expert load share per layer", "share",
                                  reference=[1.0 / e for e in ts.num_experts_per_layer],
                                  experts_per_layer=ts.num_experts_per_layer), "expert load per layer")
    header = ["layer", "tokens routed", "MaxVio", "load entropy (bits)"]
    rows = [[labels[l], int(ts.load[l].sum()), ts.max_vio[l], ts.load_entropy[l]] for l in range(ts.num_layers)]
    if ts.token_entropy is not None:
        header.append("mean token entropy (bits)")
        for l, row in enumerate(rows):
            row.append(ts.token_entropy[l])
    page.table(header, rows)


def _structure_section(page: _Page, an: Analysis, out: Path, labels: list[str]) -> None:
    ts = an.trace
    if ts.top_k > 1:
        page.h2("Co-activation within a layer")
        page.p("P(j | i): of the tokens routed to expert i (row), the fraction also routed to expert j (column); "
               "the diagonal is left out.", note=True)
        cond = ts.coactivation.astype(np.float64)
        diag = np.diagonal(cond, axis1=1, axis2=2)[:, :, None]
        cond = np.divide(cond, diag, out=np.zeros_like(cond), where=diag > 0)
        cond[:, np.arange(ts.num_experts), np.arange(ts.num_experts)] = np.nan
        page.img(plots.heatmaps(out / "coactivation.png", cond, labels, "co-activation P(j | i)", "expert j",
                                "expert i", vmin=0.0), "co-activation heatmaps")
    if ts.num_layers < 2:
        return
    page.h2("Cross-layer transitions and predictability")
    page.p("P(expert j at layer l+1 | expert i at layer l) for the same token. Predictability: on a random half "
           "of the tokens the transition counts are estimated; on the other half each token's experts at l+1 "
           "are predicted as the best successors of its experts at l (as many as it used). Hit rate = fraction of "
           "the used experts predicted; top-1 = the highest-weight expert predicted first. The baseline always "
           "predicts the most popular experts of l+1. (Fate, 2025, reports the same metrics for its cross-layer "
           "gate prefetcher.)", note=True)
    pair_labels = [f"L{l}->L{l + 1}" for l in range(ts.num_layers - 1)]
    page.img(plots.heatmaps(out / "transitions.png", _row_normalise(ts.transitions), pair_labels,
                            "transition P(j at l+1 | i at l)", "expert j at l+1", "expert i at l", vmin=0.0),
             "transition matrices")
    p = ts.predictability
    page.img(plots.per_layer_lines(out / "predictability.png",
                                   {"hit rate": p.hit_rate, "top-1": p.top1_accuracy,
                                    "hit rate (popularity)": p.baseline_hit_rate,
                                    "top-1 (popularity)": p.baseline_top1_accuracy},
                                   pair_labels, f"cross-layer prediction ({p.num_eval_tokens:,} held-out tokens)",
                                   "accuracy", ylim=(0.0, 1.02)), "cross-layer predictability")
    page.table(["layers", "hit rate", "top-1", "hit rate (popularity)", "top-1 (popularity)"],
               [[pair_labels[l], p.hit_rate[l], p.top1_accuracy[l], p.baseline_hit_rate[l],
                 p.baseline_top1_accuracy[l]] for l in range(ts.num_layers - 1)])


def _domain_section(page: _Page, an: Analysis, out: Path, labels: list[str]) -> None:
    ts = an.trace
    present = ts.domain_tokens > 0
    if not present.any():
        return
    page.h2("Domain x expert specialisation")
    page.p("Fraction of each domain's tokens routed to each expert.", note=True)
    names = [n for n, keep in zip(ts.domain_names, present) if keep]
    page.img(plots.heatmaps(out / "domain_expert.png", ts.domain_frequency[:, present], labels,
                            "routing frequency by domain", "expert", "domain", yticklabels=names, vmin=0.0),
             "domain x expert heatmaps")
    page.table(["domain", "tokens"], [[n, int(t)] for n, t in zip(names, ts.domain_tokens[present])])


def _disparity_section(page: _Page, an: Analysis, out: Path, labels: list[str]) -> None:
    d = an.disparity
    page.h2(f"Routing disparity: {d.label_a} vs {d.label_b}")
    page.p(f"Per (layer, expert): routing {d.measure} of {d.label_a} ({d.tokens_a:,} tokens, {d.units_a:,} "
           f"{d.unit}s) minus that of {d.label_b} ({d.tokens_b:,} tokens, {d.units_b:,} {d.unit}s), with "
           f"{round(100 * d.confidence)}% bootstrap intervals ({d.num_resamples} resamples of {d.unit}s, seed "
           f"{d.seed}); red intervals exclude 0. No correction for the {d.difference.size} comparisons. Expert "
           "profiling as in GateBreaker (arXiv:2512.21008) and EASY-EP (2025).", note=True)
    page.img(plots.disparity_plot(out / "disparity.png", d, labels), "routing disparity")
    top = d.top(20)
    if top:
        page.table(["layer", "expert", f"{d.label_a}", f"{d.label_b}", "difference", "CI low", "CI high"],
                   [[labels[x.layer], x.expert, x.value_a, x.value_b, x.difference, x.ci_low, x.ci_high]
                    for x in top], left=1)
    else:
        page.p("No expert's interval excludes 0.")


def build_report(out_dir: str | os.PathLike, trace: Trace | None = None,
                 metrics_path: str | os.PathLike | None = None, groups=None,
                 title: str = "moekit routing report", *, analysis: Analysis | None = None,
                 labels: tuple[str, str] | None = None, num_resamples: int = 1000, seed: int = 0) -> Path:
    """Write ``index.html``, its PNG plots and ``summary.txt`` into ``out_dir``; return the path of index.html.

    Give a trace, a metrics file (a run's ``metrics.jsonl``), or both. ``groups`` picks the two input groups
    of the disparity profile (see :func:`moekit.report.analysis.resolve_groups`: None = the trace's two largest
    domains, False = none, a pair of domain names/ids, or a pair of traces named by ``labels``). Pass
    ``analysis`` (from :func:`moekit.report.analyse`) to reuse computed statistics. Files are written
    atomically; existing files of the same names are replaced.
    """
    _import_plots()
    an = analysis if analysis is not None else analyse(trace, metrics_path, groups, title=title, labels=labels,
                                                       num_resamples=num_resamples, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = _Page(an.title)
    summary = summary_text(analysis=an)
    page.pre(summary)
    if an.trace is not None:
        info = {"source": an.trace_source, "model": an.trace_model}
        page.p("trace " + json.dumps({k: v for k, v in info.items() if v}, sort_keys=True), note=True)
    if an.metrics is not None:
        _training_section(page, an, out)
    if an.trace is not None:
        labels_I = _layer_labels(an.trace.layer_names)
        _load_section(page, an, out, labels_I)
        _structure_section(page, an, out, labels_I)
        _domain_section(page, an, out, labels_I)
    if an.disparity is not None:
        _disparity_section(page, an, out, _layer_labels(an.disparity.layer_names))
    atomic_write_bytes(out / "summary.txt", (summary + "\n").encode("utf-8"))
    index = out / "index.html"
    atomic_write_bytes(index, page.render().encode("utf-8"))
    return index
