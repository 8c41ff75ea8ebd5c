"""How much of a transformers MoE model's training step the experts take, and what that allows.

    python benchmarks/hf_expert_share.py

Times forward + backward of the OLMoE- and DeepSeek-V3-shaped models of ``moekit bench --hf`` (batch 2 x 256)
with transformers' ``grouped_mm`` experts, with moekit's, and with the experts replaced by ``x * 0`` (the rest
of the model alone). From these: the experts' share of the step, moekit's speed-up on the experts alone, and
the whole-model speed-up that perfectly free experts would give (Amdahl's bound). Also the rate of the grouped
matrix products at the OLMoE shape against one large matrix product, on this machine.
"""
from __future__ import annotations

import statistics
import time

import torch

import moekit.hf  # noqa: F401  (registers "moekit")
from moekit.hf.bench import deepseek_v3_model, olmoe_model, time_steps


def gflops(fn, flops: float, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return flops / ((time.perf_counter() - start) / repeats) / 1e9


def main(rounds: int = 7) -> None:
    torch.manual_seed(0)
    print("| model | grouped_mm step | moekit step | without experts | experts' share (grouped_mm) | "
          "moekit on the experts alone | bound with free experts |")
    print("|---|---|---|---|---|---|---|")
    for name, build in (("OLMoE-shaped", olmoe_model), ("DeepSeek-V3-shaped", deepseek_v3_model)):
        model = build(False)
        ids = torch.randint(0, model.config.vocab_size, (2, 256))
        weight = torch.randn(2, 256, model.config.vocab_size)
        experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]

        def without_experts(on: bool) -> None:
            for m in experts:
                if on:
                    m.forward = lambda hidden_states, *args, **kwargs: hidden_states * 0
                else:
                    m.__dict__.pop("forward", None)

        # Interleaved rounds (one step of each variant per round) so that drifts of this machine's speed hit
        # every variant alike; medians over the rounds after one warm-up round.
        samples = {"grouped_mm": [], "moekit": [], "rest": []}
        for round_index in range(rounds + 1):
            for variant in samples:
                without_experts(variant == "rest")
                model.set_experts_implementation("moekit" if variant == "moekit" else "grouped_mm")
                t = time_steps(model, ids, weight, 0, 1)
                if round_index:
                    samples[variant].append(t)
        without_experts(False)
        times = {k: statistics.median(v) for k, v in samples.items()}
        rest = times["rest"]
        gmm, mk = times["grouped_mm"], times["moekit"]
        print(f"| {name} | {gmm:.3f} s | {mk:.3f} s | {rest:.3f} s | {(gmm - rest) / gmm:.0%} | "
              f"{(gmm - rest) / (mk - rest):.2f}x | {gmm / rest:.2f}x |")
    experts, rows, dim, width = 64, 64, 512, 512  # OLMoE shape: 4096 rows, up-projection 512 -> 2 x 256
    x = torch.randn(experts * rows, dim)
    w = torch.randn(experts, width, dim).transpose(1, 2)
    offsets = torch.arange(1, experts + 1, dtype=torch.int32) * rows
    flops = 2.0 * experts * rows * dim * width
    big = torch.randn(dim, width)
    print()
    print("| product (OLMoE up-projection, 64 experts x 64 rows) | GFLOP/s |")
    print("|---|---|")
    print(f"| torch._grouped_mm | {gflops(lambda: torch._grouped_mm(x, w, offsets), flops):.0f} |")
    print(f"| torch.bmm (equal groups only) | {gflops(lambda: torch.bmm(x.view(experts, rows, dim), w), flops):.0f} |")
    print(f"| one 4096 x 512 x 512 torch.mm | {gflops(lambda: x @ big, flops):.0f} |")


if __name__ == "__main__":
    main()
