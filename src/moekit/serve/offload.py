"""Offloaded generation: a model whose routed experts live in an :class:`moekit.serve.store.ExpertStore` and are
served from an :class:`moekit.serve.cache.ExpertCache` with a prefetcher (:mod:`moekit.serve.prefetch`).

Legend (docs/architecture.md): T tokens, D model width, E experts, K experts per token, S routed pairs sorted by
expert.

Two integrations share one :class:`OffloadEngine`:

* moekit runs: :class:`OffloadedExperts` is the experts kind ``"offloaded"`` (:func:`moekit.experts.get`); a run
  is built with it in every MoE layer (no expert weight is ever allocated), the non-expert weights come from the
  store, and :func:`load_offloaded_run` returns the model and the engine. ``moekit generate RUN --expert-budget``
  uses it (:mod:`moekit.commands_offload`).
* transformers MoE models (gated experts in transformers 5's stacked layout: OLMoE, Qwen3-MoE, Mixtral, ...):
  :func:`offload` writes (or reuses) a store for the model and replaces every experts module by
  :class:`OffloadedHFExperts`, freeing the expert parameters; :func:`load_hf_from_store` builds the model from a
  store without ever allocating its experts.

Exactness: each call computes the same operations in the same order as the resident model, on the cached copies
of the same weights: moekit's small-batch loop for decoding rows (:meth:`GroupedExperts.small_batch_forward`)
and the fused path's grouped products otherwise (rows assembled in plan order and scatter-added once), the eager
transformers loop for transformers models. A call needing more distinct experts than the layer's slots (a long
prefill) runs in groups of experts; the rows stay in plan order, so the sums do not change. Greedy output is
therefore the resident model's (tested token for token).
"""
from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..dispatch.fused import _act_forward
from ..dispatch.grouped import grouped_mm
from ..dispatch.plan import DispatchPlan
from ..experts.base import Experts, register, set_ffn_shape
from .cache import ExpertCache
from .prefetch import PREFETCHERS, Prefetcher, make_prefetcher
from .store import ExpertStore, fingerprint, is_store, write_store

__all__ = ["OffloadEngine", "OffloadedExperts", "OffloadedHFExperts", "load_offloaded_run", "load_hf_from_store",
           "offload", "write_run_store", "write_hf_store"]


# ------------------------------------------------------------------------------------------------ engine
class OffloadEngine:
    """The store, cache and prefetcher of one offloaded model, and the per-call protocol the experts modules
    follow: :meth:`run` (account, acquire by groups, prefetch the next layer, compute, release)."""

    def __init__(self, store: ExpertStore, cache: ExpertCache, prefetcher: Prefetcher):
        self.store, self.cache, self.prefetcher = store, cache, prefetcher
        self._tmp: tempfile.TemporaryDirectory | None = None

    def run(self, layer: int, x_TD: torch.Tensor, used: list[int], ids_TK: torch.Tensor | None, compute) -> None:
        """Serve one call of ``layer`` needing experts ``used`` (ascending): ``compute(group, weights)`` is called
        for consecutive groups of at most the layer's slots, ``weights`` one dict of tensors per expert."""
        cache = self.cache
        tokens = None
        if cache._adapt_pending and ids_TK is not None:
            tokens = [[int(e) for e in row if e >= 0] for row in ids_TK.tolist()]
        cache.begin_call(layer, used, tokens)
        slots = cache.slots[layer]
        groups = [used[i:i + slots] for i in range(0, len(used), slots)] or [[]]
        predicted = False
        try:
            for group in groups:
                weights = cache.acquire(layer, group) if group else []
                if not predicted and ids_TK is not None:  # own misses first, then the next layer's reads
                    predicted = True
                    pred = self.prefetcher.predict(layer, x_TD, ids_TK)
                    for target, ids in (pred.items() if isinstance(pred, dict) else [(layer + 1, pred)]):
                        if ids:
                            cache.prefetch(target, ids)
                try:
                    compute(group, weights)
                finally:
                    if group:
                        cache.release(layer, group)
        finally:
            cache.end_call(layer)

    def stats(self) -> dict:
        """The cache's :meth:`~moekit.serve.cache.ExpertCache.stats` plus the prefetcher's name."""
        return {**self.cache.stats(), "prefetch": self.prefetcher.name}

    def close(self) -> None:
        self.cache.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _tokens_experts(plan: DispatchPlan, T: int) -> torch.Tensor:
    """``ids_TK`` from a plan (each token's experts, -1 padded)."""
    order = torch.argsort(plan.token_S, stable=True)
    tok, exp = plan.token_S[order], plan.expert_S[order]
    counts = torch.bincount(tok, minlength=T)
    K = int(counts.max()) if counts.numel() else 0
    out = torch.full((T, max(K, 1)), -1, dtype=torch.int64)
    if tok.numel():
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(tok.numel()) - starts[tok]
        out[tok, pos] = exp.to(torch.int64)
    return out


