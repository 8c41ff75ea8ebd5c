"""Routing traces written by other serving systems, read into a moekit :class:`~moekit.trace.format.Trace`.

**SGLang** expert-distribution recorder, ``per_token`` mode (``--expert-distribution-recorder-mode
per_token``, then the ``/start_expert_distribution_record``, ``/stop_...`` and ``/dump_expert_distribution_record``
endpoints). Layout as written by ``python/sglang/srt/eplb/expert_distribution.py`` (``_DetailAccumulator.dump``
and ``_DetailSinglePassGatherer.collect``, sgl-project/sglang, read 2026-12): one ``torch.save`` file
``expert_distribution_recorder_{time}_{rank}.pt`` holding ::

    {"records": [ {"forward_pass_id": int, "rank": int, "gatherer_key": str,
                   "input_ids": [n] list, "positions": [n] list, "extend_seq_lens": list | None,
                   "forward_mode": int,
                   "topk_ids_of_layer": int32 tensor [num_layers, n, 8]   # physical expert ids, -1 = none
                   "misc_objects": list, "global_physical_count": tensor [num_layers, num_physical]}, ...],
     "last_physical_to_logical_map": int tensor [num_layers, num_physical]}

The top-k buffer is 8 wide (DeepSeek-V3's k) and padded with -1; ids are *physical* slots, mapped here to
logical experts with ``last_physical_to_logical_map``. Layers that never routed (dense layers) are dropped,
tokens follow the order of the forward passes. The file is a Python pickle (``torch.save``), and moekit never
unpickles a user's file unless asked: only with ``allow_pickle=True`` (``moekit simulate --allow-pickle``) is it
read, and then with ``torch.load(weights_only=True)``, the restricted unpickler that only rebuilds tensors and
plain containers (no code runs); a file that needs more is refused. SGLang records no request ids, so ``seq_ids`` are unknown (-1).

**vLLM** returns the routed experts of a request in memory, not in a file: ``CompletionOutput.routed_experts``
(``vllm/outputs.py``, vllm-project/vllm, read 2026-12), an integer ``np.ndarray`` of shape
``[seq_len, layer_num, topk]`` (prompt and generated positions in order; vLLM's capturer gives ``seq_len`` =
tokens - 1, the last sampled token never ran). Saved with numpy this reads as: a ``.npy`` file (one request), a
``.npz`` file (one array per request, e.g. ``np.savez(path, **{out.request_id: out.outputs[0].routed_experts})``)
or a ``.jsonl`` file with one object per request ``{"request_id": ..., "routed_experts": [[[...]]],
"token_ids": [...]}`` (``token_ids`` optional). The OpenAI-compatible server (``vllm serve
--enable-return-routed-experts``; docs.vllm.ai "Routed Experts Replay", v0.21) answers with
``prompt_routed_experts`` ``[prompt_len, num_moe_layers, top_k]`` at the response level and ``routed_experts``
``[gen_len, num_moe_layers, top_k]`` in every choice; a saved response (``.json``, or one per line in
``.jsonl``) is read as one request per choice, prompt rows first. Read with ``allow_pickle=False``. The
number of experts is not in the data: pass it (``num_experts``) or it is taken as the largest id + 1.

:func:`check_model` compares a trace's layers and experts with a model (a moekit run or stated counts).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..trace.format import Trace, load_trace

__all__ = ["FORMATS", "detect_format", "load_sglang", "load_vllm", "load_any", "check_model", "run_shape"]

FORMATS = ("moekit", "sglang", "vllm")


def detect_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return "moekit"
    if suffix == ".pt":
        return "sglang"
    if suffix in (".npy", ".npz", ".jsonl", ".json"):
        return "vllm"
    raise ValueError(f"cannot tell the format of {path} from its suffix; pass --format {'|'.join(FORMATS)}")


def _trace(experts_LTK: np.ndarray, num_experts: int, source: dict, tokens=None, positions=None,
           seq_ids=None) -> Trace:
    experts_LTK = np.asarray(experts_LTK, dtype=np.int64)
    # a token's experts first, pads after, no repeats: sort each row with -1 last, keep the first occurrence
    key = np.where(experts_LTK >= 0, experts_LTK, np.iinfo(np.int64).max)
    experts_LTK = np.take_along_axis(experts_LTK, np.argsort(key, axis=-1, kind="stable"), -1)
    dup = np.zeros_like(experts_LTK, dtype=bool)
    dup[..., 1:] = (experts_LTK[..., 1:] == experts_LTK[..., :-1]) & (experts_LTK[..., 1:] >= 0)
    experts_LTK[dup] = -1
    key = np.where(experts_LTK >= 0, experts_LTK, np.iinfo(np.int64).max)
    experts_LTK = np.take_along_axis(experts_LTK, np.argsort(key, axis=-1, kind="stable"), -1)
    width = max(1, int((experts_LTK >= 0).sum(-1).max())) if experts_LTK.size else 1
    experts_LTK = experts_LTK[..., :width]
    weights = np.where(experts_LTK >= 0, 1.0, 0.0).astype(np.float32)  # gate weights are not recorded
    L = experts_LTK.shape[0]
    return Trace(experts=experts_LTK, weights=weights, num_experts=num_experts,
                 layer_names=[f"layers.{i}" for i in source.get("layers", range(L))],
                 tokens=tokens, positions=positions, seq_ids=seq_ids,
                 model={"num_experts": num_experts, "num_moe_layers": L}, source=source)


def load_sglang(path: str | Path, num_experts: int | None = None, *, allow_pickle: bool = False) -> Trace:
    """Read an SGLang ``per_token`` expert-distribution dump (see the module docstring for the layout). The file
    is a pickle: refused unless ``allow_pickle`` (then read by torch's weights-only unpickler)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    if not allow_pickle:
        raise ValueError(f"{path} is an SGLang dump, a Python pickle (torch.save): moekit reads it only when you "
                         f"trust the file and pass --allow-pickle (torch's weights-only loader, no code runs)")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable SGLang expert-distribution dump "
                         f"({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__})") from None
    if not isinstance(data, dict) or "records" not in data or "last_physical_to_logical_map" not in data:
        raise ValueError(f"{path} is not an SGLang per_token dump (no 'records' and 'last_physical_to_logical_map')")
    p2l = np.asarray(data["last_physical_to_logical_map"], dtype=np.int64)
    records = [r for r in data["records"] if isinstance(r, dict) and "topk_ids_of_layer" in r]
    if not records:
        raise ValueError(f"{path} holds no per_token records (was the recorder in per_token mode?)")
    records.sort(key=lambda r: (r.get("forward_pass_id", 0), r.get("rank", 0)))
    blocks, tokens, positions = [], [], []
    for r in records:
        ids = np.asarray(r["topk_ids_of_layer"], dtype=np.int64)
        if ids.ndim != 3 or ids.shape[0] != p2l.shape[0]:
            raise ValueError(f"{path}: topk_ids_of_layer has shape {list(ids.shape)}, expected "
                             f"[{p2l.shape[0]} layers, tokens, k]")
        n = ids.shape[1]
        if ids.size and (ids.max() >= p2l.shape[1]):
            raise ValueError(f"{path}: a physical expert id is >= the map's {p2l.shape[1]} slots")
        layer_idx = np.arange(ids.shape[0])[:, None, None]
        blocks.append(np.where(ids >= 0, p2l[layer_idx, np.maximum(ids, 0)], -1))
        tokens.extend(list(r.get("input_ids") or [-1] * n)[:n])
        positions.extend(list(r.get("positions") or [-1] * n)[:n])
    experts_LTK = np.concatenate(blocks, axis=1)
    routed_layers = [l for l in range(experts_LTK.shape[0]) if (experts_LTK[l] >= 0).any()]
    if not routed_layers:
        raise ValueError(f"{path}: no layer routed any token")
    experts_LTK = experts_LTK[routed_layers]
    keep = (experts_LTK >= 0).any(-1).all(0)  # tokens every MoE layer routed
    experts_LTK = experts_LTK[:, keep]
    E = num_experts if num_experts is not None else int(max(p2l.max(), experts_LTK.max())) + 1
    return _trace(experts_LTK, E, {"format": "sglang-per-token", "file": path.name, "layers": routed_layers},
                  tokens=np.asarray(tokens, dtype=np.int64)[keep],
                  positions=np.asarray(positions, dtype=np.int64)[keep])


