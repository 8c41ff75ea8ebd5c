"""Expert parallelism on this machine: loss parity, tokens/s at EP = 1, 2, 4, and the chunked overlap.

    python benchmarks/expert_parallel.py parity       # default model, 20 steps: one process vs torchrun EP=2
    python benchmarks/expert_parallel.py throughput   # default model: tokens/s at EP = 1, 2, 4
    python benchmarks/expert_parallel.py overlap      # one MoE layer: measured r = 1..L vs the fitted model,
                                                      # and the model's prediction for a multi-node cluster

Every figure goes to stdout as a Markdown table (BENCHMARKS.md section 5 holds the last run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _train(nproc: int, out: Path, name: str, *args: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "")}
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "moekit", "train", "--out", str(out), "--name", name, "--no-progress", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return out / name


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def parity(args) -> None:
    common = ["--steps", str(args.steps), "--final-eval-windows", "8", "--checkpoint-every", str(args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        one = _records(_train(1, out, "ep1", *common))
        two = _records(_train(2, out, "ep2", "--expert-parallel", "2", *common))
    rel = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two)]
    print(f"| steps | max relative loss difference | loss at step {args.steps} (1 process) | (EP=2) |")
    print("|---|---|---|---|")
    print(f"| {len(rel)} | {max(rel):.2e} | {one[-1]['loss']:.6f} | {two[-1]['loss']:.6f} |")


def throughput(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ep in args.ep:
            extra = ["--expert-parallel", str(ep)] if ep > 1 else []
            recs = _records(_train(ep, Path(tmp), f"ep{ep}", "--steps", str(args.steps), "--final-eval-windows",
                                   "8", "--checkpoint-every", str(args.steps), *extra))
            tok = statistics.median(r["tokens_per_s"] for r in recs[args.warmup:])
            rows.append((ep, tok))
    base = rows[0][1]
    print("| EP (processes) | tokens/s (median of steps after warm-up) | vs EP=1 |")
    print("|---|---|---|")
    for ep, tok in rows:
        print(f"| {ep} | {tok:,.0f} | {tok / base:.2f}x |")


def overlap(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           __file__, "overlap-worker", "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    subprocess.run(cmd, check=True, env=env)
    _cluster_prediction()


def _layer_time(layer, x, repeats: int) -> float:
    import torch
    import torch.distributed as dist

    times = []
    for i in range(repeats + 2):
        dist.barrier()
        t0 = time.perf_counter()
        out = layer(x)
        out.float().square().mean().backward()
        dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def overlap_worker(args) -> None:
    import torch
    import torch.distributed as dist

    from moekit import MoE
    from moekit.parallel import ParallelLayout, expert_parallel
    from moekit.parallel.cost_model import fit_cost_model

    torch.set_num_threads(1)
    layout = ParallelLayout.initialise(dist.get_world_size() if dist.is_initialized() else
                                       int(os.environ["WORLD_SIZE"]), num_experts=16)
    torch.manual_seed(0)
    layer = MoE(dim=256, num_experts=16, top_k=2, hidden_dim=256, aux_loss="switch").train()
    sharding = expert_parallel(layer, layout)
    x = torch.randn(args.tokens, 256, generator=torch.Generator().manual_seed(layout.rank))
    rows = args.tokens * 2
    model = fit_cost_model(layout.ep_group, layout.ep_size, layer.experts, rows, repeats=args.repeats)
    measured = {}
    torch.manual_seed(layout.rank)
    for r in (1, 2, 4, 8):
        if sharding.set_chunks(r) == r:  # r is capped at the experts per rank
            measured[r] = _layer_time(layer, x, args.repeats)
    if layout.is_main:
        bytes_sent = rows * 256 * 4
        print(f"fitted on this machine ({layout.world_size} gloo processes): all-to-all "
              f"{model.comm.intercept * 1e6:.0f} us + {model.comm.slope * 1e9:.3f} ns/byte; experts "
              f"{model.compute.intercept * 1e6:.0f} us + {model.compute.slope * 1e6:.2f} us/row")
        print()
        print("| r | measured layer forward+backward (s) | vs r=1 | predicted exchange+experts gain vs r=1 |")
        print("|---|---|---|---|")
        for r, t in measured.items():
            print(f"| {r} | {t:.4f} | {measured[1] / t:.2f}x | {model.gain(r, bytes_sent, rows):.2f}x |")
        print(f"\ncost model's choice on this machine: r = {model.best_chunks(bytes_sent, rows, 8)}")
    dist.barrier()
    dist.destroy_process_group()


# Multi-node clusters, assumed (not measured); BENCHMARKS.md section 5 states where the figures come from.
# name, dim, expert hidden, top_k, experts, EP ranks, tokens per rank, GB/s per rank, latency us, TFLOP/s
CLUSTERS = [
    ("DeepSeek-V3-shaped, 256 experts, EP=64 (8 nodes x 8 GPUs)", 7168, 2048, 8, 256, 64, 4096, 40.0, 30.0, 600.0),
    ("Qwen3-30B-A3B-shaped, 128 experts, EP=16 (2 nodes x 8 GPUs)", 2048, 768, 8, 128, 16, 8192, 40.0, 30.0, 600.0),
    ("Mixtral-shaped, 8 experts, EP=4 (4 nodes)", 4096, 14336, 2, 8, 4, 4096, 40.0, 30.0, 600.0),
    ("Mixtral-shaped, 8 experts, EP=8 (8 nodes): one expert per rank", 4096, 14336, 2, 8, 8, 4096, 40.0, 30.0, 600.0),
]
ELEMENT_BYTES = 2  # bf16


def _cluster_prediction() -> None:
    from moekit.parallel.cost_model import from_hardware

    print("\n| cluster (assumed: 40 GB/s per GPU, 30 us per message, 600 TFLOP/s, 10 us per chunk launch) "
          "| rows/rank | bytes per all-to-all | local experts (max r) | best r | predicted gain vs r=1 |")
    print("|---|---|---|---|---|---|")
    for name, dim, hidden, top_k, experts, ep, tokens, bw, lat, tflops in CLUSTERS:
        model = from_hardware(bw, lat, tflops, dim, hidden, launch_us=10.0)
        rows = tokens * top_k
        nbytes = rows * dim * ELEMENT_BYTES
        local = experts // ep
        best = model.best_chunks(nbytes, rows, local)
        print(f"| {name} | {rows:,} | {nbytes / 1e6:.0f} MB | {local} | {best} | "
              f"{model.gain(best, nbytes, rows):.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity")
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=parity)
    p = sub.add_parser("throughput")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.set_defaults(func=throughput)
    p = sub.add_parser("overlap")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.set_defaults(func=overlap)
    p = sub.add_parser("overlap-worker")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.set_defaults(func=overlap_worker)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
