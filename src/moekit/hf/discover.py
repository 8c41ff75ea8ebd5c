"""Find the transformers MoE classes whose experts use ``use_experts_implementation``, and build tiny ones.

Nothing is hand-listed: every ``transformers.models.<pkg>.modeling_<pkg>`` module is imported (those failing to
import are skipped), and an experts class is one whose own ``forward`` is the wrapper the decorator installs
(its code object lives in ``transformers.integrations.moe``) and whose interface is ``ALL_EXPERTS_FUNCTIONS``.
Each is mapped through the auto mappings to a config class and a ``*ForCausalLM`` (else base) model class of
the same package, preferring text-only configs. :func:`tiny_config` shrinks a config's defaults generically.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

from torch import nn


@dataclass
class ExpertsEntry:
    """One decorated experts class and the model that builds it."""

    package: str
    experts_cls: type
    flags: dict = field(default_factory=dict)
    model_type: str | None = None
    config_cls: type | None = None
    model_cls: type | None = None
    candidates: list = field(default_factory=list)  # [(model_type, config_cls, model_cls)], best first

    @property
    def name(self) -> str:
        return self.experts_cls.__name__


def is_decorated_experts(cls) -> bool:
    """True when ``cls`` itself was wrapped by transformers' ``use_experts_implementation`` (default interface)."""
    from transformers.integrations import moe

    fwd = cls.__dict__.get("forward") if isinstance(cls, type) else None
    code = getattr(fwd, "__code__", None)
    if code is None or code.co_filename != moe.__file__ or code.co_name != "forward":
        return False
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in fwd.__closure__ or ())))
    return cells.get("experts_interface") is moe.ALL_EXPERTS_FUNCTIONS


def _decorator_flags(cls) -> dict:
    """The flags passed to the decorator (read from its ``__init__`` wrapper's closure)."""
    init = cls.__dict__.get("__init__")
    names = ("is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm")
    code = getattr(init, "__code__", None)
    if code is None:
        return {}
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in init.__closure__ or ())))
    return {k: cells[k] for k in names if k in cells}


def _model_packages() -> list[str]:
    import transformers.models as models

    return sorted(m.name for m in pkgutil.iter_modules(models.__path__) if m.ispkg)


def find_experts_classes() -> list[ExpertsEntry]:
    """Every decorated experts class of the installed transformers, with candidate (config, model) classes."""
    from transformers.models.auto import configuration_auto as ca
    from transformers.models.auto import modeling_auto as ma

    entries: list[ExpertsEntry] = []
    for pkg in _model_packages():
        try:
            mod = importlib.import_module(f"transformers.models.{pkg}.modeling_{pkg}")
        except Exception:  # missing module or optional dependency: not runnable here
            continue
        experts = [v for v in vars(mod).values()
                   if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == mod.__name__
                   and is_decorated_experts(v)]
        if not experts:
            continue
        model_types = [mt for mt in ca.CONFIG_MAPPING_NAMES if ca.model_type_to_module_name(mt) == pkg]
        candidates = []
        for mt in model_types:
            try:
                config_cls = ca.CONFIG_MAPPING[mt]
            except Exception:
                continue
            for mapping in (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_MAPPING_NAMES):
                cls_name = mapping.get(mt)
                if isinstance(cls_name, (list, tuple)):
                    cls_name = cls_name[0]
                model_cls = getattr(mod, cls_name, None) if cls_name else None
                if model_cls is not None:
                    text_only = not getattr(config_cls, "sub_configs", None)
                    causal = mapping is ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                    candidates.append(((not text_only, not causal), mt, config_cls, model_cls))
        candidates.sort(key=lambda c: c[0])
        cands = [c[1:] for c in candidates]
        for cls in experts:
            entry = ExpertsEntry(pkg, cls, _decorator_flags(cls), candidates=list(cands))
            if cands:
                entry.model_type, entry.config_cls, entry.model_cls = cands[0]
            entries.append(entry)
    return entries


# ----------------------------------------------------------------------------------------------------------------
# Tiny configs
# ----------------------------------------------------------------------------------------------------------------

