"""Write your own Router (docs/extending.md): registered from this file, no edit to moekit.

    python examples/custom_router.py [OUT]   # a toy layer, then the LM trained and evaluated from the CLI

The router is Mixtral's rule written from scratch: top-k of the logits, routing weights = softmax over the K
chosen logits (Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088), with the Switch balancing loss
(Fedus et al. 2021, arXiv:2101.03961). Its logits come from the base class's ``logits`` step, so jitter, float32
router math and the per-layer logit offset (test-time adaptation) work without a line of its own.

The second half runs the ``moekit`` command in fresh processes: ``train --plugin examples/custom_router.py
--router example_topk_softmax``, then ``eval`` of that run, which finds the plugin in the run's config.json.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import moekit
from moekit import balance
from moekit.routing import Router, Routing, RoutingContext, register


@register("example_topk_softmax")
class TopKSoftmaxRouter(Router):
    """Top-k of the logits, softmax over the chosen ones; the Switch loss in training."""

    def __init__(self, dim, num_experts, top_k, *, aux_loss_coef=1e-2, jitter=0.0):
        super().__init__(dim, num_experts, top_k, jitter=jitter)
        if not aux_loss_coef >= 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {aux_loss_coef!r}")
        self.aux_loss_coef = float(aux_loss_coef)

    def has_balancing(self) -> bool:
        return self.aux_loss_coef > 0

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        logits_TE = self.logits(x_TD, ctx)  # float32; jitter in training; + logit offset
        top_logits_TK, topk_ids_TK = logits_TE.topk(self.top_k, dim=-1)
        weights_TK = torch.softmax(top_logits_TK, dim=-1)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        routing = Routing.from_topk(topk_ids_TK, weights_TK, self.num_experts, logits=logits_TE, probs=probs_TE)
        if self.training and self.aux_loss_coef > 0:
            counts_E = routing.tokens_per_expert()
            routing.aux_losses["switch"] = self.aux_loss_coef * balance.switch_loss(probs_TE, counts_E)
        return routing


def toy_training(steps: int = 60) -> tuple[float, float]:
    torch.manual_seed(0)
    layer = moekit.MoE(dim=16, hidden_dim=32, num_experts=4, top_k=2, router="example_topk_softmax")
    target = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 16)
        loss = torch.nn.functional.mse_loss(layer(x), target(x).detach()) + moekit.aux_loss(layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


def main(argv=None) -> int:
    first, last = toy_training()
    print(f"example_topk_softmax: toy loss {first:.4f} -> {last:.4f}")
    assert last < first
    out = Path(argv[0]) if argv else Path(tempfile.mkdtemp())
    tiny = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1", "--hidden-dim", "16",
            "--num-experts", "4", "--batch-size", "2", "--seq-len", "32", "--max-seq-len", "64",
            "--final-eval-windows", "2", "--no-progress"]
    plugin = str(Path(__file__).resolve())
    moekit_cmd = [sys.executable, "-m", "moekit"]
    subprocess.run([*moekit_cmd, "train", "--plugin", plugin, "--router", "example_topk_softmax", *tiny,
                    "--steps", "3", "--out", str(out), "--name", "custom-router-example"], check=True)
    # eval in a fresh process: the plugin path recorded in the run's config.json registers the router again
    subprocess.run([*moekit_cmd, "eval", str(out / "custom-router-example"), "--max-windows", "2"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
