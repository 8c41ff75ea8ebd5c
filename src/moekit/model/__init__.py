"""The compact decoder-only MoE language model (Qwen3-MoE architecture) and its Hugging Face mapping.

``MoELM(ModelConfig(...))(input_ids [B, L]) -> logits [B, L, V]``; :func:`generate_batch` (``moekit.generate``)
samples from it for a batch of prompts, :func:`generate` for an id tensor; :func:`param_counts` reports total
and active parameters.

Mapping to transformers' ``Qwen3MoeForCausalLM`` (details in :mod:`moekit.model.hf_mapping`): module tree and
parameter names are the same (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``q_norm``, ``k_norm``, ``input_layernorm``, ``post_attention_layernorm``, ``mlp.gate.weight``,
``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj`` or ``mlp.{gate,up,down}_proj`` in dense layers,
``model.norm``, ``lm_head``), so ``model.state_dict()`` loads into it directly; ``ModelConfig`` fields map to
``Qwen3MoeConfig`` fields as listed in :mod:`moekit.model.config`.
"""
from .cache import KVCache
from .config import ModelConfig
from .generate import Generation, generate, generate_batch
from .hf_mapping import (from_hf_state_dict, from_qwen3_moe_config, qwen3_incompatibilities, qwen3_moe_config_dict,
                         to_hf_state_dict, to_qwen3_moe_config)
from .lm import MoEDecoder, MoELM
from .params import count_active_params, count_params, param_counts

__all__ = [
    "Generation", "KVCache", "ModelConfig", "MoEDecoder", "MoELM", "count_active_params", "count_params",
    "from_hf_state_dict", "from_qwen3_moe_config", "generate", "generate_batch", "param_counts",
    "qwen3_incompatibilities", "qwen3_moe_config_dict", "to_hf_state_dict", "to_qwen3_moe_config",
]
