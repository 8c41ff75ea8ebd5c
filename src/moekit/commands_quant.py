"""``moekit quantize SRC OUT``: a moekit run with low-bit packed experts (:mod:`moekit.compress.quant`,
:class:`moekit.experts.QuantizedExperts`). Non-expert weights are kept as they are. Methods: rtn, gptq, agq,
ternary, hqq (optional package), eaquant (:mod:`moekit.compress.eaquant`); ``--act-bits`` simulates activation
quantisation; ``--calib ebss`` calibrates on self-sampled text (:mod:`moekit.compress.ebss`).

OUT is an ordinary run folder (``eval``, ``generate``, ``trace``, ``report`` open it): its config gets
``experts = "quantized"`` with ``experts_options`` (bits, group, symmetric, method) and, with ``--mixed``,
per-layer ``moe_overrides`` holding each layer's ``expert_bits``; ``config.json`` records what was done under
``"quantization"``. Everything is written to a temporary folder beside OUT and renamed into place.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

MIXED_CHOICES = (2, 3, 4)


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="pack a run's experts into low-bit weights (rtn, gptq, agq, ternary, "
                                        "hqq, eaquant, MC mixed precision)")
    p.add_argument("src", help="run folder to quantise")
    p.add_argument("out", help="new run folder to write (must not exist)")
    p.add_argument("--bits", default="4", help="2, 3, 4, 8 or ternary (default 4; --method ternary implies it)")
    p.add_argument("--group", type=int, default=128,
                   help="group size along the input dimension (default 128; a narrower matrix uses its width)")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq", "agq", "ternary", "hqq", "eaquant"),
                   help="rtn: round to nearest; gptq: GPTQ on each expert's input Hessian; agq: MoEQuant's "
                        "routing-weighted GPTQ; ternary: {-1, 0, 1} with an absmean scale; hqq: Half-Quadratic "
                        "Quantization (optional extra: pip install 'moekit[hqq]'; asymmetric, float16 zeros); "
                        "eaquant: EAQuant's shared smoothing chosen with a router-KL term, then GPTQ")
    p.add_argument("--act-bits", type=int, default=None, metavar="B",
                   help="simulated activation quantisation: fake-quantise the experts' inputs per token to B bits "
                        "(2..8) in the saved model")
    p.add_argument("--kl-weight", type=float, default=1.0,
                   help="eaquant: weight of the router KL alignment term in the smoothing search (default 1)")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--sym", dest="symmetric", action="store_true", default=True, help="symmetric grid (default)")
    grid.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric grid with zero points")
    p.add_argument("--mixed", type=float, default=None, metavar="BUDGET",
                   help="MC-MoE mixed precision: per-expert bits in {2,3,4} with this mean per layer")
    p.add_argument("--allocation", default="mc", choices=("mc", "random", "uniform"),
                   help="with --mixed: mc (the integer program, default); random or uniform (baselines with the "
                        "same mean: random experts get the MC solution's widths shuffled / floor and ceil of the "
                        "budget)")
    p.add_argument("--seed", type=int, default=0, help="seed of --allocation random")
    p.add_argument("--calib-tokens", type=int, default=32768,
                   help="calibration tokens (gptq, agq, eaquant, --mixed)")
    p.add_argument("--calib", default="corpus", choices=("corpus", "ebss"),
                   help="calibration source: corpus (the run's training split, or --calib-data) or ebss (MoEQuant's "
                        "expert-balanced self-sampling: the model writes it; --calib-seq-len, default 128)")
    p.add_argument("--calib-domain", default=None, help="calibrate on this domain of the run's corpus only")
    p.add_argument("--calib-data", default=None, help="calibrate on this text file or folder instead")
    p.add_argument("--calib-seq-len", type=int, default=None, help="calibration window (default: the run's)")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.set_defaults(func=cmd_quantize)


def _check_args(args):
    """Everything checked before any work: ValueError (one line, exit 2) otherwise."""
    from .compress import quant as Q
    from .train.checkpoint import read_run_config
    from .train.config import check_run_config

    if args.method == "hqq" and not Q.hqq_available():
        raise ValueError(Q.hqq_missing_message())
    if args.method == "hqq":
        args.symmetric = False  # HQQ's grid has a (fractional) zero point
    bits = "ternary" if args.method == "ternary" else Q.check_bits(args.bits)
    if args.method == "hqq" and bits not in Q.HQQ_BITS:
        raise ValueError(f"--method hqq quantises to {', '.join(map(str, Q.HQQ_BITS))} bits, got {bits!r}")
    if args.act_bits is not None and not 2 <= args.act_bits <= 8:
        raise ValueError(f"--act-bits must be in 2..8, got {args.act_bits}")
    if not args.kl_weight >= 0:
        raise ValueError(f"--kl-weight must be >= 0, got {args.kl_weight}")
    if args.calib == "ebss" and args.calib_data:
        raise ValueError("--calib ebss writes its own calibration text: drop --calib-data")
    if args.method != "ternary" and bits == "ternary":
        raise ValueError("--bits ternary goes with --method ternary")
    if bits == "ternary" and not args.symmetric:
        raise ValueError("ternary quantisation is symmetric only: drop --asym")
    if args.group < 1:
        raise ValueError(f"--group must be >= 1, got {args.group}")
    if args.mixed is not None:
        if args.method in ("ternary", "hqq", "eaquant"):
            raise ValueError("--mixed chooses among 2, 3 and 4 bits: use --method rtn, gptq or agq")
        if not min(MIXED_CHOICES) <= args.mixed <= max(MIXED_CHOICES):
            raise ValueError(f"--mixed must be in [{min(MIXED_CHOICES)}, {max(MIXED_CHOICES)}], got {args.mixed}")
    if args.calib_tokens < 1:
        raise ValueError(f"--calib-tokens must be >= 1, got {args.calib_tokens}")
    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise ValueError(f"run folder {src} does not exist")
    if out.resolve() == src.resolve():
        raise ValueError("OUT must differ from SRC")
    if out.exists() or out.is_symlink():
        raise ValueError(f"{out} exists; choose a new folder")
    if not out.parent.is_dir():
        raise ValueError(f"the parent folder of {out} does not exist")
    if args.calib_data and not Path(args.calib_data).exists():
        raise ValueError(f"--calib-data: {args.calib_data} does not exist")
    cfg = read_run_config(src)
    model_cfg, _ = check_run_config(cfg, str(src / "config.json"))
    for index, moe in model_cfg.layer_moes.items():
        if moe.experts not in ("dense", "ternary"):
            raise ValueError(f"layer {index} has experts of kind {moe.experts!r}; quantize reads dense (or "
                             "ternary-trained) experts")
        if args.method == "eaquant" and (moe.router != "topk" or moe.score_func != "softmax"):
            raise ValueError(f"--method eaquant needs softmax top-k routers; layer {index} has {moe.router} "
                             f"({moe.score_func})")
        for name, cols in (("dim", moe.dim), ("hidden_dim", moe.hidden_dim)):
            if args.group < cols and cols % args.group:
                raise ValueError(f"--group {args.group} does not divide layer {index}'s {name}={cols}")
    if not (src / "model.safetensors").is_file():
        raise ValueError(f"{src} holds no model.safetensors")
    return bits, cfg, model_cfg


def _calibration(args, cfg, model):
    from .commands import _load_data
    from .compress.calibrate import calibration_batches, text_batches
    from .train.config import run_data_path

    if args.calib == "ebss":
        from .compress.ebss import ebss_batches

        return ebss_batches(model, args.calib_tokens, args.calib_seq_len or 128)
    seq_len = args.calib_seq_len or cfg["train"]["seq_len"]
    if args.calib_data:
        return text_batches(args.calib_data, seq_len, args.calib_tokens)
    corpus = _load_data(run_data_path(cfg))
    return calibration_batches(corpus, seq_len, args.calib_tokens, domain=args.calib_domain)


def _allocation(args, mc_bits, rng) -> list[int]:
    if args.allocation == "mc":
        return mc_bits
    E = len(mc_bits)
    if args.allocation == "random":
        bits = list(mc_bits)
        rng.shuffle(bits)
        return bits
    lo = int(args.mixed)
    n_hi = int(round((args.mixed - lo) * E))
    bits = [min(lo + 1, max(MIXED_CHOICES))] * n_hi + [lo] * (E - n_hi)
    return bits


def cmd_quantize(args) -> int:
    import torch

    from .compress import quant as Q
    from .experts import DenseExperts, QuantizedExperts
    from .io import atomic_save_safetensors, atomic_write_json, read_json, temp_sibling_dir
    from .layer import MoE
    from .model import MoELM
    from .train import load_run
    from .train.checkpoint import RUN_FORMAT
    from .train.loop import _dtype
    from .train.config import check_run_config

    bits, cfg, _ = _check_args(args)
    src, out = Path(args.src), Path(args.out)
    model, cfg = load_run(src)
    need_calib = args.method in ("gptq", "agq", "eaquant") or args.mixed is not None
    recs = {}
    layer_inputs = {}
    if need_calib:
        batches = _calibration(args, cfg, model)
        recs = Q.collect_expert_hessians(model, batches, weighted=args.method == "agq", stats=True,
                                         keep_rows=256 if args.mixed is not None else 0)
        if args.method == "eaquant":
            from .compress.eaquant import keep_layer_inputs

            layer_inputs = keep_layer_inputs(model, batches, 2048)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    index_of = {}
    for pos, (name, _) in enumerate(layers):
        parts = name.split(".")
        index_of[name] = next((int(parts[i + 1]) for i, p in enumerate(parts[:-1])
                               if p == "layers" and parts[i + 1].isdigit()), pos)
    new_cfg = json.loads(json.dumps(cfg))
    options = {"bits": bits, "group": args.group, "symmetric": args.symmetric, "method": args.method}
    if args.method == "hqq":
        options["zero_dtype"] = "float16"
    if args.act_bits is not None:
        options["act_bits"] = args.act_bits
    if args.method == "eaquant":
        options["smooth"] = True
    new_cfg["model"]["moe"]["experts"] = "quantized"
    new_cfg["model"]["moe"]["experts_options"] = dict(options)
    overrides = new_cfg["model"].get("moe_overrides") or {}
    for key, settings in overrides.items():  # layers overriding the experts kind get the quantised one too
        settings["experts"] = "quantized"
        settings["experts_options"] = dict(options)
    packed: dict[str, list] = {}
    summary_layers = []
    rng = random.Random(args.seed)
    undercalibrated = []
    for name, layer in layers:
        experts = layer.experts
        if not isinstance(experts, DenseExperts):
            raise ValueError(f"{name}: experts of kind {type(experts).__name__}; quantize reads dense experts")
        w_up, w_down = experts.w_up.detach(), experts.w_down.detach()
        E = experts.num_experts
        rec = recs.get(name)

        smooth = None
        if args.method == "eaquant":
            from .compress import eaquant as EA

            def rtn_pair(e, up_s, down, b=bits):
                return (Q.rtn(up_s, b, args.group, args.symmetric).dequantize(),
                        Q.rtn(down, b, args.group, args.symmetric).dequantize())

            gate = layer.gate
            smooth, alpha, table = EA.search_smoothing(
                layer_inputs[name], gate, w_up, w_down, experts.act_spec.fn, args.act_bits, layer.config.top_k,
                getattr(gate, "norm_topk", False), getattr(gate, "scaling_factor", 1.0), rtn_pair,
                kl_weight=args.kl_weight)
            w_up = w_up * smooth  # the stored up matrices hold the shared smoothing
            if rec is not None:  # inputs become x / s: H -> S^-1 H S^-1
                inv = (1.0 / smooth).to(torch.float64)
                rec["up"] = rec["up"] * inv[None, :, None] * inv[None, None, :]
            summary_layers.append({"layer": index_of[name], "alpha": alpha,
                                   "candidates": [{k: r[k] for k in ("alpha", "output_error", "kl", "loss")}
                                                  for r in table]})

        def quantize(e, b, rec=rec, w_up=w_up, w_down=w_down):
            h_up = h_down = None
            if rec is not None and args.method in ("gptq", "agq", "eaquant") and rec["count"][e] >= 8:
                h_up, h_down = rec["up"][e], rec["down"][e]
            return (Q.quantize_matrix(w_up[e], args.method, b, args.group, args.symmetric, h_up),
                    Q.quantize_matrix(w_down[e], args.method, b, args.group, args.symmetric, h_down))

        if rec is not None:
            undercalibrated += [(index_of[name], e) for e in range(E) if rec["count"][e] < 8]
        if args.mixed is not None:
            cache = {}

            def quantize_cached(e, b):
                if (e, b) not in cache:
                    cache[(e, b)] = quantize(e, b)
                return cache[(e, b)]

            q = Q.mixed_output_errors(w_up, w_down, experts.act_spec.fn, rec, MIXED_CHOICES, quantize_cached)
            count = rec["count"]
            freq = count / max(1, rec["tokens"])
            mean_w = torch.where(count > 0, rec["weight_sum"] / count.clamp(min=1), torch.zeros_like(count))
            costs = Q.mc_costs(freq, mean_w, q)
            mc_bits = Q.mc_allocate(costs, MIXED_CHOICES, args.mixed)
            expert_bits = _allocation(args, mc_bits, rng)
            pairs = [quantize_cached(e, b) for e, b in enumerate(expert_bits)]
            cost = float(sum(costs[e, MIXED_CHOICES.index(b)] for e, b in enumerate(expert_bits)))
            layer_opts = dict(options, bits=max(expert_bits), expert_bits=expert_bits)
            key = str(index_of[name])
            overrides.setdefault(key, {}).update(experts="quantized", experts_options=layer_opts)
            summary_layers.append({"layer": index_of[name], "expert_bits": expert_bits, "objective": cost})
        else:
            pairs = [quantize(e, bits) for e in range(E)]
        packed[name] = (pairs, smooth)
    if overrides:
        new_cfg["model"]["moe_overrides"] = overrides
    new_cfg["quantization"] = {"source": str(src.resolve()), **options, "mixed": args.mixed,
                               "allocation": args.allocation if args.mixed is not None else None,
                               "calib_tokens": args.calib_tokens if need_calib else 0,
                               "calib_domain": args.calib_domain, "calib_data": args.calib_data,
                               "calib": args.calib if need_calib else None, "act_bits": args.act_bits}
    model_cfg, train_cfg = check_run_config(new_cfg, "quantized config")
    qmodel = MoELM(model_cfg).to(_dtype(train_cfg.dtype))
    old_sd = model.state_dict()
    new_sd = qmodel.state_dict()
    keep = {k: v for k, v in old_sd.items() if k in new_sd and new_sd[k].shape == v.shape}
    missing = set(new_sd) - set(keep)
    qmodel.load_state_dict(keep, strict=False)
    qlayers = {name: m for name, m in qmodel.named_modules() if isinstance(m, MoE)}
    for name, (pairs, smooth) in packed.items():
        qexp = qlayers[name].experts
        assert isinstance(qexp, QuantizedExperts)
        if smooth is not None:
            qexp.smooth.copy_(smooth)
        for e, (up, down) in enumerate(pairs):
            qexp.set_packed(qexp.up_name, e, up)
            qexp.set_packed("down_proj", e, down)
    unexpected = [k for k in missing if ".experts." not in k]
    if unexpected:
        raise ValueError(f"quantized model: weights with no source: {unexpected[:3]}")
    # write: temporary folder beside OUT, renamed into place
    tmp = temp_sibling_dir(out)
    try:
        tensors = {k: v.contiguous() for k, v in qmodel.state_dict().items()}
        atomic_save_safetensors(tmp / "model.safetensors", tensors, {"format": RUN_FORMAT})
        atomic_write_json(tmp / "config.json", new_cfg)
        for extra in ("metrics.jsonl",):
            if (src / extra).is_file():
                shutil.copy2(src / extra, tmp / extra)
        if (src / "latest.json").is_file():  # the step only: OUT has no checkpoints to resume from
            step = read_json(src / "latest.json", "latest.json").get("step")
            atomic_write_json(tmp / "source_step.json", {"step": step})
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dense_bytes = sum(t.numel() * t.element_size() for k, t in old_sd.items() if ".experts." in k)
    q_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".experts." in k)
    summary = {"out": str(out), "method": args.method, "bits": bits, "group": args.group,
               "symmetric": args.symmetric, "mixed": args.mixed, "expert_bytes": q_bytes,
               "expert_bytes_source": dense_bytes, "file_bytes": (out / "model.safetensors").stat().st_size,
               "file_bytes_source": (src / "model.safetensors").stat().st_size, "layers": summary_layers,
               "rtn_fallback_experts": undercalibrated}
    if args.json:
        print(json.dumps(summary))
    else:
        width = Q.bits_label(bits) if args.mixed is None else f"mixed {args.mixed} bits"
        grid = "symmetric" if args.symmetric else "asymmetric"
        print(f"quantized {src} -> {out}: {args.method} {width}, group {args.group}, {grid}", file=sys.stderr)
        print(f"expert weights {dense_bytes:,} -> {q_bytes:,} bytes ({q_bytes / dense_bytes:.3f}x); file "
              f"{summary['file_bytes_source']:,} -> {summary['file_bytes']:,} bytes", file=sys.stderr)
        for row in summary_layers:
            if "expert_bits" in row:
                print(f"layer {row['layer']}: expert bits {row['expert_bits']}", file=sys.stderr)
            else:
                print(f"layer {row['layer']}: shared smoothing alpha {row['alpha']}", file=sys.stderr)
        if undercalibrated:
            print(f"{len(undercalibrated)} experts saw fewer than 8 calibration tokens and were rounded to nearest: "
                  f"{undercalibrated[:8]}", file=sys.stderr)
    return 0
