"""The subcommands of ``moekit``: train, eval, generate (trace and report live beside them)."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ train
def add_train(sub) -> None:
    from .train import add_config_flags

    p = sub.add_parser("train", help="train the built-in MoE language model (defaults: the stdlib corpus)")
    p.add_argument("--config", help="TOML file with [model], [moe] and [train] tables")
    p.add_argument("--data", help="train on your own text file or folder instead of the embedded corpus")
    p.add_argument("--out", default="runs", help="folder that holds run folders (default ./runs)")
    p.add_argument("--name", help="run folder name (default: a timestamp)")
    p.add_argument("--resume", metavar="RUN", help="continue the run folder RUN from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p)
    from . import commands_adapt
    commands_adapt.add_train_domain_arguments(p)  # --exclude-domains (adapt)
    p.set_defaults(func=cmd_train)


LAYOUT_FLAGS = ("cfg__train__steps", "cfg__train__expert_parallel", "cfg__train__overlap_chunks")


def cmd_train(args) -> int:
    """Train a new run or resume one; under torchrun every process runs this (rank 0 writes the files)."""
    from .train import (NonFiniteLoss, build_configs, new_run_config, read_run_config, read_toml, run_training)
    from .train.config import check_run_config, run_data_path
    from .io import atomic_write_json, remove_stale_temporaries
    from .parallel import ParallelLayout

    if args.resume:
        run_dir = Path(args.resume)
        base = read_run_config(run_dir)
        check_run_config(base, str(run_dir / "config.json"))  # every key present: no silent defaults
        flags = [k for k in vars(args) if k.startswith("cfg__")]
        if args.config or args.data or [f for f in flags if f not in LAYOUT_FLAGS]:
            raise ValueError("--resume continues a run as configured; only --steps, --expert-parallel and "
                             "--overlap-chunks may change")
        model_cfg, train_cfg = build_configs(args, base, where=str(run_dir / "config.json"))
        run_config = {**base, "model": model_cfg.to_dict(), "train": vars(train_cfg).copy()}
        plugins = list(base.get("plugins") or [])  # loaded by read_run_config; --plugin may add more
        plugins += [p for p in getattr(args, "plugin_paths", []) if p not in plugins]
        if plugins:
            run_config["plugins"] = plugins
    else:
        _check_run_name(args.name)
        _check_output_folder(Path(args.out), "--out")
        base = read_toml(args.config) if args.config else {}
        if args.data and not Path(args.data).exists():
            raise FileNotFoundError(f"--data: {args.data} does not exist")
        model_cfg, train_cfg = build_configs(args, base, where=f"--config {args.config}" if args.config else "settings")
        run_config = new_run_config(model_cfg, train_cfg, str(Path(args.data).resolve()) if args.data else None,
                                    plugins=getattr(args, "plugin_paths", None))
    # Everything is checked before anything is written: the model builds (on the meta device: no memory, no
    # random numbers drawn) and the data gives a corpus (built in the cache folder, not in the run).
    _check_model_builds(model_cfg)
    train_cfg.check_device()
    _load_data(run_data_path(run_config))
    from . import commands_adapt
    commands_adapt.apply_train_domains(args, run_config)  # --exclude-domains
    # The trainer runs on the CPU, hence gloo (NCCL needs CUDA tensors).
    layout = ParallelLayout.initialise(train_cfg.expert_parallel, _layout_experts(model_cfg, train_cfg.expert_parallel),
                                       train_cfg.batch_size, backend="gloo")
    created = None  # the run folder this command made: removed again when it ends without a checkpoint
    try:
        if not args.resume:
            run_dir = Path(args.out) / (args.name or time.strftime("run-%Y%m%d-%H%M%S",
                                                                   time.localtime(_shared_time(layout))))
            if run_dir.exists() or run_dir.is_symlink():
                raise ValueError(f"run folder {run_dir} already exists; choose another --name or --resume it")
            _barrier(layout)
            if layout.is_main:
                run_dir.mkdir(parents=True)
                created = run_dir
        elif layout.is_main:  # temporaries of writes that were killed earlier
            for folder in (run_dir, run_dir / "checkpoints"):
                remove_stale_temporaries(folder)
        if layout.is_main and not args.resume:  # a resumed run's config is rewritten once it has resumed
            atomic_write_json(run_dir / "config.json", run_config)
        _barrier(layout)
        try:
            run_training(run_dir, run_config, resume=bool(args.resume), log=_err, progress=not args.no_progress,
                         layout=layout)
        except NonFiniteLoss as exc:
            created = None  # a diverged run is a result: its metrics show how it diverged
            _err(f"moekit train: {exc}")
            return 1
        except KeyboardInterrupt as exc:
            what = exc.describe() if hasattr(exc, "describe") else "the last checkpoint is kept"
            if getattr(exc, "kept_step", 0) is None:  # nothing to resume from
                _err(f"moekit train: interrupted before the first checkpoint; {what}; "
                     + (f"{run_dir} is removed; start again" if created is not None else
                        f"remove {run_dir} and start again"))
            elif layout.world_size > 1:
                _err(f"moekit train: interrupted; the last checkpoint is kept; continue with: "
                     f"torchrun --nproc-per-node {layout.world_size} -m moekit train --resume {run_dir} "
                     f"--expert-parallel {layout.ep_size}")
            else:
                _err(f"moekit train: interrupted; {what}; continue with: moekit train --resume {run_dir}")
            return 130
        if layout.is_main:
            _err(f"run folder: {run_dir}")
        # Every rank past its last collective before any rank tears its process groups down: destroying a
        # gloo group while a peer still talks on it aborted a process at exit (seen with 4 processes).
        _barrier(layout)
        if layout.world_size > 1:
            # Leave without tearing gloo down: its teardown aborted one of 4 ranks now and then ("terminate
            # called without an active exception", SIGABRT, after every rank had finished; seen in the suite).
            # Every file is closed and every checkpoint renamed into place by now; the OS closes the sockets.
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(0)
        return 0
    finally:
        if created is not None and not (created / "latest.json").exists():
            # Bad input found late, or Ctrl-C before the first checkpoint: nothing to resume from, so leave
            # no folder behind that would block the corrected command.
            shutil.rmtree(created, ignore_errors=True)
        if layout.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _check_run_name(name: str | None) -> None:
    """``--name`` is one plain folder name inside ``--out``: no separators, no ``..``, not absolute."""
    if name is None:
        return
    bad = (not name or name in (".", "..") or "/" in name or "\0" in name or os.sep in name
           or (os.altsep is not None and os.altsep in name) or Path(name).is_absolute() or name.strip() != name)
    if bad:
        raise ValueError(f"--name must be a single folder name inside --out (no '/', '..', absolute path or "
                         f"surrounding spaces), got {name!r}")


def _check_model_builds(model_cfg) -> None:
    """Construct the model on the meta device, so that a setting only its modules check fails now."""
    import warnings

    import torch

    from .model import MoELM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            MoELM(model_cfg)
    except TypeError as exc:
        raise ValueError(f"the model cannot be built from these settings ({exc})") from None


def _load_data(path: str | None):
    """The corpus of ``--data`` (or the embedded one); ``ValueError`` naming the path when it is unusable."""
    from .data import load_corpus

    try:
        return load_corpus(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ValueError(f"--data: {exc}") from None


def _layout_experts(model_cfg, ep_size) -> int:
    """The expert count the parallel layout is checked against. Every MoE layer's experts are sharded over the
    ``ep_size`` ranks, so with per-layer counts (``moe_overrides``) each must be divisible: ``ValueError`` naming
    the first layer that is not (the same check on every rank, before any collective)."""
    counts = {i: m.num_experts for i, m in model_cfg.layer_moes.items()}
    if isinstance(ep_size, int) and not isinstance(ep_size, bool) and ep_size > 1:
        for i, n in counts.items():
            if n % ep_size:
                raise ValueError(f"expert_parallel={ep_size} does not divide num_experts={n} of layer {i}; "
                                 f"experts per MoE layer: {list(counts.values())}")
    return min(counts.values(), default=model_cfg.moe.num_experts)


def _barrier(layout) -> None:
    if layout.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _shared_time(layout) -> float:
    """Rank 0's clock, so that every rank names a new run folder the same."""
    now = time.time()
    if layout.world_size == 1:
        return now
    import torch
    import torch.distributed as dist

    t = torch.tensor([now], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t)


