"""Per-layer MoE settings (``ModelConfig.moe_overrides``): a model whose MoE layers differ in expert count,
top-k and expert width, through construction, config.json, train/resume/eval/trace/report and export."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.model import ModelConfig, MoELM, count_active_params, count_params, qwen3_incompatibilities

try:
    import transformers
except ImportError:  # transformers is an optional dependency
    transformers = None

# Layers: 0 -> 4 experts top-2, 1 -> 8 experts top-2, 2 -> dense, 3 -> 2 experts top-1 of width 16.
BASE = dict(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, dense_layers=[2],
            moe=dict(hidden_dim=32, num_experts=4, top_k=2, norm_topk=True))
OVERRIDES = {1: {"num_experts": 8}, 3: {"num_experts": 2, "top_k": 1, "hidden_dim": 16, "norm_topk": False}}


def per_layer_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, "moe_overrides": OVERRIDES, **overrides})


# ------------------------------------------------------------------------------------------------ config
def test_model_has_each_layers_shapes_and_routing():
    torch.manual_seed(0)
    cfg = per_layer_config()
    model = MoELM(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected = {0: (4, 32), 1: (8, 32), 3: (2, 16)}  # (experts, hidden width)
    for i, (E, F) in expected.items():
        assert shapes[f"model.layers.{i}.mlp.gate.weight"] == (E, 32)
        assert shapes[f"model.layers.{i}.mlp.experts.gate_up_proj"] == (E, 2 * F, 32)
        assert shapes[f"model.layers.{i}.mlp.experts.down_proj"] == (E, 32, F)
    # layer 2: the dense SwiGLU MLP of width moe.hidden_dim * moe.top_k
    assert shapes["model.layers.2.mlp.gate_proj.weight"] == (64, 32)
    assert not any(n.startswith("model.layers.2.mlp.experts") for n in shapes)
    assert cfg.layer_moe(2) is None and cfg.layer_moe(0) is cfg.moe
    assert (cfg.layer_moe(3).num_experts, cfg.layer_moe(3).top_k, cfg.layer_moe(3).hidden_dim) == (2, 1, 16)
    assert cfg.experts_per_layer == [4, 8, 2]

    ids = torch.randint(0, 256, (2, 9))
    assert model(ids).shape == (2, 9, cfg.vocab_size)
    layers = moekit.moe_layers(model)
    assert [int(layer.load.routed_E.numel()) for layer in layers] == [4, 8, 2]
    assert [int(layer.load.routed_E.sum()) for layer in layers] == [18 * 2, 18 * 2, 18 * 1]  # T * top_k


def test_active_params_count_each_layers_top_k():
    cfg = per_layer_config()
    model = MoELM(cfg)
    per_expert = {0: 3 * 32 * 32, 1: 3 * 32 * 32, 3: 3 * 32 * 16}  # gate_up (2F x D) + down (D x F)
    inactive = (4 - 2) * per_expert[0] + (8 - 2) * per_expert[1] + (2 - 1) * per_expert[3]
    assert count_active_params(model) == count_params(model) - inactive


def test_overrides_equal_to_each_other_behave_as_that_global_setting():
    """Overriding every MoE layer with the same settings builds the model that has them as ``moe``."""
    settings = {"num_experts": 6, "top_k": 3, "hidden_dim": 8}
    base = {**BASE, "dense_hidden_dim": 24}  # the dense layer's default width follows moe, so fix it
    torch.manual_seed(1)
    a = MoELM(ModelConfig(**{**base, "moe_overrides": {0: settings, 1: settings, 3: settings}})).eval()
    torch.manual_seed(1)
    b = MoELM(ModelConfig(**{**base, "moe": {**BASE["moe"], **settings}})).eval()
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("overrides, match", [
    ({4: {"num_experts": 2}}, r"moe_overrides: key 4 is not a layer index in \[0, 4\)"),
    ({"x": {"num_experts": 2}}, r"moe_overrides: key 'x' is not a layer index"),
    ({2: {"num_experts": 2}}, r"moe_overrides: layer 2 has a dense FFN"),
    ({1: {"top_k": 9}}, r"moe_overrides: layer 1: top_k must be in \[1, num_experts=4\]"),
    ({3: {"num_experts": 0}}, r"moe_overrides: layer 3: num_experts must be a positive integer"),
    ({1: {"dim": 16}}, r"moe_overrides: layer 1: dim is the model's width"),
    ({1: {"n_experts": 8}}, r"moe_overrides: layer 1: unknown setting\(s\) n_experts"),
    ({1: 8}, r"moe_overrides: layer 1 must map to a table/dict"),
    ({1: {}, "1": {}}, r"moe_overrides: layer 1 is given twice"),
    ([{"num_experts": 8}], r"moe_overrides must be a dict"),
])
def test_bad_overrides_name_the_field_and_layer(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**BASE, "moe_overrides": overrides})


def test_config_json_round_trip_and_old_config_loads_unchanged():
    cfg = per_layer_config()
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["moe_overrides"] == {"1": OVERRIDES[1], "3": OVERRIDES[3]}
    again = ModelConfig.from_dict(data)
    assert again == cfg and again.moe_overrides == OVERRIDES

    # a config.json written before moe_overrides existed: no such key
    old = {k: v for k, v in ModelConfig(**BASE).to_dict().items() if k != "moe_overrides"}
    loaded = ModelConfig.from_dict(old)
    assert loaded.moe_overrides == {} and loaded == ModelConfig(**BASE)
    assert all(loaded.layer_moe(i) is loaded.moe for i in (0, 1, 3))
    assert loaded.experts_per_layer == [4, 4, 4]


def test_toml_table_with_string_keys(tmp_path):
    from moekit.train import read_toml

    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_layers = 4\ndense_layers = [2]\n\n[model.moe_overrides]\n"
                    "1 = {num_experts = 8}\n3 = {num_experts = 2, top_k = 1}\n")
    table = read_toml(path)["model"]
    assert table["moe_overrides"] == {"1": {"num_experts": 8}, "3": {"num_experts": 2, "top_k": 1}}
    cfg = ModelConfig.from_dict(table)
    assert cfg.experts_per_layer == [16, 8, 2] and cfg.layer_moe(3).top_k == 1


def test_expert_parallel_needs_every_layers_count_divisible():
    from moekit.commands import _layout_experts

    cfg = per_layer_config()
    assert _layout_experts(cfg, 2) == 2  # 4, 8 and 2 experts all split over 2 ranks
    with pytest.raises(ValueError, match=r"expert_parallel=4 does not divide num_experts=2 of layer 3"):
        _layout_experts(cfg, 4)
    assert _layout_experts(ModelConfig(**BASE), 4) == 4


# ------------------------------------------------------------------------------------------------ traces
def test_trace_files_with_and_without_per_layer_counts(tmp_path):
    from safetensors.torch import save_file

    from moekit.trace import TraceFormatError, load_trace, save_trace
    from moekit.trace.format import HEADER_KEY
    from moekit.trace.synthetic import synthetic_trace

    trace = synthetic_trace(num_layers=2, num_tokens=50, num_experts=4, top_k=2)
    path = save_trace(trace, tmp_path / "t.safetensors")
    # a header written before traces could hold per-layer counts: no num_experts_per_layer
    header = {k: v for k, v in trace.header().items() if k != "num_experts_per_layer"}
    save_file(trace.tensors(), str(tmp_path / "old.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    old = load_trace(tmp_path / "old.safetensors")
    assert old.num_experts_per_layer == [4, 4] and torch.equal(old.experts, load_trace(path).experts)
    # a layer with 3 experts cannot list expert 3
    header = {**trace.header(), "num_experts_per_layer": [4, 3]}
    save_file(trace.tensors(), str(tmp_path / "bad.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    assert bool((trace.experts[1] == 3).any())
    with pytest.raises(TraceFormatError, match="expert id >= the layer's number of experts"):
        load_trace(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------------ export
def test_export_refusal_names_the_differing_layers():
    problems = qwen3_incompatibilities(per_layer_config())
    differ = [p for p in problems if "differ" in p]
    assert len(differ) == 1
    assert "num_experts (layer 0: 4, layer 1: 8, layer 3: 2)" in differ[0]
    assert "top_k (layer 0: 2, layer 1: 2, layer 3: 1)" in differ[0]
    assert "hidden_dim (layer 0: 32, layer 1: 32, layer 3: 16)" in differ[0]
    # a router Qwen3-MoE lacks, set on one layer only, is reported for that layer
    hashed = per_layer_config(moe_overrides={1: {"router": "hash", "norm_topk": False}})
    assert any("moe.router='hash' in layer(s) 1" in p for p in qwen3_incompatibilities(hashed))
    dropping = per_layer_config(moe_overrides={0: {"eval_capacity_factor": 1.0}, 3: {"eval_capacity_factor": 1.0}})
    assert any("moe.eval_capacity_factor=1.0 in layer(s) 0, 3" in p for p in qwen3_incompatibilities(dropping))
    assert qwen3_incompatibilities(ModelConfig(**BASE)) == []


@pytest.mark.skipif(transformers is None, reason="transformers is not installed")
def test_export_of_equal_overrides_matches_transformers(tmp_path):
    from moekit.hf.export import export_model_hf

    settings = {"num_experts": 6, "top_k": 3, "hidden_dim": 8, "norm_topk": False}
    cfg = ModelConfig(**{**BASE, "init_std": 0.2, "moe_overrides": {0: settings, 1: settings, 3: settings}})
    torch.manual_seed(0)
    model = MoELM(cfg).eval()
    with torch.no_grad():  # sharper routing than the default initialisation, so top-k choices matter
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    out = export_model_hf(model, tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    experts = hf_cfg.get("num_experts", hf_cfg.get("num_local_experts"))  # transformers spells it either way
    assert (experts, hf_cfg["num_experts_per_tok"], hf_cfg["moe_intermediate_size"]) == (6, 3, 8)
    assert hf_cfg["norm_topk_prob"] is False and hf_cfg["mlp_only_layers"] == [2]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).float(), hf(ids).logits.float()
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


# ------------------------------------------------------------------------------------------------ CLI
TOML = """
[model]
dim = 32
n_layers = 4
n_heads = 2
n_kv_heads = 1
max_seq_len = 128
dense_layers = [2]

