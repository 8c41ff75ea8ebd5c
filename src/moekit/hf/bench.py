"""Forward + backward time of transformers MoE models with experts_implementation "eager", "grouped_mm", "moekit".

    moekit bench --hf                        # full run (OLMoE- and DeepSeek-V3-shaped models)
    python -m moekit.hf.bench --quick        # smoke run on tiny shapes
    python benchmarks/hf_bench.py --json     # the same, one JSON object on stdout

Each model is built once from a config with random weights (float32 on the CPU, bfloat16 on CUDA unless
``--dtype``); the three implementations are switched at run time with ``model.set_experts_implementation`` so
they see the same weights and inputs. A step is ``loss = sum(logits * w)``, ``loss.backward()`` with gradients of
all parameters; the time is the median of ``--repeats`` steps after ``--warmup`` steps. Ratios compare moekit with
the faster of transformers' implementations measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import moekit.hf  # noqa: F401  (registers "moekit")

IMPLEMENTATIONS = ("eager", "grouped_mm", "moekit")


def olmoe_model(quick: bool):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    if quick:
        cfg = OlmoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=128,
                          max_position_embeddings=128)
    else:
        cfg = OlmoeConfig(hidden_size=512, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=8, num_experts=64, num_experts_per_tok=8, vocab_size=4096,
                          max_position_embeddings=1024)
    return OlmoeForCausalLM(cfg)


def deepseek_v3_model(quick: bool):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    if quick:
        sizes = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                     n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                     qk_nope_head_dim=8, v_head_dim=16, head_dim=8, vocab_size=128)
    else:
        sizes = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64, num_experts_per_tok=6,
                     n_group=8, topk_group=4, kv_lora_rank=128, q_lora_rank=256, qk_rope_head_dim=32,
                     qk_nope_head_dim=32, v_head_dim=64, head_dim=32, vocab_size=4096)
    cfg = DeepseekV3Config(**sizes, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=1024)
    return DeepseekV3ForCausalLM(cfg)


MODELS = {"olmoe": olmoe_model, "deepseek_v3": deepseek_v3_model}


def time_steps(model, input_ids, weight, warmup: int, repeats: int) -> float:
    """Median seconds of one forward + backward step."""
    times = []
    for i in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(input_ids=input_ids, use_cache=False).logits
        (logits.float() * weight).sum().backward()
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch, seq = (2, 32) if args.quick else (args.batch, args.seq)
    results = {"machine": platform.platform(), "device": str(device), "dtype": str(dtype), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "batch": batch, "seq": seq, "models": {}}
    for name in args.models:
        torch.manual_seed(0)
        model = MODELS[name](args.quick).to(device=device, dtype=dtype).train()
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        weight = torch.randn(batch, seq, vocab, generator=gen).to(device)
        row = {}
        for impl in IMPLEMENTATIONS:
            model.set_experts_implementation(impl)
            row[impl] = time_steps(model, input_ids, weight, args.warmup, args.repeats)
        best = min(("eager", "grouped_mm"), key=row.get)
        row["best_transformers"] = best
        row["speedup_vs_best"] = row[best] / row["moekit"]
        row["parameters"] = sum(p.numel() for p in model.parameters())
        results["models"][name] = row
        del model
    return results


def print_table(results: dict) -> None:
    print(f"# {results['device']} {results['dtype']} torch {results['torch']} threads {results['threads']} "
          f"batch {results['batch']} seq {results['seq']}")
    print(f"{'model':12s} {'params':>10s} " + " ".join(f"{i:>12s}" for i in IMPLEMENTATIONS)
          + f" {'moekit vs best':>16s}")
    for name, row in results["models"].items():
        times = " ".join(f"{row[i] * 1e3:10.1f}ms" for i in IMPLEMENTATIONS)
        print(f"{name:12s} {row['parameters']:10d} {times} {row['speedup_vs_best']:8.2f}x ({row['best_transformers']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 3 repeats (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 3
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    results = run(args)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
