"""``moekit compress-report RUN OUT_DIR [--quick]``: every pruning, merging and quantisation method at several
budgets on one run (:mod:`moekit.compress.report`), as a Markdown/JSON table and a size-vs-quality plot with its
Pareto front in an HTML page."""
from __future__ import annotations

import sys
from pathlib import Path


def add_compress_report(sub) -> None:
    p = sub.add_parser("compress-report", help="every compression method at several budgets: quality, router "
                       "agreement, size and decode speed (table + Pareto plot)")
    p.add_argument("run", help="moekit run folder")
    p.add_argument("out_dir", help="folder to write (must not exist): report.json, report.md, size_quality.png, "
                   "index.html")
    p.add_argument("--quick", action="store_true",
                   help="fewer budgets, calibration and evaluation tokens (about 10 minutes on 2 CPU cores for the "
                        "default run)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of methods to run (e.g. frequency,reap,rtn); default: all")
    p.add_argument("--keeps", default=None, help="comma-separated keep fractions (default 0.75,0.5,0.25; quick "
                   "0.75,0.5)")
    p.add_argument("--eval-windows", type=int, default=None, help="validation windows per entry")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compress_report)


def cmd_compress_report(args) -> int:
    from dataclasses import replace

    from .compress.report import ReportConfig, run_report, write_outputs

    run, out = Path(args.run), Path(args.out_dir)
    if not (run / "config.json").is_file():
        raise ValueError(f"RUN {run} is not a run folder (no config.json)")
    if out.exists() or out.is_symlink():
        raise ValueError(f"OUT_DIR {out} already exists; choose a new folder")
    if out.resolve() == run.resolve() or out.resolve().is_relative_to(run.resolve()):
        raise ValueError(f"OUT_DIR {out} must lie outside RUN {run}")
    cfg = ReportConfig.preset(args.quick)
    if args.keeps:
        try:
            keeps = tuple(float(k) for k in args.keeps.split(","))
        except ValueError:
            raise ValueError(f"--keeps must be comma-separated numbers, got {args.keeps!r}") from None
        cfg = replace(cfg, keeps=keeps)
    if args.eval_windows is not None:
        cfg = replace(cfg, eval_windows=args.eval_windows)
    if args.methods:
        wanted = set(args.methods.split(","))
        known = set(cfg.prune_methods) | set(cfg.merge_methods) | {m for m, _ in cfg.quant}
        unknown = wanted - known
        if unknown:
            raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from {sorted(known)}")
        cfg = replace(cfg, prune_methods=tuple(m for m in cfg.prune_methods if m in wanted),
                      merge_methods=tuple(m for m in cfg.merge_methods if m in wanted),
                      quant=tuple(q for q in cfg.quant if q[0] in wanted))
    report = run_report(str(run), cfg, progress=not args.no_progress)
    write_outputs(report, out)
    print(f"compress-report: {len(report['rows']) - 1} entries in {report['seconds']:.0f}s -> {out}/index.html",
          file=sys.stderr)
    return 0
