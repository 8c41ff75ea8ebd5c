"""Offloaded generation benchmark (issue 15): experts on disk behind moekit's expert cache vs fully resident vs
transformers + accelerate disk offload, on an OLMoE-shaped transformers model with RANDOM weights; and the
default moekit run at --expert-budget 0.25 vs resident.

    python benchmarks/offload.py [--workdir DIR] [--tokens 24] [--repeats 3] [--run RUN]

The model (``OlmoeConfig``: 16 layers, 64 experts, top-8 like OLMoE-1B-7B, but width 512 and expert width 320
so that the experts are about 2 GB in float32) is made from a config with random weights (transformers' own
initialisation) and saved with ``save_pretrained``; ``moekit offload`` writes its expert store. Each
configuration runs in its own process (so peak RSS, ``ru_maxrss``, is its own): greedy ``generate`` of
``--tokens`` tokens after an 8-token prompt, ``--repeats`` timed runs after one warm-up, median tokens/s.

* resident: ``from_pretrained`` (all weights in memory).
* moekit: ``moekit.serve.load_hf_from_store`` (experts never allocated), 25% of each layer's experts resident,
  cold reads (every expert file's pages dropped with ``posix_fadvise(DONTNEED)`` first and after every read, so
  each miss reads the disk), a fresh (empty) cache for every timed run.
* accelerate: ``from_pretrained(device_map="auto", max_memory={"cpu": same resident bytes}, offload_folder=...)``
  in the separate environment made by ``benchmarks/make_accelerate_env.sh`` (.venv-accelerate), the offload
  folder's pages dropped before every timed run and after every decoding step (cold, like moekit's).

Every configuration runs with one intra-op thread (``torch.set_num_threads(1)``): on the shared 2-core machine
multi-threaded small kernels wait on descheduled threads (moekit's own decode policy, ``moekit.threads``).

Greedy tokens of every configuration are compared with the resident model's.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [[11, 523, 71, 3047, 9, 88, 1201, 42]]
SHAPE = dict(vocab_size=50304, hidden_size=512, intermediate_size=320, num_hidden_layers=16, num_attention_heads=8,
             num_key_value_heads=8, num_experts=64, num_experts_per_tok=8, max_position_embeddings=512)


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _drop(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def _time_generate(model, tokens: int, repeats: int, before=None, every_step=None):
    import torch

    ids = torch.tensor(PROMPT)
    kw = {}
    if every_step is not None:  # called after every decoding step (a stopping criterion that never stops)
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Each(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                every_step()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        kw["stopping_criteria"] = StoppingCriteriaList([_Each()])
    rates, out = [], None
    for i in range(repeats + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kw)
        dt = time.perf_counter() - t0
        if i:  # the first run is the warm-up
            rates.append(tokens / dt)
    return rates, out[0, len(PROMPT[0]):].tolist()


# ------------------------------------------------------------------------------------------------ children
def child(args) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # every configuration: one intra-op thread (2 shared cores; see BENCHMARKS.md)
    rec: dict = {"config": args.child}
    # The libraries every configuration imports are loaded before the baseline: the figure of interest is what
    # the model and its serving add, not the import of transformers' modelling code (about 100 MiB).
    import transformers.models.olmoe.modeling_olmoe  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    if args.child == "moekit":
        import moekit.serve  # noqa: F401
    base = _rss()
    if args.child == "resident":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
        rec["rates"], rec["tokens"] = _time_generate(model, args.tokens, args.repeats)
    elif args.child == "moekit":
        from moekit.serve import ExpertCache, load_hf_from_store

        model, engine = load_hf_from_store(args.store, budget=args.budget, policy=args.policy,
                                           prefetch=args.prefetch, cold=args.cold)
        stats = []

        def fresh():
            if engine.cache._loader is not None:
                stats.append(engine.stats())
            engine.cache.close()
            engine.cache = None
            gc.collect()  # the old slots go before the new ones are allocated
            engine.cache = ExpertCache(engine.store, args.budget, args.policy, cold=args.cold)

        rec["rates"], rec["tokens"] = _time_generate(model, args.tokens, args.repeats, before=fresh)
        stats.append(engine.stats())
        rec["stats"] = {k: v for k, v in stats[-1].items() if k != "layers"}
        engine.close()
    elif args.child == "accelerate":
        from transformers import AutoModelForCausalLM

        off = Path(args.offload_folder)
        model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32, device_map="auto",
                                                     max_memory={"cpu": int(args.max_memory)},
                                                     offload_folder=str(off)).eval()
        rec["device_map_disk"] = sum(1 for v in model.hf_device_map.values() if v == "disk")
        rec["rates"], rec["tokens"] = _time_generate(model, args.tokens, args.repeats, before=lambda: _drop(off),
                                                     every_step=lambda: _drop(off))
    rec["peak_rss_bytes"] = _rss()
    rec["start_rss_bytes"] = base
    print("RESULT " + json.dumps(rec))


def run_child(python: str, argv: list[str]) -> dict:
    p = subprocess.run([python, __file__, *argv], capture_output=True, text=True, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {argv[:2]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


# ------------------------------------------------------------------------------------------------ moekit run
def run_part(args) -> dict:
    """The default moekit run: resident vs --expert-budget 0.25 (warm and cold), in this process."""
    import torch

    from moekit.model import generate_batch
    from moekit.serve.offload import load_offloaded_run, write_run_store
    from moekit.train import load_run

    store = Path(args.workdir) / "run-store"
    if not store.exists():
        write_run_store(args.run, store)
    prompts = ["The quick brown fox"]
    n = 64

    def timed(model, reset=None):
        rates, toks = [], None
        for i in range(args.repeats + 1):
            if reset is not None:
                reset()
            t0 = time.perf_counter()
            out = generate_batch(model, prompts, n, temperature=0, eos_id=None)
            dt = time.perf_counter() - t0
            toks = out[0].new_ids
            if i:
                rates.append(n / dt)
        return statistics.median(rates), toks

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ref, _ = load_run(Path(args.run))
    r_rate, r_toks = timed(ref)
    out = {"resident_tokens_per_s": r_rate, "rows": []}
    for policy, prefetch, cold in [("lru", "none", False), ("lru", "cross_layer", False), ("lru", "cross_layer", True),
                                   ("shallow", "cross_layer", True)]:
        model, engine = load_offloaded_run(store, 0.25, policy, prefetch, cold=cold, run=args.run)
        from moekit.serve import ExpertCache

        def reset():
            engine.cache.close()
            engine.cache = None
            gc.collect()
            engine.cache = ExpertCache(engine.store, 0.25, policy, cold=cold)

        rate, toks = timed(model, reset)
        s = engine.stats()
        engine.close()
        out["rows"].append({"policy": policy, "prefetch": prefetch, "cold": cold, "tokens_per_s": rate,
                            "ratio": rate / r_rate, "same_tokens": toks == r_toks, "hit_rate": s["hit_rate"],
                            "precision": s["precision"], "recall": s["recall"],
                            "mib_read_per_run": s["bytes_read"] / 2**20})
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/moekit-offload-bench")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--prefetch", default="cross_layer")
    ap.add_argument("--cold", action="store_true", default=True)
    ap.add_argument("--run", default="/tmp/bench/runs/demo-check", help="moekit run for the second part")
    ap.add_argument("--accelerate-python", default=str(ROOT / ".venv-accelerate" / "bin" / "python"))
    ap.add_argument("--skip", default="", help="comma list of parts to skip: resident,moekit,accelerate,run")
    # child mode
    ap.add_argument("--child", default=None)
    ap.add_argument("--ckpt")
    ap.add_argument("--store")
    ap.add_argument("--offload-folder")
    ap.add_argument("--max-memory")
    args = ap.parse_args()
    if args.child:
        return child(args)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, store = work / "olmoe-random", work / "store"
    if not (ckpt / "config.json").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.OlmoeConfig(**SHAPE),
                                                              dtype=torch.float32)
        model.save_pretrained(ckpt)
        del model
    if not store.exists():
        subprocess.run([sys.executable, "-m", "moekit", "offload", str(ckpt), str(store)], check=True, cwd=ROOT)
    man = json.loads((store / "manifest.json").read_text())
    expert_bytes = sum(l["expert_bytes"] * l["num_experts"] for l in man["layers"])
    nonexpert = (store / "nonexpert.safetensors").stat().st_size
    resident_bytes = nonexpert + int(args.budget * expert_bytes)
    res: dict = {"shape": SHAPE, "expert_bytes": expert_bytes, "nonexpert_bytes": nonexpert,
                 "budget": args.budget, "resident_bytes": resident_bytes, "tokens": args.tokens,
                 "repeats": args.repeats, "load_average": os.getloadavg()}
    py = sys.executable
    common = ["--ckpt", str(ckpt), "--store", str(store), "--tokens", str(args.tokens), "--repeats",
              str(args.repeats), "--budget", str(args.budget), "--policy", args.policy, "--prefetch", args.prefetch]
    if "resident" not in skip:
        res["resident"] = run_child(py, ["--child", "resident", *common])
    if "moekit" not in skip:
        res["moekit"] = run_child(py, ["--child", "moekit", *common])
    if "accelerate" not in skip and Path(args.accelerate_python).exists():
        off = work / "accelerate-offload"
        res["accelerate"] = run_child(args.accelerate_python, ["--child", "accelerate", *common, "--offload-folder",
                                                               str(off), "--max-memory", str(resident_bytes)])
    for name in ("resident", "moekit", "accelerate"):
        if name in res:
            r = res[name]
            r["tokens_per_s"] = statistics.median(r["rates"])
            if "resident" in res:
                r["same_tokens"] = r["tokens"] == res["resident"]["tokens"]
    if "resident" in res and "moekit" in res:
        res["moekit_vs_resident"] = res["moekit"]["tokens_per_s"] / res["resident"]["tokens_per_s"]
    if "accelerate" in res and "moekit" in res:
        res["moekit_vs_accelerate"] = res["moekit"]["tokens_per_s"] / res["accelerate"]["tokens_per_s"]
    if "run" not in skip and Path(args.run).is_dir():
        res["run"] = run_part(args)
    for r in (res.get(k) for k in ("resident", "moekit", "accelerate")):
        if r:
            r.pop("tokens", None)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
