"""``moekit bench``: time the MoE layer against its floor and against Hugging Face transformers.

Implementations, on identical weights and identical routing:

* ``moekit`` -- :class:`moekit.MoE` (router, plan, fused dispatch);
* ``floor`` -- the experts alone (``Experts.expert_rows``: two grouped matrix products and the activation, with
  the fused backward) on input already sorted by expert with the same per-expert counts: no router, no plan, no
  gather, no scatter, no weighting;
* ``hf-eager`` / ``hf-grouped_mm`` -- transformers' ``OlmoeSparseMoeBlock`` with those experts
  implementations (when transformers is installed).

Times are the median of ``--repeats`` runs after ``--warmup`` runs. ``fwd_s`` is an inference forward
(no autograd graph); ``fwd_bwd_s`` a forward plus backward computing the gradients of the input and of every
weight, seeded with a fixed output gradient made outside the timed region. ``peak_bytes`` is the memory a
forward+backward needs beyond its inputs and weights, weight gradients included: on CUDA the caching
allocator's peak; on the CPU the largest value of glibc's in-use heap bytes (``mallinfo2``: ``uordblks +
hblkhd``) sampled after every aten operation of the run (a ``TorchDispatchMode``), minus its value before.
Temporaries that live and die inside one operation are missed by every implementation alike. Scratch
workspace an implementation keeps between calls is added to its figure.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SHAPES = {
    "olmoe": dict(tokens=4096, dim=512, hidden=256, experts=64, top_k=8),
    "mixtral": dict(tokens=4096, dim=1024, hidden=1024, experts=8, top_k=2),
    "decode": dict(tokens=16, dim=512, hidden=256, experts=64, top_k=8),
}
IMPLS = ("moekit", "floor", "hf-eager", "hf-grouped_mm")


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


@dataclass
class Case:
    """One benchmark case: a forward callable and a forward+backward callable with its setup."""

    fwd: callable
    fwd_bwd: callable
    zero_grad: callable
    workspace_bytes: callable = lambda: 0


def _moe_config(shape: dict, router: str, router_options: dict | None = None):
    """The layer of a shape; balancing losses off (the timed work is the layer, not a loss). Every router accepts
    ``aux_loss=None`` (``MoEConfig.router_kwargs`` passes "off" values only to routers that take them)."""
    from .config import MoEConfig

    return MoEConfig(dim=shape["dim"], hidden_dim=shape["hidden"], num_experts=shape["experts"],
                     top_k=shape["top_k"], router=router, router_options=dict(router_options or {}), aux_loss=None)


def build_case(shape_name: str, impl: str, device: str, dtype: torch.dtype, router: str = "topk",
               seed: int = 0, router_options: dict | None = None) -> Case:
    """Build the modules and inputs of one case; all implementations share weights and routing."""
    import warnings

    from . import MoE, RoutingContext
    from .dispatch import make_plan, workspace

    shape = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(_moe_config(shape, router, router_options))
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    moe = moe.to(device=device, dtype=dtype).train()
    x = torch.randn(shape["tokens"], shape["dim"], generator=gen).to(device=device, dtype=dtype)
    # token ids for routers that read them (hash routing): one sequence of random byte ids
    input_ids = torch.randint(0, 256, (1, shape["tokens"]), generator=gen).to(device)

    attention_probs = None
    if moe.gate.needs_attention:
        # attention-aware routing reads the preceding attention layer's probabilities: a causal running mean
        # stands in for them here (what the layer is timed on, not what a model would learn)
        n = shape["tokens"]
        causal_TT = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).unsqueeze(1)
        attention_probs = causal_TT.unsqueeze(0).to(device)

    def ctx():
        return RoutingContext(batch_shape=(1, shape["tokens"]), input_ids=input_ids, attention_probs=attention_probs)

    dout = torch.randn(shape["tokens"], shape["dim"], generator=gen).to(device=device, dtype=dtype)
    params = list(moe.parameters())

    def zero(ps):
        def run():
            for p in ps:
                p.grad = None
        return run

    if impl == "moekit":
        workspace.clear()  # count only the scratch this case needs, not what an earlier case left
        x_req = x.clone().requires_grad_(True)
        warnings.filterwarnings("ignore", message="moekit.MoE: training with every")

        def fwd():
            with torch.no_grad():
                return moe(x, ctx())

        def fwd_bwd():
            x_req.grad = None
            moe(x_req, ctx()).backward(dout)

        def ws_bytes():
            return sum(b.numel() * b.element_size() for b in workspace.buffers.values())

        return Case(fwd, fwd_bwd, zero(params), ws_bytes)

    if impl == "floor":
        # the experts alone on rows already sorted by expert (no router, plan, gather or combine), through the
        # Experts interface
        with torch.no_grad():
            plan = make_plan(moe.router(x, ctx()))
        x_SD = x[plan.token_S].contiguous().requires_grad_(True)
        dy_SD = torch.randn(x_SD.shape, generator=gen).to(device=device, dtype=dtype)
        experts = moe.experts
        counts = plan.counts_E

        def fwd():
            with torch.no_grad():
                return experts.expert_rows(x_SD, counts)

        def fwd_bwd():
            x_SD.grad = None
            experts.expert_rows(x_SD, counts).backward(dy_SD)

        return Case(fwd, fwd_bwd, zero(list(experts.parameters())))

    if impl in ("hf-eager", "hf-grouped_mm"):
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

        cfg = OlmoeConfig(hidden_size=shape["dim"], intermediate_size=shape["hidden"], num_experts=shape["experts"],
                          num_experts_per_tok=shape["top_k"], norm_topk_prob=False, hidden_act="silu")
        cfg._experts_implementation = impl.split("-", 1)[1]
        block = OlmoeSparseMoeBlock(cfg)
        block.load_state_dict(moe.state_dict(), strict=True)
        block = block.to(device=device, dtype=dtype).train()
        x3 = x.unsqueeze(0)
        x3_req = x3.clone().requires_grad_(True)
        dout3 = dout.unsqueeze(0)

        def fwd():
            with torch.no_grad():
                return block(x3)

        def fwd_bwd():
            x3_req.grad = None
            block(x3_req).backward(dout3)

        return Case(fwd, fwd_bwd, zero(list(block.parameters())))
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, zero_grad, device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        zero_grad()
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        zero_grad()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class _PeakHeap(TorchDispatchMode):
    """Samples the in-use heap after every aten operation; ``peak`` is the largest growth over the start."""

    def __init__(self):
        super().__init__()
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._mallinfo2 = libc.mallinfo2
        self.base = self._in_use()
        self.peak = 0

    def _in_use(self) -> int:
        info = self._mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._in_use() - self.base)
        return out


def measure_peak(case: Case, device: str) -> int:
    """Peak extra bytes of one forward+backward (see the module docstring)."""
    case.zero_grad()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        case.fwd_bwd()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base) + case.workspace_bytes()
    for _ in range(2):  # the first pass under a dispatch mode pays one-time set-up costs: report the second
        case.zero_grad()
        with _PeakHeap() as tracker:
            case.fwd_bwd()
    return tracker.peak + case.workspace_bytes()


def run(shapes, impls, device: str, dtype: torch.dtype, repeats: int, warmup: int, router: str = "topk",
        progress=None, router_options: dict | None = None) -> dict:
    results = []
    dtype_name = str(dtype).replace("torch.", "")
    for shape in shapes:
        for impl in impls:
            if progress:
                progress(f"{shape:8s} {impl}")
            case = build_case(shape, impl, device, dtype, router, router_options=router_options)
            fwd_s = median_time(case.fwd, case.zero_grad, device, repeats, warmup)
            fwd_bwd_s = median_time(case.fwd_bwd, case.zero_grad, device, repeats, warmup)
            peak = measure_peak(case, device)
            results.append(dict(shape=shape, impl=impl, fwd_s=fwd_s, fwd_bwd_s=fwd_bwd_s, peak_bytes=int(peak)))
            del case
    return {"device": device, "dtype": dtype_name, "results": results}


def format_table(report: dict) -> str:
    rows = report["results"]
    floor = {(r["shape"]): r for r in rows if r["impl"] == "floor"}
    lines = [f"device={report['device']} dtype={report['dtype']}",
             f"{'shape':8s} {'impl':14s} {'fwd_s':>9s} {'fwd_bwd_s':>10s} {'peak_MiB':>9s} {'fwd/floor':>9s} {'fb/floor':>9s}"]
    for r in rows:
        f = floor.get(r["shape"])
        rf = f"{r['fwd_s'] / f['fwd_s']:.3f}" if f else "-"
        rb = f"{r['fwd_bwd_s'] / f['fwd_bwd_s']:.3f}" if f else "-"
        lines.append(f"{r['shape']:8s} {r['impl']:14s} {r['fwd_s']:9.4f} {r['fwd_bwd_s']:10.4f} "
                     f"{r['peak_bytes'] / 2**20:9.1f} {rf:>9s} {rb:>9s}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="olmoe,mixtral,decode", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS))
    p.add_argument("--router", default="topk", help="router of the moekit layer (the floor uses its counts; "
                   "the transformers baselines run only with topk, whose routing they share)")
    p.add_argument("--router-options", default="{}", help="JSON object of router options, e.g. '{\"n_iters\": 5}'")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported), >= 1")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--hf", action="store_true", help="time whole transformers models (OLMoE- and DeepSeek-V3-shaped) "
                   "with the eager, grouped_mm and moekit experts implementations instead (moekit.hf.bench)")
    p.add_argument("--seq", type=int, default=512, help="with --hf: tokens per sequence (batch 2)")
    p.add_argument("--decode", action="store_true", help="time one layer's inference forward at T = 1, 4, 16, 64 "
                   "tokens (olmoe, mixtral, qwen3-30b-a3b shapes) against the weight-read floor and transformers "
                   "(moekit.bench_decode); --impls then takes moekit, hf-grouped_mm, hf-eager")
    p.add_argument("--decode-shapes", default=None, help="with --decode: comma-separated subset of olmoe, mixtral, "
                   "qwen3-30b-a3b (the last needs about 5 GiB; skipped with a note when memory is short)")


def _check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is refused before any work."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device or ""):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def main_from_args(args) -> int:
    from . import routing

    _check_device(args.device)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.hf:
        if not _has_transformers():
            raise ValueError("--hf needs transformers (pip install moekit[hf])")
        from .hf.bench import main as hf_main

        argv = ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seq", str(args.seq)]
        if args.json:
            argv.append("--json")
        if args.device != "auto":
            argv += ["--device", args.device]
        if args.dtype != "auto":
            argv += ["--dtype", args.dtype]
        return hf_main(argv)

    if args.decode:
        return _main_decode(args)
    shapes = [s for s in args.shapes.split(",") if s]
    impls = [s for s in args.impls.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"--shapes: unknown shape {s!r}; allowed: {', '.join(SHAPES)}")
    for i in impls:
        if i not in IMPLS:
            raise ValueError(f"--impls: unknown implementation {i!r}; allowed: {', '.join(IMPLS)}")
    if not shapes or not impls:
        raise ValueError("--shapes and --impls must each name at least one entry")
    routing.get(args.router)
    try:
        router_options = json.loads(args.router_options)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--router-options is not valid JSON ({exc})") from None
    if not isinstance(router_options, dict):
        raise ValueError("--router-options must be a JSON object")
    if args.router != "topk" and any(i.startswith("hf-") for i in impls):
        impls = [i for i in impls if not i.startswith("hf-")]
        print(f"--router {args.router}: the transformers baselines route with top-k only; skipping them",
              file=sys.stderr)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype_name!r}")
    if not _has_transformers():
        skipped = [i for i in impls if i.startswith("hf-")]
        impls = [i for i in impls if not i.startswith("hf-")]
        if skipped:
            print(f"transformers is not installed: skipping {', '.join(skipped)}", file=sys.stderr)
    progress = None if args.json else (lambda msg: print(f"  timing {msg} ...", file=sys.stderr, flush=True))
    report = run(shapes, impls, device, getattr(torch, dtype_name), args.repeats, args.warmup, args.router, progress,
                 router_options)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs "
              f"after {args.warmup} warm-up runs")
        print(format_table(report))
    return 0


def _main_decode(args) -> int:
    from .bench_decode import format_decode_table, main_decode

    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype_name!r}")
    args.decode_impls = None if args.impls == ",".join(IMPLS) else args.impls
    report = main_decode(args, device, getattr(torch, dtype_name))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_decode_table(report))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .cli import main as cli_main

    return cli_main(["bench", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
