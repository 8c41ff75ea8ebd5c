"""``moekit compress-report``: every compression method at several budgets on one run, measured the same way.

For each entry (a method at a budget) the compressed run is built by the ordinary commands, in-process
(``moekit prune`` / ``moekit merge`` for pruning and merging, ``moekit quantize`` -- the
:mod:`moekit.compress.quant` API behind it -- for quantisation), into a temporary work folder, then measured:

* **quality**: validation bits per byte, overall and per domain (:func:`moekit.train.evaluate` on the same
  validation windows for every entry);
* **router agreement** with the original: on the first validation windows, for every token and MoE layer, the
  share of the original's top-k experts that the compressed model also selects (a merged expert counts as
  every original expert of its cluster; quantised models keep the expert ids), averaged over tokens and layers;
* **size**: bytes of the expert weights (state-dict tensors under ``.experts.``) and of ``model.safetensors``;
* **speed**: batch-1 greedy decode tokens/s (KV cache, one thread), the median of several timed runs after a
  warm-up; the original is timed the same way right before each entry (same process, adjacent in time, so a
  machine whose load changes affects both alike) and the ratio is to that adjacent measurement.

Outputs in OUT_DIR (written into a temporary sibling folder and renamed into place): ``report.json`` (every
figure), ``report.md`` (the table), ``size_quality.png`` (bits per byte against file bytes, the Pareto front
of entries not beaten on both drawn as a line) and ``index.html`` (table + plot).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Entry", "ReportConfig", "pareto_front", "plan_entries", "router_agreement", "run_report",
           "write_outputs"]


@dataclass
class ReportConfig:
    """What the report measures. ``quick`` picks the small preset (see :meth:`preset`)."""

    prune_methods: tuple = ("frequency", "reap", "easy_ep", "naee", "dern")
    merge_methods: tuple = ("hc_smoe", "uncurl")
    keeps: tuple = (0.75, 0.5, 0.25)
    quant: tuple = (("rtn", 8), ("rtn", 4), ("rtn", 3), ("gptq", 3), ("rtn", 2))
    eval_windows: int = 200
    calib_tokens: int = 32768
    naee_tokens: int = 2048
    agreement_windows: int = 8
    decode_tokens: int = 64
    decode_repeats: int = 5

    def __post_init__(self):
        for k in self.keeps:
            if not 0 < k <= 1:
                raise ValueError(f"keep fractions must be in (0, 1], got {k}")
        for name in ("eval_windows", "calib_tokens", "naee_tokens", "agreement_windows", "decode_tokens",
                     "decode_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def preset(cls, quick: bool) -> "ReportConfig":
        if not quick:
            return cls()
        return cls(keeps=(0.75, 0.5), quant=(("rtn", 8), ("rtn", 4), ("rtn", 2)), eval_windows=40,
                   calib_tokens=8192, naee_tokens=512, agreement_windows=4, decode_tokens=32, decode_repeats=3)


@dataclass
class Entry:
    kind: str      # prune | merge | quantize
    method: str
    budget: str    # "keep 0.5" / "4 bits"
    argv: list

    @property
    def label(self) -> str:
        return f"{self.method} {self.budget}"


def plan_entries(run: str, work: str, cfg: ReportConfig) -> list[Entry]:
    """The entries to build; keeps that would leave fewer experts than top-k are clamped (``--clamp-top-k``)."""
    out = []
    common = ["--calib-tokens", str(cfg.calib_tokens), "--no-progress", "--json", "--allow-undercalibrated"]
    for kind, methods in (("prune", cfg.prune_methods), ("merge", cfg.merge_methods)):
        for m in methods:
            for k in cfg.keeps:
                dest = os.path.join(work, f"{m}-{k}")
                argv = [kind, run, dest, "--method", m, "--keep", str(k), "--clamp-top-k", *common]
                if m == "naee":
                    argv += ["--naee-tokens", str(cfg.naee_tokens)]
                out.append(Entry(kind, m, f"keep {k}", argv))
    for m, b in cfg.quant:
        dest = os.path.join(work, f"{m}-{b}bit")
        argv = ["quantize", run, dest, "--method", m, "--bits", str(b), "--json"]
        if m in ("gptq", "agq"):
            argv += ["--calib-tokens", str(cfg.calib_tokens)]
        out.append(Entry("quantize", m, f"{b} bits", argv))
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when both coordinates are to be minimised (size, bits per byte),
    sorted by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


# ------------------------------------------------------------------------------------------------ measures
def _expert_groups(folder: Path, model) -> dict[int, list[list[int]]] | None:
    """Original expert ids behind each expert of a compressed run (None: ids unchanged)."""
    cfg = json.loads((folder / "config.json").read_text())
    rec = cfg.get("compression")
    if not rec:
        return None
    return {int(i): g for i, g in rec["groups"].items()}


@torch.no_grad()
def _routing(model, windows) -> dict[int, list[list[set]]]:
    """Per MoE layer, per window, the set of experts each token is routed to (from the dispatch plans)."""
    from .prune import moe_layer_map

    layers = moe_layer_map(model)
    seen: dict[int, list] = {i: [] for i in layers}
    handles = []
    for i, (_, layer) in layers.items():
        def hook(_layer, x_TD, plan, i=i):
            sets = [set() for _ in range(x_TD.shape[0])]
            for t, e in zip(plan.token_S.tolist(), plan.expert_S.tolist()):
                sets[t].add(e)
            seen[i].append(sets)
            return None
        handles.append(layer.register_plan_hook(hook))
    try:
        for ids in windows:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def router_agreement(orig: dict, comp: dict, groups: dict | None) -> float:
    """Mean over tokens and layers of ``|O ∩ members(C)| / |O|`` (``O`` the original's experts of the token,
    ``C`` the compressed model's, mapped to original ids through ``groups``)."""
    total, n = 0.0, 0
    for i, calls in orig.items():
        g = groups.get(i) if groups else None
        for o_calls, c_calls in zip(calls, comp.get(i, [])):
            for o, c in zip(o_calls, c_calls):
                if not o:
                    continue
                mapped = set(c) if g is None else {m for e in c for m in g[e]}
                total += len(o & mapped) / len(o)
                n += 1
    return total / n if n else float("nan")


def _expert_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if ".experts." in k)