# ------------------------------------------------------------------------------------------------ eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss, bits per byte and perplexity, overall and per domain")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", help="evaluate on this text file or folder instead of the run's data")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many validation windows")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rewire", action="store_true",
                   help="streaming evaluation with test-time rewiring (moekit.adapt): each window is scored left to "
                        "right and the routers' logit offsets adapt on the part already scored; prints bits per "
                        "byte with and without it")
    p.add_argument("--rewire-every", type=int, default=64, help="with --rewire: tokens scored between adaptations")
    p.add_argument("--rewire-steps", type=int, default=3, help="with --rewire: optimiser steps per adaptation")
    p.add_argument("--rewire-lr", type=float, default=0.01, help="with --rewire: learning rate of the offsets")
    from . import commands_compress
    commands_compress.add_dynamic_skip_arguments(p)  # NAEE dynamic skipping
    from . import commands_adapt
    commands_adapt.add_eval_domain_arguments(p)  # --domains (adapt)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .data import unigram_baseline
    from .train import evaluate, load_run

    from .train.config import run_data_path

    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError("--max-windows must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.data and not Path(args.data).exists():
        raise FileNotFoundError(f"--data: {args.data} does not exist")
    if args.rewire:
        from . import commands_adapt

        commands_adapt.check_rewire_schedule(args)
    model, cfg = load_run(Path(args.run))
    data = args.data if args.data else run_data_path(cfg)
    corpus = _load_data(data)
    from . import commands_adapt
    corpus = commands_adapt.eval_corpus(args, corpus)  # --domains
    train = cfg["train"]
    if args.rewire:
        return _eval_rewire(args, model, corpus, train["seq_len"])
    from . import commands_compress
    skip = commands_compress.start_dynamic_skip(args, model, cfg)  # NAEE skipping
    result = evaluate(model, corpus, train["seq_len"], args.batch_size or train["batch_size"], args.max_windows,
                      progress=not args.json)
    commands_compress.finish_dynamic_skip(args, skip, result)
    if not math.isfinite(result["bits_per_byte"]):
        raise ValueError(f"{args.run}: the validation loss is not finite ({result['bits_per_byte']}); the model "
                         "produces NaN or infinite logits")
    result["unigram_bits_per_byte"] = unigram_baseline(corpus)["bits_per_byte"]
    if args.json:
        print(json.dumps(result))
        return 0
    base = result["unigram_bits_per_byte"]
    print(f"validation: loss {result['loss']:.4f} nats, {result['bits_per_byte']:.4f} bits/byte, "
          f"perplexity {result['perplexity']:.3f} ({result['tokens']:,} bytes)")
    print(f"order-0 (unigram) baseline: {base:.4f} bits/byte ({100 * (1 - result['bits_per_byte'] / base):.1f}% below)")
    print(f"{'domain':24s} {'bits/byte':>10s} {'bytes':>10s}")
    for name, d in sorted(result["domains"].items(), key=lambda kv: -kv[1]["tokens"]):
        print(f"{name:24s} {d['bits_per_byte']:10.4f} {d['tokens']:10,d}")
    return 0


def _eval_rewire(args, model, corpus, seq_len: int) -> int:
    """``moekit eval --rewire``: streaming rewiring against the plain model on the same validation windows."""
    from .adapt import Rewirer, evaluate_streaming, windows_from_corpus

    try:
        rewirer = Rewirer(model, lr=args.rewire_lr, steps=args.rewire_steps, every=args.rewire_every)
    except ValueError as exc:  # e.g. a router without logits (hash)
        raise ValueError(f"--rewire: {exc}") from None
    windows = windows_from_corpus(corpus, seq_len, args.max_windows)
    t0 = time.perf_counter()
    result = evaluate_streaming(model, rewirer, windows)
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result))
        return 0
    plain, rewired = result["bits_per_byte_plain"], result["bits_per_byte"]
    print(f"streaming rewiring over {result['tokens']:,} bytes ({result['adaptations']} adaptations of "
          f"{args.rewire_steps} steps every {args.rewire_every} tokens, lr {args.rewire_lr}):")
    print(f"  without: {plain:.4f} bits/byte   with: {rewired:.4f} bits/byte   ({rewired - plain:+.4f})")
    return 0


