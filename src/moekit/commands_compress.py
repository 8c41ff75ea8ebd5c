"""``moekit prune`` and ``moekit merge``: smaller moekit runs (or transformers checkpoints) from a trained run.

Every input is checked before any work (keep fraction, OUT, top-k, calibration size, export compatibility);
the output is written into a temporary folder beside OUT and renamed into place, so an interrupted command
leaves nothing behind.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

DEFAULT_CALIB_TOKENS = 32768
NAEE_INPUTS = 2048


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_common(p, methods, what: str) -> None:
    p.add_argument("src", help="moekit run folder to compress")
    p.add_argument("out", help="folder to write (must not exist)")
    p.add_argument("--method", required=True, choices=methods, help=f"{what} method")
    p.add_argument("--keep", required=True, type=float, help="fraction of experts kept, in (0, 1]")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--per-layer", dest="global_budget", action="store_false",
                       help="keep the same fraction in every MoE layer (default)")
    scope.add_argument("--global", dest="global_budget", action="store_true",
                       help="one budget over all layers (counts may differ per layer; moekit format only)")
    p.set_defaults(global_budget=False)
    p.add_argument("--clamp-top-k", action="store_true",
                   help="lower top-k to the experts left where fewer remain (else an error)")
    p.add_argument("--format", default="moekit", choices=("moekit", "hf"),
                   help="moekit: a run folder (default); hf: a transformers Qwen3-MoE checkpoint (equal counts)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--calib-domain", metavar="NAME", help="calibrate on one domain of the run's corpus")
    src.add_argument("--calib-data", metavar="PATH", help="calibrate on your own text file or folder")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                   help=f"calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    p.add_argument("--min-expert-tokens", type=int, default=1,
                   help="every expert needs this many routed calibration tokens (default 1)")
    p.add_argument("--allow-undercalibrated", action="store_true", help="continue when experts have fewer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def add_prune(sub) -> None:
    from .compress.prune import NAEE_MAX_COMBINATIONS, PRUNE_METHODS

    from .compress.dern import DERN_ALPHA

    p = sub.add_parser("prune", help="drop experts (frequency, REAP, EASY-EP, NAEE, DERN, UNCURL) from a run")
    _add_common(p, PRUNE_METHODS, "pruning")
    p.add_argument("--dern-alpha", type=float, default=DERN_ALPHA,
                   help=f"dern: cosine similarity below which a dropped neuron segment is discarded "
                        f"(default {DERN_ALPHA})")
    p.add_argument("--naee-max-combinations", type=int, default=NAEE_MAX_COMBINATIONS,
                   help="naee: exhaustive search up to this many drop sets per layer, greedy beyond")
    p.add_argument("--naee-tokens", type=int, default=NAEE_INPUTS,
                   help=f"naee: calibration tokens per layer for the reconstruction error (default {NAEE_INPUTS})")
    p.add_argument("--dynamic-skip", action="store_true",
                   help="naee: also calibrate dynamic skipping (beta = median w2/w1 per layer), store the betas "
                        "in config.json and report the fraction of experts skipped on the calibration data")
    p.set_defaults(func=cmd_prune)


def add_merge(sub) -> None:
    from .compress.merge import MERGE_METHODS

    p = sub.add_parser("merge", help="merge clusters of experts (HC-SMoE, UNCURL) into single experts")
    _add_common(p, MERGE_METHODS, "merging")
    p.add_argument("--router-rows", default="dominant", choices=("dominant", "average"),
                   help="router row of a merged expert: the most frequent member's (default) or the mean")
    p.set_defaults(func=cmd_merge)


# ------------------------------------------------------------------------------------------------ checks
def _check_paths(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise ValueError(f"SRC {src} is not a run folder")
    s, o = src.resolve(), out.resolve()
    if o == s or o.is_relative_to(s) or s.is_relative_to(o):
        raise ValueError(f"OUT {out} must lie outside SRC {src} (and not contain it)")
    if out.exists() or out.is_symlink():
        raise ValueError(f"OUT {out} already exists; choose a new folder")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{parent} is a file, not a folder, so {out} cannot be written")
            break


def _prepare(args, method_kind: str):
    """Everything checked before any work; returns (run config, model config, budget, calibration batches)."""
    from .compress.calibrate import MIN_CALIB_TOKENS, calibration_batches, text_batches
    from .compress.prune import budgets, check_keep
    from .train import read_run_config
    from .train.config import check_run_config, run_data_path

    check_keep(args.keep)
    src, out = Path(args.src), Path(args.out)
    _check_paths(src, out)
    cfg = read_run_config(src)
    model_cfg, _ = check_run_config(cfg, str(src / "config.json"))
    moes = model_cfg.layer_moes
    if not moes:
        raise ValueError(f"{src} has no MoE layers")
    layer_experts = {i: m.num_experts for i, m in moes.items()}
    layer_top_k = {i: m.top_k for i, m in moes.items()}
    budget = budgets(layer_experts, layer_top_k, args.keep, global_budget=args.global_budget,
                     clamp_top_k=args.clamp_top_k)
    if args.global_budget and args.format == "hf":
        raise ValueError("--format hf needs the same expert count in every layer; use --per-layer")
    if getattr(args, "method", None) == "naee" and args.global_budget:
        raise ValueError("naee searches each layer's best set for a given size; use --per-layer")
    if args.method == "naee":
        from .routing import get

        from .routing.topk import TopKRouter

        for i, m in moes.items():
            if not issubclass(get(m.router), TopKRouter) or m.num_groups != 1:
                raise ValueError(f"naee needs a top-k router without expert groups; layer {i} uses {m.router!r}")
        if args.naee_max_combinations < 1 or args.naee_tokens < 1:
            raise ValueError("--naee-max-combinations and --naee-tokens must be >= 1")
    if getattr(args, "dern_alpha", None) is not None and not -1.0 <= args.dern_alpha <= 1.0:
        raise ValueError(f"--dern-alpha must be a cosine similarity in [-1, 1], got {args.dern_alpha}")
    if args.method == "dern":
        for i, m in moes.items():
            if m.experts != "dense":
                raise ValueError(f"dern needs dense experts; layer {i} uses {m.experts!r}")
    if getattr(args, "dynamic_skip", False) and (args.method != "naee" or min(layer_top_k.values()) < 2):
        raise ValueError("--dynamic-skip goes with --method naee on layers with top-k >= 2")
    if args.min_expert_tokens < 0:
        raise ValueError(f"--min-expert-tokens must be >= 0, got {args.min_expert_tokens}")
    if args.calib_tokens < MIN_CALIB_TOKENS:
        raise ValueError(f"calibration too small: --calib-tokens must be >= {MIN_CALIB_TOKENS}, got {args.calib_tokens}")
    if args.format == "hf":
        from .compress.prune import _new_config
        from .model.hf_mapping import qwen3_incompatibilities

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problems = qwen3_incompatibilities(_new_config(model_cfg, budget, args.clamp_top_k))
        if problems:
            raise ValueError("--format hf: the model has no Qwen3-MoE equivalent: " + "; ".join(problems))
    seq_len = cfg["train"]["seq_len"]
    if args.calib_data:
        batches = text_batches(args.calib_data, seq_len, args.calib_tokens)
    else:
        from .commands import _load_data

        corpus = _load_data(run_data_path(cfg))
        batches = calibration_batches(corpus, seq_len, args.calib_tokens, domain=args.calib_domain)
    return cfg, model_cfg, budget, layer_top_k, batches


def _calibrate(args, model, batches, **options):
    from .compress.calibrate import calibrate, require_min_tokens

    t0 = time.perf_counter()
    stats = calibrate(model, batches, progress=not args.no_progress, total=len(batches), **options)
    if not args.json:
        _err(stats.format_counts())
    low = require_min_tokens(stats, args.min_expert_tokens, allow=args.allow_undercalibrated)
    if low:
        _err(f"warning: {len(low)} experts have fewer than {args.min_expert_tokens} calibration tokens "
             "(--allow-undercalibrated)")
    _err(f"calibrated {stats.tokens:,} tokens in {time.perf_counter() - t0:.1f}s")
    return stats


def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix == ".safetensors")


def _write(args, cfg: dict, model, record: dict) -> Path:
    """Write the compressed model to OUT through a temporary folder beside it."""
    from .io import atomic_save_safetensors, atomic_write_json, temp_sibling_dir

    out = Path(args.out)
    tmp = temp_sibling_dir(out)
    try:
        if args.format == "hf":
            from .hf.export import export_model_hf

            folder = export_model_hf(model, tmp / "hf")  # a Qwen3-MoE checkpoint, plus what was done
            atomic_write_json(folder / "moekit_compression.json", record)
        else:
            folder = tmp
            new_cfg = copy.deepcopy(cfg)
            new_cfg["model"] = model.config.to_dict()
            new_cfg["compression"] = record
            atomic_write_json(tmp / "config.json", new_cfg)
            atomic_save_safetensors(tmp / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
        if out.exists() or out.is_symlink():
            raise ValueError(f"OUT {out} appeared while compressing; nothing written")
        os.replace(folder, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _finish(args, src_model, new_model, record: dict) -> int:
    out = _write(args, record.pop("_cfg"), new_model, record)
    src_bytes = _file_bytes(Path(args.src))
    out_bytes = _file_bytes(out)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    summary = {"out": str(out), "method": record["method"], "keep": record["keep"],
               "experts_per_layer": new_model.config.experts_per_layer,
               "parameters_before": params(src_model), "parameters_after": params(new_model),
               "bytes_before": src_bytes, "bytes_after": out_bytes}
    for key in ("skipped_fraction", "betas"):
        if key in record:
            summary[key] = record[key]
    if args.json:
        print(json.dumps(summary))
    else:
        _err(f"{record['method']}: experts per layer {src_model.config.experts_per_layer} -> "
             f"{new_model.config.experts_per_layer}; parameters {summary['parameters_before']:,} -> "
             f"{summary['parameters_after']:,}; weights file {src_bytes:,} -> {out_bytes:,} bytes -> {out}")
    return 0


def _record(args, cfg, kind: str, groups: dict) -> dict:
    return {"_cfg": cfg, "kind": kind, "method": args.method, "keep": args.keep, "source": str(Path(args.src).resolve()),
            "budget": "global" if args.global_budget else "per-layer",
            "calibration": {"domain": args.calib_domain, "data": args.calib_data, "tokens": args.calib_tokens},
            "groups": {str(i): g for i, g in groups.items()}}


def cmd_prune(args) -> int:
    from .compress import prune as P
    from .train import load_run

    from .hf.prune_io import is_hf_checkpoint

    if is_hf_checkpoint(args.src):
        return _cmd_prune_hf(args)
    if args.method == "uncurl":  # UNCURL prunes by merging clusters: the merge path
        args.router_rows = "dominant"
        return cmd_merge(args)
    cfg, model_cfg, budget, layer_top_k, batches = _prepare(args, "prune")
    model, _ = load_run(Path(args.src))
    stats = _calibrate(args, model, batches, keep_inputs=args.naee_tokens if args.method == "naee" else 0)
    dern_report = None
    if args.method == "naee":
        keep = P.naee_keep_sets(model, stats, budget, max_combinations=args.naee_max_combinations,
                                clamp_top_k=args.clamp_top_k, log=None if args.json else _err)
    else:
        scores = {s.layer_index: P.expert_scores(s, args.method) for s in stats.layers}
        keep = P.keep_sets(scores, budget, layer_top_k, args.clamp_top_k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.method == "dern":
            from .compress.dern import dern_model

            new_model, dern_report = dern_model(model, stats, keep, alpha=args.dern_alpha,
                                                clamp_top_k=args.clamp_top_k, log=None if args.json else _err)
        else:
            new_model = P.prune_model(model, keep, clamp_top_k=args.clamp_top_k)
    for w in caught:
        _err(f"warning: {w.message}")
    record = _record(args, cfg, "prune", {i: [[e] for e in k] for i, k in keep.items()})
    record["kept"] = {str(i): k for i, k in keep.items()}
    if dern_report is not None:
        record["dern"] = {"alpha": args.dern_alpha,
                          "segments": {str(i): {"merged": a, "discarded": d} for i, (a, d) in dern_report.items()}}
    if args.dynamic_skip:
        import torch

        betas = {s.layer_index: s.ratio_median() for s in stats.layers}
        skip = P.enable_dynamic_skipping(new_model, betas)
        with torch.no_grad():
            for b in batches:
                kw = {"attention_mask": b["attention_mask"]} if b.get("attention_mask") is not None else {}
                new_model(b["input_ids"], **kw)
        skip.remove()
        record["betas"] = {str(i): v for i, v in betas.items()}
        record["skipped_fraction"] = skip.skipped_fraction
        _err(f"dynamic skipping: beta per layer {[round(v, 4) for v in betas.values()]}; "
             f"{100 * skip.skipped_fraction:.1f}% of routed pairs skipped on the calibration data")
    return _finish(args, model, new_model, record)


def cmd_merge(args) -> int:
    from .compress import merge as M
    from .train import load_run

    from .hf.prune_io import is_hf_checkpoint

    if is_hf_checkpoint(args.src):
        raise ValueError("merging transformers checkpoints is not supported; prune them (--method frequency, reap "
                         "or dern)")
    cfg, model_cfg, budget, layer_top_k, batches = _prepare(args, "merge")
    model, _ = load_run(Path(args.src))
    stats = _calibrate(args, model, batches, all_experts=args.method == "hc_smoe")
    counts = budget if isinstance(budget, dict) else M.global_counts(stats, budget, layer_top_k, args.clamp_top_k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new_model, groups = M.merge_model(model, stats, counts, method=args.method, router_rows=args.router_rows,
                                          clamp_top_k=args.clamp_top_k)
    for w in caught:
        _err(f"warning: {w.message}")
    record = _record(args, cfg, "merge", groups)
    record["router_rows"] = args.router_rows
    return _finish(args, model, new_model, record)


# ------------------------------------------------------------------------------------------------ dynamic skipping
DYNAMIC_SKIP_CALIB_TOKENS = 8192


def add_dynamic_skip_arguments(p) -> None:
    """``--dynamic-skip`` for ``moekit eval`` / ``moekit generate`` (NAEE dynamic skipping at inference)."""
    p.add_argument("--dynamic-skip", action="store_true",
                   help="NAEE dynamic skipping: skip a token's non-first expert when its routing weight is below "
                        "beta x the first one's; beta per layer from the run's config.json (written by `moekit "
                        "prune --dynamic-skip`), else the median w2/w1 on "
                        f"{DYNAMIC_SKIP_CALIB_TOKENS} training tokens; reports the fraction of experts skipped")


def start_dynamic_skip(args, model, cfg: dict):
    """Install dynamic skipping on ``model`` when ``args.dynamic_skip``; returns the handle (or None)."""
    if not getattr(args, "dynamic_skip", False):
        return None
    from .compress.prune import enable_dynamic_skipping, moe_layer_map

    layers = moe_layer_map(model)
    if not layers or max(m.config.top_k for _, m in layers.values()) < 2:
        raise ValueError("--dynamic-skip needs MoE layers with top-k >= 2")
    stored = (cfg.get("compression") or {}).get("betas")
    if stored:
        betas = {int(i): float(b) for i, b in stored.items()}
        source = "config.json"
    else:
        from .commands import _load_data
        from .compress.calibrate import calibrate, calibration_batches
        from .train.config import run_data_path

        corpus = _load_data(run_data_path(cfg))
        batches = calibration_batches(corpus, cfg["train"]["seq_len"], DYNAMIC_SKIP_CALIB_TOKENS)
        stats = calibrate(model, batches, progress=False)
        betas = {s.layer_index: s.ratio_median() for s in stats.layers if s.top_k >= 2}
        source = f"median w2/w1 on {stats.tokens:,} training tokens"
    skip = enable_dynamic_skipping(model, betas)
    skip.source = source
    return skip


def finish_dynamic_skip(args, skip, result: dict | None = None) -> None:
    """Remove the hooks, put ``skipped_fraction`` and ``betas`` into ``result`` and report on stderr."""
    if skip is None:
        return
    skip.remove()
    if result is not None:
        result["dynamic_skip"] = {"skipped_fraction": skip.skipped_fraction, "skipped_pairs": skip.skipped_pairs,
                                  "pairs": skip.pairs, "betas": {str(i): b for i, b in skip.betas.items()}}
    _err(f"dynamic skipping (beta from {skip.source}): {100 * skip.skipped_fraction:.1f}% of routed experts "
         f"skipped ({skip.skipped_pairs:,} of {skip.pairs:,} token-expert pairs)")


# ------------------------------------------------------------------------------------------------ transformers input
def _cmd_prune_hf(args) -> int:
    """``moekit prune`` on a transformers checkpoint folder: an ordinary transformers checkpoint out."""
    import torch

    from .compress.prune import budgets, check_keep
    from .hf import prune_io as H

    check_keep(args.keep)
    src, out = Path(args.src), Path(args.out)
    _check_paths(src, out)
    if args.method not in H.HF_PRUNE_METHODS:
        raise ValueError(f"--method {args.method}: transformers checkpoints can be pruned with "
                         f"{', '.join(H.HF_PRUNE_METHODS)}")
    if args.global_budget:
        raise ValueError("a transformers checkpoint needs the same expert count in every layer; use --per-layer")
    if getattr(args, "dynamic_skip", False):
        raise ValueError("--dynamic-skip applies to moekit runs")
    if args.calib_tokens < 64:
        raise ValueError(f"calibration too small: --calib-tokens must be >= 64, got {args.calib_tokens}")
    model, blocks = H.load_hf(src)
    top_k = int(getattr(model.config, "num_experts_per_tok", 1) or 1)
    budget = budgets({i: b.num_experts for i, b in enumerate(blocks)}, {i: top_k for i in range(len(blocks))},
                     args.keep, clamp_top_k=args.clamp_top_k)
    seq_len = int(min(256, getattr(model.config, "max_position_embeddings", 256) or 256))
    corpus = None
    if not args.calib_data:
        from .commands import _load_data

        corpus = _load_data(None)
    batches = H.calibration_batches_hf(src, model, seq_len, args.calib_tokens, text_path=args.calib_data,
                                       corpus=corpus, domain=args.calib_domain)
    stats = H.calibrate_hf(model, blocks, batches, progress=not args.no_progress)
    low = [(b.name, e, int(c)) for b, s in zip(blocks, stats) for e, c in enumerate(s["count_E"].tolist())
           if c < args.min_expert_tokens]
    if low and not args.allow_undercalibrated:
        raise ValueError(f"{len(low)} experts have fewer than {args.min_expert_tokens} calibration tokens (e.g. "
                         f"{low[0][0]} expert {low[0][1]}: {low[0][2]}); pass --allow-undercalibrated")
    if not args.json:
        for b, s in zip(blocks, stats):
            _err(f"{b.name}: tokens per expert {s['count_E'].tolist()}")
    keep = [sorted(torch.topk(sc, budget[i]).indices.tolist()) for i, sc in enumerate(H.scores(stats, args.method))]
    new = H.prune_hf(model, blocks, keep, method=args.method, stats=stats,
                     dern_alpha=getattr(args, "dern_alpha", 0.4), clamp_top_k=args.clamp_top_k)
    record = {"kind": "prune", "method": args.method, "keep": args.keep, "source": str(src.resolve()),
              "input": "transformers", "kept": {b.name: k for b, k in zip(blocks, keep)},
              "calibration": {"domain": args.calib_domain, "data": args.calib_data, "tokens": args.calib_tokens}}
    from .io import atomic_write_json, temp_sibling_dir

    tmp = temp_sibling_dir(out)
    try:
        new.save_pretrained(tmp)
        skip = {"config.json", "generation_config.json", "model.safetensors.index.json"}
        for f in src.iterdir():  # tokenizer and other side files travel with the weights
            if f.is_file() and f.name not in skip and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")) \
                    and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        atomic_write_json(tmp / "moekit_compression.json", record)
        if out.exists() or out.is_symlink():
            raise ValueError(f"OUT {out} appeared while compressing; nothing written")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size = lambda folder: sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")  # noqa: E731
    summary = {"out": str(out), "method": args.method, "keep": args.keep, "experts_per_layer": [len(k) for k in keep],
               "bytes_before": size(src), "bytes_after": size(out)}
    if args.json:
        print(json.dumps(summary))
    else:
        _err(f"{args.method}: experts per layer {[b.num_experts for b in blocks]} -> {summary['experts_per_layer']}; "
             f"weights {summary['bytes_before']:,} -> {summary['bytes_after']:,} bytes -> {out}")
    return 0
