"""``moekit compare``: train the same model once per routing or balancing method and put them side by side.

Every method trains the default model (or the ``--quick`` one) with the same seed, data, steps and active
parameters; only the MoE settings differ. Reported per method: validation bits per byte, MaxVio (mean over
the second half of training and worst over all of it, over layers), the routing fluctuation rate between the
last two checkpoints (fraction of probe tokens whose top-1 expert changes; "Improving Routing in Sparse
Mixture of Experts with Graph of Tokens", Nguyen et al., ICML 2025), the mean per-token routing entropy (bits)
on the probe, and the median training-step time relative to ``topk`` measured in the same run.
"""
from __future__ import annotations

import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import routing
from .routing.graph import routing_fluctuation_rate
from .io import atomic_write_bytes, atomic_write_json

# name -> (description, MoEConfig overrides). The loss-free bias step u is 1e-2 rather than DeepSeek's 1e-3:
# these runs are hundreds of steps long, not tens of thousands, and the bias must be able to move in them.
METHODS: dict[str, tuple[str, dict]] = {
    "topk": ("token-choice top-k, switch auxiliary loss", {}),
    "topk-sequence": ("top-k, sequence-level auxiliary loss", {"aux_loss": "sequence"}),
    "topk-global": ("top-k, global-batch auxiliary loss", {"aux_loss": "global"}),
    "topk-zloss": ("top-k, switch loss + router z-loss", {"z_loss_coef": 1e-3}),
    "lossfree": ("top-k, auxiliary-loss-free bias (DeepSeek sign rule)",
                 {"aux_loss": None, "bias_update": "sign", "bias_update_rate": 1e-2}),
    "lossfree-u1e-3": ("top-k, auxiliary-loss-free bias, DeepSeek's step u = 1e-3",
                       {"aux_loss": None, "bias_update": "sign", "bias_update_rate": 1e-3}),
    "topk-sigmoid": ("top-k on sigmoid scores (DeepSeek-V3 gate), switch auxiliary loss",
                     {"score_func": "sigmoid", "norm_topk": True}),
    "lossfree-sigmoid": ("sigmoid scores + auxiliary-loss-free bias (DeepSeek-V3 gate), u = 1e-3",
                         {"score_func": "sigmoid", "norm_topk": True, "aux_loss": None, "bias_update": "sign",
                          "bias_update_rate": 1e-3}),
    "lossfree-primal-dual": ("top-k, auxiliary-loss-free bias (primal-dual, decaying step)",
                             {"aux_loss": None, "bias_update": "decaying", "bias_update_rate": 1e-1}),
    "expert_choice": ("expert choice (not causal)", {"router": "expert_choice", "aux_loss": None}),
    "sinkhorn": ("Sinkhorn balanced assignment (BASE)", {"router": "sinkhorn", "aux_loss": None}),
    "ssr": ("Selective Sinkhorn Routing", {"router": "ssr", "aux_loss": None}),
    "sparse_ot": ("sparsity-constrained optimal transport", {"router": "sparse_ot", "aux_loss": None}),
    "similarity": ("similarity-aware routing (graph of tokens)", {"router": "similarity"}),
    "attention": ("attention-aware routing (graph of tokens)", {"router": "attention"}),
    "momentum": ("MomentumSMoE", {"router": "momentum"}),
    "adam": ("AdamSMoE", {"router": "adam"}),
    "dts": ("EvoMoE dense-to-sparse gate", {"router": "dts"}),
    "activation_dts": ("activation dense-to-sparse gate", {"router": "activation_dts"}),
    "hash": ("hash routing", {"router": "hash", "aux_loss": None}),
    "top_any": ("MC# online top-any pruning", {"router": "top_any"}),
    "mixer": ("MixER K-means + least-squares gate", {"router": "mixer", "aux_loss": None}),
    "moduleformer": ("ModuleFormer mutual-information loss", {"router": "moduleformer", "aux_loss": None}),
}