# ------------------------------------------------------------------------------------------------ generate
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained run (KV cache); one prompt or a batch")
    p.add_argument("run", help="run folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--prompt", default=None, help="text to continue (default: start of a document)")
    which.add_argument("--prompts", metavar="FILE",
                       help="generate for every prompt of FILE as one padded batch: one prompt a line (empty lines "
                            "skipped), or JSON Lines with a \"prompt\" string per line (FILE.jsonl, or every "
                            "non-blank line a JSON object with \"prompt\")")
    p.add_argument("--max-new-tokens", type=int, default=200, help="at most this many new tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a prompt's text where it produces TEXT (not printed; repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: per-prompt text, token counts, stop reason and tokens/s")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step")
    p.add_argument("--threads", default="auto", help="intra-op threads: 'auto' (default: one thread for model "
                   "calls of at most 8 token rows, such as decoding steps, which keeps its speed on a busy "
                   "machine; torch's count for larger calls) or a number")
    from . import commands_compress
    commands_compress.add_dynamic_skip_arguments(p)  # NAEE dynamic skipping
    from . import commands_adapt
    commands_adapt.add_generate_rewire_arguments(p)  # --rewire (adapt)
    from . import commands_offload
    commands_offload.add_generate_arguments(p)  # --expert-budget (offload)
    p.set_defaults(func=cmd_generate)


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3
MIN_TOP_P = 1e-6


