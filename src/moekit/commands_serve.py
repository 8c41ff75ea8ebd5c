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
    from .serve.simulate import POLICIES, PREFETCHERS

    p = sub.add_parser("simulate", help="expert-cache hit rates on a routing trace (every policy x prefetcher)")
    p.add_argument("trace", help="routing trace (.safetensors, written by moekit trace)")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of each layer's experts resident (0.25)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated subset of {','.join(POLICIES)}")
    p.add_argument("--prefetch", default=",".join(PREFETCHERS),
                   help=f"comma-separated subset of {','.join(PREFETCHERS)} (belady runs with none only)")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="fraction of tokens that warm the caches and fit the prefetch table, not counted (0.2)")
    p.add_argument("--decay", type=float, default=0.95, help="lfu: decay of the use counts per token (0.95)")
    p.add_argument("--expert-bytes", type=int, default=None,
                   help="bytes per expert for bytes moved (default: 3*dim*hidden_dim*2 from the trace's model)")
    p.add_argument("--per-layer", action="store_true", help="also print per-layer hit rates")
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


def cmd_simulate(args) -> int:
    from .serve.simulate import POLICIES, PREFETCHERS, layer_slots, simulate
    from .trace import load_trace

    policies = _split(args.policies, POLICIES, "policies")
    prefetchers = _split(args.prefetch, PREFETCHERS, "prefetch")
    if args.expert_bytes is not None and args.expert_bytes <= 0:
        raise ValueError(f"--expert-bytes must be positive, got {args.expert_bytes}")
    trace = load_trace(args.trace)
    layer_slots(trace, args.budget)  # the budget check before any work
    results = []
    for policy in policies:
        for prefetch in (["none"] if policy == "belady" else prefetchers):
            results.append(simulate(trace, args.budget, policy, prefetch, warmup=args.warmup, decay=args.decay,
                                    bytes_per_expert=args.expert_bytes))
    if args.json:
        print(json.dumps({"trace": str(args.trace), "budget": args.budget, "results": [r.to_dict() for r in results]},
                         indent=1))
        return 0
    print(f"{Path(args.trace).name}: {trace.num_tokens} tokens ({results[0].measured_tokens} measured), "
          f"{trace.num_layers} layers, budget {args.budget:g} of the experts per layer")
    print(f"{'policy':10s} {'prefetch':12s} {'hit rate':>8s} {'precision':>9s} {'recall':>7s} {'loads':>9s}")
    for r in results:
        print(f"{r.policy:10s} {r.prefetch:12s} {_fmt(r.hit_rate):>8s} {_fmt(r.precision):>9s} {_fmt(r.recall):>7s} "
              f"{r.loads:9d}" + (f"  {r.bytes_moved / 2**20:.1f} MiB" if r.bytes_moved is not None else ""))
        if args.per_layer:
            print("    per layer: " + " ".join(_fmt(s.hit_rate) for s in r.layers))
    bound = [r for r in results if r.policy == "belady"]
    if bound:
        print(f"belady (offline optimum of demand loading): {bound[0].hit_rate:.3f}")
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
