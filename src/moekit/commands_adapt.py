"""Adaptation commands and hooks: ``moekit finetune`` (full or router-only fine-tuning, RoMA), the domain
flags of ``moekit train`` (``--exclude-domains`` / ``--include-domains``) and ``moekit eval`` (``--domains``),
and ``moekit generate --rewire`` (test-time rewiring during generation). The methods live in
:mod:`moekit.adapt` and :mod:`moekit.data.select`; ``commands.py`` calls the hooks below."""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ train / eval
def add_train_domain_arguments(p) -> None:
    p.add_argument("--exclude-domains", metavar="A,B",
                   help="train without these domains of the data (e.g. held out for a domain-shift study); "
                        "recorded in the run's config.json")
    p.add_argument("--include-domains", metavar="A,B", help="train on these domains of the data only")


def apply_train_domains(args, run_config: dict) -> None:
    """Record ``--exclude-domains`` / ``--include-domains`` in a new run's config (names checked against the
    corpus before anything is written)."""
    from .data.select import corpus_for_run, parse_domains

    exclude = parse_domains(getattr(args, "exclude_domains", None), "--exclude-domains")
    include = parse_domains(getattr(args, "include_domains", None), "--include-domains")
    if exclude is None and include is None:
        return
    if getattr(args, "resume", None):
        raise ValueError("--resume continues a run on its recorded data; --exclude-domains/--include-domains "
                         "cannot change it")
    data = dict(run_config.get("data") or {})
    if include is not None:
        data["include_domains"] = include
    if exclude is not None:
        data["exclude_domains"] = exclude
    run_config["data"] = data
    corpus = corpus_for_run(run_config)
    if len(corpus.train) < 2:
        raise ValueError("the domain selection leaves no training text")


def add_eval_domain_arguments(p) -> None:
    p.add_argument("--domains", metavar="A,B", help="evaluate on these domains of the data only")


def eval_corpus(args, corpus):
    """The corpus ``moekit eval`` scores: restricted to ``--domains`` when given."""
    from .data.select import parse_domains, select_domains

    names = parse_domains(getattr(args, "domains", None), "--domains")
    if names is None:
        return corpus
    out = select_domains(corpus, include=names)
    if len(out.val) < 2:
        raise ValueError(f"--domains {','.join(names)}: these domains have no validation text")
    return out


# ------------------------------------------------------------------------------------------------ generate --rewire
def add_generate_rewire_arguments(p) -> None:
    g = p.add_argument_group("test-time rewiring (moekit.adapt)")
    g.add_argument("--rewire", action="store_true",
                   help="adapt the routers' logit offsets on the prompt, then every --rewire-every generated tokens "
                        "on the text so far; offsets reset per prompt (prompts run one after another)")
    g.add_argument("--rewire-every", type=int, default=64, help="generated tokens between adaptations (default 64)")
    g.add_argument("--rewire-steps", type=int, default=3, help="optimiser steps per adaptation (default 3)")
    g.add_argument("--rewire-lr", type=float, default=0.01, help="learning rate of the offsets (default 0.01)")
    g.add_argument("--rewire-layers", metavar="I,J",
                   help="MoE layer positions (0-based, model order) to adapt (default: all)")


def check_rewire_schedule(args) -> None:
    """Bad ``--rewire-every`` / ``--rewire-steps`` / ``--rewire-lr`` (eval and generate), before any loading."""
    if args.rewire_every < 1:
        raise ValueError(f"--rewire-every must be >= 1, got {args.rewire_every}")
    if args.rewire_steps < 1:
        raise ValueError(f"--rewire-steps must be >= 1, got {args.rewire_steps}")
    if not (math.isfinite(args.rewire_lr) and args.rewire_lr > 0):
        raise ValueError(f"--rewire-lr must be a finite number > 0, got {args.rewire_lr}")


def check_generate_rewire(args) -> None:
    """Bad ``--rewire-*`` values of generate, before the model is loaded."""
    if not getattr(args, "rewire", False):
        return
    check_rewire_schedule(args)
    if args.rewire_layers is not None:
        try:
            args.rewire_layers_list = [int(t) for t in args.rewire_layers.split(",")]
        except ValueError:
            raise ValueError(f"--rewire-layers takes MoE layer positions separated by commas, e.g. 2,3; got "
                             f"{args.rewire_layers!r}") from None


