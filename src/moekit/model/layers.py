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
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of shape ``[*positions.shape, H]`` for integer positions (``[L]``, or ``[B, L]``
        when each sequence has its own), cast to ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device, torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_BNLH: torch.Tensor, cos_LH: torch.Tensor, sin_LH: torch.Tensor) -> torch.Tensor:
    return x_BNLH * cos_LH + rotate_half(x_BNLH) * sin_LH


class Attention(nn.Module):
    """``Qwen3MoeAttention``: grouped-query attention with per-head RMSNorm on queries and keys (before RoPE),
    no biases, scaling ``head_dim ** -0.5``; computed with ``F.scaled_dot_product_attention``.

    ``forward`` returns ``(out_BLD, probs_BLS)``. With ``need_weights`` the attention is computed explicitly
    (as transformers' eager path: float32 softmax, cast back) and ``probs_BLS`` is the attention probabilities
    averaged over heads, float32, rows summing to one over the ``S`` key positions (cache included); it is None
    otherwise.

    ``cos``/``sin`` are ``[L, H]`` (positions shared by the batch) or ``[B, 1, L, H]`` (per sequence).
    ``attn_mask_B1LS`` (bool, True = may attend; see :meth:`padding_mask`) replaces the plain causal mask when
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

    def forward(self, x_BLD: torch.Tensor, cos_LH: torch.Tensor, sin_LH: torch.Tensor,
                kv_cache: KVCache | None = None, start_pos: int = 0, need_weights: bool = False,
                attn_mask_B1LS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        probs_BLS = None
        if need_weights:
            out_BNLH, probs_BLS = self._explicit(q_BNLH, k_BKSH, v_BKSH, attn_mask_B1LS)
        else:
            mask_LS, is_causal = None, False
            if attn_mask_B1LS is not None:
                mask_LS = attn_mask_B1LS
            elif S == L:
                is_causal = L > 1
            elif L > 1:  # a chunk of L new queries after S - L cached positions
                mask_LS = self._causal_mask(L, S, x_BLD.device)
            out_BNLH = F.scaled_dot_product_attention(
                q_BNLH, k_BKSH, v_BKSH, attn_mask=mask_LS, is_causal=is_causal, scale=self.scaling,
                enable_gqa=self.n_heads != self.n_kv_heads)
        out_BLD = self.o_proj(out_BNLH.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))
        return out_BLD, probs_BLS

    @staticmethod
    def _causal_mask(L: int, S: int, device) -> torch.Tensor:
        """``[L, S]`` True where query ``i`` (position ``S - L + i``) may attend to key position ``j``."""
        query_pos_L = torch.arange(S - L, S, device=device)
        return torch.arange(S, device=device)[None, :] <= query_pos_L[:, None]

    @staticmethod
    def padding_mask(key_mask_BS: torch.Tensor, L: int) -> torch.Tensor:
        """``[B, 1, L, S]`` True where query ``i`` (key column ``S - L + i``) may attend to key column ``j``:
        causal, and key ``j`` is a real token (``key_mask_BS`` True). A padding query would see no key at all
        (a softmax over nothing is NaN), so every query also sees itself; real queries never see padding."""
        S, device = key_mask_BS.shape[1], key_mask_BS.device
        causal_LS = Attention._causal_mask(L, S, device)
        self_LS = torch.arange(S, device=device)[None, :] == torch.arange(S - L, S, device=device)[:, None]
        return ((causal_LS & key_mask_BS[:, None, :]) | self_LS)[:, None]

    def _explicit(self, q_BNLH: torch.Tensor, k_BKSH: torch.Tensor, v_BKSH: torch.Tensor,
                  attn_mask_B1LS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention with its probabilities (SDPA does not return them): each key/value head serves
        ``n_heads / n_kv_heads`` consecutive query heads, as ``repeat_kv`` in transformers."""
        L, S = q_BNLH.shape[2], k_BKSH.shape[2]
        groups = self.n_heads // self.n_kv_heads
        k_BNSH = k_BKSH.repeat_interleave(groups, dim=1)
        v_BNSH = v_BKSH.repeat_interleave(groups, dim=1)
        logits_BNLS = (q_BNLH @ k_BNSH.transpose(-1, -2)) * self.scaling
        allowed = self._causal_mask(L, S, q_BNLH.device) if attn_mask_B1LS is None else attn_mask_B1LS
        logits_BNLS = logits_BNLS.masked_fill(~allowed, float("-inf"))
        probs32_BNLS = torch.softmax(logits_BNLS, dim=-1, dtype=torch.float32)
        out_BNLH = probs32_BNLS.to(q_BNLH.dtype) @ v_BNSH
        return out_BNLH, probs32_BNLS.mean(dim=1)


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
      its probabilities explicitly and the layer puts their head average ``[B, L, S]`` in
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

    def forward(self, x_BLD: torch.Tensor, cos_LH: torch.Tensor, sin_LH: torch.Tensor,
                ctx: RoutingContext | None = None, kv_cache: KVCache | None = None,
                start_pos: int = 0, attn_mask_B1LS: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.mlp.gate if self.is_moe else None
        need_weights = gate is not None and gate.needs_attention
        attn_BLD, probs_BLS = self.self_attn(self.input_layernorm(x_BLD), cos_LH, sin_LH, kv_cache, start_pos,
                                             need_weights=need_weights, attn_mask_B1LS=attn_mask_B1LS)
        h_BLD = x_BLD + attn_BLD
        normed_BLD = self.post_attention_layernorm(h_BLD)
        if not self.is_moe:
            return h_BLD + self.mlp(normed_BLD)
        if ctx is None:
            ctx = RoutingContext(batch_shape=tuple(normed_BLD.shape[:-1]), layer_index=self.layer_index)
        if need_weights:
            ctx.attention_probs = probs_BLS
        try:
            ffn_BLD = self.mlp(normed_BLD, ctx)
        finally:
            if need_weights:
                ctx.attention_probs = None
        return h_BLD + gate.residual_update(ffn_BLD, ctx)