def read_prompts(path: str) -> list[tuple[int, str]]:
    """``(line number, prompt)`` pairs of a ``--prompts`` file. JSON Lines (``{"prompt": ...}`` per line) when
    the name ends in ``.jsonl`` or every non-blank line parses as a JSON object with a ``"prompt"`` key;
    otherwise every non-empty line is one prompt, taken literally (no stripping beyond the line break)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompts {path}: not UTF-8 text (byte {exc.start})") from None
    lines = [(n, line[:-1] if line.endswith("\r") else line) for n, line in enumerate(text.split("\n"), 1)]

    def as_record(line: str):
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        return rec if isinstance(rec, dict) and "prompt" in rec else None

    filled = [(n, line) for n, line in lines if line.strip()]
    if Path(path).suffix.lower() == ".jsonl" or (filled and all(as_record(line) is not None for _, line in filled)):
        prompts = []
        for n, line in filled:
            rec = as_record(line)
            if rec is None:
                raise ValueError(f"--prompts {path} line {n}: expected a JSON object with a \"prompt\" key")
            if not isinstance(rec["prompt"], str):
                raise ValueError(f"--prompts {path} line {n}: \"prompt\" must be a string, got "
                                 f"{type(rec['prompt']).__name__}")
            prompts.append((n, rec["prompt"]))
    else:
        prompts = [(n, line) for n, line in lines if line]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts")
    return prompts


def cmd_generate(args) -> int:
    from .data import BOS_ID, EOS_ID
    from .model import generate_batch
    from .train import load_run, read_run_config

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # Dividing logits by a temperature below MIN_TEMPERATURE overflows float32 (inf - inf = NaN); such a
    # temperature is greedy decoding in all but name. The same bound keeps --top-p away from denormals.
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature <= MAX_TEMPERATURE):
        raise ValueError(f"--temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                         f"got {args.temperature}")
    if not MIN_TOP_P <= args.top_p <= 1:
        raise ValueError(f"--top-p must be in [{MIN_TOP_P}, 1], got {args.top_p}")
    if any(not s for s in args.stop):
        raise ValueError("--stop must be a non-empty string")
    from .threads import parse_threads

    threads = parse_threads(args.threads)
    from . import commands_adapt
    commands_adapt.check_generate_rewire(args)  # --rewire-* values
    from . import commands_offload
    commands_offload.check_generate_offload(args)  # --expert-budget values
    if args.prompts is not None:
        numbered = read_prompts(args.prompts)
    else:
        numbered = [(None, args.prompt or "")]
    # The run (format, version, plugins) and the context limit are checked from config.json before the weights
    # are read; load_run reads it again (plugins load once per process).
    limit = read_run_config(Path(args.run)).get("model", {}).get("max_seq_len")
    if isinstance(limit, int):
        for line, prompt in numbered:
            n = 1 + len(prompt.encode("utf-8"))  # BOS + bytes
            if n + args.max_new_tokens > limit:
                where = f"--prompts {args.prompts} line {line}: prompt" if line is not None else "prompt"
                raise ValueError(f"{where} plus --max-new-tokens ({n} + {args.max_new_tokens} tokens) exceeds the "
                                 f"model's max_seq_len={limit}")
    offloaded = None  # --expert-budget: the experts served from an expert store (moekit.serve.offload)
    if args.expert_budget is not None:
        (model, offloaded), _run_cfg = commands_offload.load_offloaded(args), read_run_config(Path(args.run))
    else:
        model, _run_cfg = load_run(Path(args.run))
    if args.rewire:  # test-time rewiring (moekit.adapt.online): its own loop, prompt by prompt
        return commands_adapt.generate_rewire(args, model, numbered, threads)
    from . import commands_compress
    skip = commands_compress.start_dynamic_skip(args, model, _run_cfg)  # NAEE
    prompts = [p for _, p in numbered]
    stream = None  # noqa: F811  (replaced below for a single prompt)
    if len(prompts) == 1 and not args.json:  # one prompt: print the text as it comes
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

        def stream(_index: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

    t0 = time.perf_counter()
    results = generate_batch(model, [[BOS_ID, *p.encode("utf-8")] for p in prompts], args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             use_cache=not args.no_cache, eos_id=EOS_ID, stop=args.stop, stream=stream,
                             threads=threads)
    dt = time.perf_counter() - t0
    commands_compress.finish_dynamic_skip(args, skip)
    total = sum(r.new_tokens for r in results)
    if args.json:
        out = {"batch_size": len(results), "cache": not args.no_cache, "new_tokens": total, "seconds": dt,
               "tokens_per_s": total / max(dt, 1e-9),
               "prompts": [{"prompt": p, **r.to_dict()} for p, r in zip(prompts, results)]}
        if offloaded is not None:
            out["offload"] = commands_offload.report(offloaded, total, dt)
        if args.prompts is not None:
            for (line, _), rec in zip(numbered, out["prompts"]):
                rec["line"] = line
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if stream is not None:
        sys.stdout.write("\n")
    else:
        for (line, prompt), r in zip(numbered, results):
            sys.stdout.write(f"==> prompt {r.index + 1} (line {line}) <==\n{prompt}{r.text}\n")
    sys.stdout.flush()
    stops = sorted({r.stop_reason for r in results})
    _err(f"{total} tokens in {dt:.2f}s ({total / max(dt, 1e-9):.1f} tokens/s, {len(results)} prompt"
         f"{'s' if len(results) > 1 else ''}, {'no cache' if args.no_cache else 'KV cache'}; stopped by "
         f"{', '.join(stops)})")
    if offloaded is not None:
        commands_offload.print_report(commands_offload.report(offloaded, total, dt))
    return 0


# ------------------------------------------------------------------------------------------------ trace
def add_trace(sub) -> None:
    p = sub.add_parser("trace", help="record every token's experts and weights per MoE layer (docs/trace-format.md)")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", help="trace this text file or folder instead of the run's validation split")
    p.add_argument("--out", help="trace file to write (default RUN/trace.safetensors)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--max-windows", type=int, default=64, help="windows of seq_len tokens to trace")
    p.add_argument("--logits", action="store_true", help="also keep the raw router logits")
    p.set_defaults(func=cmd_trace)


def trace_batches(corpus, split: str, seq_len: int, batch_size: int, max_windows: int):
    """Full windows of ``split`` with per-token position in document, document id, domain id and window id."""
    import numpy as np
    import torch

    from .data.batches import val_window_starts

    tokens = corpus.tokens(split)
    docs = corpus.documents(split)
    doc_start = np.fromiter((d["offset"] for d in docs), dtype=np.int64, count=len(docs))
    starts = val_window_starts(len(tokens), seq_len, max_windows)
    starts = starts[starts + seq_len <= len(tokens)]
    offsets = np.arange(seq_len, dtype=np.int64)
    for first in range(0, len(starts), batch_size):
        index_BL = starts[first:first + batch_size, None] + offsets
        doc_BL = np.searchsorted(doc_start, index_BL, side="right") - 1
        yield {
            "input_ids": torch.from_numpy(np.asarray(tokens[index_BL]).astype(np.int64)),
            "positions": torch.from_numpy(index_BL - doc_start[doc_BL]),
            "doc_ids": torch.from_numpy(doc_BL),
            "domain_ids": torch.from_numpy(corpus.domain_ids(split, index_BL)),
            "seq_ids": torch.from_numpy(np.broadcast_to(np.arange(first, first + len(index_BL))[:, None],
                                                        index_BL.shape).copy()),
        }


def make_trace(run_dir: Path, data: str | None, split: str, max_windows: int, logits: bool):
    from .trace import trace_model
    from .train import load_run

    from .train.config import run_data_path

    if max_windows < 1:
        raise ValueError("--max-windows must be >= 1")
    if data and not Path(data).exists():
        raise FileNotFoundError(f"--data: {data} does not exist")
    model, cfg = load_run(run_dir)
    corpus = _load_data(data if data else run_data_path(cfg))
    seq_len, batch_size = cfg["train"]["seq_len"], cfg["train"]["batch_size"]
    batches = list(trace_batches(corpus, split, seq_len, batch_size, max_windows))
    if not batches:
        raise ValueError(f"the {split} split is shorter than one window of {seq_len} tokens")
    m = model.config
    moes = list(m.layer_moes.values()) or [m.moe]
    info = {"dim": m.dim, "n_layers": m.n_layers, "router": m.moe.router,
            "num_experts": max(x.num_experts for x in moes), "top_k": max(x.top_k for x in moes), "run": str(run_dir)}
    if m.moe_overrides:  # per-layer settings: the trace header's num_experts_per_layer holds the counts
        info["top_k_per_layer"] = [x.top_k for x in moes]
        info["hidden_dim_per_layer"] = [x.hidden_dim for x in moes]
    return trace_model(model, batches, domain_names=corpus.domains, keep_logits=logits, model_info=info,
                       source={"data": data or run_data_path(cfg) or "stdlib", "split": split})


def cmd_trace(args) -> int:
    from .report import TRACE_FILE
    from .trace import save_trace

    run_dir = Path(args.run)
    out = Path(args.out) if args.out else run_dir / TRACE_FILE
    _check_output_file(out, "--out" if args.out else "trace file")
    t0 = time.perf_counter()
    trace = make_trace(run_dir, args.data, args.split, args.max_windows, args.logits)
    save_trace(trace, out)
    _err(f"traced {trace.num_tokens:,} tokens x {trace.num_layers} MoE layers in {time.perf_counter() - t0:.1f}s "
         f"-> {out}")
    return 0


# ------------------------------------------------------------------------------------------------ report
def add_report(sub) -> None:
    p = sub.add_parser("report", help="HTML routing report with plots, and a terminal summary")
    p.add_argument("path", help="a run folder (its metrics and trace; a trace is made when missing) or a trace file")
    p.add_argument("--out", help="report folder (default: RUN/report or TRACE's folder/report)")
    p.add_argument("--groups", help="two domains to profile against each other, 'A,B' (default: the two largest)")
    p.add_argument("--compare-trace", help="profile the report's trace against this second trace instead")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the disparity CIs")
    p.set_defaults(func=cmd_report)


# The bootstrap keeps a few numbers per resample and group: a million stays in the tens of megabytes.
MIN_RESAMPLES, MAX_RESAMPLES = 10, 1_000_000


def _check_output_file(path: Path, what: str) -> None:
    """A file can be written at ``path``: not an existing folder, no file where its folder should be."""
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder, not a file")
    _check_parent(path, what)


def _check_output_folder(path: Path, what: str) -> None:
    """A folder can be made or filled at ``path``: not an existing file, no file where a parent should be."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: {path} exists and is not a folder")
    _check_parent(path, what)


