"""Domain-shift study of issue 16: adaptation of a default-shaped moekit model to domains it never saw.

1. ``moekit train`` the default model (4 layers, width 256, 16 experts top-2) on the embedded corpus without
   the held-out domains (``--exclude-domains``), ``--steps`` steps (default 120, well below the default 400:
   on two cores shared with four other agents a step took 8-20 s, and the whole study has to fit well under
   an hour).
2. ``moekit finetune`` it on the held-out domains' training split (``--data domain:...``): routers only,
   routers only + RoMA (each ``--roma`` value), all parameters; ``--ft-steps`` steps each.
3. On ``--windows`` evenly spaced validation windows of the held-out domains, and as many of the training
   domains (forgetting), bits per byte of: no adaptation; streaming rewiring (:func:`moekit.adapt.
   evaluate_streaming`, every 64 tokens, 3 Adam steps -- the paper-like setting -- and a cheap setting); the
   three fine-tunes; dynamic evaluation of all parameters (Krause et al. 2018, arXiv:1709.07432) at matched
   steps (same chunks, same step count, same per-window reset). The rewiring and dynamic-evaluation learning
   rates are picked on held-out-domain *training-split* windows (never the validation windows scored).
4. Timing: plain scoring vs rewired scoring on the same windows, interleaved, median of ``--rounds`` rounds
   after a warm-up (issue 16's target: at most 30% extra evaluation time).
5. Routing change: fraction of top-k choices that differ from the base model's on the held-out windows
   (rewiring: mean over its adaptations, measured on the adaptation text).

    python benchmarks/domain_shift.py --out /tmp/domain-shift [--steps 120] [--ft-steps 30] [--roma 10]
        [--windows 16] [--tune-windows 4] [--rounds 2] [--json FILE]

Runs are kept in OUT and reused when present (delete OUT to start over).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HELD_OUT = "pydoc,encodings,logging"


def sh(cmd: list[str], log: list) -> None:
    text = " ".join(cmd)
    log.append(text)
    print(f"$ {text}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def moekit(*args) -> list[str]:
    return [sys.executable, "-m", "moekit", *map(str, args)]


@torch.no_grad()
def plain_bpb(model, windows) -> tuple[float, float]:
    from moekit.adapt.rewire import _nats

    model.eval()
    nats = count = 0.0
    t0 = time.perf_counter()
    for w in windows:
        ids = torch.tensor(w)
        n = _nats(model(ids[None, :-1])[0], ids[1:])
        nats += float(n.double().sum())
        count += n.numel()
    return nats / count / math.log(2), time.perf_counter() - t0


@torch.no_grad()
def topk_change(model, base, windows) -> float:
    """Fraction of (token, layer, slot) top-k choices of ``model`` not among ``base``'s for the same token."""
    from moekit.layer import moe_layers

    changed = total = 0
    for w in windows:
        ids = torch.tensor(w)[None, :-1]
        model(ids)
        a = [l.last_routing.topk_ids.clone() for l in moe_layers(model)]
        base(ids)
        b = [l.last_routing.topk_ids for l in moe_layers(base)]
        for a_TK, b_TK in zip(a, b):
            kept = (a_TK[:, :, None] == b_TK[:, None, :]).any(-1)
            changed += int((~kept).sum())
            total += kept.numel()
    return changed / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/domain-shift")
    p.add_argument("--held-out", default=HELD_OUT)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--ft-steps", type=int, default=30)
    p.add_argument("--roma", default="10", help="RoMA weights to try (comma-separated)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--tune-windows", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--finetunes-only", action="store_true",
                   help="evaluate only no adaptation and the fine-tunes (e.g. after adding a --roma value)")
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    runs = out / "runs"
    commands: list[str] = []
    t_study = time.perf_counter()
    held = args.held_out.split(",")

    # 1. base run without the held-out domains
    if not (runs / "base" / "model.safetensors").is_file():
        sh(moekit("train", "--out", runs, "--name", "base", "--steps", args.steps, "--exclude-domains",
                  args.held_out, "--final-eval-windows", 100, "--no-progress"), commands)
    # 2. fine-tunes on the held-out domains' training split
    data = f"domain:{args.held_out}"
    variants = [("ft-routers", ["--routers-only"])]
    variants += [(f"ft-routers-roma{lam}", ["--routers-only", "--roma", lam]) for lam in args.roma.split(",")]
    variants += [("ft-full", [])]
    for name, extra in variants:
        if not (runs / name / "model.safetensors").is_file():
            sh(moekit("finetune", runs / "base", runs / name, "--data", data, "--steps", args.ft_steps,
                      "--final-eval-windows", 50, "--no-progress", *extra), commands)

    from moekit.adapt import DynamicEvaluator, Rewirer, evaluate_streaming, windows_from_corpus
    from moekit.data import load_corpus
    from moekit.data.select import select_domains
    from moekit.train import load_run

    torch.set_num_threads(2)
    base, cfg = load_run(runs / "base")
    seq_len = cfg["train"]["seq_len"]
    corpus = load_corpus(None)
    held_c, train_c = select_domains(corpus, include=held), select_domains(corpus, exclude=held)
    w_held = windows_from_corpus(held_c, seq_len, args.windows)
    w_train = windows_from_corpus(train_c, seq_len, args.windows)
    w_tune = windows_from_corpus(held_c, seq_len, args.tune_windows, split="train")
    rows, res = [], {"held_out": held, "steps": args.steps, "ft_steps": args.ft_steps, "windows": args.windows,
                     "held_tokens": sum(len(w) - 1 for w in w_held), "train_tokens": sum(len(w) - 1 for w in w_train)}

    # no adaptation
    plain_bpb(base, w_held[:4])  # warm-up
    bpb_h, t_h = plain_bpb(base, w_held)
    bpb_t, _ = plain_bpb(base, w_train)
    rows.append({"method": "no adaptation", "held": bpb_h, "train": bpb_t, "wall_s": t_h, "change": 0.0})

    if not args.finetunes_only:
        # learning rates picked on held-out training-split windows
        tune = {}
        for lr in (0.01, 0.03, 0.1):
            r = evaluate_streaming(base, Rewirer(base, lr=lr, steps=3, every=64, report_routing=False), w_tune)
            tune[f"rewire lr {lr}"] = r["bits_per_byte"] - r["bits_per_byte_plain"]
        rw_lr = min((0.01, 0.03, 0.1), key=lambda lr: tune[f"rewire lr {lr}"])
        for lr in (1e-4, 3e-4, 1e-3):
            r = evaluate_streaming(base, DynamicEvaluator(base, lr=lr, steps=3, every=64, optimizer="adam"), w_tune)
            tune[f"dynamic lr {lr}"] = r["bits_per_byte"] - r["bits_per_byte_plain"]
        de_lr = min((1e-4, 3e-4, 1e-3), key=lambda lr: tune[f"dynamic lr {lr}"])
        res["tuning_delta_bpb"], res["rewire_lr"], res["dynamic_lr"] = tune, rw_lr, de_lr
        print(f"tuning (held-out train split, delta bits/byte): {tune}", file=sys.stderr, flush=True)

        settings = {
            "streaming rewiring (3 steps / 64 tokens)": lambda m: Rewirer(m, lr=rw_lr, steps=3, every=64),
            "streaming rewiring, cheap (last layer, 1 step / 128 tokens)":
                lambda m: Rewirer(m, [len(m.model.layers) - 1], lr=rw_lr, steps=1, every=128, report_routing=False),
            "dynamic evaluation, all parameters (3 steps / 64 tokens)":
                lambda m: DynamicEvaluator(m, lr=de_lr, steps=3, every=64, optimizer="adam"),
        }
        for name, make in settings.items():
            t0 = time.perf_counter()
            r_h = evaluate_streaming(base, make(base), w_held)
            wall = time.perf_counter() - t0
            r_t = evaluate_streaming(base, make(base), w_train)
            rows.append({"method": name, "held": r_h["bits_per_byte"], "train": r_t["bits_per_byte"], "wall_s": wall,
                         "change": r_h["routing_change"] if name.startswith("streaming rewiring (") else None,
                         "plain_check": r_h["bits_per_byte_plain"]})

    # fine-tunes
    for name, _ in variants:
        model, _ = load_run(runs / name)
        h, _ = plain_bpb(model, w_held)
        t, _ = plain_bpb(model, w_train)
        recs = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        train_s = max((x.get("time", 0.0) for x in recs), default=float("nan"))
        rows.append({"method": name, "held": h, "train": t, "wall_s": train_s,
                     "change": topk_change(model, base, w_held[:16])})

    if not args.finetunes_only:
        # timing: plain vs rewired scoring, interleaved rounds after a warm-up
        w_time = w_held[:12]
        ratios = {k: [] for k in ("default", "cheap")}
        for rnd in range(args.rounds + 1):
            _, tp = plain_bpb(base, w_time)
            for key, make in (("default", lambda: Rewirer(base, lr=rw_lr, steps=3, every=64, report_routing=False)),
                              ("cheap", lambda: Rewirer(base, [len(base.model.layers) - 1], lr=rw_lr, steps=1,
                                                        every=128, report_routing=False))):
                r = evaluate_streaming(base, make(), w_time)
                if rnd:  # round 0 is the warm-up
                    ratios[key].append((r["seconds_adapt"] + r["seconds_score"]) / tp)
        res["time_ratio"] = {k: statistics.median(v) for k, v in ratios.items()}
        res["time_ratios_all"] = ratios
    res["rows"], res["commands"] = rows, commands
    res["study_s"] = time.perf_counter() - t_study
    print("\n| method | held-out bits/byte | training-domain bits/byte | wall time (s) | top-k changed |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        ch = "n/a" if r["change"] is None else f"{100 * r['change']:.1f}%"
        print(f"| {r['method']} | {r['held']:.4f} | {r['train']:.4f} | {r['wall_s']:.1f} | {ch} |")
    if "time_ratio" in res:
        print(f"\nrewired / plain evaluation time (median of {args.rounds}): {res['time_ratio']}")
    print(f"study wall time {res['study_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
