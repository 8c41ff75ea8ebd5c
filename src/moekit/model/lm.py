"""The decoder-only MoE language model: ``MoELM(config)(input_ids [B, L]) -> logits [B, L, V]``.

Module tree and parameter names are those of transformers' ``Qwen3MoeForCausalLM`` (``model.embed_tokens``,
``model.layers.N.*``, ``model.norm``, ``lm_head``), so ``state_dict()`` loads into it as is (see
:mod:`moekit.model.hf_mapping`).

Legend: B batch, L sequence length, D model width, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layer import moe_layers
from ..routing.base import RoutingContext
from ..routing.graph import CACHE_KEY, START_POS_KEY
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
                start_pos: int = 0) -> torch.Tensor:
        B, L = input_ids_BL.shape
        x_BLD = self.embed_tokens(input_ids_BL)
        positions_L = torch.arange(start_pos, start_pos + L, device=input_ids_BL.device)
        cos_LH, sin_LH = self.rotary_emb(positions_L, x_BLD.dtype)
        # Cross-layer routing state, shared by the layers of this call only (momentum, attention probabilities);
        # routers that read earlier positions keep per-position state in the KV cache.
        extras: dict = {START_POS_KEY: start_pos}
        if kv_cache is not None:
            extras[CACHE_KEY] = kv_cache
        for layer in self.layers:
            ctx = RoutingContext(batch_shape=(B, L), input_ids=input_ids_BL, layer_index=layer.layer_index,
                                 extras=extras)
            x_BLD = layer(x_BLD, cos_LH, sin_LH, ctx, kv_cache, start_pos)
        if kv_cache is not None:
            kv_cache.length = start_pos + L
        return self.norm(x_BLD)


class MoELM(nn.Module):
    """Compact decoder-only MoE language model, architecture of Qwen3-MoE (Qwen Team 2025, "Qwen3 Technical
    Report", arXiv:2505.09388): pre-norm blocks with GQA attention (q/k RMSNorm, RoPE) and a MoE FFN
    (:class:`moekit.MoE`) in every ``moe_every``-th layer, a dense SwiGLU MLP elsewhere.

    ``forward(input_ids [B, L], kv_cache=None, start_pos=0) -> logits [B, L, V]``; tokens get positions
    ``start_pos ...``. With a :class:`KVCache` the keys/values of these positions are stored and attention
    covers all cached positions before them. Auxiliary losses of the MoE layers are read with
    ``moekit.aux_loss(model)`` after the call. With a router that is not causal (``Router.causal`` False,
    such as expert choice) a token's routing depends on later tokens of the batch, so the model is not
    strictly causal and cached decoding differs from a full forward.

    Routers with state across layers get it through ``RoutingContext.extras``, a dict made afresh for each
    call: ``momentum`` / ``adam`` (:mod:`moekit.routing.momentum`) change how the MoE output enters the
    residual stream, ``attention`` (:mod:`moekit.routing.graph`) reads the preceding attention layer's
    probabilities, and ``similarity`` / ``attention`` keep earlier positions' routing state in the KV cache,
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

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, length] tensor, got {got}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor (int64/int32), got {input_ids.dtype}")
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be an integer >= 0, got {start_pos!r}")
        return self.lm_head(self.model(input_ids, kv_cache, start_pos))
