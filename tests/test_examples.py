"""The extension guides' examples (docs/extending.md) run as a user runs them: from outside the package, in a
fresh process, registering their classes without any edit to moekit's source."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOEKIT_CACHE": os.environ.get("MOEKIT_CACHE", str(tmp_path / "cache")),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path / "runs")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script,kinds,run,key,name", [
    ("custom_experts.py", ("mlp_list", "bf16_storage"), "custom-experts-example", "experts", "bf16_storage"),
    ("custom_router.py", ("example_topk_softmax",), "custom-router-example", "router", "example_topk_softmax"),
])
def test_example_runs(tmp_path, script, kinds, run, key, name):
    proc = _run(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in kinds:
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"{kind}: toy loss"))
        first, last = (float(v) for v in line.split("toy loss")[1].split("->"))
        assert last < first
    config = json.loads((tmp_path / "runs" / run / "config.json").read_text())
    assert config["model"]["moe"][key] == name
    assert (tmp_path / "runs" / run / "model.safetensors").is_file()