def _decode_rate(model, tokens: int, repeats: int) -> float:
    from ..data import BOS_ID
    from ..model import generate_batch

    prompt = [BOS_ID, *b"def main():\n    "]
    generate_batch(model, [prompt], 4, temperature=0.0, eos_id=None, threads=1)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = generate_batch(model, [prompt], tokens, temperature=0.0, eos_id=None, threads=1)
        rates.append(r[0].new_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def _measure(model, folder: Path | None, corpus, seq_len: int, batch: int, cfg: ReportConfig, windows,
             orig_routing) -> dict:
    from ..train import evaluate

    ev = evaluate(model, corpus, seq_len, batch, cfg.eval_windows)
    out = {"bits_per_byte": ev["bits_per_byte"],
           "domains": {d: v["bits_per_byte"] for d, v in ev["domains"].items()},
           "domain_tokens": {d: v["tokens"] for d, v in ev["domains"].items()},
           "expert_bytes": _expert_bytes(model),
           "tokens_per_s": _decode_rate(model, cfg.decode_tokens, cfg.decode_repeats)}
    if folder is not None:
        out["file_bytes"] = (folder / "model.safetensors").stat().st_size
    if orig_routing is not None:
        groups = _expert_groups(folder, model) if folder is not None else None
        out["router_agreement"] = router_agreement(orig_routing, _routing(model, windows), groups)
    else:
        out["router_agreement"] = 1.0
    return out


def run_report(run: str, cfg: ReportConfig, *, progress: bool = True, log=None) -> dict:
    """Build and measure every entry; returns the report dictionary (see :func:`write_outputs`)."""
    from ..cli import main as cli_main
    from ..commands import _load_data
    from ..data import val_batches
    from ..train import load_run
    from ..train.config import run_data_path

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_path = Path(run)
    model, rcfg = load_run(run_path)
    corpus = _load_data(run_data_path(rcfg))
    seq_len, batch = rcfg["train"]["seq_len"], rcfg["train"]["batch_size"]
    windows = [vb.input_ids for vb in val_batches(corpus, 1, seq_len, cfg.agreement_windows)]
    t_start = time.perf_counter()
    orig_routing = _routing(model, windows)
    base = _measure(model, run_path, corpus, seq_len, batch, cfg, windows, None)
    base.update(kind="original", method="original", budget="", label="original", seconds=0.0)
    domains_by_size = sorted(base["domain_tokens"], key=lambda d: -base["domain_tokens"][d])
    rows = [base]
    with tempfile.TemporaryDirectory(prefix="moekit-compress-report-") as work:
        entries = plan_entries(str(run_path), work, cfg)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(entries), desc="compress-report", file=sys.stderr, dynamic_ncols=True)
        for entry in entries:
            if bar is not None:
                bar.set_postfix_str(entry.label)
            t0 = time.perf_counter()
            sink_out, sink_err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(sink_out), contextlib.redirect_stderr(sink_err):
                rc = cli_main(entry.argv)
            row = {"kind": entry.kind, "method": entry.method, "budget": entry.budget, "label": entry.label}
            if rc != 0:
                msg = (sink_err.getvalue().strip().splitlines() or [f"exit {rc}"])[-1]
                row["error"] = msg
                log(f"{entry.label}: skipped ({msg})")
            else:
                folder = Path(entry.argv[2])
                cm, _ = load_run(folder)
                # the original's decode rate measured right before, so that the ratio compares like with like
                row["tokens_per_s_original"] = _decode_rate(model, cfg.decode_tokens, cfg.decode_repeats)
                row.update(_measure(cm, folder, corpus, seq_len, batch, cfg, windows, orig_routing))
                del cm
                shutil.rmtree(folder, ignore_errors=True)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    for r in rows:
        if "tokens_per_s" in r:
            r["decode_ratio"] = r["tokens_per_s"] / r.get("tokens_per_s_original", base["tokens_per_s"])
            r["delta_bits_per_byte"] = r["bits_per_byte"] - base["bits_per_byte"]
    ok = [i for i, r in enumerate(rows) if "file_bytes" in r]
    front = pareto_front([(rows[i]["file_bytes"], rows[i]["bits_per_byte"]) for i in ok])
    for j in front:
        rows[ok[j]]["pareto"] = True
    return {"run": str(run_path.resolve()), "config": asdict(cfg), "rows": rows, "domains_by_size": domains_by_size,
            "seconds": time.perf_counter() - t_start,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


# ------------------------------------------------------------------------------------------------ outputs
def _top_domains(report: dict, n: int) -> list[str]:
    """The ``n`` domains with most validation bytes in the original's evaluation (stored order)."""
    return list(report.get("domains_by_size", []))[:n] or sorted(report["rows"][0]["domains"])[:n]


def markdown_table(report: dict) -> str:
    doms = _top_domains(report, 4)
    head = ["method", "budget", "bits/byte", "Δ", *doms, "router agreement", "expert bytes", "file bytes",
            "decode tok/s (x orig)", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['budget']} | skipped: {r['error']} |" + " |" * (len(head) - 3))
            continue
        cells = [r["method"], r["budget"] or "-", f"{r['bits_per_byte']:.4f}", f"{r['delta_bits_per_byte']:+.4f}",
                 *[f"{r['domains'].get(d, float('nan')):.4f}" for d in doms], f"{r['router_agreement']:.3f}",
                 f"{r['expert_bytes']:,}", f"{r.get('file_bytes', 0):,}",
                 f"{r['tokens_per_s']:.1f} ({r['decode_ratio']:.2f})", "yes" if r.get("pareto") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "file_bytes" in r]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    kinds = {"original": ("k", "*"), "prune": ("tab:blue", "o"), "merge": ("tab:green", "s"),
             "quantize": ("tab:red", "^")}
    for kind, (color, marker) in kinds.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter([r["file_bytes"] / 1e6 for r in pts], [r["bits_per_byte"] for r in pts], c=color,
                       marker=marker, label=kind, zorder=3)
            for r in pts:
                ax.annotate(r["label"], (r["file_bytes"] / 1e6, r["bits_per_byte"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
    front = sorted([r for r in rows if r.get("pareto")], key=lambda r: r["file_bytes"])
    ax.plot([r["file_bytes"] / 1e6 for r in front], [r["bits_per_byte"] for r in front], "k--", lw=1,
            label="Pareto front", zorder=2)
    ax.set_xlabel("model.safetensors (MB)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("size vs quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _html(report: dict, table_md: str) -> str:
    import html

    rows = table_md.strip().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[2:])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>moekit compress-report</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}"
            f"td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}</style></head><body>"
            f"<h1>Compression report</h1><p>run: {html.escape(report['run'])}; {report['seconds']:.0f} s; "
            f"{len(report['rows']) - 1} entries</p><img src='size_quality.png' alt='size vs quality'>"
            f"<table><tr>{head}</tr>{body}</table></body></html>\n")


def write_outputs(report: dict, out_dir: str | os.PathLike) -> Path:
    """``report.json``, ``report.md``, ``size_quality.png`` and ``index.html`` in a temporary sibling folder,
    renamed to ``out_dir``."""
    from ..io import atomic_write_bytes, atomic_write_json, temp_sibling_dir

    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"OUT_DIR {out} already exists")
    tmp = temp_sibling_dir(out)
    try:
        table = markdown_table(report)
        atomic_write_json(tmp / "report.json", report)
        atomic_write_bytes(tmp / "report.md", table.encode())
        plot(report, tmp / "size_quality.png")
        atomic_write_bytes(tmp / "index.html", _html(report, table).encode())
        if out.exists():
            raise ValueError(f"OUT_DIR {out} appeared while writing; nothing written")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
