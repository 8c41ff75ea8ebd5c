"""The decoder-only MoE language model: ``MoELM(config)(input_ids [B, L]) -> logits [B, L, V]``.

Module tree and parameter names are those of transformers' ``Qwen3MoeForCausalLM`` (``model.embed_tokens``,
``model.layers.N.*``, ``model.norm``, ``lm_head``), so ``state_dict()`` loads into it as is (see
:mod:`moekit.model.hf_mapping`).

Legend (docs/architecture.md): B batch, L sequence length, J positions attended, D model width, A head
width, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layer import moe_layers
from ..routing.base import MomentumState, RoutingContext
from .cache import KVCache
from .config import ModelConfig
from .layers import DecoderLayer, RMSNorm, RotaryEmbedding


class MoEDecoder(nn.Module):
    """``Qwen3MoeModel``: token embedding, ``n_layers`` decoder layers, final RMSNorm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids_BL: torch.Tensor, kv_cache: KVCache | None = None,
                start_pos: int = 0, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L = input_ids_BL.shape
        x_BLD = self.embed_tokens(input_ids_BL)
        attn_mask_B1LJ, token_mask_BL = None, None
        if attention_mask is None:
            positions_L = torch.arange(start_pos, start_pos + L, device=input_ids_BL.device)
            cos_LA, sin_LA = self.rotary_emb(positions_L, x_BLD.dtype)
        else:
            # Padding: a token's position counts the real tokens before it in its own sequence, so a
            # left-padded prompt gets the positions 0, 1, ... it has alone; pad keys are masked out.
            key_mask_BJ = attention_mask.to(device=input_ids_BL.device, dtype=torch.bool)
            positions_BL = (key_mask_BJ.long().cumsum(dim=-1) - 1).clamp(min=0)[:, -L:]
            cos_LA, sin_LA = (t[:, None] for t in self.rotary_emb(positions_BL, x_BLD.dtype))  # [B, 1, L, H]
            attn_mask_B1LJ = self.layers[0].self_attn.padding_mask(key_mask_BJ, L) if self.layers else None
            token_mask_BL = key_mask_BJ[:, -L:]
        # Cross-layer routing state, shared by the layers of this call only (momentum, free-form extras);
        # routers that read earlier positions keep per-position state in the KV cache.
        momentum, extras = MomentumState(), {}
        for layer in self.layers:
            ctx = RoutingContext(batch_shape=(B, L), input_ids=input_ids_BL, layer_index=layer.layer_index,
                                 token_mask=token_mask_BL, kv_cache=kv_cache, start_pos=start_pos,
                                 momentum=momentum, extras=extras)
            x_BLD = layer(x_BLD, cos_LA, sin_LA, ctx, kv_cache, start_pos, attn_mask_B1LJ=attn_mask_B1LJ)
        if kv_cache is not None:
            kv_cache.length = start_pos + L
        return self.norm(x_BLD)


class MoELM(nn.Module):
    """Compact decoder-only MoE language model, architecture of Qwen3-MoE (Qwen Team 2025, "Qwen3 Technical
    Report", arXiv:2505.09388): pre-norm blocks with GQA attention (q/k RMSNorm, RoPE) and a MoE FFN
    (:class:`moekit.MoE`) in every ``moe_every``-th layer, a dense SwiGLU MLP elsewhere.

    ``forward(input_ids [B, L], kv_cache=None, start_pos=0, attention_mask=None) -> logits [B, L, V]``; tokens
    get positions ``start_pos ...``. With a :class:`KVCache` the keys/values of these positions are stored and
    attention covers all cached positions before them.

    ``attention_mask`` (bool or 0/1, ``[B, start_pos + L]`` with a cache, ``[B, L]`` without; True = real token)
    marks padding, as transformers' mask of the same name: pad positions are never attended to, each real
    token's rotary position is the number of real tokens before it in its sequence (so a left-padded prompt
    gives the logits it gives alone), and the MoE layers get the mask of this call's tokens as
    ``RoutingContext.token_mask``. Logits at pad positions are meaningless.

    Auxiliary losses of the MoE layers are read with ``moekit.aux_loss(model)`` after the call. With a router
    that is not causal (``Router.causal`` False, such as expert choice) a token's routing depends on later
    tokens of the batch, so the model is not strictly causal and cached decoding differs from a full forward.

    Routers with state across layers get it through typed fields of :class:`RoutingContext` made afresh for
    each call: ``momentum`` / ``adam`` (:mod:`moekit.routing.momentum`) change how the MoE output enters the
    residual stream (``ctx.momentum``, shared by the layers of the call), ``attention``
    (:mod:`moekit.routing.graph`) reads the preceding attention layer's probabilities (``ctx.attention_probs``),
    and ``similarity`` / ``attention`` keep earlier positions' routing state in the KV cache,
    so cached decoding matches a full forward for all of them.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        self.model = MoEDecoder(self.config)
        self.lm_head = nn.Linear(self.config.dim, self.config.vocab_size, bias=False)
        self._init_weights()
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self) -> None:
        """As transformers' ``_init_weights``: N(0, init_std) for linear and embedding weights, norms at one;
        the MoE layers keep the initialisation of :class:`moekit.MoE` (``moe.init_std``)."""
        inside_moe = {id(m) for layer in moe_layers(self) for m in layer.modules()}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in inside_moe:
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences of up to ``max_len`` (default ``max_seq_len``)."""
        return KVCache.for_model(self, batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, length] tensor, got {got}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor (int64/int32), got {input_ids.dtype}")
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be an integer >= 0, got {start_pos!r}")
        if attention_mask is not None:
            if kv_cache is None and start_pos != 0:
                raise ValueError("attention_mask without a kv_cache needs start_pos=0 (it covers the whole sequence)")
            B, L = input_ids.shape
            expected = (B, start_pos + L)
            if not isinstance(attention_mask, torch.Tensor):
                raise ValueError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
            if tuple(attention_mask.shape) != expected:
                got = tuple(attention_mask.shape)
                raise ValueError(f"attention_mask must have shape [batch, start_pos + length] = {list(expected)}, "
                                 f"got {got}")
        return self.lm_head(self.model(input_ids, kv_cache, start_pos, attention_mask))
