"""Building blocks of the decoder, each following its Hugging Face transformers Qwen3-MoE counterpart
(``transformers/models/qwen3_moe/modeling_qwen3_moe.py``) line for line in its math.

Legend (docs/architecture.md): B batch, L query length, J key/value length (cache included), D model width,
N query heads, G key/value heads, A head width, F MLP hidden width.
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
        if input_dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula in one fused kernel (a quarter faster at decode sizes)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
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
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of shape ``[*positions.shape, H]`` for integer positions (``[L]``, or ``[B, L]``
        when each sequence has its own), cast to ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device, torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_BNLA: torch.Tensor, cos_LA: torch.Tensor, sin_LA: torch.Tensor) -> torch.Tensor:
    return x_BNLA * cos_LA + rotate_half(x_BNLA) * sin_LA


class Attention(nn.Module):
    """``Qwen3MoeAttention``: grouped-query attention with per-head RMSNorm on queries and keys (before RoPE),
    no biases, scaling ``head_dim ** -0.5``; computed with ``F.scaled_dot_product_attention``.

    ``forward`` returns ``(out_BLD, probs_BLJ)``. With ``need_weights`` the attention is computed explicitly
    (as transformers' eager path: float32 softmax, cast back) and ``probs_BLJ`` is the attention probabilities
    averaged over heads, float32, rows summing to one over the ``S`` key positions (cache included); it is None
    otherwise.

    ``cos``/``sin`` are ``[L, H]`` (positions shared by the batch) or ``[B, 1, L, H]`` (per sequence).
    ``attn_mask_B1LJ`` (bool, True = may attend; see :meth:`padding_mask`) replaces the plain causal mask when
    a batch holds padding; None means every key is a real token.
    """

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

    def forward(self, x_BLD: torch.Tensor, cos_LA: torch.Tensor, sin_LA: torch.Tensor,
                kv_cache: KVCache | None = None, start_pos: int = 0, need_weights: bool = False,
                attn_mask_B1LJ: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, L, _ = x_BLD.shape
        q_BNLA = self.q_norm(self.q_proj(x_BLD).view(B, L, self.n_heads, self.head_dim)).transpose(1, 2)
        k_BGLA = self.k_norm(self.k_proj(x_BLD).view(B, L, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v_BGLA = self.v_proj(x_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BNLA = apply_rotary(q_BNLA, cos_LA, sin_LA)
        k_BGLA = apply_rotary(k_BGLA, cos_LA, sin_LA)
        if kv_cache is not None:
            k_BGJA, v_BGJA = kv_cache.update(self.layer_index, k_BGLA, v_BGLA, start_pos)
        else:
            k_BGJA, v_BGJA = k_BGLA, v_BGLA
        S = k_BGJA.shape[2]
        probs_BLJ = None
        if need_weights:
            out_BNLA, probs_BLJ = self._explicit(q_BNLA, k_BGJA, v_BGJA, attn_mask_B1LJ)
        else:
            mask_LJ, is_causal = None, False
            if attn_mask_B1LJ is not None:
                mask_LJ = attn_mask_B1LJ
            elif S == L:
                is_causal = L > 1
            elif L > 1:  # a chunk of L new queries after S - L cached positions
                mask_LJ = self._causal_mask(L, S, x_BLD.device)
            out_BNLA = F.scaled_dot_product_attention(
                q_BNLA, k_BGJA, v_BGJA, attn_mask=mask_LJ, is_causal=is_causal, scale=self.scaling,
                enable_gqa=self.n_heads != self.n_kv_heads)
        out_BLD = self.o_proj(out_BNLA.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))
        return out_BLD, probs_BLJ

    @staticmethod
    def _causal_mask(L: int, S: int, device) -> torch.Tensor:
        """``[L, J]`` True where query ``i`` (position ``J - L + i``) may attend to key position ``j``."""
        query_pos_L = torch.arange(S - L, S, device=device)
        return torch.arange(S, device=device)[None, :] <= query_pos_L[:, None]

    @staticmethod
    def padding_mask(key_mask_BJ: torch.Tensor, L: int) -> torch.Tensor:
        """``[B, 1, L, J]`` True where query ``i`` (key column ``J - L + i``) may attend to key column ``j``:
        causal, and key ``j`` is a real token (``key_mask_BJ`` True). A padding query would see no key at all
        (a softmax over nothing is NaN), so every query also sees itself; real queries never see padding."""
        S, device = key_mask_BJ.shape[1], key_mask_BJ.device
        causal_LJ = Attention._causal_mask(L, S, device)
        self_LJ = torch.arange(S, device=device)[None, :] == torch.arange(S - L, S, device=device)[:, None]
        return ((causal_LJ & key_mask_BJ[:, None, :]) | self_LJ)[:, None]

    def _explicit(self, q_BNLA: torch.Tensor, k_BGJA: torch.Tensor, v_BGJA: torch.Tensor,
                  attn_mask_B1LJ: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention with its probabilities (SDPA does not return them): each key/value head serves
        ``n_heads / n_kv_heads`` consecutive query heads, as ``repeat_kv`` in transformers."""
        L, S = q_BNLA.shape[2], k_BGJA.shape[2]
        groups = self.n_heads // self.n_kv_heads
        k_BNJA = k_BGJA.repeat_interleave(groups, dim=1)
        v_BNJA = v_BGJA.repeat_interleave(groups, dim=1)
        logits_BNLJ = (q_BNLA @ k_BNJA.transpose(-1, -2)) * self.scaling
        allowed = self._causal_mask(L, S, q_BNLA.device) if attn_mask_B1LJ is None else attn_mask_B1LJ
        logits_BNLJ = logits_BNLJ.masked_fill(~allowed, float("-inf"))
        probs32_BNLJ = torch.softmax(logits_BNLJ, dim=-1, dtype=torch.float32)
        out_BNLA = probs32_BNLJ.to(q_BNLA.dtype) @ v_BNJA
        return out_BNLA, probs32_BNLJ.mean(dim=1)


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
    :class:`moekit.MoE` (``gate``, ``experts``) or a :class:`DenseMLP`.

    Two router hooks, declared on :class:`moekit.routing.Router` and read from the MoE layer's router
    (``mlp.gate``), both passing state through the layer's ``RoutingContext``, never through module attributes:

    - ``needs_attention`` (True for :class:`moekit.routing.graph.AttentionRouter`): the attention layer computes
      its probabilities explicitly and the layer puts their head average ``[B, L, J]`` in
      ``ctx.attention_probs`` for the router, clearing it after the MoE call.
    - ``residual_update(f, ctx) -> delta`` (identity by default; :mod:`moekit.routing.momentum` overrides it):
      the residual branch adds ``delta`` instead of the MoE output ``f`` (MomentumSMoE, AdamSMoE).
    """

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.is_moe = config.is_moe_layer(layer_index)
        self.self_attn = Attention(config, layer_index)
        moe = config.layer_moe(layer_index)  # this layer's settings (moe_overrides applied), None when dense
        self.mlp = MoE(moe) if self.is_moe else DenseMLP(config.dim, config.dense_hidden_dim)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x_BLD: torch.Tensor, cos_LA: torch.Tensor, sin_LA: torch.Tensor,
                ctx: RoutingContext | None = None, kv_cache: KVCache | None = None,
                start_pos: int = 0, attn_mask_B1LJ: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.mlp.gate if self.is_moe else None
        need_weights = gate is not None and gate.needs_attention
        attn_BLD, probs_BLJ = self.self_attn(self.input_layernorm(x_BLD), cos_LA, sin_LA, kv_cache, start_pos,
                                             need_weights=need_weights, attn_mask_B1LJ=attn_mask_B1LJ)
        h_BLD = x_BLD + attn_BLD
        normed_BLD = self.post_attention_layernorm(h_BLD)
        if not self.is_moe:
            return h_BLD + self.mlp(normed_BLD)
        if ctx is None:
            ctx = RoutingContext(batch_shape=tuple(normed_BLD.shape[:-1]), layer_index=self.layer_index)
        if need_weights:
            ctx.attention_probs = probs_BLJ
        try:
            ffn_BLD = self.mlp(normed_BLD, ctx)
        finally:
            if need_weights:
                ctx.attention_probs = None
        return h_BLD + gate.residual_update(ffn_BLD, ctx)
