"""Interrupting ``moekit train``: Ctrl-C at any point (inside a step, after the update, inside a checkpoint write,
before step 1) resumes to exactly the uninterrupted run; a non-finite loss or update keeps the last finite
checkpoint; checkpoint writes never empty the folder ``latest.json`` points at; eval refuses diverged weights.

The reference for every resumed run is the same run trained without interruption (identical float losses and
final weights), so each test fails if a batch is skipped, repeated, or a checkpoint holds a skewed state.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit.train.checkpoint as ckpt_mod
import moekit.train.loop as loop_mod
from moekit.cli import main
from moekit.train.checkpoint import latest_checkpoint, save_checkpoint
from moekit.train.loop import Trainer

TINY = ["--batch-size", "2", "--seq-len", "16", "--dim", "16", "--n-layers", "1", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "16", "--num-experts", "4", "--checkpoint-every", "5",
        "--final-eval-windows", "2", "--max-seq-len", "64", "--no-progress", "--steps", "12",
        "--aux-loss", "global", "--bias-update", "sign", "--jitter", "0.1"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _latest_step(run: Path) -> int | None:
    latest = run / "latest.json"
    return json.loads(latest.read_text())["step"] if latest.exists() else None


@pytest.fixture
def reference():
    """The uninterrupted run: its losses and final weights."""
    assert main(["train", *TINY, "--name", "ref"]) == 0
    run = Path("runs/ref")
    return _losses(run), load_file(str(run / "model.safetensors"))


def _resume_matches(run: Path, reference) -> None:
    ref_losses, ref_weights = reference
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _losses(run) == ref_losses  # identical floats: no batch skipped or repeated
    weights = load_file(str(run / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def _interrupt_and_check(capsys, run_name, expect_kept, expect_saved):
    code = main(["train", *TINY, "--name", run_name])
    err = capsys.readouterr().err
    assert code == 130
    run = Path("runs") / run_name
    assert _latest_step(run) == expect_kept
    line = [ln for ln in err.splitlines() if "interrupted" in ln][-1]
    if expect_saved:
        assert f"checkpoint of step {expect_kept} saved" in line
    else:
        assert f"last checkpoint (step {expect_kept}) is kept" in line
    assert "--resume" in line
    return run


def test_interrupt_inside_forward_keeps_last_checkpoint(capsys, monkeypatch, reference):
    real = Trainer._losses

    def losses(self, *batch):  # the batch of step 8 is drawn, the update not done yet
        if self.step == 7:
            raise KeyboardInterrupt
        return real(self, *batch)

    monkeypatch.setattr(Trainer, "_losses", losses)
    run = _interrupt_and_check(capsys, "fwd", expect_kept=5, expect_saved=False)
    monkeypatch.setattr(Trainer, "_losses", real)
    _resume_matches(run, reference)


def test_interrupt_after_update_keeps_last_checkpoint(capsys, monkeypatch, reference):
    real = loop_mod.end_step
    calls = {"n": 0}

    def end_step(model):  # after optimizer.step() of step 9: weights updated, step counter not yet
        calls["n"] += 1
        real(model)
        if calls["n"] == 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod, "end_step", end_step)
    run = _interrupt_and_check(capsys, "upd", expect_kept=5, expect_saved=False)
    monkeypatch.setattr(loop_mod, "end_step", real)
    _resume_matches(run, reference)


def test_interrupt_between_steps_saves_that_step(capsys, monkeypatch, reference):
    real = Trainer.train_step

    def step(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    run = _interrupt_and_check(capsys, "between", expect_kept=7, expect_saved=True)
    monkeypatch.setattr(Trainer, "train_step", real)
    _resume_matches(run, reference)


@pytest.mark.parametrize("second_interrupt", [False, True])
def test_interrupt_inside_checkpoint_write(capsys, monkeypatch, reference, second_interrupt):
    real = ckpt_mod.atomic_save_safetensors
    state = {"armed": False, "raised": 0}

    def save(path, tensors, metadata=None):
        if Path(path).name == "optimizer.safetensors" and "0000010" in str(path) and state["raised"] < (
                2 if second_interrupt else 1):
            state["raised"] += 1
            raise KeyboardInterrupt
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckpt_mod, "atomic_save_safetensors", save)
    run = _interrupt_and_check(capsys, f"save{int(second_interrupt)}", expect_kept=5 if second_interrupt else 10,
                               expect_saved=not second_interrupt)
    assert (latest_checkpoint(run) / "optimizer.safetensors").is_file()
    monkeypatch.setattr(ckpt_mod, "atomic_save_safetensors", real)
    _resume_matches(run, reference)


def test_real_sigint_finishes_the_step_then_saves(capsys, monkeypatch, reference):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a non-default handler in this process")
    real = Trainer._losses

    def losses(self, *batch):  # Ctrl-C arrives in the middle of step 8
        if self.step == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *batch)

    monkeypatch.setattr(Trainer, "_losses", losses)
    run = _interrupt_and_check(capsys, "sigint", expect_kept=8, expect_saved=True)
    monkeypatch.setattr(Trainer, "_losses", real)
    _resume_matches(run, reference)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_interrupt_before_step_one_says_nothing_was_saved(capsys, monkeypatch):
    def step(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(["train", *TINY, "--name", "early"]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was saved" in err and "checkpoint saved" not in err
    assert not Path("runs/early/latest.json").exists() and not Path("runs/early/checkpoints").exists()


# ------------------------------------------------------------------------------------------------ atomic writes
def _fake_state(step: int, value: float):
    model = {"w": torch.full((3, 2), value)}
    opt = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.full((3, 2), value)}},
           "param_groups": [{"lr": 0.1, "params": [0]}]}
    return model, opt, {"batches": {"position": step}}


@pytest.mark.parametrize("kill_at", range(1, 7))
def test_rewriting_a_step_never_empties_the_checkpoint_latest_points_at(tmp_path, monkeypatch, kill_at):
    """A second save of the same step killed at its k-th file write: latest.json still names a complete
    checkpoint holding one of the two states (never an emptied folder), and a later save cleans up."""
    run = tmp_path / "run"
    model, opt, st = _fake_state(5, 1.0)
    save_checkpoint(run, 5, model, opt, st)
    real = ckpt_mod.atomic_save_safetensors
    real_json = ckpt_mod.atomic_write_json
    count = {"n": 0}

    class Killed(BaseException):
        pass

    def counted(fn):
        def wrapper(*a, **k):
            count["n"] += 1
            if count["n"] == kill_at:
                raise Killed
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(ckpt_mod, "atomic_save_safetensors", counted(real))
    monkeypatch.setattr(ckpt_mod, "atomic_write_json", counted(real_json))
    model2, opt2, st2 = _fake_state(5, 2.0)
    with pytest.raises(Killed):
        save_checkpoint(run, 5, model2, opt2, st2)
    path = latest_checkpoint(run)
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert (path / name).is_file(), name
    held = float(load_file(str(path / "model.safetensors"))["w"][0, 0])
    assert held in (1.0, 2.0)
    monkeypatch.setattr(ckpt_mod, "atomic_save_safetensors", real)
    monkeypatch.setattr(ckpt_mod, "atomic_write_json", real_json)
    model3, opt3, st3 = _fake_state(6, 3.0)
    save_checkpoint(run, 6, model3, opt3, st3, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006"]


# ------------------------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("where", ["update", "loss"])
def test_non_finite_keeps_the_last_finite_checkpoint(capsys, monkeypatch, where):
    original_end_step, original_losses = loop_mod.end_step, Trainer._losses
    if where == "update":  # the update of step 10 (a checkpoint step) makes a weight NaN
        real = loop_mod.end_step
        calls = {"n": 0}

        def end_step(model):
            calls["n"] += 1
            real(model)
            if calls["n"] == 10:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")

        monkeypatch.setattr(loop_mod, "end_step", end_step)
    else:  # the loss of step 8 is NaN
        real = Trainer._losses

        def losses(self, *batch):
            ce, aux, ce_value, aux_value = real(self, *batch)
            if self.step == 7:
                ce_value = float("nan")
            return ce, aux, ce_value, aux_value

        monkeypatch.setattr(Trainer, "_losses", losses)
    code = main(["train", *TINY, "--name", "nan"])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err
    run = Path("runs/nan")
    assert _latest_step(run) == 5 and "checkpoint (step 5" in err and "step 0" not in err
    for f in (run / "model.safetensors", latest_checkpoint(run) / "model.safetensors",
              latest_checkpoint(run) / "optimizer.safetensors"):
        tensors = load_file(str(f))
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    # the kept checkpoint is the uninterrupted run's step 5: resuming without the fault repeats its losses
    monkeypatch.setattr(loop_mod, "end_step", original_end_step)
    monkeypatch.setattr(Trainer, "_losses", original_losses)
    assert main(["train", *TINY, "--name", "ref"]) == 0
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _losses(run) == _losses(Path("runs/ref"))


def test_eval_refuses_non_finite_weights(capsys):
    assert main(["train", *TINY, "--name", "div", "--steps", "2"]) == 0
    run = Path("runs/div")
    tensors = load_file(str(run / "model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(run / "model.safetensors"), metadata={"format": "moekit-run"})
    capsys.readouterr()
    assert main(["eval", str(run), "--max-windows", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "NaN or infinite" in err and first in err
