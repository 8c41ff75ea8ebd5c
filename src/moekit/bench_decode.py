"""``moekit bench --decode``: one MoE layer's inference forward at decode sizes, beside its weight-read floor.

For each shape (OLMoE-, Mixtral- and Qwen3-30B-A3B-shaped layers) and ``T`` in 1, 4, 16, 64 tokens, on identical
weights and routing: ``moekit`` (:class:`moekit.MoE` in eval mode, no autograd; the experts path it took is
reported: ``small-batch`` or ``grouped``), transformers' ``OlmoeSparseMoeBlock`` with its ``grouped_mm`` and
``eager`` experts (when transformers is installed). Times are medians of ``--repeats`` runs after ``--warmup``.

The floor is the time to read the weights the call needs at the memory bandwidth measured in the same run:
``floor_s = (router bytes + bytes of the distinct experts the routing selects) / bandwidth``, the bandwidth being
the median rate of summing a tensor much larger than the caches (CPU) or of a device-to-device copy (CUDA).
Decoding a small batch reads each used expert's weights once and does little arithmetic on them, so no
implementation can beat the floor by much; the ratio says how far one is from it.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time

import torch

DECODE_SHAPES = {
    "olmoe": dict(dim=512, hidden=256, experts=64, top_k=8),
    "mixtral": dict(dim=1024, hidden=1024, experts=8, top_k=2),
    "qwen3-30b-a3b": dict(dim=2048, hidden=768, experts=128, top_k=8),
}
DECODE_TOKENS = (1, 4, 16, 64)
DECODE_IMPLS = ("moekit", "hf-grouped_mm", "hf-eager", "moekit-q4", "moekit-q8")  # -qB: RTN-packed experts
DEFAULT_DECODE_IMPLS = ("moekit", "hf-grouped_mm", "hf-eager")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(device, repeats: int = 5, nbytes: int = 1 << 29) -> float:
    """Bytes per second read by a full-tensor sum (CPU) or copy (CUDA) of ``nbytes`` (512 MiB: past any cache)."""
    big = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    if torch.device(device).type == "cuda":
        out = torch.empty_like(big)
        seconds = _median(lambda: out.copy_(big), device, repeats, 2)
        return 2 * nbytes / seconds  # a copy reads and writes every byte
    seconds = _median(lambda: big.sum(), device, repeats, 2)
    return nbytes / seconds


def layer_bytes(shape: dict, element_size: int) -> tuple[int, int]:
    """``(bytes of one expert, bytes of the router)``."""
    d, f = shape["dim"], shape["hidden"]
    return 3 * d * f * element_size, shape["experts"] * d * element_size


def free_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def run_decode(shapes, tokens, impls, device, dtype, repeats: int, warmup: int, progress=None) -> dict:
    from . import MoE
    from .config import MoEConfig

    has_hf = True
    try:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    except ImportError:
        has_hf = False
    bandwidth = read_bandwidth(device)
    results, notes = [], []
    element = torch.tensor([], dtype=dtype).element_size()
    for name in shapes:
        shape = DECODE_SHAPES[name]
        expert_bytes, router_bytes = layer_bytes(shape, element)
        copies = 1 + (1 if has_hf and any(i.startswith("hf-") for i in impls) else 0)
        needed = copies * shape["experts"] * expert_bytes
        if torch.device(device).type == "cpu" and needed * 1.3 > free_memory_bytes():
            notes.append(f"{name}: skipped, needs about {needed / 2**30:.1f} GiB for {copies} copies of the layer")
            continue
        torch.manual_seed(0)
        cfg = MoEConfig(dim=shape["dim"], hidden_dim=shape["hidden"], num_experts=shape["experts"],
                        top_k=shape["top_k"], aux_loss=None)
        with torch.device("meta"):
            moe = MoE(cfg)
        moe = moe.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            for b in moe.buffers():
                b.zero_()
        moe = moe.to(device=device, dtype=dtype).eval()
        block = None
        if has_hf and any(i.startswith("hf-") for i in impls):
            hf_cfg = OlmoeConfig(hidden_size=shape["dim"], intermediate_size=shape["hidden"],
                                 num_experts=shape["experts"], num_experts_per_tok=shape["top_k"],
                                 norm_topk_prob=False, hidden_act="silu")
            with torch.device("meta"):
                block = OlmoeSparseMoeBlock(hf_cfg)
            block.load_state_dict(moe.state_dict(), strict=True, assign=True)
            block = block.eval()
        qlayers = {}
        for num_tokens in tokens:
            x = torch.randn(num_tokens, shape["dim"], generator=gen).to(device=device, dtype=dtype)
            with torch.no_grad():
                used = int(torch.unique(moe.router(x).expert_ids).numel())
            floor_s = (router_bytes + used * expert_bytes) / bandwidth
            for impl in impls:
                if progress:
                    progress(f"{name:14s} T={num_tokens:<3d} {impl}")
                path = None
                if impl == "moekit":
                    def fn(layer=moe, x=x):
                        with torch.no_grad():
                            return layer(x)
                    seconds = _median(fn, device, repeats, warmup)
                    path = moe.experts.last_path
                elif impl.startswith("moekit-q"):  # the same layer with RTN-packed experts (experts/quantized.py)
                    from .experts.quantized import quantized_layer

                    qkey = int(impl[len("moekit-q"):])
                    qmoe = qlayers.get(qkey)
                    if qmoe is None:
                        qmoe = qlayers[qkey] = quantized_layer(moe, bits=qkey).to(device=device)

                    def fn(layer=qmoe, x=x):
                        with torch.no_grad():
                            return layer(x)
                    seconds = _median(fn, device, repeats, warmup)
                    path = f"{qkey}-bit"
                elif impl.startswith("hf-"):
                    if block is None:
                        continue
                    hf_cfg._experts_implementation = impl.split("-", 1)[1]  # read by the experts at call time
                    x3 = x.unsqueeze(0)

                    def fn(block=block, x3=x3):
                        with torch.no_grad():
                            return block(x3)
                    seconds = _median(fn, device, repeats, warmup)
                else:
                    raise ValueError(f"--impls: unknown implementation {impl!r}; allowed: {', '.join(DECODE_IMPLS)}")
                results.append(dict(shape=name, impl=impl, tokens=num_tokens, fwd_s=seconds, fwd_bwd_s=None,
                                    peak_bytes=None, floor_s=floor_s, experts_used=used, path=path))
        del moe, block, qlayers
        gc.collect()
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "mode": "decode",
            "bandwidth_gb_s": bandwidth / 1e9, "threads": torch.get_num_threads(), "results": results,
            "notes": notes}


def format_decode_table(report: dict) -> str:
    lines = [f"device={report['device']} dtype={report['dtype']} threads={report['threads']} "
             f"read bandwidth {report['bandwidth_gb_s']:.1f} GB/s",
             f"{'shape':14s} {'T':>3s} {'impl':14s} {'fwd_ms':>8s} {'floor_ms':>9s} {'x floor':>8s} "
             f"{'vs hf-gmm':>9s}  path"]
    by = {(r["shape"], r["tokens"], r["impl"]): r for r in report["results"]}
    for r in report["results"]:
        hf = by.get((r["shape"], r["tokens"], "hf-grouped_mm"))
        vs = f"{r['fwd_s'] / hf['fwd_s']:.2f}" if hf else "-"
        lines.append(f"{r['shape']:14s} {r['tokens']:3d} {r['impl']:14s} {r['fwd_s'] * 1e3:8.3f} "
                     f"{r['floor_s'] * 1e3:9.3f} {r['fwd_s'] / r['floor_s']:8.2f} {vs:>9s}  {r['path'] or ''}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def main_decode(args, device: str, dtype: torch.dtype) -> dict:
    shapes = [s for s in (args.decode_shapes or ",".join(DECODE_SHAPES)).split(",") if s]
    for s in shapes:
        if s not in DECODE_SHAPES:
            raise ValueError(f"--decode-shapes: unknown shape {s!r}; allowed: {', '.join(DECODE_SHAPES)}")
    impls = [i for i in (args.decode_impls or ",".join(DEFAULT_DECODE_IMPLS)).split(",") if i]
    for i in impls:
        if i not in DECODE_IMPLS:
            raise ValueError(f"--impls: unknown implementation {i!r} for --decode; allowed: {', '.join(DECODE_IMPLS)}")
    progress = None if args.json else (lambda msg: print(f"  timing {msg} ...", file=sys.stderr, flush=True))
    return run_decode(shapes, DECODE_TOKENS, impls, device, dtype, args.repeats, args.warmup, progress)
