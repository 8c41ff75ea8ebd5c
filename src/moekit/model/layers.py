"""Building blocks of the decoder, each following its Hugging Face transformers Qwen3-MoE counterpart
(``transformers/models/qwen3_moe/modeling_qwen3_moe.py``) line for line in its math.

Legend: B batch, L query length, S key/value length (cache included), D model width, N query heads,
K key/value heads, H head dim, F MLP hidden width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoE
from ..routing.base import RoutingContext
from .cache import KVCache
from .config import ModelConfig


class RMSNorm(nn.Module):
    """``Qwen3MoeRMSNorm`` (T5 style): normalise in float32, cast back, then scale by ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Default RoPE of ``Qwen3MoeRotaryEmbedding`` (Su et al. 2021, RoFormer, arXiv:2104.09864), applied in
    the ``rotate_half`` layout: ``inv_freq = 1 / theta^(2i/H)``, ``angle = position * inv_freq`` in float32,
    both halves of the head dim share the angles."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions_L: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos_LH``, ``sin_LH`` for integer positions ``[L]``, cast to ``dtype``."""
        freqs_LX = positions_L[:, None].float() * self.inv_freq.to(positions_L.device, torch.float)
        emb_LH = torch.cat((freqs_LX, freqs_LX), dim=-1)
        return emb_LH.cos().to(dtype), emb_LH.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_BNLH: torch.Tensor, cos_LH: torch.Tensor, sin_LH: torch.Tensor) -> torch.Tensor:
    return x_BNLH * cos_LH + rotate_half(x_BNLH) * sin_LH


class Attention(nn.Module):
    """``Qwen3MoeAttention``: grouped-query attention with per-head RMSNorm on queries and keys (before RoPE),
    no biases, scaling ``head_dim ** -0.5``; computed with ``F.scaled_dot_product_attention``."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x_BLD: torch.Tensor, cos_LH: torch.Tensor, sin_LH: torch.Tensor,
                kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q_BNLH = self.q_norm(self.q_proj(x_BLD).view(B, L, self.n_heads, self.head_dim)).transpose(1, 2)
        k_BKLH = self.k_norm(self.k_proj(x_BLD).view(B, L, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v_BKLH = self.v_proj(x_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BNLH = apply_rotary(q_BNLH, cos_LH, sin_LH)
        k_BKLH = apply_rotary(k_BKLH, cos_LH, sin_LH)
        if kv_cache is not None:
            k_BKSH, v_BKSH = kv_cache.update(self.layer_index, k_BKLH, v_BKLH, start_pos)
        else:
            k_BKSH, v_BKSH = k_BKLH, v_BKLH
        S = k_BKSH.shape[2]
        mask_LS, is_causal = None, False
        if S == L:
            is_causal = L > 1
        elif L > 1:  # a chunk of L new queries after S - L cached positions
            query_pos_L = torch.arange(S - L, S, device=x_BLD.device)
            mask_LS = torch.arange(S, device=x_BLD.device)[None, :] <= query_pos_L[:, None]
        out_BNLH = F.scaled_dot_product_attention(
            q_BNLH, k_BKSH, v_BKSH, attn_mask=mask_LS, is_causal=is_causal, scale=self.scaling,
            enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out_BNLH.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class DenseMLP(nn.Module):
    """``Qwen3MoeMLP``: SwiGLU ``down(silu(gate(x)) * up(x))`` (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """``Qwen3MoeDecoderLayer``: pre-norm attention and FFN, each in a residual branch. The FFN (``mlp``) is a
    :class:`moekit.MoE` (``gate``, ``experts``) or a :class:`DenseMLP`."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.is_moe = config.is_moe_layer(layer_index)
        self.self_attn = Attention(config, layer_index)
        self.mlp = MoE(config.moe) if self.is_moe else DenseMLP(config.dim, config.dense_hidden_dim)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x_BLD: torch.Tensor, cos_LH: torch.Tensor, sin_LH: torch.Tensor,
                ctx: RoutingContext | None = None, kv_cache: KVCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        h_BLD = x_BLD + self.self_attn(self.input_layernorm(x_BLD), cos_LH, sin_LH, kv_cache, start_pos)
        normed_BLD = self.post_attention_layernorm(h_BLD)
        ffn_BLD = self.mlp(normed_BLD, ctx) if self.is_moe else self.mlp(normed_BLD)
        return h_BLD + ffn_BLD