def _check_parent(path: Path, what: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what}: {parent} is a file, not a folder, so {path} cannot be written")
            return


def cmd_report(args) -> int:
    from .report import TRACE_FILE, analyse, build_report, report_inputs, summary_text
    from .trace import load_trace, save_trace

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not MIN_RESAMPLES <= args.resamples <= MAX_RESAMPLES:
        raise ValueError(f"--resamples must be in [{MIN_RESAMPLES}, {MAX_RESAMPLES:,}], got {args.resamples}")
    if args.groups:
        parts = [g.strip() for g in args.groups.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError("--groups takes two domain names separated by a comma, e.g. json,email")
    if args.compare_trace and not Path(args.compare_trace).is_file():
        raise ValueError(f"--compare-trace: {args.compare_trace} is not a file")
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "report"
    _check_output_folder(out, "--out" if args.out else "report folder")
    t0 = time.perf_counter()
    if path.is_dir() and not (path / TRACE_FILE).is_file() and (path / "model.safetensors").is_file():
        trace = make_trace(path, None, "val", 64, False)  # checks the run before saying anything
        _err(f"no trace in {path}: traced the validation split first")
        save_trace(trace, path / TRACE_FILE)
    trace, metrics = report_inputs(path)
    groups = None
    if args.compare_trace:
        groups = (trace, load_trace(args.compare_trace))
    elif args.groups:
        parts = [g.strip() for g in args.groups.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError("--groups takes two domain names separated by a comma, e.g. json,email")
        groups = tuple(parts)
    an = analyse(trace, metrics, groups, num_resamples=args.resamples)
    index = build_report(out, analysis=an)
    print(summary_text(analysis=an))
    _err(f"report: {index} ({time.perf_counter() - t0:.1f}s)")
    return 0


# ------------------------------------------------------------------------------------------------ inspect
def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="MoE structure, parameters and memory of a transformers checkpoint folder "
                                       "(reads config.json and safetensors headers only)")
    p.add_argument("path", help="local transformers checkpoint folder (config.json + *.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from .hf.inspect import format_info, inspect_checkpoint

    info = inspect_checkpoint(args.path)
    print(json.dumps(info.to_dict()) if args.json else format_info(info))
    return 0


# ------------------------------------------------------------------------------------------------ export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run as a transformers checkpoint (Qwen3MoeForCausalLM)")
    p.add_argument("run", help="run folder")
    p.add_argument("out", help="checkpoint folder to write (refused when it exists and is not empty)")
    p.add_argument("--format", default="hf", choices=("hf", "compressed-tensors"),
                   help="hf: transformers Qwen3-MoE (default); compressed-tensors: a `moekit quantize` run as the "
                        "pack-quantized checkpoint vLLM loads (moekit.hf.compressed_tensors)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .hf.export import export_hf

    if args.format == "compressed-tensors":  # moekit.hf.compressed_tensors (quantised runs)
        from .hf.compressed_tensors import export_compressed_tensors

        out = export_compressed_tensors(Path(args.run), Path(args.out), force=args.force)
        _err(f"exported {args.run} -> {out} (compressed-tensors pack-quantized Qwen3MoeForCausalLM)")
        return 0
    out = export_hf(Path(args.run), Path(args.out), force=args.force)
    _err(f"exported {args.run} -> {out} (transformers Qwen3MoeForCausalLM: config.json, model.safetensors)")
    return 0
