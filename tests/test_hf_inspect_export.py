"""``moekit inspect`` (headers only) on tiny transformers checkpoints, and ``moekit export --format hf``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.cli import main  # noqa: E402
from moekit.hf.inspect import inspect_checkpoint, read_safetensors_header  # noqa: E402

D, F, V = 16, 8, 64
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _configs():
    T = transformers
    return {
        "olmoe": (T.OlmoeConfig(**COMMON, intermediate_size=F, num_experts=4, num_experts_per_tok=2), 4, 2, 2, 0),
        "mixtral": (T.MixtralConfig(**COMMON, intermediate_size=F, num_local_experts=4, num_experts_per_tok=1),
                    4, 1, 2, 0),
        "qwen3": (T.Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=F, num_experts=6,
                                   num_experts_per_tok=2, head_dim=8), 6, 2, 2, 0),
        "dsv3": (T.DeepseekV3Config(**COMMON, intermediate_size=24, moe_intermediate_size=F, n_routed_experts=8,
                                    num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                                    first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                                    qk_nope_head_dim=4, v_head_dim=8, rope_scaling=None), 8, 2, 1, 1),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, model, E, top_k, MoE layers, shared experts); plus a dense Llama and a sharded Qwen3."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, (cfg, E, k, n_moe, shared) in _configs().items():
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        out[name] = (root / name, model, E, k, n_moe, shared)
    model = out["qwen3"][1]
    model.save_pretrained(root / "sharded", max_shard_size="8KB")
    out["sharded"] = (root / "sharded", *out["qwen3"][1:])
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=24))
    llama.save_pretrained(root / "llama")
    out["llama"] = (root / "llama", llama, 0, 0, 0, 0)
    return out


def _stored_numel(model) -> int:
    """Parameters plus persistent buffers (what save_pretrained stores; e.g. e_score_correction_bias)."""
    params = sum(p.numel() for p in model.parameters())
    param_ids = {id(p) for p in model.parameters()}
    buffers = {n: b for n, b in model.named_buffers() if id(b) not in param_ids}
    state = model.state_dict()
    return params + sum(b.numel() for n, b in buffers.items() if n in state)


@pytest.mark.parametrize("name", ["olmoe", "mixtral", "qwen3", "dsv3", "sharded"])
def test_inspect_counts_match_the_instantiated_model(checkpoints, name):
    folder, model, E, k, n_moe, shared = checkpoints[name]
    info = inspect_checkpoint(folder)
    assert info.total_params == _stored_numel(model)
    if name != "dsv3":
        assert info.total_params == sum(p.numel() for p in model.parameters())
    assert info.num_moe_layers == n_moe and info.experts_per_layer == [E] * n_moe
    assert info.num_experts == E and info.top_k == k and info.num_shared_experts == shared
    assert info.num_layers == 2
    per_expert = 3 * D * F  # gate, up, down projections of a SwiGLU expert
    assert all(L.params_per_expert == per_expert for L in info.moe_layers)
    assert info.bytes_per_expert == per_expert * 4  # float32
    assert info.active_params == info.total_params - n_moe * (E - k) * per_expert
    assert info.memory_bytes == {"16bit": 2 * info.total_params, "8bit": info.total_params,
                                 "4bit": info.total_params // 2}
    if name == "dsv3":
        assert info.moe_layers[0].shared_params == 3 * D * F and info.moe_layers[0].layer == 1
    if name == "sharded":
        assert len(info.files) > 1


def test_inspect_cli_text_and_json(checkpoints, capsys):
    folder = checkpoints["dsv3"][0]
    assert main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "DeepseekV3ForCausalLM" in text and "top-k 2" in text and "1 shared" in text and "4-bit" in text
    assert main(["inspect", str(folder), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["architecture"] == "DeepseekV3ForCausalLM" and obj["num_moe_layers"] == 1
    assert set(obj["memory_bytes"]) == {"16bit", "8bit", "4bit"}


def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_inspect_bad_inputs(checkpoints, tmp_path, capsys):
    assert "config.json is missing" in _error(capsys, "inspect", str(tmp_path))
    assert "does not exist" in _error(capsys, "inspect", str(tmp_path / "nope"))
    assert "dense model" in _error(capsys, "inspect", str(checkpoints["llama"][0]))

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["sharded"][0], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    err = _error(capsys, "inspect", str(broken))
    assert "missing" in err and shard.name in err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoints["qwen3"][0], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    assert "unreadable safetensors header" in _error(capsys, "inspect", str(corrupt))
    with pytest.raises(ValueError, match="not JSON"):
        (corrupt / "x.safetensors").write_bytes((4).to_bytes(8, "little") + b"\xfe\xfe{}")
        read_safetensors_header(corrupt / "x.safetensors")

    nobin = tmp_path / "nobin"
    nobin.mkdir()
    (nobin / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    (nobin / "pytorch_model.bin").write_bytes(b"")
    assert "no model.safetensors" in _error(capsys, "inspect", str(nobin))


# ------------------------------------------------------------------------------------------------ export
TINY = ["--batch-size", "2", "--seq-len", "16", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "32", "--num-experts", "4", "--checkpoint-every", "5",
        "--final-eval-windows", "2", "--max-seq-len", "64", "--no-progress", "--steps", "2"]


@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_export_hf_logits_match(_isolated, capsys):
    assert main(["train", *TINY, "--name", "r", "--out", "runs"]) == 0
    assert main(["export", "runs/r", "--format", "hf", "hf_out"]) == 0
    out = Path("hf_out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not Path("hf_out.tmp").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]

    from moekit.train import load_run

    ours, _ = load_run(Path("runs/r"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    x = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x).float(), hf(x).logits.float()
    assert rel_err(a, b) < 1e-5

    capsys.readouterr()
    err = _error(capsys, "export", "runs/r", "hf_out")
    assert "already exists" in err and "--force" in err
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["export", "runs/r", "hf_out", "--force"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns >= stamp and not Path("hf_out.old").exists()
    Path("empty").mkdir()
    assert main(["export", "runs/r", "empty"]) == 0 and (Path("empty") / "config.json").is_file()


def test_export_refuses_what_qwen3_cannot_express(_isolated, capsys):
    assert main(["train", *TINY, "--name", "h", "--out", "runs", "--router", "hash"]) == 0
    capsys.readouterr()
    err = _error(capsys, "export", "runs/h", "--format", "hf", "hf_out")
    assert "no Qwen3-MoE equivalent" in err and "moe.router='hash'" in err
    assert not Path("hf_out").exists() and not Path("hf_out.tmp").exists()
    assert "does not exist" in _error(capsys, "export", "runs/missing", "x")


def test_export_model_tied_embeddings_and_dense_layers(tmp_path):
    from moekit.hf.export import export_model_hf
    from moekit.model import MoELM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=1, max_seq_len=64, moe_every=2, tie_embeddings=True,
                      init_std=0.2, moe=dict(hidden_dim=16, num_experts=4, top_k=2, norm_topk=False))
    model = MoELM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    export_model_hf(model, tmp_path / "tied")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    info = inspect_checkpoint(tmp_path / "tied")  # the export is itself inspectable
    assert info.num_moe_layers == 1 and info.top_k == 2 and info.total_params == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-5
