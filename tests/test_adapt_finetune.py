"""``moekit finetune`` (full / routers only / RoMA), domain selection of training and evaluation.

References: the source run's weights file (bit-equality of every non-router tensor), an uninterrupted run
(bit-exact resume), the files themselves (domain selection), :func:`moekit.adapt.roma_loss` (RoMA term
computed by a separate forward pass).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from moekit.io import load_safetensors

TINY = ["--batch-size", "2", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "16", "--num-experts", "4", "--max-seq-len", "64",
        "--final-eval-windows", "2", "--no-progress", "--steps", "2"]


def _folder(root):
    """Three domains (subfolders), a few files each; domain c is tiny."""
    for d, text in (("a", "def f(x):\n    return x * 2 + 1\n"), ("b", "The cat sat on the mat. It was warm.\n")):
        (root / d).mkdir(parents=True)
        for i in range(6):
            (root / d / f"{i}.txt").write_text(f"# file {i}\n" + text * (60 + 7 * i))
    (root / "c").mkdir()
    (root / "c" / "0.txt").write_text("tiny\n")
    (root / "c" / "1.txt").write_text("tiny too\n")
    return root


@pytest.fixture
def env(tmp_path, monkeypatch, capsys):
    from moekit.cli import main

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data")
    assert main(["train", *TINY, "--data", "data", "--name", "src", "--exclude-domains", "b"]) == 0
    capsys.readouterr()
    return main, tmp_path, capsys


def _one_error(capsys, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_routers_only_changes_only_router_tensors(env):
    main, tmp, capsys = env
    assert main(["finetune", "runs/src", "runs/ft", "--data", "domain:b", "--routers-only", "--steps", "3",
                 "--lr", "0.01", "--no-progress"]) == 0
    before, after = load_safetensors(tmp / "runs/src/model.safetensors"), load_safetensors(tmp / "runs/ft/model.safetensors")
    assert before.keys() == after.keys()
    routers = [k for k in before if ".mlp.gate." in k]
    assert routers and all(not torch.equal(before[k], after[k]) for k in routers)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in routers)
    cfg = json.loads((tmp / "runs/ft/config.json").read_text())
    assert cfg["finetune"]["trainable"] == "routers" and cfg["data"]["include_domains"] == ["b"]
    # full fine-tuning changes the rest too
    assert main(["finetune", "runs/src", "runs/full", "--data", "domain:b", "--steps", "2", "--no-progress"]) == 0
    full = load_safetensors(tmp / "runs/full/model.safetensors")
    assert not torch.equal(full["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_resume_is_bit_exact_and_roma_is_logged(env):
    main, tmp, capsys = env
    args = ["--data", "domain:b", "--routers-only", "--roma", "5", "--steps", "4", "--checkpoint-every", "2",
            "--no-progress"]
    assert main(["finetune", "runs/src", "runs/a", *args]) == 0
    shutil.copytree(tmp / "runs/a", tmp / "runs/b")
    (tmp / "runs/b/latest.json").write_text(json.dumps({"step": 2, "checkpoint": "checkpoints/step-0000002"}))
    (tmp / "runs/b/model.safetensors").unlink()
    assert main(["finetune", "runs/src", "runs/b", "--resume", "--no-progress"]) == 0
    a, b = load_safetensors(tmp / "runs/a/model.safetensors"), load_safetensors(tmp / "runs/b/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def records(run):
        out = []
        for line in (tmp / run / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.append({k: v for k, v in rec.items() if k not in ("tokens_per_s", "step_time_s", "time")})
        return out

    ra, rb = records("runs/a"), records("runs/b")
    assert ra == rb and all("roma" in r and r["roma"] >= 0 for r in ra if "loss" in r)


def test_bad_finetune_input(env):
    main, tmp, capsys = env
    for argv, needle in ((["--data", "domain:c"], "too few for one batch"),
                         (["--data", "domain:zz"], "zz"),
                         (["--data", "domain:b", "--roma", "-1"], "--roma"),
                         (["--data", "domain:b", "--steps", "0"], "--steps"),
                         ([], "--data")):
        assert main(["finetune", "runs/src", "runs/x", *argv, "--no-progress"]) == 2, argv
        _one_error(capsys, needle)
        assert not (tmp / "runs/x").exists()
    assert main(["train", *TINY, "--data", "data", "--name", "y", "--exclude-domains", "nope"]) == 2
    _one_error(capsys, "nope")
    assert not (tmp / "runs/y").exists()


def test_roma_regulariser_matches_roma_loss():
    from moekit.adapt import roma_loss
    from moekit.adapt.finetune import RomaRegulariser
    from moekit.model import ModelConfig, MoELM

    torch.manual_seed(0)
    model = MoELM(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.3,
                              moe=dict(hidden_dim=16, num_experts=4, top_k=2, norm_topk=True))).eval()
    ids_NL = torch.randint(0, 256, (6, 17), generator=torch.Generator().manual_seed(1))
    reg = RomaRegulariser(model, lam=2.0, k=2)
    model(ids_NL[:, :-1])
    value = reg(model, ids_NL[:, :-1], ids_NL[:, 1:])
    _, parts = roma_loss(model, ids_NL, lam=2.0, k=2)
    assert float(value.detach()) == pytest.approx(2.0 * parts["roma"], rel=1e-5)
    assert reg.metrics()["roma"] == pytest.approx(parts["roma"], rel=1e-5)


def test_select_domains_keeps_exactly_the_chosen_documents(tmp_path, monkeypatch):
    from moekit.data import BOS_ID, EOS_ID, load_corpus
    from moekit.data.select import select_domains

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "data")
    full = load_corpus(str(root))
    for include, exclude in ((["a"], None), (None, ["a"]), (["a", "c"], ["c"])):
        sub = select_domains(full, include, exclude)
        kept = [d for d in full.domains if (include is None or d in include) and d not in (exclude or [])]
        assert sub.domains == kept
        for split in ("train", "val"):
            want = [d["path"] for d in full.documents(split) if full.domains[d["domain"]] in kept]
            docs = sub.documents(split)
            assert [d["path"] for d in docs] == want
            tokens = sub.tokens(split)
            assert len(tokens) == sum(d["length"] for d in docs)
            for d in docs:
                raw = (root / d["path"]).read_bytes() if full.index["split_mode"] == "file" else None
                got = tokens[d["offset"]:d["offset"] + d["length"]].tolist()
                if raw is not None:
                    assert got == [BOS_ID, *raw, EOS_ID]
                assert sub.domains[d["domain"]] == d["path"].split("/")[0]
    with pytest.raises(ValueError, match="zz"):
        select_domains(full, ["zz"])
    with pytest.raises(ValueError, match="no domain"):
        select_domains(full, ["a"], ["a"])


def test_train_exclude_and_eval_domains(env):
    main, tmp, capsys = env
    from moekit.data.select import corpus_for_run

    cfg = json.loads((tmp / "runs/src/config.json").read_text())
    assert cfg["data"]["exclude_domains"] == ["b"] and corpus_for_run(cfg).domains == ["a", "c"]
    assert main(["eval", "runs/src", "--json"]) == 0
    allv = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(allv["domains"]) == {"a", "b", "c"}  # eval defaults to the whole data, held-out domains included
    assert main(["eval", "runs/src", "--json", "--domains", "b"]) == 0
    only = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(only["domains"]) == {"b"} and only["tokens"] == allv["domains"]["b"]["tokens"]
    assert main(["eval", "runs/src", "--domains", "zz"]) == 2
    _one_error(capsys, "zz")
