"""End-to-end CLI tests of train / resume / eval / generate on a tiny configuration (seconds, not minutes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit.cli import main

TINY = ["--batch-size", "4", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "32", "--num-experts", "4", "--checkpoint-every", "5",
        "--final-eval-windows", "4", "--max-seq-len", "128", "--no-progress"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def _train(*extra) -> int:
    return main(["train", *TINY, *extra])


def test_train_writes_run_folder_and_resume_is_bit_exact(capsys):
    assert _train("--name", "full", "--steps", "10", "--bias-update", "sign", "--aux-loss", "global") == 0
    run = Path("runs/full")
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "latest.json"):
        assert (run / name).is_file(), name
    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    assert (ckpt / "optimizer.safetensors").is_file() and (ckpt / "state.json").is_file()
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "bits_per_byte", "max_vio", "load", "tokens_per_s"} <= set(rec)
    assert len(rec["load"]) == 2 and len(rec["load"][0]) == 4
    assert "order-0 (unigram) baseline" in capsys.readouterr().err

    assert _train("--name", "part", "--steps", "5", "--bias-update", "sign", "--aux-loss", "global") == 0
    assert main(["train", "--resume", "runs/part", "--steps", "10", "--no-progress"]) == 0
    full, part = _losses(run), _losses(Path("runs/part"))
    assert len(full) == 10 and full == part  # identical floats, not merely close


def test_eval_json_schema(capsys):
    assert _train("--name", "e", "--steps", "3") == 0
    capsys.readouterr()
    assert main(["eval", "runs/e", "--json", "--max-windows", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("loss", "bits_per_byte", "perplexity", "unigram_bits_per_byte"):
        assert isinstance(out[key], float)
    assert out["domains"] and all(isinstance(d["bits_per_byte"], float) and isinstance(d["tokens"], int)
                                  for d in out["domains"].values())
    assert abs(out["perplexity"] - torch.tensor(out["loss"]).exp().item()) < 1e-6 * out["perplexity"]


def test_generate_greedy_same_with_and_without_cache(capsys):
    assert _train("--name", "g", "--steps", "3") == 0
    capsys.readouterr()
    args = ["generate", "runs/g", "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "40"]
    assert main(args) == 0
    cached = capsys.readouterr()
    assert main(args + ["--no-cache"]) == 0
    uncached = capsys.readouterr()
    assert cached.out == uncached.out and cached.out.startswith("def ")
    assert "tokens" in cached.err


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_one_line_exit_2(capsys, tmp_path):
    assert "does not exist" in _one_line_error(capsys, ["train", *TINY, "--data", "nope/missing"])
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["train", *TINY, "--data", str(tmp_path / "empty"), "--name", "x"])
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[model]\nwidth = 3\n")
    assert "width" in _one_line_error(capsys, ["train", "--config", str(cfg), "--name", "y"])
    cfg.write_text("[optimizer]\nlr = 1\n")
    assert "optimizer" in _one_line_error(capsys, ["train", "--config", str(cfg), "--name", "y"])
    assert "top_k" in _one_line_error(capsys, ["train", *TINY, "--top-k", "9", "--name", "z"])
    assert "does not exist" in _one_line_error(capsys, ["eval", "runs/none"])


def test_damaged_runs_are_refused_and_left_alone(capsys):
    assert _train("--name", "r", "--steps", "3") == 0
    run = Path("runs/r")
    capsys.readouterr()
    # an existing run folder is never overwritten by a new training run
    before = (run / "model.safetensors").read_bytes()
    assert "already exists" in _one_line_error(capsys, ["train", *TINY, "--name", "r", "--steps", "3"])
    assert (run / "model.safetensors").read_bytes() == before
    # truncated weights
    (run / "model.safetensors").write_bytes(before[: len(before) // 2])
    assert "truncated" in _one_line_error(capsys, ["eval", str(run)])
    # another format version
    cfg = json.loads((run / "config.json").read_text())
    cfg["version"] = 99
    (run / "config.json").write_text(json.dumps(cfg))
    assert "version" in _one_line_error(capsys, ["generate", str(run)])
    assert json.loads((run / "config.json").read_text())["version"] == 99


def test_non_finite_loss_stops_and_keeps_last_checkpoint(capsys):
    # a learning rate this large makes the loss overflow within a few steps
    code = main(["train", *TINY, "--name", "nan", "--steps", "40", "--lr", "1e30", "--warmup-steps", "0",
                 "--grad-clip", "0"])
    err = capsys.readouterr().err
    # it diverges before the first checkpoint (step 5): the message must not name a checkpoint that does not exist
    assert code == 1 and "non-finite" in err and "no checkpoint was saved" in err and "step 0" not in err
    assert (Path("runs/nan") / "config.json").is_file() and not (Path("runs/nan") / "latest.json").exists()


def test_ctrl_c_saves_checkpoint_and_resume_matches(capsys, monkeypatch):
    from moekit.train.loop import Trainer

    assert _train("--name", "ref", "--steps", "8") == 0
    real_step = Trainer.train_step

    def interrupted(self):
        if self.step == 6:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert _train("--name", "int", "--steps", "8") == 130
    assert "--resume" in capsys.readouterr().err
    run = Path("runs/int")
    assert json.loads((run / "latest.json").read_text())["step"] == 6
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _losses(run) == _losses(Path("runs/ref"))


def test_trace_and_report(capsys):
    import re

    from moekit.trace import load_trace

    assert _train("--name", "t", "--steps", "4") == 0
    run = Path("runs/t")
    assert main(["trace", str(run), "--out", "tr.safetensors", "--logits", "--max-windows", "6"]) == 0
    trace = load_trace("tr.safetensors")
    assert trace.num_layers == 2 and trace.has_logits
    assert trace.num_tokens % 32 == 0 and 0 < trace.num_tokens <= 6 * 32  # full windows only
    # the routing recorded equals a fresh forward's routing of the first window
    from moekit.train import load_run

    model, _ = load_run(run)
    with torch.no_grad():
        model(trace.tokens[:32].long().unsqueeze(0))
    first = model.model.layers[0].mlp.last_routing
    assert torch.equal(trace.experts[0, :32, 0].long(), first.topk_ids[:, 0])
    capsys.readouterr()
    assert main(["report", str(run)]) == 0  # traces the run first, then reports on trace + metrics
    out = capsys.readouterr().out
    assert "MaxVio" in out
    html = (run / "report" / "index.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert images and all((run / "report" / src).stat().st_size > 0 for src in images)
    assert "nope" in _one_line_error(capsys, ["report", "tr.safetensors", "--groups", "nope,json"])
    Path("bad.safetensors").write_bytes(b"not a trace")
    _one_line_error(capsys, ["report", "bad.safetensors"])


def test_compare_writes_table(capsys):
    out = Path("cmp")
    assert main(["compare", "--quick", "--steps", "4", "--methods", "hash,topk,lossfree", "--out", str(out),
                 "--no-progress"]) == 0
    table = json.loads((out / "compare.json").read_text())["results"]
    assert [r["method"] for r in table] == ["topk", "hash", "lossfree"]  # the baseline first
    assert table[0]["step_time_vs_topk"] == 1.0
    for r in table:
        assert 0 <= r["fluctuation_rate"] <= 1 and r["val_bits_per_byte"] > 0 and r["max_vio_worst"] >= 0
    md = (out / "compare.md").read_text()
    assert md.count("\n| ") == 4 and (out / "compare_val_bits_per_byte.png").stat().st_size > 0
    capsys.readouterr()
    assert "unknown method" in _one_line_error(capsys, ["compare", "--methods", "nope"])