HIDDEN = 32
NUM_LAYERS = 2
_SIZES = {
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN,
    "intermediate_size": 32, "ffn_hidden_size": 32, "moe_intermediate_size": 16, "expert_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "moe_shared_expert_intermediate_size": 16, "dense_intermediate_size": 32,
    "shared_experts_intermediate_size": 16,
    "num_hidden_layers": NUM_LAYERS, "num_layers": NUM_LAYERS, "n_layer": NUM_LAYERS,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "attention_head_dim": 16,
    "vocab_size": 96, "max_position_embeddings": 128, "vocab_size_per_layer_input": 96,
    "hidden_size_per_layer_input": 8,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "top_k": 2,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1, "decoder_sparse_step": 1, "moe_layer_freq": 1,
    "mlp_only_layers": [], "attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    "linear_num_heads": 2, "linear_head_dim": 16, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 8,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_layers": 1, "decoder_layers": 1,
    "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_heads": 2, "depth": 1, "out_hidden_size": HIDDEN,
    "num_mel_bins": 16, "output_dim": HIDDEN, "downsample_hidden_size": 16,
    "enable_moe_block": True, "sliding_window": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
# Keys set even when the default is None (the model then needs them).
_ALWAYS = ("head_dim", "num_experts_per_tok", "n_routed_experts", "n_shared_experts", "n_group", "topk_group")


def _two_layer_list(values: list) -> list:
    """A per-layer list cut to ``NUM_LAYERS`` entries that keeps its first value and its first different one
    (so a hybrid keeps one layer of each kind and a dense-then-sparse schedule keeps its sparse layer)."""
    first = values[0]
    other = next((v for v in values if v != first), first)
    return [first, other][:NUM_LAYERS]


def _partial_rotary_factor(have: dict) -> float:
    """The config's partial rotary factor (top level, in ``rope_parameters``, or in its per-layer-type dicts)."""
    rope = have.get("rope_parameters")
    candidates = [have.get("partial_rotary_factor")]
    if isinstance(rope, dict):
        candidates.append(rope.get("partial_rotary_factor"))
        candidates += [v.get("partial_rotary_factor") for v in rope.values() if isinstance(v, dict)]
    return next((float(c) for c in candidates if c), 1.0)


def tiny_overrides(config) -> dict:
    """Size fields of ``config`` (defaults) shrunk to a tiny model; only keys the config has."""
    have = config.to_dict()
    out = {k: v for k, v in _SIZES.items() if k in have and (have[k] is not None or k in _ALWAYS)}
    if "eos_token_id" in out and isinstance(have["eos_token_id"], list):
        out["eos_token_id"] = [2]
    num_layers = next((have[k] for k in ("num_hidden_layers", "num_layers", "n_layer") if k in have), None)
    for key, value in have.items():
        if isinstance(value, list) and value and num_layers and len(value) == num_layers and key not in out:
            out[key] = _two_layer_list(value)
    if "kv_lora_rank" in have and "num_key_value_heads" in out:  # multi-head latent attention: kv heads = heads
        out["num_key_value_heads"] = out.get("num_attention_heads", 2)
    if "qk_rope_head_dim" in out and "head_dim" in out:
        # Latent-attention configs rotate head_dim * partial_rotary_factor dims, which must be the rope dims.
        out["head_dim"] = int(out["qk_rope_head_dim"] / _partial_rotary_factor(have))
    rope = have.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("mrope_section"):  # multimodal rope: sections sum to rotary_dim / 2
        heads = out.get("num_attention_heads", have.get("num_attention_heads"))
        head_dim = out.get("head_dim") or out.get("hidden_size", HIDDEN) // heads
        half = int(head_dim * rope.get("partial_rotary_factor", have.get("partial_rotary_factor", 1.0) or 1.0)) // 2
        third = half // 3
        out["rope_parameters"] = {**rope, "mrope_section": [half - 2 * third, third, third]}
    return out


def tiny_config(config_cls, **extra):
    """A tiny instance of ``config_cls``: its defaults with every known size field shrunk (sub-configs too, as
    dicts), then ``extra``."""
    base = config_cls()
    kwargs = tiny_overrides(base)
    for key in getattr(base, "sub_configs", None) or {}:
        sub = getattr(base, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            try:
                kwargs[key] = tiny_config(type(sub)).to_dict()
            except Exception:
                pass
    kwargs.update(extra)
    try:
        return config_cls(**kwargs)
    except Exception:
        cfg = config_cls()
        for k, v in kwargs.items():
            if not isinstance(v, dict):
                setattr(cfg, k, v)
        return cfg
