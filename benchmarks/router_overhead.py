"""Forward+backward time of the MoE layer with each router, relative to ``topk``, at one bench shape.

Issue 5's target: ``sinkhorn``, ``ssr`` and ``sparse_ot`` add at most 25% to the layer's forward+backward time
at the ``olmoe`` shape (T=4096, D=512, F=256, E=64, K=8). All routers are timed in one process, interleaved
in a shuffled order each round (seeded) so that drifts in machine load and allocator state hit every router
alike; the figure is the median of the rounds.
SSR is timed at its default selectivity and with Sinkhorn on every call (``sinkhorn_prob=1``), its worst case.

    python benchmarks/router_overhead.py [--shape olmoe] [--rounds 7] [--json]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings

import torch

from moekit.bench import SHAPES, build_case

ROUTERS = [
    ("topk", {}),
    ("expert_choice", {}),
    ("sinkhorn", {}),
    ("ssr", {}),
    ("ssr", {"sinkhorn_prob": 1.0}),
    ("sparse_ot", {}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="olmoe", choices=sorted(SHAPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    cases = [(f"{name}{json.dumps(opts) if opts else ''}", build_case(args.shape, "moekit", "cpu", torch.float32,
                                                                       name, router_options=opts))
             for name, opts in ROUTERS]
    times = {label: [] for label, _ in cases}
    for label, case in cases:  # warm-up
        case.zero_grad()
        case.fwd_bwd()
    order = random.Random(0)
    for _ in range(args.rounds):
        for label, case in order.sample(cases, len(cases)):
            case.zero_grad()
            t0 = time.perf_counter()
            case.fwd_bwd()
            times[label].append(time.perf_counter() - t0)
    base = statistics.median(times[cases[0][0]])
    rows = [{"router": label, "fwd_bwd_s": statistics.median(ts), "vs_topk": statistics.median(ts) / base}
            for label, ts in times.items()]
    if args.json:
        print(json.dumps({"shape": args.shape, "rounds": args.rounds, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "results": rows}, indent=1))
        return
    print(f"shape {args.shape}, median of {args.rounds} interleaved rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'router':34s} {'fwd_bwd_s':>10s} {'vs topk':>8s}")
    for r in rows:
        print(f"{r['router']:34s} {r['fwd_bwd_s']:10.4f} {r['vs_topk']:8.3f}")


if __name__ == "__main__":
    main()