def generate_rewire(args, model, numbered, threads) -> int:
    """``moekit generate --rewire``: generation with online rewiring, reporting each adaptation on stderr
    (per-layer offset norms, fraction of changed top-k choices) and in ``--json``."""
    from .adapt import Rewirer, generate_rewired
    from .data import BOS_ID, EOS_ID

    try:
        rewirer = Rewirer(model, getattr(args, "rewire_layers_list", None), lr=args.rewire_lr,
                          steps=args.rewire_steps, every=args.rewire_every)
    except ValueError as exc:  # a router without logits (hash), a bad layer position
        raise ValueError(f"--rewire: {exc}") from None
    prompts = [p for _, p in numbered]
    single = len(prompts) == 1 and not args.json

    def stream(_index: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def on_adapt(index: int, a) -> None:
        norms = " ".join(f"{x:.3f}" for x in a.delta_norms)
        change = " ".join(f"{x:.2f}" for x in a.routing_change)
        where = "prefill" if a.generated == 0 else f"after {a.generated} tokens"
        _err(f"{'' if single else f'[prompt {index + 1}] '}rewire {where}: loss {a.loss_before:.3f} -> "
             f"{a.loss_after:.3f} nats on {a.tokens} tokens; |delta| per layer {norms}; top-k changed {change}"
             + ("" if a.recomputed_from is None else f"; KV cache recomputed from layer {a.recomputed_from}")
             + f" ({a.seconds * 1000:.0f} ms)")

    if single:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    t0 = time.perf_counter()
    results = generate_rewired(model, [[BOS_ID, *p.encode("utf-8")] for p in prompts], args.max_new_tokens, rewirer, args.rewire_every, on_adapt=on_adapt,
                               stream=stream if single else None, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed, use_cache=not args.no_cache, eos_id=EOS_ID, stop=args.stop,
                               threads=threads)
    dt = time.perf_counter() - t0
    total = sum(g.new_tokens for g, _ in results)
    if args.json:
        out = {"batch_size": len(results), "cache": not args.no_cache, "new_tokens": total, "seconds": dt,
               "tokens_per_s": total / max(dt, 1e-9),
               "rewire": {"every": args.rewire_every, "steps": args.rewire_steps, "lr": args.rewire_lr,
                          "layers": rewirer.layers},
               "prompts": [{"prompt": p, **g.to_dict(), "adaptations": [a.to_dict() for a in ads]}
                           for p, (g, ads) in zip(prompts, results)]}
        for (line, _), rec in zip(numbered, out["prompts"]):
            if line is not None:
                rec["line"] = line
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if single:
        sys.stdout.write("\n")
    else:
        for (line, prompt), (g, _) in zip(numbered, results):
            sys.stdout.write(f"==> prompt {g.index + 1} (line {line}) <==\n{prompt}{g.text}\n")
    sys.stdout.flush()
    adaptations = sum(len(ads) for _, ads in results)
    _err(f"{total} tokens in {dt:.2f}s ({total / max(dt, 1e-9):.1f} tokens/s, {len(results)} prompt"
         f"{'s' if len(results) > 1 else ''}, {adaptations} adaptations of {args.rewire_steps} steps every "
         f"{args.rewire_every} tokens)")
    return 0


# ------------------------------------------------------------------------------------------------ finetune
def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a run on new text (a domain of its corpus or your files): all "
                                        "parameters or the routers only, optionally with the RoMA regulariser")
    p.add_argument("src", help="run folder to start from")
    p.add_argument("out", help="new run folder for the fine-tune (with --resume: the fine-tune to continue)")
    p.add_argument("--data", help="domain:NAME[,NAME] (domains of SRC's corpus) or a text file/folder; "
                                  "required unless --resume")
    p.add_argument("--routers-only", action="store_true", help="train the routers only (every other parameter "
                                                               "stays bit-equal)")
    p.add_argument("--roma", type=float, default=None, metavar="LAMBDA",
                   help="add the RoMA routing-manifold regulariser with this weight (arXiv:2511.07419); the term is "
                        "an unnormalised sum over the batch's neighbour pairs (about 1 on the default model at the "
                        "start), so weights of 1 or less; logged as 'roma' in metrics.jsonl")
    p.add_argument("--roma-k", type=int, default=3, help="RoMA neighbours per sequence (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: SRC's lr / 3)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: a tenth of --steps")
    p.add_argument("--batch-size", type=int, default=None, help="default: SRC's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=None, help="default: --steps / 2")
    p.add_argument("--final-eval-windows", type=int, default=None, help="validation windows scored at the end "
                                                                        "(default: SRC's)")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune OUT from its latest checkpoint "
                                                         "(only --steps may change)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from .train import read_run_config
    from .train.config import check_run_config

    out = Path(args.out)
    if args.resume:
        return _resume_finetune(args, out)
    from .adapt.finetune import check_finetune_table
    from .data.select import corpus_for_run, split_data_spec
    from .io import atomic_write_json
    from .train import TrainConfig, new_run_config, run_training
    from .train.config import run_data_path

    if not args.data:
        raise ValueError("--data is required: domain:NAME for a domain of SRC's corpus, or a text file/folder")
    if out.exists() or out.is_symlink():
        raise ValueError(f"{out} already exists; choose another OUT or continue it with --resume")
    args.steps = 100 if args.steps is None else args.steps
    for name, value in (("--steps", args.steps), ("--roma-k", args.roma_k)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if args.roma is not None and not (math.isfinite(args.roma) and args.roma >= 0):
        raise ValueError(f"--roma must be a finite number >= 0, got {args.roma}")
    src = Path(args.src)
    src_cfg = read_run_config(src)
    model_cfg, train_cfg = check_run_config(src_cfg, str(src / "config.json"))
    path, include = split_data_spec(args.data)
    if include is not None:
        path = run_data_path(src_cfg)
    elif not Path(path).exists():
        raise ValueError(f"--data: {path} does not exist")
    train = {**vars(train_cfg), "steps": args.steps, "seed": args.seed, "expert_parallel": 1, "eval_every": 0,
             "lr": args.lr if args.lr is not None else train_cfg.lr / 3,
             "warmup_steps": args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10),
             "checkpoint_every": args.checkpoint_every or max(1, args.steps // 2)}
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    if args.final_eval_windows is not None:
        train["final_eval_windows"] = args.final_eval_windows
    ft_cfg = TrainConfig.from_dict(train)
    run_config = new_run_config(model_cfg, ft_cfg, str(Path(path).resolve()) if path else None,
                                plugins=src_cfg.get("plugins"))
    if include is not None:
        run_config["data"]["include_domains"] = include
    run_config["finetune"] = check_finetune_table({
        "source": str(src.resolve()), "trainable": "routers" if args.routers_only else "all", "roma": args.roma,
        "roma_k": args.roma_k, "roma_weight": "cosine"})
    try:
        corpus = corpus_for_run(run_config)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ValueError(f"--data: {exc}") from None
    if len(corpus.train) < ft_cfg.seq_len + 1:
        raise ValueError(f"--data {args.data}: {len(corpus.train):,} training tokens, too few for one batch "
                         f"(a window needs seq_len + 1 = {ft_cfg.seq_len + 1})")
    if not (src / "model.safetensors").is_file():
        raise ValueError(f"{src} has no model.safetensors")
    out.mkdir(parents=True)
    try:
        atomic_write_json(out / "config.json", run_config)
        return _train(out, run_config, resume=False, progress=not args.no_progress, run_training=run_training)
    finally:
        if not (out / "latest.json").exists():
            shutil.rmtree(out, ignore_errors=True)


def _train(out: Path, run_config: dict, *, resume: bool, progress: bool, run_training) -> int:
    from .train import NonFiniteLoss

    try:
        run_training(out, run_config, resume=resume, log=_err, progress=progress)
    except NonFiniteLoss as exc:
        _err(f"moekit finetune: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        what = exc.describe() if hasattr(exc, "describe") else "the last checkpoint is kept"
        _err(f"moekit finetune: interrupted; {what}; continue with: moekit finetune SRC {out} --resume")
        return 130
    _err(f"run folder: {out}")
    return 0


def _resume_finetune(args, out: Path) -> int:
    from .io import remove_stale_temporaries
    from .train import read_run_config, run_training
    from .train.config import TrainConfig, check_run_config

    cfg = read_run_config(out)
    check_run_config(cfg, str(out / "config.json"))
    if not cfg.get("finetune"):
        raise ValueError(f"{out} is not a fine-tune run (no 'finetune' table); use moekit train --resume")
    if Path(cfg["finetune"]["source"]).resolve() != Path(args.src).resolve():
        raise ValueError(f"{out} was fine-tuned from {cfg['finetune']['source']}, not {args.src}")
    if args.data or args.routers_only or args.roma is not None:
        raise ValueError("--resume continues the fine-tune as configured; only --steps may change")
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg["train"] = vars(TrainConfig.from_dict({**cfg["train"], "steps": args.steps}))
    for folder in (out, out / "checkpoints"):
        remove_stale_temporaries(folder)
    return _train(out, cfg, resume=True, progress=not args.no_progress, run_training=run_training)
