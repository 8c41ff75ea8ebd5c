"""PNG plots of the report, drawn with matplotlib's Agg renderer on standalone ``Figure`` objects (no pyplot
global state, no display needed). Each function writes one file atomically and returns its path.

Legend (docs/architecture.md): W logged steps, I layers, E experts, O domains.
"""
from __future__ import annotations

import math
import textwrap
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..io import temp_sibling
from ..trace.disparity import Disparity

__all__ = ["bars_per_layer", "heatmaps", "per_layer_lines", "disparity_plot", "load_evolution", "step_lines"]

_DPI = 90
_MAX_COLUMNS = 400  # steps per load-evolution heatmap (longer runs are averaged into bins)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _grid(n: int, ncols: int = 4, panel: tuple[float, float] = (3.4, 2.8), title: str = ""):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows + (0.5 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(textwrap.fill(title, max(40, int(ncols * panel[0] * 11))), fontsize=10)
    return fig, axes[:n]


def _bin_columns(steps_X: np.ndarray, values_XX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average runs of consecutive steps so at most ``_MAX_COLUMNS`` remain."""
    n = steps_X.size
    if n <= _MAX_COLUMNS:
        return steps_X, values_XX
    edges = np.linspace(0, n, _MAX_COLUMNS + 1).astype(int)
    steps = np.array([steps_X[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    with np.errstate(invalid="ignore"):
        values = np.stack([np.nanmean(values_XX[a:b], axis=0) for a, b in zip(edges[:-1], edges[1:])])
    return steps, values


def bars_per_layer(path: Path, values_IE: np.ndarray, layer_labels: Sequence[str], title: str, ylabel: str,
                   reference: float | Sequence[float] | None = None,
                   experts_per_layer: Sequence[int] | None = None) -> Path:
    """One bar chart per layer (experts on x), with an optional horizontal reference line (one value, or one
    per layer); ``experts_per_layer`` limits each layer's bars to its own experts."""
    fig, axes = _grid(len(layer_labels), title=title)
    L, E = values_IE.shape
    widths = list(experts_per_layer) if experts_per_layer is not None else [E] * L
    refs = [reference] * L if reference is None or np.isscalar(reference) else list(reference)
    for ax, label, row, E_l, ref in zip(axes, layer_labels, values_IE, widths, refs):
        ax.bar(np.arange(E_l), row[:E_l], color="tab:blue", width=0.8)
        if ref is not None:
            ax.axhline(ref, color="tab:red", lw=1, ls="--")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel(ylabel)
    return _save(fig, path)


def heatmaps(path: Path, mats_XRC: np.ndarray, labels: Sequence[str], title: str, xlabel: str, ylabel: str,
             cmap: str = "viridis", yticklabels: Sequence[str] | None = None, vmin: float | None = None,
             vmax: float | None = None) -> Path:
    """A grid of heatmaps with a colour bar each."""
    fig, axes = _grid(len(labels), title=title)
    for ax, label, mat in zip(axes, labels, mats_XRC):
        im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if yticklabels is not None and len(yticklabels) <= 30:
            ax.set_yticks(np.arange(len(yticklabels)), [str(t)[:14] for t in yticklabels], fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.85)
    return _save(fig, path)


def per_layer_lines(path: Path, series: dict[str, np.ndarray], xlabels: Sequence[str], title: str,
                    ylabel: str, ylim: tuple[float, float] | None = None) -> Path:
    """Named series over layers (or layer pairs) as lines with markers."""
    fig = Figure(figsize=(max(5.0, 0.45 * len(xlabels) + 3), 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(xlabels))
    for name, values in series.items():
        ax.plot(x, values, marker="o", label=name)
    ax.set_xticks(x, list(xlabels), rotation=45 if len(xlabels) > 8 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def disparity_plot(path: Path, disparity: Disparity, layer_labels: Sequence[str]) -> Path:
    """Per layer: difference A - B per expert with its confidence interval; intervals excluding 0 in red."""
    pct = round(100 * disparity.confidence)
    title = (f"routing {disparity.measure} difference {disparity.label_a} - {disparity.label_b} "
             f"({pct}% bootstrap CI, {disparity.num_resamples} resamples of {disparity.unit}s)")
    fig, axes = _grid(len(layer_labels), title=title)
    E = disparity.difference.shape[1]
    x = np.arange(E)
    for l, (ax, label) in enumerate(zip(axes, layer_labels)):
        diff, lo, hi = disparity.difference[l], disparity.ci_low[l], disparity.ci_high[l]
        sig = disparity.significant[l]
        for mask, color in ((~sig, "tab:gray"), (sig, "tab:red")):
            if mask.any():
                ax.errorbar(x[mask], diff[mask], yerr=np.stack([diff[mask] - lo[mask], hi[mask] - diff[mask]]),
                            fmt="o", ms=3, color=color, ecolor=color, elinewidth=1, capsize=2)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel(f"{disparity.measure} diff")
    return _save(fig, path)


def load_evolution(path: Path, steps_X: np.ndarray, load_XIE: np.ndarray, layer_labels: Sequence[str]) -> Path:
    """Per layer: each expert's share of the assignments (rows) over training steps (columns)."""
    totals = np.nansum(load_XIE, axis=2, keepdims=True)  # NaN: experts a narrower layer does not have
    with np.errstate(invalid="ignore", divide="ignore"):
        share_XIE = load_XIE / totals
    steps, share = _bin_columns(steps_X, share_XIE.reshape(len(steps_X), -1))
    share_XIE = share.reshape(len(steps), *load_XIE.shape[1:])
    fig, axes = _grid(len(layer_labels), title="expert load share over training (metrics.jsonl)")
    E = load_XIE.shape[2]
    left, right = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)
    for l, (ax, label) in enumerate(zip(axes, layer_labels)):
        im = ax.imshow(share_XIE[:, l].T, aspect="auto", interpolation="nearest", cmap="magma", origin="lower",
                       extent=(left, right, -0.5, E - 0.5), vmin=0.0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, shrink=0.85)
    return _save(fig, path)


def step_lines(path: Path, steps_X: np.ndarray, series: dict[str, np.ndarray], title: str, ylabel: str,
               logy: bool = False) -> Path:
    """Series over training steps (NaN gaps skipped); a 2-D series ``[W, I]`` gives one line per layer."""
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, values in series.items():
        values = np.asarray(values, dtype=np.float64)
        columns = values.reshape(len(steps_X), -1)
        for j in range(columns.shape[1]):
            ok = np.isfinite(columns[:, j])
            if ok.any():
                label = name if columns.shape[1] == 1 else f"{name} {j}"
                ax.plot(steps_X[ok], columns[ok, j], lw=1, label=label, marker="o" if ok.sum() < 30 else None,
                        ms=3)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles and len(handles) <= 16:
        ax.legend(fontsize=7, ncols=2 if len(handles) > 6 else 1)
    return _save(fig, path)
