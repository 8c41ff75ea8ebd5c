"""``moekit offload SRC OUT`` (write an expert store) and the ``--expert-budget`` flags of ``moekit generate``
(offloaded generation through :mod:`moekit.serve.offload`). Bad input raises ``ValueError``, which
``moekit.cli`` prints as one line with exit code 2."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def add_offload(sub) -> None:
    p = sub.add_parser("offload", help="write a model's experts to an expert store (one file per layer and expert)")
    p.add_argument("src", help="a moekit run folder or a transformers checkpoint folder")
    p.add_argument("out", help="store folder to create")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=cmd_offload)


def _is_run(src: Path) -> bool:
    """Whether ``src`` holds a moekit run's config.json (a transformers checkpoint has its own config.json)."""
    from .io import read_json

    return (src / "config.json").is_file() and read_json(src / "config.json", "config").get("format") == "moekit-run"


def cmd_offload(args) -> int:
    from tqdm import tqdm

    from .serve.offload import write_hf_store, write_run_store
    from .serve.store import ExpertStore

    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise ValueError(f"{src} does not exist or is not a folder")
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder for the expert store")
    if not out.parent.is_dir():
        raise ValueError(f"the folder {out.parent} does not exist")
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is neither a moekit run nor a transformers checkpoint folder (no config.json)")
    t0 = time.perf_counter()
    with tqdm(desc="expert files", unit="file", disable=args.json, leave=False) as bar:
        if _is_run(src):
            write_run_store(src, out, progress=bar.update)
        else:
            write_hf_store(src, out, progress=bar.update)
    st = ExpertStore(out)
    summary = {"store": str(out), "kind": st.model.get("kind"), "layers": len(st.layers),
               "experts": sum(s.num_experts for s in st.layers), "expert_bytes": st.expert_bytes_total,
               "nonexpert_bytes": (out / "nonexpert.safetensors").stat().st_size,
               "seconds": time.perf_counter() - t0}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{out}: {summary['layers']} MoE layers, {summary['experts']} expert files, "
              f"{summary['expert_bytes'] / 2**20:.1f} MiB of experts, "
              f"{summary['nonexpert_bytes'] / 2**20:.1f} MiB of other weights ({summary['seconds']:.1f}s)")
    return 0


# ------------------------------------------------------------------------------------------------ generate
def add_generate_arguments(p) -> None:
    """The offloading flags of ``moekit generate``."""
    from .serve.cache import POLICIES
    from .serve.prefetch import PREFETCHERS

    g = p.add_argument_group("offloaded generation (experts on disk behind a cache)")
    g.add_argument("--expert-budget", type=float, default=None, metavar="FRACTION",
                   help="serve the experts from an expert store with this fraction of each layer's experts in "
                        "memory (e.g. 0.25)")
    g.add_argument("--store", default=None, help="expert store of the run (moekit offload RUN STORE); default: "
                   "written to a temporary folder first")
    g.add_argument("--cache", default="lru", choices=POLICIES, help="cache policy (lru)")
    g.add_argument("--prefetch", default="none", choices=PREFETCHERS, help="prefetcher (none)")
    g.add_argument("--miss-bits", type=int, default=None, choices=(2, 3, 4, 8),
                   help="on a miss compute with a low-bit copy of the expert (HOBBIT; output then differs from the "
                        "resident model) while the full one is read in the background")
    g.add_argument("--cold", action="store_true",
                   help="drop the store's pages from the OS page cache first and after every read (each miss "
                        "reads the disk)")


def check_generate_offload(args) -> None:
    """Flag checks before any work (``ValueError``)."""
    if args.expert_budget is None:
        for flag, default in (("store", None), ("cache", "lru"), ("prefetch", "none"), ("cold", False),
                              ("miss_bits", None)):
            if getattr(args, flag) != default:
                raise ValueError(f"--{flag.replace('_', '-')} needs --expert-budget")
        return
    if not 0.0 < args.expert_budget <= 1.0:
        raise ValueError(f"--expert-budget must be a fraction in (0, 1], got {args.expert_budget}")
    if args.store is not None and not (Path(args.store) / "manifest.json").is_file():
        raise ValueError(f"--store {args.store} is not an expert store (no manifest.json)")


def load_offloaded(args):
    """``(model, engine)`` for ``moekit generate RUN --expert-budget``."""
    from .serve.offload import load_offloaded_run, write_run_store

    from .serve.cache import allocate_slots
    from .train import read_run_config
    from .train.config import check_run_config

    store = args.store
    run = Path(args.run)
    model_cfg, _ = check_run_config(read_run_config(run), str(run / "config.json"))
    moes = list(model_cfg.layer_moes.values())
    allocate_slots([m.num_experts for m in moes], [m.top_k for m in moes], budget=args.expert_budget,
                   policy="lru")  # the budget check before the store is written
    if store is None:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="moekit-store-")
        store = Path(tmp.name) / "store"
        write_run_store(run, store)
    else:
        tmp = None
    model, engine = load_offloaded_run(store, args.expert_budget, args.cache, args.prefetch, cold=args.cold,
                                       run=run, miss_bits=args.miss_bits)
    engine._tmp = tmp
    return model, engine


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``, kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(engine, new_tokens: int, seconds: float) -> dict:
    """The offloading record of ``moekit generate --json`` (also printed on stderr without ``--json``)."""
    s = engine.stats()
    engine.close()
    return {"tokens_per_s": new_tokens / max(seconds, 1e-9), "peak_rss_bytes": peak_rss_bytes(), **s}


def print_report(rec: dict) -> None:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    print(f"offload: policy {rec['policy']}, prefetch {rec['prefetch']}, budget {rec['budget']:g} "
          f"({rec['resident_expert_bytes'] / 2**20:.1f} MiB of experts resident"
          f"{', cold reads' if rec['cold'] else ''}):"
          f" hit rate {f(rec['hit_rate'])}, {rec['bytes_read'] / 2**20:.1f} MiB read in {rec['read_s']:.2f}s, "
          f"prefetch precision {f(rec['precision'])} recall {f(rec['recall'])} lead {f(rec['lead_ms'], '{:.1f}')} ms,"
          f" peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB"
          + (f", {rec['lowbit']} misses served {rec['miss_bits']}-bit" if rec.get("miss_bits") else ""),
          file=sys.stderr)
