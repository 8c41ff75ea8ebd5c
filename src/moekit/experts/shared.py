"""Shared experts: an always-on FFN beside the routed experts (DeepSeekMoE, Dai et al. 2024,
arXiv:2401.06066; Qwen2-MoE), with Qwen2-MoE's optional sigmoid gate ``sigmoid(x W_s^T) * shared(x)``.

Parameter names follow transformers' ``Qwen2MoeSparseMoeBlock``: ``shared_expert.{gate,up,down}_proj.weight``
and ``shared_expert_gate.weight``. ``N`` shared experts of width ``F_s`` are held as one FFN of width
``N * F_s``, which computes the same sum (DeepSeek-V3 does the same).
"""
from __future__ import annotations

import torch
from torch import nn

from .activations import get_activation


class SharedExpert(nn.Module):
    """One dense FFN (gated or not) applied to every token."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "swiglu", init_std: float = 0.02):
        super().__init__()
        act = get_activation(activation)
        self.act_fn, self.gated = act.fn, act.gated
        if self.gated:
            self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))
