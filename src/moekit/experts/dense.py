"""Dense experts: ``E`` feed-forward networks stored as 3-D tensors in the Hugging Face transformers 5 layout.

Legend: E experts, D model width, F expert hidden width, H = 2F for gated activations (else F).

Gated activations (``swiglu``: Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202;
``geglu``) keep ``gate_up_proj [E, 2F, D]`` with the gate half's rows first, exactly as transformers'
``OlmoeExperts`` / ``MixtralExperts``; ungated ones (``gelu``, ``relu``) keep ``up_proj [E, F, D]``. Both keep
``down_proj [E, D, F]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import GroupedExperts, register, set_ffn_shape


@register("dense")
class DenseExperts(GroupedExperts):
    """``E`` independent FFN experts on stacked weights (the default kind, ``MoEConfig(experts="dense")``)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "swiglu",
                 init_std: float = 0.02):
        super().__init__()
        set_ffn_shape(self, num_experts, dim, hidden_dim, activation)
        up_rows = 2 * hidden_dim if self.gated else hidden_dim
        up = nn.Parameter(torch.empty(num_experts, up_rows, dim))
        if self.gated:
            self.gate_up_proj = up
        else:
            self.up_proj = up
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        nn.init.normal_(up, std=init_std)
        nn.init.normal_(self.down_proj, std=init_std)

    @property
    def w_up(self) -> torch.Tensor:
        """``[E, H, D]``: ``gate_up_proj`` for gated activations, ``up_proj`` otherwise."""
        return self.gate_up_proj if self.gated else self.up_proj

    @property
    def w_down(self) -> torch.Tensor:
        """``[E, D, F]``: ``down_proj``."""
        return self.down_proj

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}")
