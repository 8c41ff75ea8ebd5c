#!/usr/bin/env bash
# One GPU check (issue 13), under 8 minutes on one H100/H200: run it on the device machine from the repository
# root. It sets up the project the way `make` does (CPU-pinned torch is replaced by the CUDA build that the
# machine's pip resolves), then
#   1. the CUDA / bf16 tests (tests/test_cuda.py; skipped on a machine without CUDA),
#   2. `moekit bench` in bf16 (training shapes: moekit vs floor vs transformers),
#   3. `moekit bench --decode` in bf16 (one layer at T = 1, 4, 16, 64 against the weight-read floor),
#   4. a short `moekit train --device cuda` (and a resume of it).
# Everything it prints is also written to $OUT/gpu_check.log when OUT is set (the device tool's output folder).
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/gpu_check.log"
exec > >(tee "$log") 2>&1

PY=${PY:-python3}
if [ ! -x .venv/bin/python ]; then
    $PY -m venv .venv
fi
# torch with CUDA (the default wheel on PyPI), then moekit's other dependencies and moekit itself.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch>=2.9" safetensors tqdm matplotlib numpy scipy pytest hypothesis "transformers>=5"
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
.venv/bin/python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PY

echo "== 1. CUDA / bf16 tests"
timeout 180 .venv/bin/python -m pytest -p no:cacheprovider -q tests/test_cuda.py

echo "== 2. moekit bench (bf16, training shapes)"
timeout 150 .venv/bin/python -m moekit bench --device cuda --dtype bfloat16 --repeats 20 --warmup 5 \
    --impls moekit,floor,hf-grouped_mm

echo "== 3. moekit bench --decode (bf16)"
timeout 120 .venv/bin/python -m moekit bench --decode --device cuda --dtype bfloat16 --repeats 50 --warmup 10

echo "== 4. moekit train on CUDA (60 steps, then resumed to 80)"
export MOEKIT_CACHE=/tmp/moekit-cache
rm -rf /tmp/gpu-runs
timeout 150 .venv/bin/python -m moekit train --device cuda --steps 60 --out /tmp/gpu-runs --name gpu --no-progress \
    --checkpoint-every 30
timeout 60 .venv/bin/python -m moekit train --resume /tmp/gpu-runs/gpu --steps 80 --no-progress
echo "gpu_check: done"
