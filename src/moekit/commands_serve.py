"""``moekit simulate`` (expert-cache simulation on a routing trace) and ``moekit place`` (expert placement on
devices). Bad input raises ``ValueError``, which ``moekit.cli`` prints as one line with exit code 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--{what} takes a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return names


def add_simulate(sub) -> None:
    from .serve.cost import PRESETS
    from .serve.importers import FORMATS
    from .serve.simulate import POLICIES, PREFETCHERS

    p = sub.add_parser("simulate", help="expert-cache hit rates on a routing trace (every policy x prefetcher)")
    p.add_argument("trace", help="routing trace: moekit (.safetensors), SGLang per_token dump (.pt) or vLLM "
                                 "routed_experts (.npy/.npz/.jsonl)")
    p.add_argument("--format", choices=FORMATS, default=None, help="trace format (default: from the suffix)")
    p.add_argument("--num-experts", type=int, default=None,
                   help="experts per layer of an imported trace (default: the largest id + 1)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read an SGLang dump (a torch.save pickle) with torch's weights-only loader; refused "
                        "without this flag: pass it only for files you trust")
    p.add_argument("--run", default=None, help="moekit run the trace must come from (layer and expert counts)")
    p.add_argument("--layers", type=int, default=None, help="MoE layers the trace must have")
    p.add_argument("--experts", type=int, default=None, help="experts per layer the trace must have")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of each layer's experts resident (0.25)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated subset of {','.join(POLICIES)}")
    p.add_argument("--prefetch", default=",".join(PREFETCHERS),
                   help=f"comma-separated subset of {','.join(PREFETCHERS)} (belady runs with none only)")
    p.add_argument("--pool", choices=("layer", "shared"), default="layer",
                   help="one cache per layer (default) or one pool of the same total slots for all layers "
                        "(shallow and adaptive need per-layer caches and are left out)")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="fraction of tokens that warm the caches and fit the predictors, not counted (0.2)")
    p.add_argument("--decay", type=float, default=0.95, help="lfu: decay of the use counts per token (0.95)")
    p.add_argument("--pin-tokens", type=int, default=2,
                   help="lru_pinned: tokens a prefetched expert stays pinned at most while unused (2)")
    p.add_argument("--request-tokens", type=int, default=64,
                   help="trace_match: request length when the trace has no sequences (64)")
    p.add_argument("--expert-bytes", type=int, default=None,
                   help="bytes per expert for bytes moved (default: 3*dim*hidden_dim*2 from the trace's model)")
    p.add_argument("--cost-model", default=None,
                   help=f"simulated decode time on a two-tier machine: a preset ({', '.join(PRESETS)}) or a "
                        "JSON/TOML file of its rates (see moekit.serve.cost.CostModel)")
    p.add_argument("--schedule", type=int, default=None, metavar="MICRO",
                   help="instead of the cache table: ExpertFlow token scheduling into micro-batches of MICRO "
                        "requests; distinct experts against arrival order")
    p.add_argument("--batch", type=int, default=16, help="--schedule: requests decoding together (16)")
    p.add_argument("--max-steps", type=int, default=256, help="--schedule: decode steps measured at most (256)")
    p.add_argument("--per-layer", action="store_true", help="also print per-layer hit rate, precision, recall, lead")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.set_defaults(func=cmd_simulate)


def add_place(sub) -> None:
    p = sub.add_parser("place", help="place experts on devices from a routing trace (EPLB, MoETuner program)")
    p.add_argument("trace", help="routing trace (.safetensors)")
    p.add_argument("--devices", type=int, required=True, help="number of devices G")
    p.add_argument("--replicas", type=int, default=0, help="redundant expert slots per layer for EPLB (0)")
    p.add_argument("--method", choices=("eplb", "milp", "round_robin"), default=None,
                   help="placement written by --out (default: eplb with --replicas, else milp)")
    p.add_argument("--traffic-weight", type=float, default=0.1,
                   help="weight of cross-device traffic against the max device load in the program (0.1)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for the integer program (60)")
    p.add_argument("--format", choices=("sglang", "moekit"), default="moekit",
                   help="--out layout: sglang (--init-expert-location JSON) or moekit (device of each expert)")
    p.add_argument("--out", default=None, help="write the chosen placement to this JSON file")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=cmd_place)


def _fmt(x) -> str:
    return "   -" if x is None or x != x else f"{x:.3f}"


def _load_checked(args):
    """The trace of ``args.trace`` in ``args.format``, checked against ``--run`` / ``--layers`` / ``--experts``."""
    from .serve.importers import check_model, load_any, run_shape

    if args.num_experts is not None and args.num_experts < 1:
        raise ValueError(f"--num-experts must be >= 1, got {args.num_experts}")
    for name in ("layers", "experts"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    shape = run_shape(args.run) if args.run else None
    trace = load_any(args.trace, args.format, args.num_experts, allow_pickle=args.allow_pickle)
    if shape is not None:
        check_model(trace, *shape, what=f"run {args.run}")
    check_model(trace, args.layers, args.experts, what="the stated model")
    return trace


def _print_schedule(args, trace) -> int:
    from .serve.schedule import schedule_trace

    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    report = schedule_trace(trace, args.batch, args.schedule, warmup=args.warmup, max_steps=args.max_steps,
                            progress=sys.stderr.isatty() and not args.json)
    if args.json:
        print(json.dumps({"trace": str(args.trace), "schedule": report}, indent=1))
        return 0
    d, ps = report["distinct_experts"], report["per_step"]
    print(f"{Path(args.trace).name}: {report['steps']} decode steps of {args.batch} requests in micro-batches of "
          f"{args.schedule}; distinct experts summed over micro-batches and {report['layers']} layers")
    print(f"{'grouping':34s} {'per step':>9s} {'total':>9s}")
    print(f"{'arrival order':34s} {ps['arrival']:9.1f} {d['arrival']:9d}")
    print(f"{'scheduled on predicted routing':34s} {ps['predicted']:9.1f} {d['predicted']:9d}  "
          f"({100 * report['reduction_predicted']:.1f}% fewer)")
    print(f"{'scheduled on true routing (oracle)':34s} {ps['oracle']:9.1f} {d['oracle']:9d}  "
          f"({100 * report['reduction_oracle']:.1f}% fewer)")
    return 0


def cmd_simulate(args) -> int:
    from tqdm import tqdm

    from .serve.cost import load_cost_model
    from .serve.simulate import POLICIES, PREFETCHERS, layer_slots, simulate

    policies = _split(args.policies, POLICIES, "policies")
    prefetchers = _split(args.prefetch, PREFETCHERS, "prefetch")
    if args.pool == "shared":
        per_layer = [p for p in policies if p in ("shallow", "adaptive")]
        if per_layer and args.policies != ",".join(POLICIES):
            raise ValueError(f"--pool shared: {', '.join(per_layer)} allocate slots per layer; leave them out")
        policies = [p for p in policies if p not in ("shallow", "adaptive")]
    if args.expert_bytes is not None and args.expert_bytes <= 0:
        raise ValueError(f"--expert-bytes must be positive, got {args.expert_bytes}")
    if args.pin_tokens < 1:
        raise ValueError(f"--pin-tokens must be >= 1, got {args.pin_tokens}")
    if args.request_tokens < 1:
        raise ValueError(f"--request-tokens must be >= 1, got {args.request_tokens}")
    cost = load_cost_model(args.cost_model) if args.cost_model else None
    trace = _load_checked(args)
    if args.schedule is not None:
        return _print_schedule(args, trace)
    layer_slots(trace, args.budget)  # the budget check before any work
    if cost is not None:  # the expert's bytes and FLOPs must be known before any work
        from .serve.simulate import expert_bytes

        cost.times(trace, args.expert_bytes if args.expert_bytes is not None else expert_bytes(trace))
    configs = [(policy, prefetch) for policy in policies
               for prefetch in (["none"] if policy == "belady" else prefetchers)]
    shared: dict = {}
    results = []
    for policy, prefetch in tqdm(configs, desc="simulate", disable=len(configs) < 4 or not sys.stderr.isatty()):
        results.append(simulate(trace, args.budget, policy, prefetch, warmup=args.warmup, decay=args.decay,
                                bytes_per_expert=args.expert_bytes, pin_tokens=args.pin_tokens,
                                request_tokens=args.request_tokens, cost_model=cost, pool=args.pool,
                                _cache=shared))
    if args.json:
        print(json.dumps({"trace": str(args.trace), "budget": args.budget,
                          "cost_model": cost.to_dict() if cost else None,
                          "results": [r.to_dict() for r in results]}, indent=1))
        return 0
    where = "per layer" if args.pool == "layer" else "in one pool shared by all layers"
    print(f"{Path(args.trace).name}: {trace.num_tokens} tokens ({results[0].measured_tokens} measured), "
          f"{trace.num_layers} layers x {trace.num_experts} experts, budget {args.budget:g} of the experts {where}")
    print(f"{'policy':12s} {'prefetch':12s} {'hit rate':>8s} {'precision':>9s} {'recall':>7s} {'lead':>5s} "
          f"{'loads':>9s}" + ("  ms/token" if cost else ""))
    for r in results:
        lead = "    -" if r.lead_time != r.lead_time else f"{r.lead_time:5.2f}"
        line = (f"{r.policy:12s} {r.prefetch:12s} {_fmt(r.hit_rate):>8s} {_fmt(r.precision):>9s} "
                f"{_fmt(r.recall):>7s} {lead} {r.loads:9d}")
        if cost:
            line += f"  {r.cost['ms_per_token']:8.3f}"
        if r.bytes_moved is not None:
            line += f"  {r.bytes_moved / 2**20:.1f} MiB"
        print(line)
        if args.per_layer:
            print("    hit rate:  " + " ".join(_fmt(s.hit_rate) for s in r.layers))
            if r.prefetch != "none":
                print("    precision: " + " ".join(_fmt(s.precision) for s in r.layers))
                print("    recall:    " + " ".join(_fmt(s.recall) for s in r.layers))
                print("    lead:      " + " ".join(_fmt(s.lead_time) for s in r.layers))
    bound = [r for r in results if r.policy == "belady"]
    if bound:
        print(f"belady (offline optimum of demand loading): {bound[0].hit_rate:.3f}")
    if cost:
        c = results[0].cost
        print(f"cost model: all experts resident {c['resident_ms_per_token']:.3f} ms/token; a miss costs "
              f"{c['miss_ms']:.3f} ms ({c['miss_choice']}: move {c['move_ms']:.3f} ms, host "
              f"{'-' if c['host_ms'] is None else format(c['host_ms'], '.3f')} ms)")
    return 0


def cmd_place(args) -> int:
    import numpy as np

    from .serve import place
    from .trace import load_trace

    if args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    if args.replicas < 0:
        raise ValueError(f"--replicas must be >= 0, got {args.replicas}")
    trace = load_trace(args.trace)
    if len(set(trace.num_experts_per_layer)) != 1:
        raise ValueError("place needs the same number of experts in every layer")
    E = trace.num_experts
    if E % args.devices:
        raise ValueError(f"{E} experts cannot be split evenly over {args.devices} devices")
    if (E + args.replicas) % args.devices:
        raise ValueError(f"{E} experts + {args.replicas} replicas cannot be split evenly over {args.devices} devices")
    loads = place.expert_loads(trace)
    trans = place.transitions(trace)
    G, w = args.devices, args.traffic_weight
    rr = place.round_robin(trace.num_layers, E, G)
    device_milp, info = place.milp_placement(loads, trans, G, w, args.time_limit)
    slots = place.eplb(loads, G, args.replicas)
    report = {
        "devices": G, "replicas": args.replicas, "traffic_weight": w,
        "round_robin": place.placement_stats(rr, loads, trans, G, w),
        "milp": {**place.placement_stats(device_milp, loads, trans, G, w), "solver": info},
        "eplb": place.slot_stats(slots, loads, G),
    }
    if args.replicas == 0:  # without copies EPLB is a placement too: its traffic is defined
        report["eplb"] = place.placement_stats(slots_to_devices(slots, G), loads, trans, G, w)
    method = args.method or ("eplb" if args.replicas else "milp")
    if args.out:
        if method == "eplb":
            chosen_slots = slots
        else:
            dev = device_milp if method == "milp" else rr
            chosen_slots = np.stack([np.argsort(d, kind="stable") for d in dev])  # device-major slot order
        if args.format == "sglang":
            payload = place.sglang_json(chosen_slots)
        else:
            payload = {"method": method, "devices": G, "physical_to_logical_map": chosen_slots.tolist()}
        Path(args.out).write_text(json.dumps(payload) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{Path(args.trace).name}: {trace.num_layers} layers x {E} experts on {G} devices "
          f"(max device load summed over layers; traffic = token transitions between devices)")
    print(f"{'placement':12s} {'max load':>10s} {'balancedness':>12s} {'traffic':>10s}")
    for name in ("round_robin", "eplb", "milp"):
        s = report[name]
        traffic = s.get("cross_device_traffic")
        print(f"{name:12s} {s['max_device_load']:10.0f} {s['balancedness']:12.3f} "
              f"{'-' if traffic is None else f'{traffic:.0f}':>10s}")
    if not info["optimal"]:
        print(f"milp: {info['message']} (best placement found so far)", file=sys.stderr)
    if args.out:
        print(f"wrote {method} placement to {args.out} ({args.format})")
    return 0


def slots_to_devices(slots_IP, devices: int):
    """``device_IE`` of a slot map without copies (slot p lives on device ``p // (P / G)``)."""
    import numpy as np

    I, P = slots_IP.shape
    per = P // devices
    out = np.zeros((I, P), dtype=np.int64)
    for l in range(I):
        out[l, slots_IP[l]] = np.arange(P) // per
    return out
