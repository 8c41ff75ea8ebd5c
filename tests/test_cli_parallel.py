"""``torchrun -m moekit train --expert-parallel N``: per-step losses equal to the single-process run, checkpoints
saved at EP=2 and resumed at EP=1 and EP=4, and bad layouts failing with one clear error on every rank.

Each torchrun launch starts fresh Python processes (a few seconds each on 2 cores); the configuration is tiny.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moekit
from moekit.cli import main
from helpers import working_folder

TINY = ["--batch-size", "4", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "32", "--num-experts", "8", "--checkpoint-every", "10",
        "--final-eval-windows", "4", "--max-seq-len", "128", "--no-progress", "--steps", "20",
        "--bias-update", "sign", "--aux-loss", "global"]
RTOL = 1e-4  # the bound; the runs agree to about 1e-7


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    with working_folder(tmp_path_factory.mktemp("ep_cli")) as path:
        yield path


def torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "moekit", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def rewind(run: Path, copy: Path, step: int) -> Path:
    shutil.copytree(run, copy)
    (copy / "latest.json").write_text(json.dumps({"step": step, "checkpoint": f"checkpoints/step-{step:07d}"}))
    return copy


def error_count(stderr: str, message: str) -> int:
    """How many ``moekit train: error: ...`` messages contain ``message``. The ranks write to the same stderr
    at about the same moment, so two messages can share a line: count messages, not lines."""
    return sum(message in part.split("\n", 1)[0] for part in stderr.split("moekit train: error:")[1:])


PACKAGE_DIR = Path(moekit.__file__).resolve().parent
_FRAME = re.compile(r'^\s*File "([^"]+)", line \d+')


def moekit_frames(stderr: str) -> list[str]:
    """Traceback frames (``File "PATH", line N``) whose file lies inside the installed moekit package.

    Paths are resolved and compared with the package folder found at test time, so neither the checkout's
    location nor its folder name (a clone called ``moekit``, torchrun's own frames below it) matters."""
    frames = []
    for line in stderr.splitlines():
        match = _FRAME.match(line)
        if match and Path(match.group(1)).resolve().is_relative_to(PACKAGE_DIR):
            frames.append(line.strip())
    return frames


def assert_no_moekit_traceback(stderr: str) -> None:
    """torchrun itself prints a traceback when a process exits non-zero; moekit's processes must not."""
    assert not moekit_frames(stderr), moekit_frames(stderr)


def test_moekit_frames_ignores_the_checkout_folder_name():
    inside = PACKAGE_DIR / "commands.py"
    torch_frame = PACKAGE_DIR.parent.parent / "moekit" / ".venv" / "lib" / "torch" / "distributed" / "run.py"
    stderr = (f'Traceback (most recent call last):\n  File "{torch_frame}", line 7, in <module>\n'
              f'  File "/home/u/moekit/moekit/elastic.py", line 3, in main\nValueError: x\n')
    assert moekit_frames(stderr) == []
    assert moekit_frames(stderr + f'  File "{inside}", line 12, in cmd_train\n') == \
        [f'File "{inside}", line 12, in cmd_train']


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert abs(g - w) <= RTOL * abs(w), (step, g, w)


@pytest.fixture(scope="module")
def runs(workdir):
    assert main(["train", *TINY, "--name", "single"]) == 0
    proc = torchrun(2, *TINY, "--name", "ep2", "--expert-parallel", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "runs"


def test_expert_parallel_losses_match_single_process(runs):
    single, ep2 = losses(runs / "single"), losses(runs / "ep2")
    assert len(single) == 20
    assert_close(ep2, single)
    cfg = json.loads((runs / "ep2" / "config.json").read_text())
    assert cfg["train"]["expert_parallel"] == 2


def test_replicated_experts_and_fitted_chunks_match_single_process(runs):
    """4 processes, experts sharded over 2 (each shard on two ranks), r chosen by the fitted cost model."""
    proc = torchrun(4, *TINY, "--name", "ep2x2", "--expert-parallel", "2", "--overlap-chunks", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chosen by the cost model" in proc.stderr
    assert_close(losses(runs / "ep2x2"), losses(runs / "single"))


def test_checkpoint_from_ep2_resumes_at_ep1(runs):
    run = rewind(runs / "ep2", runs / "ep2-to-1", 10)
    assert main(["train", "--resume", str(run), "--expert-parallel", "1", "--no-progress"]) == 0
    assert_close(losses(run), losses(runs / "single"))


def test_checkpoint_from_ep2_resumes_at_ep4_with_overlap(runs):
    run = rewind(runs / "ep2", runs / "ep2-to-4", 10)
    proc = torchrun(4, "--resume", str(run), "--expert-parallel", "4", "--overlap-chunks", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(losses(run), losses(runs / "single"))
    # the checkpoint it wrote is in the single-process layout again
    assert main(["eval", str(run), "--max-windows", "2", "--json"]) == 0


@pytest.mark.parametrize("args,message", [
    (["--expert-parallel", "2", "--num-experts", "3", "--top-k", "1"], "does not divide num_experts=3"),
    (["--expert-parallel", "4"], "does not divide the world size 2"),
])
def test_bad_layout_is_one_error_per_rank(workdir, args, message):
    base = [a for a in TINY if a not in ("--num-experts", "8")]
    proc = torchrun(2, *base, "--name", "bad", *args, timeout=120)
    assert proc.returncode != 0
    assert error_count(proc.stderr, message) == 2, proc.stderr[-3000:]  # once per rank
    assert_no_moekit_traceback(proc.stderr)


@pytest.mark.parametrize("other", [["--dim", "48"], ["--num-experts", "4"]], ids=["width", "experts"])
def test_checkpoint_from_another_model_fails_on_every_rank(runs, other):
    name = "other-" + other[0].strip("-")
    assert main(["train", *TINY, "--name", name, *other, "--steps", "10"]) == 0
    run = rewind(runs / "ep2", runs / f"ep2-{name}", 10)
    shutil.copy(runs / name / "checkpoints" / "step-0000010" / "model.safetensors",
                run / "checkpoints" / "step-0000010" / "model.safetensors")
    proc = torchrun(2, "--resume", str(run), "--expert-parallel", "2", "--no-progress", timeout=120)
    assert proc.returncode != 0
    assert error_count(proc.stderr, "weights file") == 2, proc.stderr[-3000:]  # once per rank
    assert_no_moekit_traceback(proc.stderr)
    # the failed resume left the run's settings alone
    assert json.loads((run / "config.json").read_text())["train"]["expert_parallel"] == 2


def test_expert_parallel_without_torchrun_is_a_clear_error(workdir, capsys):
    assert main(["train", *TINY, "--name", "no-torchrun", "--expert-parallel", "2"]) == 2
    assert "launch with torchrun --nproc-per-node 2" in capsys.readouterr().err
    assert not (workdir / "runs" / "no-torchrun").exists()