# ------------------------------------------------------------------------------------------------ moekit
@register("offloaded")
class OffloadedExperts(Experts):
    """Experts kind ``"offloaded"``: no weights of its own; :meth:`attach` gives it an :class:`OffloadEngine` and
    its layer index. Computes exactly what :class:`moekit.experts.DenseExperts` computes (see the module
    docstring), from the cache's copies."""

    small_batch_rows_divisor = 8

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "swiglu",
                 init_std: float = 0.02):
        super().__init__()
        set_ffn_shape(self, num_experts, dim, hidden_dim, activation)
        self.engine: OffloadEngine | None = None
        self.layer = -1

    def attach(self, engine: OffloadEngine, layer: int) -> None:
        self.__dict__["engine"] = engine
        self.layer = layer

    def expert_parameter_names(self) -> list[str]:
        return []

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        if self.engine is None:
            raise RuntimeError("offloaded experts are not attached to an expert store (use load_offloaded_run)")
        T = x_TD.shape[0]
        token_S = plan.token_S
        counts = plan.counts_E.tolist()
        used = [e for e, n in enumerate(counts) if n]
        small = (not torch.is_grad_enabled() and x_TD.device.type == "cpu"
                 and token_S.shape[0] * self.small_batch_rows_divisor <= self.num_experts)
        x_SD = x_TD.index_select(0, token_S)
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        pieces: list[torch.Tensor] = []
        w_S = plan.weight_S

        def compute(group, weights):
            if not group:
                return
            if small:
                w_S1 = w_S.to(x_TD.dtype).unsqueeze(-1)
                for e, w in zip(group, weights):
                    s, t = starts[e], starts[e + 1]
                    a_SF = self.act_spec.fn(x_SD[s:t] @ w[self.up_name].t()) * w_S1[s:t]
                    pieces.append(a_SF @ w["down_proj"].t())
                return
            s, t = starts[group[0]], starts[group[-1] + 1]
            offs = torch.tensor([starts[e + 1] - s for e in group], dtype=torch.int32)
            w_up = torch.stack([w[self.up_name] for w in weights])
            w_down = torch.stack([w["down_proj"] for w in weights])
            h_SH = grouped_mm(x_SD[s:t], w_up.transpose(1, 2), offs)
            a_SF, _ = _act_forward(h_SH, self.act_spec)
            a_SF.mul_(w_S[s:t].to(a_SF.dtype).unsqueeze(-1))
            pieces.append(grouped_mm(a_SF, w_down.transpose(1, 2), offs))

        self.engine.run(self.layer, x_TD, used, _tokens_experts(plan, T), compute)
        if not pieces:
            return torch.zeros_like(x_TD)
        y_SD = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return torch.zeros_like(x_TD).index_add_(0, token_S, y_SD.to(x_TD.dtype))

    def expert_rows(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        counts = counts_E.tolist()
        used = [e for e, n in enumerate(counts) if n]
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        pieces = []

        def compute(group, weights):
            for e, w in zip(group, weights):
                h = x_SD[starts[e]:starts[e + 1]] @ w[self.up_name].t()
                pieces.append(self.act_spec.fn(h) @ w["down_proj"].t())

        self.engine.run(self.layer, x_SD, used, None, compute)
        return torch.cat(pieces) if pieces else x_SD.new_zeros(0, x_SD.shape[1])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, layer={self.layer}, activation={self.activation}"


def _run_identity(cfg: dict, tensors: dict[str, torch.Tensor]) -> dict:
    routers = {k: v for k, v in tensors.items() if ".mlp.gate." in k}
    return {"kind": "moekit-run", "config": cfg["model"], "fingerprint": fingerprint(routers)}


def write_run_store(run, out, progress=None) -> Path:
    """Write the store of a moekit run folder (dense experts only)."""
    from ..io import load_safetensors
    from ..train import read_run_config

    run = Path(run)
    cfg = read_run_config(run)
    from ..train.config import check_run_config

    model_cfg, _ = check_run_config(cfg, str(run / "config.json"))
    kinds = {m.experts for m in model_cfg.layer_moes.values()}
    if kinds != {"dense"}:
        raise ValueError(f"run {run}: only dense experts can be offloaded, this run has {sorted(kinds)}")
    tensors = load_safetensors(run / "model.safetensors", "weights file")
    layers, expert_keys = [], set()
    for i, moe in model_cfg.layer_moes.items():
        prefix = f"model.layers.{i}.mlp.experts."
        names = [k for k in tensors if k.startswith(prefix)]
        expert_keys.update(names)
        layers.append({"module": prefix[:-1], "top_k": moe.top_k,
                       "experts": {k[len(prefix):]: tensors[k] for k in names}})
    nonexpert = {k: v for k, v in tensors.items() if k not in expert_keys}
    ident = _run_identity(cfg, tensors)
    ident["run_config"] = {k: cfg[k] for k in ("format", "version", "model", "train") if k in cfg}
    return write_store(out, nonexpert, layers, ident, progress)


def load_offloaded_run(store, budget: float | None = 0.25, policy: str = "lru", prefetch: str = "none", *,
                       cold: bool = False, run=None, **cache_options):
    """``(model, engine)``: the run whose store is ``store`` (a folder written by ``moekit offload RUN``), every
    MoE layer's experts served by an :class:`ExpertCache` of ``budget`` with ``policy`` and ``prefetch``. With
    ``run``, the store must have been written from that run (``ValueError`` otherwise)."""
    from dataclasses import replace

    from ..model import MoELM
    from ..train.config import check_run_config

    st = ExpertStore(store)
    if st.model.get("kind") != "moekit-run":
        raise ValueError(f"expert store {st.path} holds a {st.model.get('kind')} model, not a moekit run")
    if run is not None:  # only the routers are read from the run (its experts stay on disk)
        from safetensors import safe_open

        from ..train import read_run_config

        cfg = read_run_config(Path(run))
        with safe_open(str(Path(run) / "model.safetensors"), framework="pt") as f:
            routers = {k: f.get_tensor(k) for k in f.keys() if ".mlp.gate." in k}
        st.check_model(_run_identity(cfg, routers))
    model_cfg, _ = check_run_config(st.model["run_config"], str(st.path / "manifest.json"))
    model_cfg = replace(model_cfg, moe=replace(model_cfg.moe, experts="offloaded", experts_options={}),
                        moe_overrides={i: {**o, "experts": "offloaded", "experts_options": {}}
                                       for i, o in model_cfg.moe_overrides.items()})
    model = MoELM(model_cfg)
    nonexpert = st.nonexpert_tensors()
    dtype = next(iter(nonexpert.values())).dtype
    model = model.to(dtype)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(nonexpert)), sorted(set(nonexpert) - set(own))
    if missing or unexpected:
        raise ValueError(f"expert store {st.path}: non-expert weights do not match the model (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(nonexpert, strict=True)
    del nonexpert
    model.eval()
    from ..layer import moe_layers

    layers = moe_layers(model)
    if len(layers) != len(st.layers):
        raise ValueError(f"expert store {st.path} has {len(st.layers)} MoE layers, the model {len(layers)}")
    cache = ExpertCache(st, budget, policy, cold=cold, **cache_options)
    routers = [m.gate for m in layers]
    logits = [(lambda r: (lambda x: r.logits(x)))(r) if getattr(r, "has_logits", False) else None
              for r in routers]
    if prefetch == "cross_layer" and any(f is None for f in logits):
        raise ValueError("prefetch cross_layer needs routers with a linear gate (logits) in every MoE layer")
    pf = make_prefetcher(prefetch, logits=logits, num_experts=cache.num_experts, top_k=cache.top_k)
    engine = OffloadEngine(st, cache, pf)
    for l, m in enumerate(layers):
        m.experts.attach(engine, l)
    return model, engine


# ------------------------------------------------------------------------------------------------ transformers
class OffloadedHFExperts(nn.Module):
    """Replaces a transformers experts module (``forward(hidden_states, top_k_index, top_k_weights)``): the eager
    transformers loop, expert by expert in id order, on the cache's copies of the weights."""

    def __init__(self, engine: OffloadEngine, layer: int, num_experts: int, act_fn):
        super().__init__()
        self.__dict__["engine"] = engine
        self.layer, self.num_experts, self.act_fn = layer, num_experts, act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        used = [int(e) for e in hit[:, 0].tolist() if e < self.num_experts]

        def compute(group, weights):
            for e, w in zip(group, weights):
                top_k_pos, token_idx = torch.where(mask[e])
                cur = hidden_states[token_idx]
                gate, up = nn.functional.linear(cur, w["gate_up_proj"]).chunk(2, dim=-1)
                h = self.act_fn(gate) * up
                h = nn.functional.linear(h, w["down_proj"])
                h = h * top_k_weights[token_idx, top_k_pos, None]
                final.index_add_(0, token_idx, h.to(final.dtype))

        self.engine.run(self.layer, hidden_states, used, top_k_index, compute)
        return final


def _hf_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(name, parent block, attribute, experts module)`` for every gated stacked experts module, in order."""
    out = []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        gate = getattr(block, "gate", None)
        if isinstance(experts, nn.Module) and isinstance(gate, nn.Module) and hasattr(experts, "down_proj"):
            if not hasattr(experts, "gate_up_proj") or getattr(experts, "is_transposed", False) \
                    or getattr(experts, "has_bias", False) or getattr(experts, "has_post_expert_norm", False):
                raise ValueError(f"{name}.experts: only gated, non-transposed experts without biases can be "
                                 f"offloaded (OLMoE, Qwen3-MoE, Mixtral layouts)")
            out.append((f"{name}.experts" if name else "experts", block, "experts", experts))
    if not out:
        raise ValueError("no transformers MoE experts module (block.gate + block.experts) found in the model")
    return out


def _hf_top_k(model, block) -> int:
    k = getattr(block.gate, "top_k", None)
    if k is None:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        k = getattr(cfg, "num_experts_per_tok", None)
    if not isinstance(k, int):
        raise ValueError("cannot tell the model's top-k (no gate.top_k, no num_experts_per_tok)")
    return k


_CFG_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "moe_intermediate_size",
             "num_hidden_layers", "num_experts", "num_local_experts", "num_experts_per_tok", "vocab_size")


def _hf_identity(model) -> dict:
    cfg = model.config.to_dict()
    routers = {f"{n}.gate.weight": b.gate.weight for n, b, _, _ in
               [(n.rsplit(".experts", 1)[0], b, a, e) for n, b, a, e in _hf_blocks(model)]}
    return {"kind": "transformers", "config": {k: cfg.get(k) for k in _CFG_KEYS if k in cfg},
            "fingerprint": fingerprint(routers)}


def write_hf_store(model_or_path, out, progress=None) -> Path:
    """Write the store of a transformers MoE model (or checkpoint folder, loaded without remote code)."""
    model = model_or_path
    if not isinstance(model, nn.Module):
        model = _load_hf(model_or_path)
    blocks = _hf_blocks(model)
    state = model.state_dict()
    expert_keys = set()
    layers = []
    for name, block, _, experts in blocks:
        tensors = {"gate_up_proj": experts.gate_up_proj.detach(), "down_proj": experts.down_proj.detach()}
        expert_keys.update(f"{name}.{k}" for k in tensors)
        layers.append({"module": name, "top_k": _hf_top_k(model, block), "experts": tensors})
    nonexpert = {k: v for k, v in state.items() if k not in expert_keys}
    ident = _hf_identity(model)
    ident["config_json"] = model.config.to_json_string()
    return write_store(out, nonexpert, layers, ident, progress)


def _load_hf(path):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is neither a moekit run nor a transformers checkpoint folder (no config.json)")
    AutoConfig.from_pretrained(path, trust_remote_code=False)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, dtype="auto")


def _attach_hf(model, engine: OffloadEngine) -> None:
    blocks = _hf_blocks(model)
    if len(blocks) != len(engine.store.layers):
        raise ValueError(f"expert store {engine.store.path} has {len(engine.store.layers)} MoE layers, the model "
                         f"{len(blocks)}")
    for l, (name, block, attr, experts) in enumerate(blocks):
        act_fn = getattr(experts, "act_fn", None)
        setattr(block, attr, OffloadedHFExperts(engine, l, engine.store.layers[l].num_experts, act_fn))
    model.__dict__["moekit_offload"] = engine


def _hf_logits(block):
    w = block.gate.weight
    b = getattr(block.gate, "bias", None)
    return lambda x: nn.functional.linear(x.to(w.dtype), w, b if isinstance(b, torch.Tensor) else None)


def offload(model, budget: float | None = 0.25, policy: str = "lru", prefetch: str = "none", *, store=None,
            cold: bool = False, **cache_options) -> OffloadEngine:
    """Serve the experts of transformers MoE ``model`` from disk: write a store (to ``store``, or a temporary
    folder removed by ``engine.close()``; an existing ``store`` is reused after checking it belongs to this
    model), replace every experts module by :class:`OffloadedHFExperts` (the expert parameters are freed) and
    return the :class:`OffloadEngine` (``engine.stats()``; also ``model.moekit_offload``)."""
    if prefetch not in PREFETCHERS:
        raise ValueError(f"prefetch must be one of {', '.join(PREFETCHERS)}, got {prefetch!r}")
    tmp = None
    if store is None:
        tmp = tempfile.TemporaryDirectory(prefix="moekit-store-")
        store = Path(tmp.name) / "store"
    store = Path(store)
    if is_store(store):
        st = ExpertStore(store)
        st.check_model(_hf_identity(model))
    else:
        write_hf_store(model, store)
        st = ExpertStore(store)
    return _engine_for_hf(model, st, budget, policy, prefetch, cold, tmp, cache_options)


def _engine_for_hf(model, st, budget, policy, prefetch, cold, tmp, cache_options) -> OffloadEngine:
    blocks = _hf_blocks(model)
    cache = ExpertCache(st, budget, policy, cold=cold, **cache_options)
    pf = make_prefetcher(prefetch, logits=[_hf_logits(b) for _, b, _, _ in blocks], num_experts=cache.num_experts,
                         top_k=cache.top_k)
    engine = OffloadEngine(st, cache, pf)
    engine._tmp = tmp
    _attach_hf(model, engine)
    gc.collect()
    return engine


def load_hf_from_store(store, budget: float | None = 0.25, policy: str = "lru", prefetch: str = "none", *,
                       cold: bool = False, **cache_options):
    """``(model, engine)``: the transformers model of a store built without allocating its experts (the model is
    made on the meta device, its experts modules replaced, the rest materialised and loaded from the store)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    st = ExpertStore(store)
    if st.model.get("kind") != "transformers":
        raise ValueError(f"expert store {st.path} holds a {st.model.get('kind')} model, not a transformers model")
    cfg_dict = json.loads(st.model["config_json"])
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                                  model_type=cfg_dict["model_type"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = _hf_blocks(model)
    for _, block, attr, experts in blocks:  # drop the meta expert tensors before materialising the rest
        setattr(block, attr, _Placeholder(experts))
    model = model.to_empty(device="cpu")
    nonexpert = st.nonexpert_tensors()
    dtype = next(iter(nonexpert.values())).dtype
    result = model.load_state_dict(nonexpert, strict=False, assign=True)  # the loaded tensors, no second copy
    if result.unexpected_keys or [k for k in result.missing_keys if ".experts." not in k]:
        raise ValueError(f"expert store {st.path}: non-expert weights do not match the model")
    del nonexpert
    _rebuild_nonpersistent(model, config)
    model.to(dtype)
    model.eval()
    routers = {}
    for (n, b, a, e) in [(n, b, a, e) for n, b, a, e in _placeholder_blocks(model)]:
        routers[f"{n.rsplit('.experts', 1)[0]}.gate.weight"] = b.gate.weight
    ident_fp = fingerprint(routers)
    if ident_fp != st.model.get("fingerprint"):
        raise ValueError(f"expert store {st.path}: router weights do not match its own fingerprint (damaged store)")
    cache = ExpertCache(st, budget, policy, cold=cold, **cache_options)
    pblocks = _placeholder_blocks(model)
    pf = make_prefetcher(prefetch, logits=[_hf_logits(b) for _, b, _, _ in pblocks],
                         num_experts=cache.num_experts, top_k=cache.top_k)
    engine = OffloadEngine(st, cache, pf)
    for l, (name, block, attr, ph) in enumerate(pblocks):
        setattr(block, attr, OffloadedHFExperts(engine, l, st.layers[l].num_experts, ph.act_fn))
    model.__dict__["moekit_offload"] = engine
    return model, engine


class _Placeholder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.act_fn = getattr(experts, "act_fn", None)
        self.down_proj = None


def _placeholder_blocks(model):
    return [(f"{n}.experts", b, "experts", b.experts) for n, b in model.named_modules()
            if isinstance(getattr(b, "experts", None), (_Placeholder, OffloadedHFExperts))]


def _rebuild_nonpersistent(model, config) -> None:
    """Recompute non-persistent buffers (rotary ``inv_freq``) that ``to_empty`` left uninitialised, by building
    a fresh copy of each module that owns some."""
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for module in model.modules():
        names = [n for n in module._buffers if n in module._non_persistent_buffers_set]
        if not names:
            continue
        try:
            fresh = type(module)(text_cfg)
        except TypeError:
            fresh = type(module)(config)
        for n in names:
            module._buffers[n] = getattr(fresh, n).to(module._buffers[n].device)

