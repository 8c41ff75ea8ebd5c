"""Plugins (``--plugin FILE.py`` / ``$MOEKIT_PLUGINS``): a router registered in the user's own file is usable by
every command, recorded in the run's config.json so later commands find it, and ``compare`` takes methods added
with ``moekit.compare.register_method``. Also the help of ``moekit train`` (real defaults, router names) and the
``--router-options`` format error.

The plugin router sends every token to the *last* ``top_k`` experts with equal weights, so the tests can check
from the recorded routing (an independent observation) that the plugin's router is the one that ran.
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

import moekit
from moekit import compare, plugins, routing
from moekit.cli import main

TINY = ["--batch-size", "2", "--seq-len", "16", "--dim", "16", "--n-layers", "1", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "16", "--num-experts", "4", "--checkpoint-every", "3",
        "--final-eval-windows", "2", "--max-seq-len", "64", "--no-progress", "--steps", "3"]

ROUTER = "last_experts_plugin_test"
METHOD = "last-experts-plugin-test"

PLUGIN = f'''
import torch
import moekit
from moekit.routing import register
from moekit.routing.base import Router, Routing


@register({ROUTER!r})
class LastExperts(Router):
    """Every token to the last top_k experts, weight 1/top_k each."""

    def forward(self, x_TD, ctx=None):
        T = x_TD.shape[0]
        ids = torch.arange(self.num_experts - self.top_k, self.num_experts, device=x_TD.device).expand(T, -1)
        w = torch.full((T, self.top_k), 1.0 / self.top_k, device=x_TD.device)
        return Routing.from_topk(ids.contiguous(), w, self.num_experts)


moekit.compare.register_method({METHOD!r}, "plugin router", router={ROUTER!r}, aux_loss=None)
'''


def _forget_plugins():
    """What a new process would look like: the plugin's router, method and module unknown."""
    routing._ROUTERS.unregister(ROUTER)
    compare.METHODS.pop(METHOD, None)
    for path in list(plugins._LOADED):
        if "plugin" in Path(path).parent.name or Path(path).name.startswith("my_"):
            plugins._LOADED.pop(path)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOEKIT_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)
    _forget_plugins()
    yield
    _forget_plugins()


@pytest.fixture
def plugin_file(tmp_path) -> Path:
    folder = tmp_path / "plugin_dir"
    folder.mkdir()
    path = folder / "my_router.py"
    path.write_text(textwrap.dedent(PLUGIN))
    return path


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_router_unknown_without_plugin(capsys):
    assert "unknown router" in _one_line_error(capsys, ["train", *TINY, "--router", ROUTER, "--name", "x"])


def test_plugin_router_trains_and_later_commands_load_it(capsys, plugin_file):
    assert main(["train", *TINY, "--plugin", str(plugin_file), "--router", ROUTER, "--name", "p"]) == 0
    run = Path("runs/p")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["plugins"] == [str(plugin_file.resolve())]
    assert cfg["model"]["moe"]["router"] == ROUTER

    _forget_plugins()  # as a new process: eval, trace and report find the plugin through config.json
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--max-windows", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_byte"] > 0

    _forget_plugins()
    assert main(["trace", str(run), "--out", "tr.safetensors", "--max-windows", "2"]) == 0
    from moekit.trace import load_trace

    trace = load_trace("tr.safetensors")
    experts = trace.experts[0].long()  # [T, K]: the plugin's rule, the last two of four experts for every token
    assert torch.equal(experts.sort(dim=-1).values, torch.tensor([2, 3]).expand_as(experts))

    _forget_plugins()
    assert main(["report", str(run), "--resamples", "10"]) == 0

    _forget_plugins()  # resume finds it too, and keeps it recorded
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["plugins"] == [str(plugin_file.resolve())]


def test_missing_recorded_plugin_is_one_line_exit_2(capsys, plugin_file):
    assert main(["train", *TINY, "--plugin", str(plugin_file), "--router", ROUTER, "--name", "gone"]) == 0
    capsys.readouterr()
    _forget_plugins()
    plugin_file.unlink()
    for argv in (["eval", "runs/gone"], ["trace", "runs/gone"], ["generate", "runs/gone"],
                 ["train", "--resume", "runs/gone", "--no-progress"]):
        err = _one_line_error(capsys, argv)
        assert "no longer exists" in err and str(plugin_file.resolve()) in err


