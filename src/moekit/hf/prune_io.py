"""Pruning transformers MoE checkpoints: load a checkpoint folder, calibrate its experts, slice experts and router
rows, write an ordinary transformers checkpoint (equal expert counts per layer, the config's expert count
rewritten) that plain ``AutoModelForCausalLM.from_pretrained`` reloads.

Supported: the sparse MoE blocks of :func:`moekit.hf.record.find_moe_blocks` whose experts module holds stacked
``gate_up_proj [E, 2F, D]`` (gate rows first, as transformers 5's decorated experts classes: Qwen3-MoE, OLMoE,
Mixtral, Qwen2-MoE, DeepSeek-V3, ...) and ``down_proj [E, D, F]``; per-expert router tensors (``gate.weight``,
``e_score_correction_bias``) are sliced with their experts; shared experts are kept as they are. Group-limited
routing (``n_group > 1``) is refused: the kept experts would no longer fill equal groups.

Calibration (:func:`calibrate_hf`) hooks every experts module: the routing it receives (``top_k_index``,
``top_k_weights``) gives routed tokens and summed routing weights per expert (``frequency``, DERN's router
score) and, by running the module's own forward once per expert on that expert's tokens, the REAP score
(mean of renormalised weight x ||expert output||). Methods: ``frequency``, ``reap``, ``dern``
(:mod:`moekit.compress.dern` on the stacked weights). Calibration text: the checkpoint's tokenizer when the
folder has one, else UTF-8 bytes taken modulo the vocabulary (tiny test checkpoints have no tokenizer).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

__all__ = ["HF_PRUNE_METHODS", "calibrate_hf", "calibration_batches_hf", "hf_blocks", "is_hf_checkpoint", "load_hf", "prune_hf"]

HF_PRUNE_METHODS = ("frequency", "reap", "dern")
COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")


def is_hf_checkpoint(folder: str | Path) -> bool:
    """A folder whose config.json is a transformers config (``model_type``), not a moekit run."""
    p = Path(folder) / "config.json"
    if not p.is_file():
        return False
    try:
        cfg = json.loads(p.read_text())
    except ValueError:
        return False
    return isinstance(cfg, dict) and "model_type" in cfg and "train" not in cfg


def hf_blocks(model) -> list:
    """The prunable MoE blocks of a loaded transformers model; ``ValueError`` naming the architecture when it has
    none (no experts class with stacked ``gate_up_proj`` / ``down_proj``)."""
    from .record import find_moe_blocks

    arch = type(model).__name__
    blocks = find_moe_blocks(model)
    ok = []
    for b in blocks:
        up, down = getattr(b.experts, "gate_up_proj", None), getattr(b.experts, "down_proj", None)
        E = b.num_experts
        if (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3
                and up.shape[0] == E and down.shape[0] == E and not getattr(b.experts, "is_transposed", False)
                and not getattr(b.experts, "has_bias", False)):
            ok.append(b)
    if not ok or len(ok) != len(blocks):
        raise ValueError(f"{arch}: no experts class moekit can prune (needs stacked gate_up_proj [E, 2F, D] and "
                         f"down_proj [E, D, F] in every MoE block)")
    n_group = getattr(model.config, "n_group", None) or getattr(model.config, "num_group", None) or 1
    if n_group > 1:
        raise ValueError(f"{arch}: group-limited routing (n_group={n_group}) is not supported for pruning")
    return ok


def load_hf(folder: str | Path):
    """``(model, blocks)`` of a transformers checkpoint folder (never ``trust_remote_code``)."""
    import transformers

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{folder}: model_type {model_type!r} is not a transformers architecture (remote code is "
                         "never run)")
    try:  # the architecture is checked on a weightless copy first: bad input fails before any loading
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with torch.device("meta"):
            hf_blocks(transformers.AutoModelForCausalLM.from_config(config))
    except (OSError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder}: transformers cannot build it ({str(exc).splitlines()[0]})") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    except (OSError, KeyError) as exc:
        raise ValueError(f"{folder}: transformers cannot load it ({str(exc).splitlines()[0]})") from None
    return model, hf_blocks(model)


def _text_ids(folder: Path, model, text: str) -> list[int]:
    """Token ids of ``text``: the checkpoint's tokenizer, or UTF-8 bytes modulo the vocabulary without one."""
    byte_ids = [b % model.config.vocab_size for b in text.encode("utf-8")]
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return byte_ids  # no tokenizer files in the folder
    from transformers import AutoTokenizer

    try:
        ids = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)(text)["input_ids"]
    except Exception:  # an unusable tokenizer: bytes as well
        return byte_ids
    return ids or byte_ids


def calibration_batches_hf(folder: str | Path, model, seq_len: int, num_tokens: int, *, text_path=None,
                           corpus=None, domain: str | None = None) -> list[dict]:
    """Calibration batches for a transformers model: the user's text (``text_path``) tokenised as described in
    the module docstring, or windows of a moekit corpus (bytes) taken modulo the vocabulary."""
    import numpy as np

    from ..compress.calibrate import _batched, _check_request, _windows, calibration_batches

    V = model.config.vocab_size
    if text_path is None:
        out = calibration_batches(corpus, seq_len, num_tokens, domain=domain)
        return [dict(b, input_ids=torch.remainder(b["input_ids"], V)) for b in out]
    from ..data.sources import text_documents

    _check_request(num_tokens, seq_len)
    if not Path(text_path).exists():
        raise ValueError(f"--calib-data: {text_path} does not exist")
    ids = []
    for doc in text_documents(text_path):
        ids += _text_ids(Path(folder), model, bytes(doc.data).decode("utf-8", errors="replace"))
    if len(ids) < num_tokens:
        raise ValueError(f"calibration too small: --calib-data {text_path} holds {len(ids):,} tokens, "
                         f"--calib-tokens asks {num_tokens:,}")
    tokens = np.asarray(ids, dtype=np.int64)
    out = _batched(_windows(tokens, [(0, len(tokens))], seq_len, num_tokens), 8)
    return [dict(b, input_ids=torch.remainder(b["input_ids"], V)) for b in out]  # padding id into the vocabulary