def register_method(name: str, description: str | None = None, *, replace: bool = False, **moe_settings) -> None:
    """Add a method to ``moekit compare``: ``name`` trains the compared model with these :class:`moekit.MoEConfig`
    settings (``router=...``, ``aux_loss=...``, ``router_options={...}``, ...) over the preset's.

    Call it from your own code or from a plugin file (``moekit compare --plugin FILE.py --methods NAME``)::

        moekit.compare.register_method("my-router", "my router, no aux loss", router="my_router", aux_loss=None)

    ``ValueError`` when ``name`` is taken (unless ``replace``), or a setting is not a MoEConfig field. The
    router name is checked when the comparison runs, so a plugin may register its router after the method.
    """
    from dataclasses import fields

    from .config import MoEConfig

    if not isinstance(name, str) or not name or "," in name:
        raise ValueError(f"compare method name must be a non-empty string without commas, got {name!r}")
    if name in METHODS and not replace:
        raise ValueError(f"compare method {name!r} is already registered; pass replace=True to redefine it")
    allowed = {f.name for f in fields(MoEConfig)} - {"dim"}
    unknown = sorted(set(moe_settings) - allowed)
    if unknown:
        raise ValueError(f"compare method {name!r}: unknown MoE setting(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(allowed))}")
    router = moe_settings.get("router", "topk")
    METHODS[name] = (description or f"{router} ({', '.join(f'{k}={v!r}' for k, v in moe_settings.items())})",
                     dict(moe_settings))


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (``KeyError`` when there is none)."""
    del METHODS[name]


# --quick: every method in about 15 minutes on 2 cores (about 40 s a method at topk's speed)
QUICK_TRAIN = {"steps": 800, "batch_size": 8, "seq_len": 128, "warmup_steps": 50, "final_eval_windows": 200,
               "checkpoint_every": 400}
QUICK_MODEL = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256}
QUICK_MOE = {"hidden_dim": 128, "num_experts": 8, "top_k": 2}


def available_methods() -> list[str]:
    have = set(routing.names())
    return [m for m, (_, over) in METHODS.items() if over.get("router", "topk") in have]


def _top1_and_entropy(model) -> tuple[list[torch.Tensor], list[float]]:
    from .layer import moe_layers

    tops, entropies = [], []
    for layer in moe_layers(model):
        r = layer.last_routing
        best_T = torch.full((r.num_tokens,), -1, dtype=torch.int64)
        best_w = torch.full((r.num_tokens,), -math.inf)
        w = r.weights.detach().float().cpu()
        tok, exp = r.token_ids.cpu(), r.expert_ids.cpu()
        order = torch.argsort(w)  # later writes win: the largest weight per token is written last
        best_w[tok[order]] = w[order]
        best_T[tok[order]] = exp[order]
        tops.append(best_T)
        if r.probs is not None:
            p = r.probs.detach().float().clamp_min(1e-12)
            entropies.append(float(-(p * p.log2()).sum(-1).mean()))
    return tops, entropies


@torch.no_grad()
def _probe(model, probe_ids) -> tuple[list[torch.Tensor], list[float]]:
    was = model.training
    model.eval()
    model(probe_ids)
    out = _top1_and_entropy(model)
    model.train(was)
    return out


def run_method(name: str, out_dir: Path, corpus, model_over: dict, moe_over: dict, train_over: dict,
               probe_ids: torch.Tensor, progress: bool, plugins: list[str] | None = None) -> dict:
    from .model.config import ModelConfig
    from .train.config import TrainConfig, moe_settings
    from .train.loop import Trainer, evaluate, new_run_config, routing_is_causal

    desc, method_over = METHODS[name]
    moe = moe_settings(model_over, {**moe_over, **method_over})
    model_cfg = ModelConfig(**model_over, moe=moe)
    train_cfg = TrainConfig(**train_over)
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = new_run_config(model_cfg, train_cfg, None, plugins=plugins)
    atomic_write_json(run_dir / "config.json", run_config)
    trainer = Trainer(run_dir, run_config, corpus, progress=progress)
    probe_at = train_cfg.steps - train_cfg.checkpoint_every
    step_times, vios_by_step, probed = [], [], {}

    def on_step(trainer, rec):
        step_times.append(rec["step_time_s"])
        vios_by_step.append(rec["max_vio"])
        if trainer.step == probe_at:
            probed["top"], _ = _probe(trainer.model, probe_ids)

    trainer.fit(on_step, desc=f"{name:22s}", leave=False)
    previous_top = probed.get("top")
    final_top, entropies = _probe(trainer.model, probe_ids)
    fluct = float("nan")
    if previous_top is not None and final_top:
        fluct = routing_fluctuation_rate(previous_top, final_top)
    ev = evaluate(trainer.model, corpus, train_cfg.seq_len, train_cfg.batch_size, train_cfg.final_eval_windows)
    half = vios_by_step[len(vios_by_step) // 2:]
    flat_half = [v for step in half for v in step]
    flat_all = [v for step in vios_by_step for v in step]
    warm = step_times[min(5, len(step_times) - 1):]
    return {
        "method": name, "description": desc, "router": moe.get("router", "topk"),
        "val_bits_per_byte": ev["bits_per_byte"],
        "max_vio_mean": statistics.fmean(flat_half) if flat_half else float("nan"),
        "max_vio_worst": max(flat_all) if flat_all else float("nan"),
        "fluctuation_rate": fluct,
        "routing_entropy_bits": statistics.fmean(entropies) if entropies else float("nan"),
        "step_time_s": statistics.median(warm),
        "causal": routing_is_causal(trainer.model),
    }


def format_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| method | val bits/byte | MaxVio mean | MaxVio worst | fluctuation | entropy (bits) | step time vs topk |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(v, fmt="{:.3f}"):
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
        name = r["method"] + ("" if r.get("causal", True) else " (not causal)")
        lines.append(f"| {name} | {f(r['val_bits_per_byte'])} | {f(r['max_vio_mean'])} | {f(r['max_vio_worst'])} | "
                     f"{f(r['fluctuation_rate'])} | {f(r['routing_entropy_bits'])} | "
                     f"{f(r.get('step_time_vs_topk'), '{:.2f}x')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    paths = []
    for key, label in (("val_bits_per_byte", "validation bits/byte"), ("max_vio_mean", "MaxVio (mean)"),
                       ("step_time_vs_topk", "step time / topk")):
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 3.5))
        ax.bar(range(len(rows)), [r.get(key) or 0 for r in rows], color="#4477aa")
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(label)
        fig.tight_layout()
        path = out_dir / f"compare_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def add_arguments(p) -> None:
    p.add_argument("--methods", default=None, help="comma-separated (default: all available): " + ", ".join(METHODS)
                   + " (add your own with moekit.compare.register_method in a --plugin file)")
    p.add_argument("--quick", action="store_true", help="a small model and short runs: every method in ~15 min")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--out", default=None, help="output folder (default runs/compare-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def main_from_args(args) -> int:
    from .data import load_corpus
    from .data.batches import val_batches

    methods = available_methods() if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError(f"--methods must name at least one method; allowed: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError("--methods names a method twice")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}")
        router = METHODS[m][1].get("router", "topk")
        routing.get(router)
    if "topk" in methods:
        methods = ["topk"] + [m for m in methods if m != "topk"]
    model_over = dict(QUICK_MODEL) if args.quick else {}
    moe_over = dict(QUICK_MOE) if args.quick else {}
    train_over = dict(QUICK_TRAIN) if args.quick else {}
    train_over["seed"] = args.seed
    if args.steps is not None:
        if args.steps < 4:
            raise ValueError("--steps must be >= 4")
        train_over["steps"] = args.steps
        train_over["checkpoint_every"] = max(2, args.steps // 2)
    # Every setting is checked before anything is written or trained.
    from .model.config import ModelConfig
    from .train.config import TrainConfig, check_model_for_training, moe_settings

    train_cfg = TrainConfig(**train_over)
    for name in methods:
        model_cfg = ModelConfig(**model_over, moe=moe_settings(model_over, {**moe_over, **METHODS[name][1]}))
        check_model_for_training(model_cfg, train_cfg, f"method {name}")
    out_dir = Path(args.out or time.strftime("runs/compare-%Y%m%d-%H%M%S"))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out: {out_dir} exists and is not a folder")
    taken = [n for n in [*methods, "compare.md", "compare.json"] if (out_dir / n).exists()]
    if taken:  # never overwrite another comparison's results
        raise ValueError(f"--out: {out_dir} already holds {', '.join(taken[:3])}; choose another --out")
    corpus = load_corpus(None)
    out_dir.mkdir(parents=True, exist_ok=True)
    seq_len = train_over.get("seq_len", 256)
    probe = next(val_batches(corpus, 8, seq_len, max_windows=8))
    # An untimed warm-up run first: the first model trained in a process pays for fresh memory (page faults)
    # that later ones reuse, which would otherwise make the first method look slower.
    warm = {**train_over, "steps": 30, "checkpoint_every": 15, "final_eval_windows": 2}
    warm_dir = Path(tempfile.mkdtemp(prefix=".warmup-", dir=out_dir))  # a new folder: removing it is safe
    try:
        run_method(methods[0], warm_dir, corpus, model_over, moe_over, warm, probe.input_ids, False)
    finally:
        shutil.rmtree(warm_dir, ignore_errors=True)
    rows = []
    for name in methods:
        t0 = time.perf_counter()
        row = run_method(name, out_dir, corpus, model_over, moe_over, train_over, probe.input_ids,
                         progress=not args.no_progress, plugins=getattr(args, "plugin_paths", None))
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{name:22s} val {row['val_bits_per_byte']:.3f} bits/byte, MaxVio {row['max_vio_mean']:.3f}, "
              f"{row['wall_s']:.0f}s", file=sys.stderr, flush=True)
    base = next((r["step_time_s"] for r in rows if r["method"] == "topk"), None)
    for r in rows:
        r["step_time_vs_topk"] = r["step_time_s"] / base if base else None
    header = (f"moekit compare ({'quick' if args.quick else 'default'} preset, seed {args.seed}, "
              f"{train_over.get('steps', 400)} steps, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    md = format_markdown(rows, header)
    atomic_write_bytes(out_dir / "compare.md", md.encode("utf-8"))
    atomic_write_json(out_dir / "compare.json", {"header": header, "results": rows})
    plot(rows, out_dir)
    print(md)
    print(f"written: {out_dir}/compare.md, compare.json, compare_*.png", file=sys.stderr)
    return 0
