"""CUDA checks (bf16 kernels, the decode path choice, training on a GPU); skipped on a machine without CUDA.
benchmarks/gpu_check.sh runs them on the device machine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moekit
from reference import reference_from_state, random_weights, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _layer(E=16, D=64, F=32, K=4, dtype=torch.bfloat16):
    layer = moekit.MoE(dim=D, hidden_dim=F, num_experts=E, top_k=K, aux_loss=None).eval()
    sd = random_weights(E, D, F, seed=3, dtype=torch.float64, std=0.2)
    layer.load_state_dict({k: v.float() for k, v in sd.items()})
    return layer.to(device="cuda", dtype=dtype), sd


def test_bf16_layer_on_cuda_matches_the_float64_reference():
    layer, sd = _layer()
    x = torch.randn(96, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_cuda = x.to("cuda", torch.bfloat16).requires_grad_(True)
    with torch.enable_grad():
        out = layer(x_cuda)
        out.float().square().sum().backward()
    ref = reference_from_state(x, sd, top_k=4)
    assert layer.experts.last_path == "grouped"  # the CUDA grouped kernel, never the CPU small-batch loop
    assert rel_err(out.double().cpu(), ref.out) < 3e-2
    assert torch.isfinite(x_cuda.grad).all() and torch.isfinite(layer.experts.gate_up_proj.grad.float()).all()


def test_decode_sizes_keep_the_grouped_kernel_on_cuda():
    layer, sd = _layer()
    x = torch.randn(1, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = layer(x.to("cuda", torch.bfloat16))
    assert layer.experts.last_path == "grouped"
    assert rel_err(out.double().cpu(), reference_from_state(x, sd, top_k=4).out) < 3e-2


def test_train_on_cuda_and_resume(tmp_path, monkeypatch):
    from moekit.cli import main

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tiny = ["--batch-size", "4", "--seq-len", "32", "--dim", "64", "--n-layers", "2", "--n-heads", "2",
            "--n-kv-heads", "1", "--hidden-dim", "32", "--num-experts", "4", "--checkpoint-every", "3",
            "--final-eval-windows", "4", "--max-seq-len", "64", "--no-progress", "--device", "cuda"]
    assert main(["train", *tiny, "--name", "g", "--steps", "3"]) == 0
    assert main(["train", "--resume", "runs/g", "--steps", "6", "--no-progress"]) == 0
    recs = [json.loads(line) for line in Path("runs/g/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 6 and all(map(lambda v: v == v and abs(v) < 1e3, losses))
    assert main(["eval", "runs/g", "--max-windows", "4"]) == 0  # a GPU-trained run evaluates on the CPU