def load_vllm(path: str | Path, num_experts: int | None = None) -> Trace:
    """Read vLLM ``routed_experts`` arrays saved as ``.npy`` / ``.npz`` / ``.jsonl`` (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    suffix = path.suffix.lower()
    arrays, token_lists, names = [], [], []
    try:
        if suffix == ".npy":
            arrays.append(np.load(path, allow_pickle=False))
            names.append(path.stem)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                for k in z.files:
                    arrays.append(z[k])
                    names.append(k)
        else:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            objs = [json.loads(ln) for ln in lines] if suffix == ".jsonl" else json.loads(path.read_text())
            if isinstance(objs, dict):
                objs = [objs]
            for i, o in enumerate(objs):
                if isinstance(o, dict) and isinstance(o.get("choices"), list):  # an OpenAI API response
                    prompt = o.get("prompt_routed_experts")
                    for j, c in enumerate(o["choices"]):
                        if not isinstance(c, dict) or "routed_experts" not in c:
                            raise ValueError(f"{path}: response {i} choice {j} has no 'routed_experts'")
                        gen = np.asarray(c["routed_experts"])
                        arrays.append(gen if prompt is None else np.concatenate([np.asarray(prompt), gen]))
                        names.append(f"{o.get('id', i)}/{c.get('index', j)}")
                        token_lists.append(None)
                    continue
                if not isinstance(o, dict) or "routed_experts" not in o:
                    raise ValueError(f"{path}: entry {i} has no 'routed_experts'")
                arrays.append(np.asarray(o["routed_experts"]))
                names.append(str(o.get("request_id", i)))
                token_lists.append(o.get("token_ids"))
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        detail = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not readable vLLM routed-experts data ({detail})") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__})") from None
    if not arrays:
        raise ValueError(f"{path} holds no routed_experts arrays")
    shapes = {a.shape[1:] for a in arrays if a.ndim == 3}
    if any(a.ndim != 3 for a in arrays) or len({s[0] for s in shapes}) != 1:
        raise ValueError(f"{path}: routed_experts must be [seq_len, layer_num, topk] with one layer_num; got "
                         f"{sorted({tuple(a.shape) for a in arrays})[:3]}")
    if any(not np.issubdtype(a.dtype, np.integer) for a in arrays):
        raise ValueError(f"{path}: routed_experts must hold integer expert ids")
    K = max(a.shape[2] for a in arrays)
    padded = [np.pad(a.astype(np.int64), ((0, 0), (0, 0), (0, K - a.shape[2])), constant_values=-1) for a in arrays]
    experts_TLK = np.concatenate(padded, axis=0)
    seq_ids = np.concatenate([np.full(len(a), i) for i, a in enumerate(arrays)])
    positions = np.concatenate([np.arange(len(a)) for a in arrays])
    tokens = None
    if token_lists and all(t is not None for t in token_lists):
        rows = []
        for t, a in zip(token_lists, arrays):
            t = np.asarray(t, dtype=np.int64)[:len(a)]
            rows.append(np.pad(t, (0, len(a) - len(t)), constant_values=-1))
        tokens = np.concatenate(rows)
    E = num_experts if num_experts is not None else int(experts_TLK.max()) + 1
    if experts_TLK.size and experts_TLK.max() >= E:
        raise ValueError(f"{path}: expert id {int(experts_TLK.max())} >= the {E} experts stated")
    return _trace(experts_TLK.transpose(1, 0, 2), E, {"format": "vllm-routed-experts", "file": path.name,
                                                      "requests": names[:1000]},
                  tokens=tokens, positions=positions, seq_ids=seq_ids)


def load_any(path: str | Path, fmt: str | None = None, num_experts: int | None = None, *,
             allow_pickle: bool = False) -> Trace:
    """Read a trace in ``fmt`` (:data:`FORMATS`; ``None``: from the file's suffix)."""
    if not Path(path).is_file():
        raise ValueError(f"trace file {path} does not exist")
    fmt = fmt or detect_format(path)
    if fmt == "moekit":
        return load_trace(path)
    if fmt == "sglang":
        return load_sglang(path, num_experts, allow_pickle=allow_pickle)
    if fmt == "vllm":
        return load_vllm(path, num_experts)
    raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def run_shape(run_dir: str | Path) -> tuple[int, int]:
    """``(MoE layers, experts)`` of a moekit run folder."""
    from ..model.config import ModelConfig
    from ..train.checkpoint import read_run_config

    cfg = read_run_config(Path(run_dir), load_plugins=False)
    model = ModelConfig.from_dict(cfg["model"])
    per_layer = model.experts_per_layer
    return len(per_layer), max(per_layer) if per_layer else 0


def check_model(trace: Trace, layers: int | None, experts: int | None, what: str = "the model") -> None:
    """``ValueError`` (one line) when the trace's MoE layers or experts differ from ``layers`` / ``experts``."""
    bad = []
    if layers is not None and trace.num_layers != layers:
        bad.append(f"{trace.num_layers} MoE layers (not {layers})")
    if experts is not None and trace.num_experts != experts:
        bad.append(f"{trace.num_experts} experts (not {experts})")
    if bad:
        raise ValueError(f"the trace is from another model: it has {' and '.join(bad)} of {what}")
