"""Write your own Experts (docs/extending.md): two kinds, registered from this file, no edit to moekit.

    python examples/custom_experts.py            # trains a toy layer with each kind, then the LM for a few steps

1. ``mlp_list``: experts as a plain ``nn.ModuleList`` of ``nn.Sequential`` MLPs. Only ``expert_rows`` is
   written; the weighted combine comes from :class:`moekit.experts.Experts`. (Its parameters are not stacked
   along an expert dimension, so it does not support expert parallelism's ``shard`` as is.)
2. ``bf16_storage``: moekit's dense experts storing their weights in bfloat16 and computing in float32. Only the
   grouped products are overridden, so the layer keeps the fused forward and hand-written backward.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

import moekit
from moekit.dispatch.grouped import grouped_mm, grouped_wgrad
from moekit.experts import DenseExperts, Experts, register


@register("mlp_list")
class MLPListExperts(Experts):
    """One ``nn.Sequential(Linear, GELU, Linear)`` per expert."""

    def __init__(self, num_experts, dim, hidden_dim, activation="gelu", init_std=0.02):
        super().__init__()
        self.num_experts, self.dim = num_experts, dim
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))
            for _ in range(num_experts))

    def expert_rows(self, x_SD, counts_E):
        # rows arrive sorted by expert, counts_E[e] of them for expert e
        chunks = torch.split(x_SD, counts_E.tolist())
        out = [mlp(rows) for mlp, rows in zip(self.mlps, chunks)]
        # every expert takes part, also with no rows, so that all parameters get (zero) gradients
        return torch.cat(out) + 0 * sum(p.sum() for p in self.parameters())

    def expert_parameter_names(self):
        return []  # nothing stacked by expert: not shardable as is


@register("bf16_storage")
class BF16StorageExperts(DenseExperts):
    """Dense experts whose stored weights are bfloat16 (half the memory); products run in float32."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p.detach().to(torch.bfloat16)))

    def _apply(self, fn, recurse=True):  # keep the storage dtype when the model is cast
        super()._apply(fn, recurse)
        for name, p in list(self.named_parameters(recurse=False)):
            if p.dtype != torch.bfloat16:
                setattr(self, name, nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad))
        return self

    @staticmethod
    def _f32(w):
        return w.float()

    def up_product(self, x_SD, offsets_E):
        return grouped_mm(x_SD, self._f32(self.w_up).transpose(1, 2), offsets_E)

    def down_product(self, a_SF, offsets_E):
        return grouped_mm(a_SF, self._f32(self.w_down).transpose(1, 2), offsets_E)

    def up_input_grad(self, dh_SH, offsets_E):
        return grouped_mm(dh_SH, self._f32(self.w_up), offsets_E)

    def down_input_grad(self, dy_SD, offsets_E):
        return grouped_mm(dy_SD, self._f32(self.w_down), offsets_E)

    def up_weight_grad(self, dh_SH, x_SD, offsets_E):
        return grouped_wgrad(dh_SH, x_SD, offsets_E).to(torch.bfloat16)

    def down_weight_grad(self, dy_SD, a_SF, offsets_E):
        return grouped_wgrad(dy_SD, a_SF, offsets_E).to(torch.bfloat16)


def toy_training(kind: str, steps: int = 60) -> tuple[float, float]:
    """Fit a random target function with a MoE layer of experts ``kind``; returns (first, last) loss."""
    torch.manual_seed(0)
    layer = moekit.MoE(dim=16, hidden_dim=32, num_experts=4, top_k=2, experts=kind,
                       activation="gelu" if kind == "mlp_list" else "swiglu")
    target = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 16)
        loss = nn.functional.mse_loss(layer(x), target(x).detach()) + moekit.aux_loss(layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        moekit.end_step(layer)
        losses.append(float(loss))
    return losses[0], losses[-1]


def main(argv=None) -> int:
    for kind in ("mlp_list", "bf16_storage"):
        first, last = toy_training(kind)
        print(f"{kind}: toy loss {first:.4f} -> {last:.4f}")
        assert last < first, kind
    # the built-in language model with these experts: the registry is all moekit needs
    from moekit.cli import main as cli

    tiny = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1", "--hidden-dim", "16",
            "--num-experts", "4", "--batch-size", "2", "--seq-len", "32", "--max-seq-len", "64",
            "--final-eval-windows", "2", "--no-progress"]
    out = (argv or ["runs"])[0]
    return cli(["train", *tiny, "--experts", "bf16_storage", "--steps", "3", "--out", out,
                "--name", "custom-experts-example"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
