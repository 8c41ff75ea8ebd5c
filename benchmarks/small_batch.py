"""The small-batch experts path against the grouped path, one layer, inference, interleaved in one run.

    python benchmarks/small_batch.py

For the olmoe (E=64, K=8), mixtral (E=8, K=2) and qwen3-30b-a3b (E=128, K=8) layer shapes at T = 1, 2, 4
tokens: ``GroupedExperts.small_batch = "off"`` (the fused grouped product) and ``"on"`` (a loop over the used
experts' weight views), alternating, best of two medians each.
"""
import statistics
import time

import torch

import moekit


def median_ms(fn, n):
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    torch.manual_seed(0)
    print("| shape | T | grouped ms | small-batch ms | small / grouped |")
    print("|---|---|---|---|---|")
    for name, (dim, hidden, experts, top_k) in {"olmoe": (512, 256, 64, 8), "mixtral": (1024, 1024, 8, 2),
                                                "qwen3-30b-a3b": (2048, 768, 128, 8)}.items():
        layer = moekit.MoE(dim=dim, hidden_dim=hidden, num_experts=experts, top_k=top_k, aux_loss=None).eval()
        for tokens in (1, 2, 4):
            x = torch.randn(tokens, dim)
            times = {}
            with torch.no_grad():
                for mode in ("off", "on", "off", "on"):
                    layer.experts.small_batch = mode
                    times.setdefault(mode, []).append(median_ms(lambda: layer(x), 40 if experts < 128 else 10))
            grouped, small = min(times["off"]), min(times["on"])
            print(f"| {name} | {tokens} | {grouped:.3f} | {small:.3f} | {small / grouped:.2f} |")


if __name__ == "__main__":
    main()
