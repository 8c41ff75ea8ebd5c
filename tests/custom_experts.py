"""Two Experts kinds written for the tests only, registered from outside moekit's source.

* ``test_loop``: an independent implementation of the Experts interface. Weights are three stacked tensors
  with names of its own (``w_gate [E, F, D]``, ``w_in [E, F, D]``, ``w_out [E, D, F]``) and ``expert_rows`` is a
  Python loop of ``torch.nn.functional.linear`` over the experts; everything else (combine, sharding) comes
  from the base class. SwiGLU only.
* ``test_fakequant``: dense experts whose weights are rounded to a grid on the fly (a fake 4-bit-ish quantiser
  with a straight-through estimator): a subclass that only changes how weights are *used* by overriding the
  six grouped products of ``ExpertProducts``, so it keeps the fused forward and hand-written backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.dispatch.grouped import grouped_mm, grouped_wgrad
from moekit.experts import DenseExperts, Experts, register


@register("test_loop")
class LoopExperts(Experts):
    def __init__(self, num_experts, dim, hidden_dim, activation="swiglu", init_std=0.02):
        super().__init__()
        if activation != "swiglu":
            raise ValueError("test_loop experts: swiglu only")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.w_gate = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * init_std)
        self.w_in = nn.Parameter(torch.randn(num_experts, hidden_dim, dim) * init_std)
        self.w_out = nn.Parameter(torch.randn(num_experts, dim, hidden_dim) * init_std)

    def expert_rows(self, x_SD, counts_E):
        pieces, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            rows = x_SD[start:start + n]
            hidden = F.silu(F.linear(rows, self.w_gate[e])) * F.linear(rows, self.w_in[e])
            pieces.append(F.linear(hidden, self.w_out[e]))
            start += n
        if not pieces:
            return x_SD.new_zeros(0, self.dim)
        # every expert's weights take part even with no rows (zero gradients, not None)
        return torch.cat(pieces) + 0 * (self.w_gate.sum() + self.w_in.sum() + self.w_out.sum())

    def state_to_dense(self) -> dict[str, torch.Tensor]:
        """The same experts in the dense layout (``gate_up_proj`` = gate rows then up rows)."""
        return {"gate_up_proj": torch.cat([self.w_gate, self.w_in], dim=1).detach(),
                "down_proj": self.w_out.detach()}


def fake_quant(w: torch.Tensor, step: float = 0.05) -> torch.Tensor:
    """Round to multiples of ``step`` (straight-through: the products use the rounded values, the weight
    gradients are those of the rounded weights)."""
    return torch.round(w / step) * step


@register("test_fakequant")
class FakeQuantExperts(DenseExperts):
    step = 0.05

    def _q(self, w):
        return fake_quant(w, self.step)

    def up_product(self, x_SD, offsets_E):
        return grouped_mm(x_SD, self._q(self.w_up).transpose(1, 2).contiguous(), offsets_E)

    def down_product(self, a_SF, offsets_E):
        return grouped_mm(a_SF, self._q(self.w_down).transpose(1, 2).contiguous(), offsets_E)

    def up_input_grad(self, dh_SH, offsets_E):
        return grouped_mm(dh_SH, self._q(self.w_up).contiguous(), offsets_E)

    def down_input_grad(self, dy_SD, offsets_E):
        return grouped_mm(dy_SD, self._q(self.w_down).contiguous(), offsets_E)

    def up_weight_grad(self, dh_SH, x_SD, offsets_E):
        return grouped_wgrad(dh_SH, x_SD, offsets_E)

    def down_weight_grad(self, dy_SD, a_SF, offsets_E):
        return grouped_wgrad(dy_SD, a_SF, offsets_E)
