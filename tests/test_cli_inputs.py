"""Bad input to the ``moekit`` commands (issue 12, items 6 and 12): every case is one line on stderr naming the
file or flag, exit code 2, no traceback, nothing left behind that blocks the corrected retry, nothing deleted or
overwritten that the command did not create, and every path inside the folder it belongs to.

The commands run in-process (``moekit.cli.main``) on a one-layer model of width 16 trained for two steps on a
small text file, so the whole file takes seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import MoEConfig
from moekit.cli import main
from moekit.io import atomic_write_bytes, remove_stale_temporaries, temp_sibling
from helpers import working_folder

TINY = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--dim", "16", "--n-layers", "1", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "16", "--num-experts", "4", "--final-eval-windows", "2",
        "--max-seq-len", "32", "--no-progress", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    with working_folder(tmp_path_factory.mktemp("cli_inputs")) as path:
        (path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 200)
        yield path


def train(*args: str) -> int:
    return main(["train", *TINY, "--data", "data.txt", *args])


@pytest.fixture(scope="module")
def run(workdir) -> Path:
    assert train("--name", "base") == 0
    return workdir / "runs" / "base"


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """A fresh copy of the trained run to damage."""
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def one_line_error(capsys, argv, *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ------------------------------------------------------------------------------------------ configs (item 6)
@pytest.mark.parametrize("settings, field", [
    ({"num_groups": 3}, "num_groups"),
    ({"jitter": 1.5}, "jitter"),
    ({"router_options": {"no_such_option": 1}}, "router_options"),
    ({"init_std": float("nan")}, "init_std"),
    ({"init_std": -0.1}, "init_std"),
])
def test_moe_config_runs_every_router_check_itself(settings, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(dim=16, hidden_dim=16, num_experts=8, **settings)


def test_moe_config_check_draws_no_random_numbers():
    state = torch.get_rng_state()
    MoEConfig(dim=16, hidden_dim=16, num_experts=8, num_groups=2, topk_groups=1, jitter=0.1)
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------------------------ train flags
@pytest.mark.parametrize("flags, needle", [
    (["--num-groups", "3"], "num_groups"),
    (["--jitter", "-1"], "jitter"),
    (["--seed", str(2**70)], "seed"),
    (["--threads", "100000"], "threads"),
    (["--rope-theta", "inf"], "rope_theta"),
    (["--norm-eps", "inf"], "norm_eps"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--init-std", "nan"], "init_std"),
    (["--moe-init-std", "-1"], "init_std"),
    (["--vocab-size", "100"], "vocab_size"),
    (["--seq-len", "64"], "max_seq_len"),
    (["--router-options", '{"no_such_option": 1}'], "router_options"),
    (["--name", "../escape"], "--name"),
    (["--name", "/tmp/abs"], "--name"),
    (["--name", "."], "--name"),
    (["--device", "gpu"], "device"),
    (["--device", "cuda:x"], "device"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]))
def test_bad_train_flags_write_nothing(workdir, capsys, flags, needle):
    argv = ["train", *TINY, "--data", "data.txt", "--name", "bad", *flags]
    one_line_error(capsys, argv, needle)
    assert not (workdir / "runs" / "bad").exists() and not (workdir / "escape").exists()


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02binary\xff"])
def test_unusable_data_leaves_no_run_folder_and_the_retry_works(workdir, capsys, content):
    bad = workdir / "bad-data"
    bad.mkdir(exist_ok=True)
    (bad / "only.txt").write_bytes(content)
    one_line_error(capsys, ["train", *TINY, "--data", str(bad), "--name", "retry"], "usable text")
    assert not (workdir / "runs" / "retry").exists()
    assert train("--name", "retry") == 0  # the corrected command with the same name
    shutil.rmtree(workdir / "runs" / "retry")


def test_group_count_error_then_corrected_retry(workdir, capsys):
    one_line_error(capsys, ["train", *TINY, "--data", "data.txt", "--name", "g", "--num-groups", "3"], "num_groups")
    assert not (workdir / "runs" / "g").exists()
    assert train("--name", "g", "--num-groups", "2") == 0
    assert json.loads((workdir / "runs" / "g" / "config.json").read_text())["model"]["moe"]["num_groups"] == 2
    shutil.rmtree(workdir / "runs" / "g")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_a_data_folder_is_skipped(workdir, capsys):
    folder = workdir / "fifo-data"
    folder.mkdir()
    shutil.copy(workdir / "data.txt", folder / "a.txt")
    os.mkfifo(folder / "pipe")
    assert train("--name", "fifo", "--data", str(folder)) == 0  # would hang reading the FIFO
    shutil.rmtree(workdir / "runs" / "fifo")


def test_out_is_a_file(workdir, capsys):
    (workdir / "a-file").write_text("x")
    one_line_error(capsys, ["train", *TINY, "--data", "data.txt", "--out", "a-file", "--name", "x"], "a-file")
    assert (workdir / "a-file").read_text() == "x"


# ------------------------------------------------------------------------------------------ run config.json
@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(data="some/string"), "'data'"),
    (lambda c: c.update(data=3), "'data'"),
    (lambda c: c["train"].pop("seq_len"), "train.seq_len"),
    (lambda c: c.pop("train"), "'train'"),
    (lambda c: c.update(train=None), "'train'"),
    (lambda c: c.update(model=[1, 2]), "'model'"),
    (lambda c: c["train"].update(weight_decay="x"), "weight_decay"),
])
@pytest.mark.parametrize("command", ["eval", "trace", "report", "resume"])
def test_bad_run_config(copy, capsys, edit, needle, command):
    cfg = json.loads((copy / "config.json").read_text())
    edit(cfg)
    (copy / "config.json").write_text(json.dumps(cfg))
    argv = {"eval": ["eval", str(copy)], "trace": ["trace", str(copy)], "report": ["report", str(copy)],
            "resume": ["train", "--resume", str(copy), "--steps", "3"]}[command]
    err = one_line_error(capsys, argv, needle)
    assert "config.json" in err
    assert not (copy / "trace.safetensors").exists() and not (copy / "report").exists()
    assert json.loads((copy / "latest.json").read_text())["step"] == 2  # no training happened


# ------------------------------------------------------------------------------------------ checkpoints
def _ckpt(run: Path) -> Path:
    return run / json.loads((run / "latest.json").read_text())["checkpoint"]


def _resume_error(capsys, run: Path, *needles: str) -> None:
    one_line_error(capsys, ["train", "--resume", str(run), "--steps", "3"], *needles)
    assert json.loads((run / "latest.json").read_text())["step"] == 2


def test_optimizer_state_of_another_shape(copy, capsys):
    path = _ckpt(copy) / "optimizer.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("exp_avg"))
    tensors[key] = torch.zeros(3, 5)
    save_file(tensors, str(path), metadata=meta)
    _resume_error(capsys, copy, "optimizer", key)


@pytest.mark.parametrize("rng", [{}, {"torch": torch.zeros(7, dtype=torch.uint8)}, {"other": torch.zeros(1)}])
def test_rng_state_missing_or_missized(copy, capsys, rng):
    path = _ckpt(copy) / "rng.safetensors"
    save_file(rng, str(path)) if rng else path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    _resume_error(capsys, copy, "RNG state")


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("batches"), "batches"),
    (lambda s: s.update(step=-3), "step"),
    (lambda s: s.update(step="7"), "step"),
    (lambda s: s.update(batches={"seed": 0}), "batches.step"),
])
def test_bad_checkpoint_state(copy, capsys, edit, needle):
    path = _ckpt(copy) / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    _resume_error(capsys, copy, "state.json", needle)


def test_folder_in_place_of_weights(copy, capsys):
    (_ckpt(copy) / "model.safetensors").unlink()
    (_ckpt(copy) / "model.safetensors").mkdir()
    _resume_error(capsys, copy, "model.safetensors")
    (copy / "model.safetensors").unlink()
    (copy / "model.safetensors").mkdir()
    one_line_error(capsys, ["eval", str(copy)], "model.safetensors")


def test_latest_json_pointing_outside_the_run(copy, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    shutil.copytree(_ckpt(copy), outside)
    (copy / "latest.json").write_text(json.dumps({"step": 2, "checkpoint": "../elsewhere"}))
    one_line_error(capsys, ["train", "--resume", str(copy), "--steps", "3"], "outside")
    (copy / "latest.json").write_text(json.dumps({"step": 2, "checkpoint": str(outside)}))
    one_line_error(capsys, ["train", "--resume", str(copy), "--steps", "3"], "outside")


def test_stale_temporaries_of_killed_writes_are_removed_on_resume(copy, capsys):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = copy / f".model.safetensors.moekit-{dead}-abc123.tmp"
    stale.write_bytes(b"x" * 100)
    live = temp_sibling(copy / "model.safetensors")  # this process is alive: kept
    users = copy / ".model.safetensors.tmp"  # not a name moekit makes: kept
    users.write_text("mine")
    assert main(["train", "--resume", str(copy), "--steps", "3", "--no-progress"]) == 0
    assert not stale.exists() and live.exists() and users.read_text() == "mine"
    live.unlink()


def test_remove_stale_temporaries_only_touches_dead_writers(tmp_path):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # the write's own temporary is gone
    dead = tmp_path / f".a.json.moekit-{2**22 + 7}-zz.tmp"
    dead.write_text("")
    alive = tmp_path / f".a.json.moekit-{os.getpid()}-zz.tmp"
    alive.write_text("")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert alive.exists()


# ------------------------------------------------------------------------------------------ other commands
def test_generate_eval_report_flags(run, capsys):
    one_line_error(capsys, ["generate", str(run), "--temperature", "1e-300"], "--temperature")
    one_line_error(capsys, ["generate", str(run), "--top-p", "1e-300"], "--top-p")
    one_line_error(capsys, ["eval", str(run), "--batch-size", "0"], "--batch-size")
    one_line_error(capsys, ["report", str(run), "--resamples", "1000000000"], "--resamples")
    assert not (run / "report").exists() and not (run / "trace.safetensors").exists()
    one_line_error(capsys, ["compare", "--methods", ""], "--methods")
    one_line_error(capsys, ["compare", "--methods", ",", "--out", "never"], "--methods")
    one_line_error(capsys, ["bench", "--device", "tpu"], "--device")
    assert not Path("never").exists()


def test_trace_out_is_a_folder_or_below_a_file(run, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    one_line_error(capsys, ["trace", str(run), "--out", str(tmp_path / "dir")], "folder")
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, ["trace", str(run), "--out", str(tmp_path / "file" / "t.safetensors")], "file")
    (tmp_path / "report-file").write_text("x")
    one_line_error(capsys, ["report", str(run), "--out", str(tmp_path / "report-file")], "report-file")
    assert (tmp_path / "report-file").read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs permissions that bind the user")
def test_read_only_destination_is_one_line(run, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        one_line_error(capsys, ["trace", str(run), "--out", str(ro / "t.safetensors"), "--max-windows", "2"],
                       str(ro))
        one_line_error(capsys, ["train", *TINY, "--data", "data.txt", "--out", str(ro), "--name", "x"], str(ro))
    finally:
        ro.chmod(stat.S_IRWXU)
    assert list(ro.iterdir()) == []


# ------------------------------------------------------------------------------------------ export
def test_export_never_touches_a_users_tmp_folder(run, tmp_path, capsys):
    out = tmp_path / "hf"
    users = tmp_path / "hf.tmp"
    users.mkdir()
    (users / "precious.txt").write_text("keep me")
    old = tmp_path / "hf.old"
    old.mkdir()
    assert main(["export", str(run), str(out)]) == 0
    assert (out / "config.json").is_file()
    assert main(["export", str(run), str(out), "--force"]) == 0
    assert (users / "precious.txt").read_text() == "keep me" and old.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.old", "hf.tmp"]


def test_export_refuses_the_run_itself(copy, capsys):
    weights = (copy / "model.safetensors").read_bytes()
    one_line_error(capsys, ["export", str(copy), str(copy), "--force"], "outside the run")
    one_line_error(capsys, ["export", str(copy), str(copy / "hf"), "--force"], "outside the run")
    one_line_error(capsys, ["export", str(copy), str(copy.parent), "--force"], "outside the run")
    assert (copy / "model.safetensors").read_bytes() == weights


# ------------------------------------------------------------------------------------------ inspect
def _checkpoint(folder: Path, config: dict, tensors: dict | None = None, index: dict | None = None) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors or {"model.layers.0.mlp.experts.down_proj": torch.zeros(4, 2, 3)},
                  str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("architectures", [7, {"a": 1}])
def test_inspect_bad_architectures(tmp_path, capsys, architectures):
    folder = _checkpoint(tmp_path / "c", {"architectures": architectures, "num_experts_per_tok": 2})
    one_line_error(capsys, ["inspect", str(folder)], "architectures")


def test_inspect_string_architectures(tmp_path, capsys):
    folder = _checkpoint(tmp_path / "c", {"architectures": "OlmoeForCausalLM", "num_experts_per_tok": 2})
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "OlmoeForCausalLM"


@pytest.mark.parametrize("value", [3, "../outside.safetensors", None])
def test_inspect_bad_weight_map(tmp_path, capsys, value):
    folder = _checkpoint(tmp_path / "c", {"model_type": "x"}, index={"weight_map": {"w": value}})
    one_line_error(capsys, ["inspect", str(folder)], "weight_map")


def _crafted(folder: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("shape, offsets, needle", [
    ([0, 2, 3], [0, 0], "no experts"),
    ([-4, 2, 3], [0, 96], "bad entry"),
    ([10**9, 10**9, 10**3], [0, 96], "data_offsets"),  # 4,000,000 TB claimed by a 96-byte file
])
def test_inspect_crafted_expert_headers(tmp_path, capsys, shape, offsets, needle):
    folder = _checkpoint(tmp_path / "c", {"model_type": "x", "num_experts_per_tok": 1})
    _crafted(folder, {"model.layers.0.mlp.experts.down_proj": {"dtype": "F32", "shape": shape,
                                                               "data_offsets": offsets}}, bytes(96))
    one_line_error(capsys, ["inspect", str(folder)], needle)
