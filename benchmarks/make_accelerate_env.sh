#!/usr/bin/env bash
# A separate virtual environment with transformers + accelerate, for the disk-offload comparison of
# benchmarks/offload.py only (never a moekit dependency):
#   bash benchmarks/make_accelerate_env.sh [DIR]     (default DIR: .venv-accelerate in the repository root)
# torch is the same CPU build the Makefile installs (requirements-cpu.txt: torch==2.13.0, found through pip's
# configured find-links / index, as `make` does). .venv-vllm has no accelerate, hence this environment.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.venv-accelerate}"
python3 -m venv "$dir"
"$dir/bin/python" -m pip install --quiet --upgrade pip
"$dir/bin/python" -m pip install --quiet "torch==2.13.0" "transformers==5.23.0" accelerate safetensors numpy
"$dir/bin/python" -c "import accelerate, torch, transformers; print('accelerate', accelerate.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
