"""A change against the code it replaces, interleaved in one run: ``moekit bench`` ratios and the whole-model
transformers comparison, for the working tree and for a previous revision.

    python benchmarks/before_after.py --rev a873424 [--rounds 5]

The previous revision's ``src/`` is extracted with ``git archive`` into a temporary folder; every measurement
runs in a fresh subprocess with ``PYTHONPATH`` pointing at one source tree or the other, alternating
previous / current (and the order flipped every round) so that drifts of this machine's speed hit both alike.
Reported: per shape and mode, the median over rounds of moekit's time divided by ``floor`` and by
``hf-grouped_mm`` (each ratio measured inside one ``moekit bench`` process), and for the OLMoE- and
DeepSeek-V3-shaped transformers models the median of (grouped_mm step / moekit step), then current / previous
for each ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HF_SNIPPET = r"""
import json, torch
import moekit.hf  # registers "moekit"
from moekit.hf.bench import deepseek_v3_model, olmoe_model, time_steps
torch.manual_seed(0)
out = {}
for name, build in (("olmoe-model", olmoe_model), ("deepseek-v3-model", deepseek_v3_model)):
    model = build(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 256))
    weight = torch.randn(2, 256, model.config.vocab_size)
    times = {}
    for impl in ("grouped_mm", "moekit", "grouped_mm", "moekit"):
        model.set_experts_implementation(impl)
        times.setdefault(impl, []).append(time_steps(model, ids, weight, 1, 2))
    out[name] = min(times["grouped_mm"]) / min(times["moekit"])
print(json.dumps(out))
"""


def extract(rev: str, into: Path) -> Path:
    archive = into / "prev.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, stdout=f)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run_bench(src: Path, shapes: str, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-m", "moekit", "bench", "--json", "--shapes", shapes, "--repeats", str(repeats),
            "--impls", "moekit,floor,hf-grouped_mm"]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, cwd=src.parent).stdout
    return json.loads(out)


def bench_ratios(report) -> dict:
    """``{(shape, mode, baseline): moekit time / baseline time}`` from one ``moekit bench --json`` report."""
    rows = report["results"]
    by = {(r["shape"], r["impl"]): r for r in rows}
    ratios = {}
    for (shape, impl), r in by.items():
        if impl != "moekit":
            continue
        for base in ("floor", "hf-grouped_mm"):
            b = by.get((shape, base))
            if b is None:
                continue
            for mode in ("fwd_s", "fwd_bwd_s"):
                ratios[f"{shape} {mode[:-2]} moekit/{base}"] = r[mode] / b[mode]
    return ratios


def run_hf(src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", HF_SNIPPET], env=env, check=True, capture_output=True, text=True,
                         cwd=src.parent).stdout
    return {f"{k} grouped_mm/moekit": v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the previous revision (a commit of this repository)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7, help="repeats inside each moekit bench run")
    parser.add_argument("--shapes", default="olmoe,mixtral,decode")
    parser.add_argument("--no-hf", action="store_true", help="skip the whole-model transformers comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"previous": extract(args.rev, Path(tmp)), "current": ROOT / "src"}
        samples: dict[str, dict[str, list[float]]] = {"previous": {}, "current": {}}
        for round_index in range(args.rounds):
            order = ["previous", "current"] if round_index % 2 == 0 else ["current", "previous"]
            for which in order:
                ratios = bench_ratios(run_bench(sources[which], args.shapes, args.repeats))
                if not args.no_hf:
                    ratios.update(run_hf(sources[which]))
                for k, v in ratios.items():
                    samples[which].setdefault(k, []).append(v)
                print(f"round {round_index + 1}/{args.rounds} {which} done", file=sys.stderr, flush=True)
    print(f"Median over {args.rounds} interleaved rounds; previous = {args.rev}, current = working tree.\n")
    print("| ratio | previous | current | current / previous |")
    print("|---|---|---|---|")
    for key in samples["previous"]:
        prev = statistics.median(samples["previous"][key])
        cur = statistics.median(samples["current"].get(key, [float("nan")]))
        print(f"| {key} | {prev:.3f} | {cur:.3f} | {cur / prev:.3f} |")


if __name__ == "__main__":
    main()