[model.moe_overrides]
1 = {num_experts = 8}
3 = {num_experts = 2, top_k = 1, hidden_dim = 16, norm_topk = false}

[moe]
hidden_dim = 32
num_experts = 4
top_k = 2

[train]
batch_size = 4
seq_len = 32
checkpoint_every = 2
final_eval_windows = 4
"""


@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "per_layer.toml").write_text(TOML)
    return tmp_path


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_cli_train_resume_eval_trace_report_export(_isolated, capsys):
    from moekit.trace import load_trace

    train = ["train", "--config", "per_layer.toml", "--no-progress"]
    assert main([*train, "--name", "full", "--steps", "4"]) == 0
    run = Path("runs/full")
    saved = json.loads((run / "config.json").read_text())["model"]
    assert saved["moe_overrides"] == {"1": {"num_experts": 8},
                                      "3": {"num_experts": 2, "top_k": 1, "hidden_dim": 16, "norm_topk": False}}
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert [len(row) for row in first["load"]] == [4, 8, 2]
    assert [sum(row) for row in first["load"]] == [4 * 32 * 2, 4 * 32 * 2, 4 * 32 * 1]

    # resume from the step-2 checkpoint: the same losses as the uninterrupted run
    assert main([*train, "--name", "part", "--steps", "2"]) == 0
    assert main(["train", "--resume", "runs/part", "--steps", "4", "--no-progress"]) == 0
    assert _losses(Path("runs/part")) == _losses(run) and len(_losses(run)) == 4

    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--max-windows", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_byte"] > 0
    generate = ["generate", str(run), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(generate) == 0
    cached = capsys.readouterr().out
    assert main([*generate, "--no-cache"]) == 0
    assert capsys.readouterr().out == cached and cached.startswith("def ")

    assert main(["trace", str(run), "--out", "tr.safetensors", "--max-windows", "4", "--logits"]) == 0
    trace = load_trace("tr.safetensors")
    assert trace.num_experts_per_layer == [4, 8, 2] and trace.num_experts == 8 and trace.top_k == 2
    assert trace.layer_names == ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.3.mlp"]
    for layer, E in enumerate([4, 8, 2]):
        assert int(trace.experts[layer].max()) < E
    assert bool((trace.experts[2, :, 1] == -1).all())  # top-1 layer: second column is padding
    assert bool(torch.isinf(trace.logits[0, :, 4:]).all()) and bool(torch.isfinite(trace.logits[1]).all())
    assert trace.model["num_experts"] == 8 and trace.model["top_k_per_layer"] == [2, 2, 1]

    capsys.readouterr()
    assert main(["report", "tr.safetensors", "--out", "rep", "--resamples", "20"]) == 0
    assert "3 MoE layers x 4/8/2 experts" in capsys.readouterr().out
    assert main(["report", str(run), "--resamples", "20"]) == 0  # trace + metrics.jsonl with ragged loads
    html = (run / "report" / "index.html").read_text()
    assert "train_load.png" in html and "log2 E per layer = 2.00, 3.00, 1.00" in html
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert images and all((run / "report" / src).stat().st_size > 0 for src in images)

    capsys.readouterr()
    err = _one_line_error(capsys, ["export", str(run), "hf_out"])
    assert "no Qwen3-MoE equivalent" in err
    assert "num_experts (layer 0: 4, layer 1: 8, layer 3: 2)" in err and "top_k (" in err
    assert not Path("hf_out").exists() and not Path("hf_out.tmp").exists()


def test_expert_parallel_with_per_layer_counts_matches_one_process(_isolated):
    """torchrun, 2 processes: each layer's experts (2, 8, dense, 4) split over 2 ranks; the losses equal one
    process's (dropless routing); overlap chunks are capped by the layer with the fewest local experts (1, the
    first layer, not the last)."""
    import os
    import subprocess
    import sys

    overrides = {"0": {"num_experts": 2, "top_k": 1, "norm_topk": False}, "1": {"num_experts": 8}}
    args = ["--config", "per_layer.toml", "--no-progress", "--steps", "3", "--moe-overrides", json.dumps(overrides)]
    assert main(["train", *args, "--name", "single"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "moekit",
           "train", *args, "--name", "ep2", "--expert-parallel", "2", "--overlap-chunks", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 overlap chunk(s)" in proc.stderr
    single, ep2 = _losses(Path("runs/single")), _losses(Path("runs/ep2"))
    assert len(single) == len(ep2) == 3
    for step, (a, b) in enumerate(zip(ep2, single), 1):
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)
