"""``moekit prune`` on transformers checkpoints (Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE with a shared expert,
DeepSeek-V3): the output is an ordinary checkpoint that plain transformers reloads, with logits equal to the
in-memory pruned model and (softmax routers) to the original model whose dropped experts' logits are -inf."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.cli import main  # noqa: E402
from moekit.hf import prune_io as H  # noqa: E402
from moekit.hf import surgery  # noqa: E402
from moekit.hf.record import find_moe_blocks  # noqa: E402

D, F, V = 16, 8, 64
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _config(name):
    T = transformers
    if name == "qwen3":
        return T.Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=F, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
    if name == "olmoe":
        return T.OlmoeConfig(**COMMON, intermediate_size=F, num_experts=8, num_experts_per_tok=2)
    if name == "mixtral":
        return T.MixtralConfig(**COMMON, intermediate_size=F, num_local_experts=8, num_experts_per_tok=2)
    if name == "qwen2":
        return T.Qwen2MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=F,
                                shared_expert_intermediate_size=F, num_experts=8, num_experts_per_tok=2)
    if name == "dsv3":
        return T.DeepseekV3Config(**dict(COMMON, num_key_value_heads=2), intermediate_size=24, moe_intermediate_size=F, n_routed_experts=8,
                                  num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                                  first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                                  qk_nope_head_dim=4, v_head_dim=8, rope_scaling=None, routed_scaling_factor=2.5,
                                  norm_topk_prob=True)
    return T.LlamaConfig(**COMMON, intermediate_size=F)  # dense: no experts class


def _save(name, folder: Path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(name)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in find_moe_blocks(model):
            b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=g))
    model.save_pretrained(folder)
    return model


@pytest.fixture
def text(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "text.txt"
    p.write_text("".join(rng.choice(list("abcdefghij klmnop\n(){}"), 3000)))
    return str(p)


@pytest.mark.parametrize("name", ["qwen3", "olmoe", "mixtral", "qwen2", "dsv3"])
def test_pruned_checkpoint_reloads_with_equal_logits(name, tmp_path, text):
    src, out = tmp_path / "src", tmp_path / "out"
    model = _save(name, src)
    method = "dern" if name == "mixtral" else "reap"
    assert main(["prune", str(src), str(out), "--method", method, "--keep", "0.5", "--calib-data", text,
                 "--calib-tokens", "600", "--no-progress", "--allow-undercalibrated"]) == 0
    rec = json.loads((out / "moekit_compression.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    blocks = H.hf_blocks(model)
    keep = [rec["kept"][b.name] for b in blocks]
    assert all(len(k) == 4 for k in keep)
    assert all(b.num_experts == 4 for b in find_moe_blocks(reloaded))
    counts = {k: v for k, v in reloaded.config.to_dict().items() if k in H.COUNT_KEYS}
    assert counts and all(v == 4 for v in counts.values())
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) < sum(f.stat().st_size for f in src.glob("*.safetensors"))
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(5))
    if method == "dern":  # the in-memory model needs the same calibration: rebuild it from the same statistics
        return _check_dern(model, blocks, keep, reloaded, ids, text, src)
    ours = H.prune_hf(model, blocks, keep)
    with torch.no_grad():
        got = reloaded(ids).logits
        torch.testing.assert_close(got, ours(ids).logits, rtol=1e-5, atol=1e-5)
        if name != "dsv3":  # softmax routers: pruning == the original with the dropped experts' logits at -inf
            surgery.replace_routers(model, "topk")
            for a, b, k in zip(surgery.adapters(model), blocks, keep):
                off = torch.full_like(a.router.logit_offset, float("-inf"))
                off[k] = 0.0
                a.router.logit_offset.copy_(off)
            torch.testing.assert_close(got, model(ids).logits, rtol=1e-4, atol=1e-4)


def _check_dern(model, blocks, keep, reloaded, ids, text, src):
    batches = H.calibration_batches_hf(src, model, 64, 600, text_path=text)
    stats = H.calibrate_hf(model, blocks, batches)
    ours = H.prune_hf(model, blocks, keep, method="dern", stats=stats)
    plain = H.prune_hf(model, blocks, keep)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(reloaded(ids).logits, plain(ids).logits)  # segments were merged


def test_hf_calibration_scores_match_a_slow_loop(tmp_path, text):
    model = _save("olmoe", tmp_path / "m")
    blocks = H.hf_blocks(model)
    ids = torch.randint(3, V, (1, 12), generator=torch.Generator().manual_seed(3))
    stats = H.calibrate_hf(model, blocks, [{"input_ids": ids, "attention_mask": None}])
    # reference: the block's router on the block's inputs, each expert run alone
    seen = {}
    def grab(_module, args):
        seen["x"] = args[0].reshape(-1, D)

    h = blocks[0].block.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(ids)
    h.remove()
    x = seen["x"]
    with torch.no_grad():
        probs = torch.softmax(x @ blocks[0].router.weight.T, -1)
        w, idx = probs.topk(2, dim=-1)
        count, reap = torch.zeros(8), torch.zeros(8, dtype=torch.float64)
        ex = blocks[0].experts
        for t in range(x.shape[0]):
            for slot in range(2):
                e = int(idx[t, slot])
                gu = ex.gate_up_proj[e] @ x[t]
                y = ex.down_proj[e] @ (torch.nn.functional.silu(gu[:F]) * gu[F:])
                count[e] += 1
                reap[e] += float(w[t, slot] / w[t].sum()) * float(y.norm())
    assert stats[0]["count_E"].tolist() == count.long().tolist()
    torch.testing.assert_close(stats[0]["reap_E"], reap / count.clamp(min=1).double(), rtol=1e-4, atol=1e-6)


def test_dense_architecture_one_line_exit_2(tmp_path, text, capsys):
    _save("llama", tmp_path / "dense")
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "dense"), str(tmp_path / "o"), "--method", "frequency", "--keep", "0.5",
                 "--calib-data", text, "--calib-tokens", "600", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no experts class" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "o").exists()
    _save("olmoe", tmp_path / "moe")
    assert main(["prune", str(tmp_path / "moe"), str(tmp_path / "o"), "--method", "naee", "--keep", "0.5",
                 "--calib-data", text]) == 2
    assert "transformers checkpoints can be pruned with" in capsys.readouterr().err