@torch.no_grad()
def calibrate_hf(model, blocks, batches, *, progress: bool = False) -> list[dict]:
    """Per block: ``count_E`` (routed tokens), ``weight_sum_E`` (routing weights as received), ``reap_E``
    (mean renormalised weight x ||output||)."""
    stats = []
    handles = []
    for b in blocks:
        E = b.num_experts
        s = {"count_E": torch.zeros(E, dtype=torch.int64), "weight_sum_E": torch.zeros(E, dtype=torch.float64),
             "reap_sum_E": torch.zeros(E, dtype=torch.float64), "tokens": 0}
        stats.append(s)

        def hook(module, args, kwargs, _output, s=s, E=E):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
            x, idx, w = vals[0], vals[1], vals[2]
            x = x.reshape(-1, x.shape[-1])
            idx = idx.reshape(x.shape[0], -1)
            w = w.reshape(x.shape[0], -1).double()
            s["tokens"] += x.shape[0]
            wn = w / w.sum(-1, keepdim=True).clamp(min=1e-30)
            for e in range(E):
                rows, slots = (idx == e).nonzero(as_tuple=True)
                if rows.numel() == 0:
                    continue
                s["count_E"][e] += rows.numel()
                s["weight_sum_E"][e] += float(w[rows, slots].sum())
                one = torch.full((rows.numel(), 1), e, dtype=idx.dtype)
                out = module.forward(x[rows], one, torch.ones(rows.numel(), 1, dtype=x.dtype))
                s["reap_sum_E"][e] += float((wn[rows, slots] * out.double().norm(dim=-1)).sum())
        handles.append(b.experts.register_forward_hook(hook, with_kwargs=True))
    try:
        it = batches
        if progress:
            from tqdm import tqdm

            it = tqdm(batches, desc="calibrate", file=sys.stderr, leave=False)
        for batch in it:
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            ids = batch["input_ids"] if isinstance(batch, dict) else batch
            model(ids, attention_mask=None if mask is None else mask.long())
    finally:
        for h in handles:
            h.remove()
    for s in stats:
        s["reap_E"] = s["reap_sum_E"] / s["count_E"].clamp(min=1)
    return stats


def scores(stats: list[dict], method: str) -> list[torch.Tensor]:
    key = {"frequency": "count_E", "reap": "reap_E", "dern": "weight_sum_E"}[method]
    return [s[key].double() for s in stats]


@torch.no_grad()
def prune_hf(model, blocks, keep: list[list[int]], *, method: str = "frequency", stats: list[dict] | None = None,
             dern_alpha: float = 0.4, clamp_top_k: bool = False):
    """The pruned transformers model (a new instance of the same class): block ``b`` keeps experts ``keep[b]``
    (same count in every block), its router rows and per-expert router tensors sliced, ``num_experts`` /
    ``num_local_experts`` / ``n_routed_experts`` rewritten; ``method="dern"`` also merges the dropped experts'
    neuron segments into the kept ones (``stats`` gives the router scores)."""
    import transformers

    n = {len(k) for k in keep}
    if len(n) != 1:
        raise ValueError("a transformers checkpoint needs the same expert count in every layer")
    n = n.pop()
    cfg = copy.deepcopy(model.config)
    have = cfg.to_dict()
    for key in COUNT_KEYS:
        if key in have and isinstance(have[key], int):
            setattr(cfg, key, n)
    k = getattr(cfg, "num_experts_per_tok", None)
    if k is not None and k > n:
        if not clamp_top_k:
            raise ValueError(f"keeping {n} experts leaves fewer than top-k {k}; pass --clamp-top-k")
        cfg.num_experts_per_tok = n
    state = model.state_dict()
    new_state = dict(state)
    for bi, (b, kept) in enumerate(zip(blocks, keep)):
        E = b.num_experts
        idx = torch.tensor(sorted(kept))
        for key, t in state.items():
            if not key.startswith(b.name + "."):
                continue
            local = key[len(b.name) + 1:]
            if (local.startswith("experts.") or local.startswith(_router_attr(b) + ".")) and t.dim() >= 1 \
                    and t.shape[0] == E:
                new_state[key] = t[idx].clone()
        if method == "dern":
            from ..compress.dern import dern_layer

            r = dern_layer(b.experts.gate_up_proj, b.experts.down_proj, True, stats[bi]["weight_sum_E"],
                           sorted(kept), dern_alpha)
            new_state[f"{b.name}.experts.gate_up_proj"] = r.w_up_KHD.contiguous()
            new_state[f"{b.name}.experts.down_proj"] = r.w_down_KDF.contiguous()
    dtype = next(model.parameters()).dtype
    new = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    missing, unexpected = new.load_state_dict(new_state, strict=False)
    missing = [m for m in missing if m not in _tied(new)]
    if missing or unexpected:
        raise ValueError(f"pruned model does not match its state: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return new


def _router_attr(b) -> str:
    return "gate" if getattr(b.block, "gate", None) is b.router else "router"


def _tied(model) -> set:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, (list, tuple, set)) else tied.keys())
