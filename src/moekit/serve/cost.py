"""A two-tier machine for the trace simulator: simulated decode time per token (batch 1).

Fast memory (a GPU, or RAM in front of a disk) holds the cached experts; the rest live in host memory (or on
disk) behind a link. Times per MoE layer and token:

* an expert in fast memory is computed there: ``max(flops / fast_tflops, bytes / fast_mem_gbps)`` (batch-1
  decode reads every weight once, so it is usually bound by memory bandwidth);
* a missed expert is either moved and then computed in fast memory (``link_latency + bytes / link_gbps`` plus
  the fast compute), or, following Fiddler ("Fiddler: CPU-GPU Orchestration for Fast Inference of
  Mixture-of-Experts Models", arXiv 2402.07033), computed on the host where it lives
  (``max(flops / host_tflops, bytes / host_mem_gbps)``) with the token's activation sent over the link and the
  result sent back (``2 * (link_latency + act_bytes / link_gbps)``), whichever is cheaper. The choice is the
  same for every miss at batch 1 (all experts have one size); when the host wins, missed experts are not
  loaded (the cache changes through prefetches only), as in Fiddler. ``host_tflops = 0`` turns host compute off
  (e.g. a disk cannot compute);
* ``dense_ms`` per layer for everything that is not an expert (attention, norms, router), always in fast
  memory;
* prefetch loads travel over the link while the ``lead`` layers between the prediction and the use compute
  (``lead * (dense + top_k * fast expert)``); what does not fit in that window is a stall.

``decode_time`` returns the mean over the measured tokens and the fully resident time (every expert in fast
memory) as the baseline. The figures are a model, not a measurement.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

__all__ = ["CostModel", "PRESETS", "load_cost_model"]


@dataclass
class CostModel:
    """Rates of a two-tier machine (GB/s = 1e9 bytes/s, TFLOP/s = 1e12 FLOP/s)."""

    link_gbps: float = 25.0          # fast <-> host link (PCIe 4 x16 about 25)
    link_latency_us: float = 10.0    # per transfer
    fast_tflops: float = 100.0       # fast tier compute
    fast_mem_gbps: float = 2000.0    # fast tier memory bandwidth
    host_tflops: float = 1.0         # host compute (0: none, misses are always moved)
    host_mem_gbps: float = 80.0      # host memory bandwidth
    dense_ms: float = 0.05           # non-expert time per layer and token, fast tier
    bytes_per_param: int = 2         # for the activations sent to the host
    expert_flops: float | None = None  # per token; default 2 * 3 * dim * hidden_dim from the trace

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "expert_flops" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ValueError(f"cost model: {f.name} must be a number, got {v!r}")
        for name in ("link_gbps", "fast_tflops", "fast_mem_gbps", "host_mem_gbps", "bytes_per_param"):
            if getattr(self, name) <= 0:
                raise ValueError(f"cost model: {name} must be positive, got {getattr(self, name)}")
        for name in ("link_latency_us", "host_tflops", "dense_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost model: {name} must be >= 0, got {getattr(self, name)}")
        if self.expert_flops is not None and self.expert_flops <= 0:
            raise ValueError(f"cost model: expert_flops must be positive, got {self.expert_flops}")

    # ------------------------------------------------------------------ one expert
    def _flops(self, trace) -> float:
        if self.expert_flops is not None:
            return float(self.expert_flops)
        dim, hidden = trace.model.get("dim"), trace.model.get("hidden_dim")
        if not (isinstance(dim, int) and isinstance(hidden, int)):
            raise ValueError("cost model: the trace does not give dim and hidden_dim; set expert_flops")
        return 2.0 * 3 * dim * hidden

    def _act_bytes(self, trace) -> float:
        dim = trace.model.get("dim")
        return float(dim * self.bytes_per_param) if isinstance(dim, int) else 0.0

    def times(self, trace, expert_bytes: int) -> dict:
        """Seconds for one expert and one token: ``fast`` (resident), ``move`` (load then compute) and
        ``host`` (Fiddler; ``inf`` when the host cannot compute)."""
        if expert_bytes is None or expert_bytes <= 0:
            raise ValueError("cost model: the bytes of an expert are unknown (pass --expert-bytes)")
        flops, lat = self._flops(trace), self.link_latency_us * 1e-6
        fast = max(flops / (self.fast_tflops * 1e12), expert_bytes / (self.fast_mem_gbps * 1e9))
        move = lat + expert_bytes / (self.link_gbps * 1e9) + fast
        if self.host_tflops > 0:
            host = (max(flops / (self.host_tflops * 1e12), expert_bytes / (self.host_mem_gbps * 1e9))
                    + 2 * (lat + self._act_bytes(trace) / (self.link_gbps * 1e9)))
        else:
            host = float("inf")
        return {"fast": fast, "move": move, "host": host, "load": lat + expert_bytes / (self.link_gbps * 1e9)}

    def host_wins(self, trace, expert_bytes: int) -> bool:
        t = self.times(trace, expert_bytes)
        return t["host"] < t["move"]

    # ------------------------------------------------------------------ a simulated run
    def decode_time(self, result, trace, expert_bytes: int) -> dict:
        """Decode time per token of a :class:`moekit.serve.simulate.SimResult` (its per-token counts)."""
        t = self.times(trace, expert_bytes)
        host = t["host"] < t["move"]
        miss = t["host"] if host else t["move"]
        dense = self.dense_ms * 1e-3
        tops = [max(1, int((trace.experts[l] >= 0).sum(-1).max())) for l in range(trace.num_layers)]
        total = np.zeros(result.measured_tokens)
        stall = np.zeros(result.measured_tokens)
        for l, s in enumerate(result.layers):
            total += dense + s.hits_T * t["fast"] + s.misses_T * miss
            if s.lead:
                window = s.lead * (dense + tops[l] * t["fast"])
                st = np.maximum(0.0, s.prefetch_T * t["load"] - window)
                stall += st
                total += st
        resident = sum(dense + k * t["fast"] for k in tops)
        ms = float(total.mean()) * 1e3 if len(total) else float("nan")
        return {"ms_per_token": ms, "resident_ms_per_token": resident * 1e3,
                "slowdown": ms / (resident * 1e3) if resident else float("nan"),
                "miss_choice": "host" if host else "move", "miss_ms": miss * 1e3,
                "move_ms": t["move"] * 1e3, "host_ms": t["host"] * 1e3 if t["host"] != float("inf") else None,
                "stall_ms_per_token": float(stall.mean()) * 1e3 if len(stall) else 0.0}

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # a GPU with experts in pinned host memory over PCIe 4 (Fiddler's setting)
    "gpu-pcie": CostModel(),
    # a laptop: RAM is the fast tier, the experts are read from an NVMe disk that cannot compute
    "ram-nvme": CostModel(link_gbps=3.0, link_latency_us=80.0, fast_tflops=0.5, fast_mem_gbps=50.0,
                          host_tflops=0.0, host_mem_gbps=3.0, dense_ms=0.2),
}


def load_cost_model(spec: str) -> CostModel:
    """A preset name (:data:`PRESETS`) or a JSON / TOML file of :class:`CostModel` fields (unset fields keep
    the ``gpu-pcie`` defaults). ``ValueError`` naming the problem otherwise."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--cost-model takes a preset ({', '.join(PRESETS)}) or a JSON/TOML file; "
                         f"{spec} is neither")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cost model {path} cannot be read: {str(exc).splitlines()[0][:100]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"cost model {path} must hold a table/object of settings")
    known = {f.name for f in fields(CostModel)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"cost model {path}: unknown setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    return CostModel(**data)
