"""Mapping between :class:`moekit.model.MoELM` and Hugging Face transformers' ``Qwen3MoeForCausalLM``
(``model_type: qwen3_moe``; checked against transformers 5.23, ``models/qwen3_moe/modeling_qwen3_moe.py``).

Parameter names are identical, so the state dict maps one to one (tensor shapes too):

=================================================  =========================================================
moekit / transformers name                          shape
=================================================  =========================================================
``model.embed_tokens.weight``                       ``[vocab_size, dim]``
``model.layers.N.input_layernorm.weight``           ``[dim]``
``model.layers.N.self_attn.q_proj.weight``          ``[n_heads * head_dim, dim]``
``model.layers.N.self_attn.k_proj.weight``          ``[n_kv_heads * head_dim, dim]`` (``v_proj`` the same)
``model.layers.N.self_attn.o_proj.weight``          ``[dim, n_heads * head_dim]``
``model.layers.N.self_attn.{q,k}_norm.weight``      ``[head_dim]``
``model.layers.N.post_attention_layernorm.weight``  ``[dim]``
``model.layers.N.mlp.gate.weight``                  ``[num_experts, dim]`` (MoE layers; the router)
``model.layers.N.mlp.experts.gate_up_proj``         ``[num_experts, 2 * moe.hidden_dim, dim]``, gate rows first
``model.layers.N.mlp.experts.down_proj``            ``[num_experts, dim, moe.hidden_dim]``
``model.layers.N.mlp.{gate,up,down}_proj.weight``   dense layers (``Qwen3MoeMLP``)
``model.norm.weight``                               ``[dim]``
``lm_head.weight``                                  ``[vocab_size, dim]``; left out when embeddings are tied
=================================================  =========================================================

Math that matches by construction: RMSNorm in float32 then cast, scale by weight; per-head ``q_norm``/``k_norm``
before RoPE; default RoPE in the ``rotate_half`` layout with float32 angles; attention scale
``head_dim ** -0.5``; router ``softmax(x W^T)`` in float32, top-k of the probabilities, renormalised when
``norm_topk`` (``norm_topk_prob``); experts ``down(silu(gate) * up)`` weighted by the gate value. moekit uses
``F.scaled_dot_product_attention`` and fused grouped experts, so logits agree to float32 rounding.

Only MoE settings that Qwen3-MoE has can be exported: router ``topk`` with softmax scores, ``swiglu``
experts (moekit's ``dense`` kind), no shared experts, no capacity dropping (in training or at inference), no
auxiliary-loss-free bias, ``scaling_factor`` 1, one expert group (:func:`qwen3_incompatibilities` lists the rest). Training-only settings (jitter, loss kinds)
do not change the forward pass. ``router_aux_loss_coef`` is converted approximately: transformers pools the
load over all MoE layers and its loss is ``top_k`` times moekit's, while ``moekit.aux_loss`` sums per-layer
losses, so ``router_aux_loss_coef = aux_loss_coef * n_moe_layers / top_k``.

Per-layer MoE settings (``ModelConfig.moe_overrides``): Qwen3-MoE has one ``num_experts``,
``num_experts_per_tok``, ``moe_intermediate_size`` and ``norm_topk_prob`` for all its MoE layers, so a model
whose MoE layers differ in any of them is refused, naming the layers; every MoE layer is checked against the
list above. When all MoE layers agree, their common values are exported, even where they differ from ``moe``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import MoEConfig
from ..data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from .config import ModelConfig

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"


# Why a setting has no Qwen3-MoE equivalent, where the bare value does not say it.
_FIELD_NOTES = {
    "router": ": each token routed from its own logits alone, the MoE output added to the residual stream "
              "unchanged",
}


# Settings Qwen3-MoE stores once for all MoE layers (moekit name, transformers name).
_SHARED_FIELDS = (("num_experts", "num_experts"), ("top_k", "num_experts_per_tok"),
                  ("hidden_dim", "moe_intermediate_size"), ("norm_topk", "norm_topk_prob"))


def _layer_moes(config: ModelConfig) -> dict[int, MoEConfig]:
    """Each MoE layer's settings (``config.moe`` alone for a model without MoE layers, keyed -1)."""
    moes = config.layer_moes
    return moes if moes else {-1: config.moe}