def test_env_variable_and_help_lists_plugin_router(capsys, plugin_file, monkeypatch, tmp_path):
    other = tmp_path / "plugin_dir" / "my_other.py"
    other.write_text("LOADED = True\n")
    monkeypatch.setenv("MOEKIT_PLUGINS", os.pathsep.join([str(plugin_file), "", str(other)]))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ROUTER in out and "--plugin" in out
    assert main(["train", *TINY, "--router", ROUTER, "--name", "env"]) == 0
    assert json.loads(Path("runs/env/config.json").read_text())["plugins"] == [str(plugin_file.resolve()),
                                                                             str(other.resolve())]


def test_bad_plugin_files_are_one_line_errors(capsys, tmp_path):
    assert "does not exist" in _one_line_error(capsys, ["train", "--plugin", "nope.py", "--name", "x"])
    bad = tmp_path / "plugin_dir"
    bad.mkdir()
    (bad / "my_broken.py").write_text("raise RuntimeError('plugin is broken')\n")
    err = _one_line_error(capsys, ["eval", "runs/x", "--plugin", str(bad / "my_broken.py")])
    assert "RuntimeError" in err and "plugin is broken" in err
    (bad / "my_syntax.py").write_text("def (:\n")
    assert "SyntaxError" in _one_line_error(capsys, ["train", f"--plugin={bad / 'my_syntax.py'}", "--name", "y"])


def test_plugin_executes_once_per_process(tmp_path):
    folder = tmp_path / "plugin_dir"
    folder.mkdir()
    counter = folder / "my_counter.py"
    counter.write_text("import builtins\nbuiltins._moekit_plugin_runs = getattr(builtins, '_moekit_plugin_runs', 0) + 1\n")
    import builtins

    builtins._moekit_plugin_runs = 0
    try:
        assert plugins.load_plugins([counter, str(counter), folder / ".." / "plugin_dir" / "my_counter.py"]) == \
            [str(counter.resolve())]
        assert builtins._moekit_plugin_runs == 1
    finally:
        del builtins._moekit_plugin_runs


def test_compare_with_registered_method(capsys, plugin_file):
    out = Path("cmp")
    assert main(["compare", "--plugin", str(plugin_file), "--quick", "--steps", "4", "--methods", f"topk,{METHOD}",
                 "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "compare.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["topk", METHOD]
    assert rows[1]["router"] == ROUTER
    # fixed routing: the top-1 expert of every probe token is the same one at both checkpoints
    assert rows[1]["fluctuation_rate"] == 0.0
    assert json.loads((out / METHOD / "config.json").read_text())["plugins"] == [str(plugin_file.resolve())]


def test_register_method_validates():
    compare.register_method(METHOD, router="topk", aux_loss="sequence")
    try:
        assert compare.METHODS[METHOD][1] == {"router": "topk", "aux_loss": "sequence"}
        with pytest.raises(ValueError, match="already registered"):
            compare.register_method(METHOD, router="topk")
        compare.register_method(METHOD, router="hash", replace=True)
        assert compare.METHODS[METHOD][1]["router"] == "hash"
        with pytest.raises(ValueError, match="nope"):
            compare.register_method("other-test-method", nope=1)
        assert "other-test-method" not in compare.METHODS
    finally:
        compare.unregister_method(METHOD)
    assert moekit.compare is compare


def test_train_help_prints_the_real_defaults(capsys):
    from moekit.model import ModelConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    norm = next(i for i, ln in enumerate(lines) if "--norm-topk" in ln and ln.strip().startswith("--norm-topk"))
    text = " ".join(lines[norm:norm + 2])
    assert f"default {ModelConfig().moe.norm_topk!r}" in text and ModelConfig().moe.norm_topk is True
    flat = " ".join(out.split())
    assert all(name in flat for name in routing.names())
    assert "switch, sequence, global" in flat and "JSON object" in flat


def test_router_options_must_be_a_json_object(capsys):
    for text, problem in (("{capacity: 2}", "double quotes"), ("[1, 2]", "list")):
        with pytest.raises(SystemExit) as exc:  # argparse's own error path: one line, exit code 2
            main(["train", *TINY, "--router-options", text, "--name", "x"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--router-options" in err and "JSON object" in err and problem in err