def qwen3_incompatibilities(config: ModelConfig) -> list[str]:
    """Reasons ``config`` has no exact Qwen3-MoE equivalent (empty when it has one)."""
    moes = _layer_moes(config)
    per_layer = bool(config.moe_overrides)

    def where(layers: list[int]) -> str:  # which layers, when layers may differ
        return f" in layer(s) {', '.join(map(str, layers))}" if per_layer else ""

    problems = []
    checks = [
        ("router", "topk"), ("score_func", "softmax"), ("activation", "swiglu"), ("num_shared_experts", 0),
        ("capacity_factor", None), ("eval_capacity_factor", None), ("bias_update", None), ("scaling_factor", 1.0),
        ("num_groups", 1), ("experts", "dense"), ("experts_options", {}),
    ]
    for name, wanted in checks:
        bad: dict = {}  # value -> layers
        for i, moe in moes.items():
            value = getattr(moe, name, wanted)  # a field this MoEConfig lacks has its neutral value
            if value != wanted:
                bad.setdefault(repr(value), []).append(i)
        for value, layers in bad.items():
            problems.append(f"moe.{name}={value}{where(layers)} (Qwen3-MoE: {wanted!r}"
                            f"{_FIELD_NOTES.get(name, '')})")
    options: dict = {}
    for i, moe in moes.items():
        if moe.router_options:
            options.setdefault(repr(moe.router_options), []).append(i)
    for value, layers in options.items():
        problems.append(f"moe.router_options={value}{where(layers)} (Qwen3-MoE: none)")
    differing = []
    for name, hf_name in _SHARED_FIELDS:
        values = {i: getattr(moe, name) for i, moe in moes.items()}
        if len(set(values.values())) > 1:
            differing.append(f"{name} ({', '.join(f'layer {i}: {v}' for i, v in values.items())})")
    if differing:
        problems.append("the MoE layers differ in " + ", ".join(differing)
                        + " (Qwen3-MoE: one value for all MoE layers)")
    return problems


def _check(config: ModelConfig) -> None:
    problems = qwen3_incompatibilities(config)
    if problems:
        raise ValueError("model has no Qwen3-MoE equivalent: " + "; ".join(problems))


def qwen3_moe_config_dict(config: ModelConfig, bos_id: int | None = BOS_ID, eos_id: int | None = EOS_ID,
                          pad_id: int | None = PAD_ID) -> dict:
    """JSON-safe keyword arguments of ``transformers.Qwen3MoeConfig`` equivalent to ``config``.

    Raises ``ValueError`` when the MoE settings have no Qwen3-MoE equivalent. Special ids default to the byte
    tokenizer's and are left out when outside the vocabulary.
    """
    _check(config)
    moes = list(_layer_moes(config).values())
    moe = moes[0]  # every MoE layer agrees on the fields below (checked)
    n_moe = max(1, len(config.moe_layer_indices))
    aux_loss_coef = sum(m.aux_loss_coef for m in moes) / len(moes)  # training only: the layers' mean

    def special(i):
        return i if i is not None and 0 <= i < config.vocab_size else None

    return {
        "architectures": [ARCHITECTURE],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.dense_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
        "attention_bias": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "decoder_sparse_step": config.moe_every,
        "mlp_only_layers": list(config.dense_layers),
        "moe_intermediate_size": moe.hidden_dim,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": bool(moe.norm_topk),
        "router_aux_loss_coef": aux_loss_coef * n_moe / moe.top_k,
        "bos_token_id": special(bos_id),
        "eos_token_id": special(eos_id),
        "pad_token_id": special(pad_id),
    }


def to_qwen3_moe_config(config: ModelConfig, **overrides):
    """A ``transformers.Qwen3MoeConfig`` equivalent to ``config`` (needs transformers)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**qwen3_moe_config_dict(config), **overrides})


def from_qwen3_moe_config(hf_config, **moe_overrides) -> ModelConfig:
    """A :class:`ModelConfig` from a ``Qwen3MoeConfig`` or its dict (``config.json``).

    ``moe_overrides`` set further :class:`moekit.MoEConfig` fields (for example ``aux_loss``).
    """
    cfg = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    model_type = cfg.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {model_type!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {cfg['hidden_act']!r}")
    if cfg.get("attention_bias", False):
        raise ValueError("attention_bias=True is not supported")
    if cfg.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type must be 'default', got {rope.get('rope_type')!r}")
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # to_dict() spells it num_local_experts
    if not num_experts:
        raise ValueError("num_experts=0 (a dense model) is not supported")
    top_k = cfg["num_experts_per_tok"]
    hidden = cfg["hidden_size"]
    sparse_step = cfg.get("decoder_sparse_step", 1)
    n_layers = cfg["num_hidden_layers"]
    n_moe = max(1, sum((i + 1) % sparse_step == 0 and i not in (cfg.get("mlp_only_layers") or [])
                       for i in range(n_layers)))
    moe = MoEConfig(**{
        "dim": hidden, "hidden_dim": cfg["moe_intermediate_size"], "num_experts": num_experts,
        "top_k": top_k, "norm_topk": bool(cfg.get("norm_topk_prob", False)),
        "aux_loss_coef": cfg.get("router_aux_loss_coef", 0.001) * top_k / n_moe, **moe_overrides})
    return ModelConfig(
        vocab_size=cfg["vocab_size"], dim=hidden, n_layers=n_layers,
        n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or hidden // cfg["num_attention_heads"],
        max_seq_len=cfg.get("max_position_embeddings", 32768),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), moe_every=sparse_step,
        dense_layers=list(cfg.get("mlp_only_layers") or []), dense_hidden_dim=cfg["intermediate_size"],
        moe=moe, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=cfg.get("initializer_range", 0.02),
    )


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``Qwen3MoeForCausalLM`` state dict of a :class:`moekit.model.MoELM` (the names are the same; a tied
    ``lm_head.weight`` is left out, as transformers saves it)."""
    _check(model.config)
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A :class:`moekit.model.MoELM` state dict from a ``Qwen3MoeForCausalLM`` one (restores a tied
    ``lm_head.weight``)."""
    _check(config)
    state = dict(state_dict)
    if config.tie_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
