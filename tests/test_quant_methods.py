"""Quantisation methods beyond RTN/GPTQ (issue 14): HQQ through the optional ``hqq`` package, EAQuant's shared
smoothing / router KL / balanced calibration and simulated activation quantisation, EBSS self-sampling, MoTE
ternary training, and the compressed-tensors export (read back by the package's own decompression)."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

import moekit
from moekit.compress import eaquant as EA
from moekit.compress import quant as Q
from reference import reference_moe

HAVE_HQQ = Q.hqq_available()
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


# ------------------------------------------------------------------------------------------------ HQQ
@pytest.mark.skipif(not HAVE_HQQ, reason="the optional hqq package is not installed")
@pytest.mark.parametrize("bits", [4, 3, 2, 8])
def test_hqq_round_trip_against_the_package_dequantisation(bits):
    from hqq.core.quantize import Quantizer

    torch.manual_seed(bits)
    w = torch.randn(12, 64) * 0.05
    p = Q.hqq(w, bits, group=32)
    assert p.zero.dtype == torch.float16 and not p.symmetric and p.group == 32
    # the package's own quantisation of the same matrix (its solver is deterministic)
    w_q, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=32, optimize=True, axis=1,
                                   compute_dtype=torch.float32, device="cpu")
    assert torch.equal(p.codes().float(), Q.hqq_codes(w_q, meta))
    # scale and zero stored as float16 (as HQQLinear keeps them): the package's dequantisation with those
    meta = dict(meta, compute_dtype=torch.float32, scale=meta["scale"].half().float(),
                zero=meta["zero"].half().float())
    assert torch.equal(p.dequantize(), Quantizer.dequantize(w_q, meta))
    # and the packed storage really is b bits per weight plus float16 scale and zero per group
    assert p.data.numel() == Q.packed_nbytes(w.numel(), bits)


@pytest.mark.skipif(not HAVE_HQQ, reason="the optional hqq package is not installed")
def test_hqq_experts_forward_uses_the_float16_zero_points():
    torch.manual_seed(0)
    layer = moekit.MoE(dim=32, hidden_dim=16, num_experts=3, top_k=2, aux_loss=None, experts="quantized",
                       experts_options={"bits": 4, "group": 16, "symmetric": False, "zero_dtype": "float16",
                                        "kernel": "dequant"}).double().eval()
    dense = [torch.randn(32, 32) * 0.1, torch.randn(32, 16) * 0.1]
    for e in range(3):
        layer.experts.set_packed("gate_up_proj", e, Q.hqq(dense[0] + e, 4, 16))
        layer.experts.set_packed("down_proj", e, Q.hqq(dense[1] - e, 4, 16))
    w_up, w_down = (w.double() for w in layer.experts.dequantized())
    x = torch.randn(5, 32, dtype=torch.float64)
    ref = reference_moe(x, layer.router.weight.detach(), w_up, w_down, top_k=2)
    assert torch.allclose(layer(x), ref.out, atol=1e-10)


def test_hqq_missing_is_one_line(monkeypatch, tmp_path, capsys):
    from moekit.cli import main

    monkeypatch.setattr(Q, "hqq_available", lambda: False)
    (tmp_path / "run").mkdir()
    assert main(["quantize", str(tmp_path / "run"), str(tmp_path / "out"), "--method", "hqq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hqq" in err and "pip install" in err


# ------------------------------------------------------------------------------------------------ EAQuant
def test_shared_smoothing_is_an_exact_rescaling_in_float():
    torch.manual_seed(1)
    E, D, H, F, T = 4, 16, 24, 12, 40
    x = torch.randn(T, D, dtype=torch.float64) * torch.linspace(0.1, 8, D, dtype=torch.float64)  # outlier channels
    w_up = torch.randn(E, H, D, dtype=torch.float64)
    w_down = torch.randn(E, D, F, dtype=torch.float64)
    router = torch.randn(E, D, dtype=torch.float64)
    act_max = x.abs().amax(0).expand(E, D).clone()
    act_max[2] = 0  # an expert without calibration rows does not vote
    s = EA.smoothing_vector(act_max, w_up, 0.5).double()
    # hand formula: max over the voting experts of act_max^a / w_max^(1-a)
    hand = torch.stack([act_max[e].sqrt() / w_up[e].abs().amax(0).sqrt() for e in (0, 1, 3)]).amax(0)
    assert torch.allclose(s, hand.float().double(), rtol=1e-6)
    assert torch.equal(EA.smoothing_vector(act_max, w_up, None), torch.ones(D))
    # one vector for every expert: (x / s) (W s)^T == x W^T, for the experts and the router alike
    for e in range(E):
        assert torch.allclose((x / s) @ (w_up[e] * s).T, x @ w_up[e].T, rtol=1e-12, atol=1e-12)
    assert torch.allclose((x / s) @ (router * s).T, x @ router.T, rtol=1e-12, atol=1e-12)
    # EAQuant's loss before any quantisation: zero output error and zero router KL
    rows = EA.balanced_rows(x @ router.T, 2, 8)
    swiglu = lambda h: torch.nn.functional.silu(h[:, :F]) * h[:, F:]  # noqa: E731
    res = EA.layer_loss(x, router, None, w_up, w_down, w_up * s, w_down, s, swiglu, None, 2, True, 1.0, rows)
    assert res["output_error"] < 1e-24 and abs(res["kl"]) < 1e-12


def test_quantized_experts_with_smoothing_equal_the_unsmoothed_layer():
    # QuantizedExperts(smooth=True) storing W_up s on an exact 8-bit grid computes x W^T (float activations)
    torch.manual_seed(2)
    D, Fh, E = 16, 8, 3
    opts = {"bits": 8, "group": 16, "smooth": True, "kernel": "dequant"}
    layer = moekit.MoE(dim=D, hidden_dim=Fh, num_experts=E, top_k=2, aux_loss=None, experts="quantized",
                       experts_options=opts).double().eval()
    s = torch.rand(D) * 3 + 0.25
    ex = layer.experts
    ex.smooth.copy_(s)
    for e in range(E):
        ex.set_packed("gate_up_proj", e, Q.rtn(torch.randn(2 * Fh, D), 8, 16))
        ex.set_packed("down_proj", e, Q.rtn(torch.randn(D, Fh), 8, 8))
    w_up_s, w_down = (w.double() for w in ex.dequantized())
    x = torch.randn(7, D, dtype=torch.float64)
    ref = reference_moe(x, layer.router.weight.detach(), w_up_s / s.double(), w_down, top_k=2)
    assert torch.allclose(layer(x), ref.out, atol=1e-10)
    assert "smooth" not in ex.expert_parameter_names()


def test_router_kl_equals_a_hand_sum():
    torch.manual_seed(3)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    hand = 0.0
    for t in range(6):
        p = [math.exp(v) for v in a[t].tolist()]
        q = [math.exp(v) for v in b[t].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        hand += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert abs(float(EA.router_kl(a, b)) - hand / 6) < 1e-12
    assert float(EA.router_kl(a, a)) == 0.0


def test_balanced_rows_give_rare_experts_their_most_likely_rows():
    logits = torch.tensor([[5., 4., 0., -9.], [4., 5., 0., -9.], [5., 0., 4., -2.], [0., 5., 4., -8.]])
    rows = EA.balanced_rows(logits, top_k=2, min_rows=2)
    assert rows[0].tolist() == [0, 1, 2] and rows[1].tolist() == [0, 1, 3] and rows[2].tolist() == [2, 3]
    # expert 3 is never in a top-2: its 2 rows of highest router probability (brute force over the softmax)
    p3 = torch.softmax(logits, -1)[:, 3]
    assert rows[3].tolist() == sorted(sorted(range(4), key=lambda t: -float(p3[t]))[:2]) == [2, 3]


def test_fake_quant_act_by_hand():
    x = torch.tensor([[1.0, -0.5, 0.26, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q = EA.fake_quant_act(x, 3)  # levels -3..3, step max/3
    assert torch.allclose(q[0], torch.tensor([1.0, -2 / 3, 1 / 3, 0.0]))
    assert torch.equal(q[1], x[1])
    assert EA.fake_quant_act(x, None) is x


# ------------------------------------------------------------------------------------------------ EBSS
def _tiny_lm(seed=0):
    from moekit.model import MoELM, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=264, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, max_seq_len=64,
                      moe=moekit.MoEConfig(dim=32, hidden_dim=16, num_experts=4, top_k=2))
    return MoELM(cfg).eval()


def test_balance_metric_by_hand():
    from moekit.compress.ebss import balance_metric

    c = torch.tensor([[[2., 2., 2., 2.], [4., 0., 0., 0.]]])
    # layer 0 even (0), layer 1: mean 1, std sqrt(3) -> CV sqrt(3); mean over layers
    assert torch.allclose(balance_metric(c), torch.tensor([math.sqrt(3) / 2], dtype=torch.float64))


def test_ebss_without_balance_is_greedy_decoding():
    from moekit.compress.ebss import EBSSConfig, ebss_sequences
    from moekit.data import BOS_ID, EOS_ID, PAD_ID

    model = _tiny_lm()
    cfg = EBSSConfig(seq_len=10, width=1, candidates=1, balance_weight=0.0, parallel=2, seed=5)
    seqs = ebss_sequences(model, 3, cfg, progress=False)
    assert len(seqs) == 3 and all(len(s) == 10 and s[0] == BOS_ID for s in seqs)
    with torch.no_grad():
        for s in seqs:  # brute-force reference: greedy argmax continuation of BOS + the sampled first token
            ids = torch.tensor(s[:2]).unsqueeze(0)
            for _ in range(8):
                logits = model(ids)[0, -1].double()
                logits[[BOS_ID, EOS_ID, PAD_ID]] = -torch.inf
                ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
            assert ids[0].tolist() == s.tolist()
    assert [s.tolist() for s in ebss_sequences(model, 3, cfg, progress=False)] == [s.tolist() for s in seqs]


def test_ebss_balance_term_chooses_the_more_even_beam():
    # one search step by hand: with a large balance weight the survivor is the candidate whose beam has the
    # lowest coefficient of variation of expert counts, whatever its log-probability
    from moekit.compress.ebss import EBSSConfig, ebss_sequences, expert_counts, balance_metric

    model = _tiny_lm(1)
    wide = EBSSConfig(seq_len=6, width=4, candidates=4, balance_weight=1e6, parallel=1, seed=0)
    greedy = EBSSConfig(seq_len=6, width=4, candidates=4, balance_weight=0.0, parallel=1, seed=0)
    s_bal = ebss_sequences(model, 1, wide, progress=False)[0]
    s_nll = ebss_sequences(model, 1, greedy, progress=False)[0]
    c_bal = expert_counts(model, [{"input_ids": torch.tensor(s_bal).unsqueeze(0)}])
    c_nll = expert_counts(model, [{"input_ids": torch.tensor(s_nll).unsqueeze(0)}])
    assert float(balance_metric(c_bal)) <= float(balance_metric(c_nll)) + 1e-12


# ------------------------------------------------------------------------------------------------ MoTE
def test_ternary_experts_forward_is_ternary_times_absmean_and_gradients_flow_by_ste():
    from moekit.experts.ternary import ternary_weight

    torch.manual_seed(4)
    D, Fh, E = 16, 8, 3
    layer = moekit.MoE(dim=D, hidden_dim=Fh, num_experts=E, top_k=2, aux_loss=None, experts="ternary",
                       experts_options={"group": 8}).double()
    ex = layer.experts
    # hand reference of the quantiser: per row and group of 8 columns, s = mean|w|, q = clamp(round(w/s))
    w = ex.w_up.detach()
    hand = torch.empty_like(w)
    for e in range(E):
        for r in range(w.shape[1]):
            for g in range(0, D, 8):
                blk = w[e, r, g:g + 8]
                s = blk.abs().mean()
                hand[e, r, g:g + 8] = s * torch.clamp(torch.round(blk / s), -1, 1)
    assert torch.equal(ternary_weight(w, 8), hand)
    assert len(hand[0, 0, :8].abs().unique()) <= 2  # {0, s} within one group
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    w_up_q, w_down_q = ternary_weight(ex.w_up.detach(), 8), ternary_weight(ex.w_down.detach(), 8)
    ref = reference_moe(x.detach(), layer.router.weight.detach(), w_up_q, w_down_q, top_k=2)
    assert torch.allclose(out, ref.out, atol=1e-10)
    # straight-through: the latent weights get exactly the gradient the ternary weights would get
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    w_up_leaf = w_up_q.clone().requires_grad_(True)
    w_down_leaf = w_down_q.clone().requires_grad_(True)
    ref2 = reference_moe(x.detach(), layer.router.weight.detach(), w_up_leaf, w_down_leaf, top_k=2)
    (ref2.out * cot).sum().backward()
    assert torch.allclose(ex.w_up.grad, w_up_leaf.grad, atol=1e-10)
    assert torch.allclose(ex.w_down.grad, w_down_leaf.grad, atol=1e-10)
    assert ex.w_up.grad.abs().sum() > 0


def test_train_ternary_experts_flag(tmp_path):
    from moekit.cli import main
    from moekit.experts.ternary import TernaryExperts
    from moekit.train import load_run

    assert main(["train", "--ternary-experts", "--num-shared-experts", "1", "--steps", "2", "--n-layers", "1",
                 "--dim", "32", "--hidden-dim", "32", "--num-experts", "4", "--batch-size", "2", "--seq-len", "16",
                 "--out", str(tmp_path), "--name", "t", "--no-progress", "--final-eval-windows", "2"]) == 0
    model, cfg = load_run(tmp_path / "t")
    assert cfg["model"]["moe"]["experts"] == "ternary"
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.experts, TernaryExperts) and mlp.shared_expert is not None


# ------------------------------------------------------------------------------------------------ compressed-tensors
def test_pack_int32_by_hand():
    from moekit.hf.compressed_tensors import pack_int32

    u = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15]])
    words = pack_int32(u, 4)
    low = sum(v << (4 * i) for i, v in enumerate([1, 2, 3, 4, 5, 6, 7, 8]))
    assert words.tolist() == [[low - 2 ** 32 if low >= 2 ** 31 else low, 15]]
    assert pack_int32(u.t(), 4, dim=0).t().tolist() == words.tolist()


CT_FLAGS = {"sym4": ["--bits", "4"], "asym3": ["--bits", "3", "--asym"], "ternary": ["--method", "ternary"],
            "eaquant8": ["--method", "eaquant", "--bits", "8"]}


@pytest.fixture(scope="module")
def ct_runs(tmp_path_factory):
    """A tiny trained run, quantised four ways, each exported as compressed-tensors: {name: (run, export)}."""
    from moekit.cli import main

    root = tmp_path_factory.mktemp("ct")
    text = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(200))
    (root / "data.txt").write_text(text)
    assert main(["train", "--steps", "2", "--n-layers", "2", "--dim", "64", "--hidden-dim", "32",
                 "--num-experts", "4", "--batch-size", "2", "--seq-len", "32", "--data", str(root / "data.txt"),
                 "--out", str(root / "runs"), "--name", "base", "--no-progress", "--final-eval-windows", "2"]) == 0
    out = {}
    for name, flags in CT_FLAGS.items():
        run = root / f"q_{name}"
        assert main(["quantize", str(root / "runs" / "base"), str(run), "--group", "32", "--calib-tokens", "256",
                     *flags]) == 0
        assert main(["export", str(run), str(root / f"ct_{name}"), "--format", "compressed-tensors"]) == 0
        out[name] = (run, root / f"ct_{name}")
    return root, out


def _dequantised_expert_weights(run) -> dict:
    from moekit.train import load_run

    model, _ = load_run(run)
    want = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        for e in range(ex.num_experts):
            up, down = ex.dequantize_expert("gate_up_proj", e), ex.dequantize_expert("down_proj", e)
            F = ex.hidden_dim
            for proj, w in (("gate_proj", up[:F]), ("up_proj", up[F:]), ("down_proj", down)):
                want[f"model.layers.{i}.mlp.experts.{e}.{proj}"] = w
    return want, model


@pytest.mark.parametrize("name", list(CT_FLAGS))
def test_compressed_tensors_export_layout(ct_runs, name):
    from safetensors.torch import load_file

    from moekit.hf.compressed_tensors import dequantized_experts

    run, out = ct_runs[1][name]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == {"sym4": 4, "asym3": 3, "ternary": 2, "eaquant8": 8}[name]
    assert weights["symmetric"] == (name != "asym3")
    want, model = _dequantised_expert_weights(run)
    sd = load_file(str(out / "model.safetensors"))
    assert ("model.layers.0.mlp.experts.0.down_proj.weight_zero_point" in sd) == (name == "asym3")
    for key, w in want.items():
        _, _, i, _, _, e, proj = key.split(".")
        assert torch.equal(dequantized_experts(out, int(i), int(e), proj), w), key
        assert sd[key + ".weight_packed"].dtype == torch.int32
        assert sd[key + ".weight_shape"].tolist() == list(w.shape)
    for i, layer in enumerate(model.model.layers):
        if layer.mlp.experts.smooth_enabled:  # EAQuant's smoothing folded: norm / s and router * s
            s = layer.mlp.experts.smooth
            assert torch.allclose(sd[f"model.layers.{i}.post_attention_layernorm.weight"],
                                  layer.post_attention_layernorm.weight.detach() / s)
            assert torch.allclose(sd[f"model.layers.{i}.mlp.gate.weight"], layer.mlp.gate.weight.detach() * s)


@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="no .venv-vllm with the compressed-tensors package")
def test_compressed_tensors_package_decompresses_to_the_same_weights(ct_runs):
    from safetensors.torch import load_file

    root, runs = ct_runs
    pairs = []
    for name, (_, out) in runs.items():
        pairs += [str(out), str(root / f"dec_{name}.safetensors")]
    script = Path(__file__).with_name("ct_decompress.py")
    subprocess.run([str(VLLM_PYTHON), str(script), *pairs], check=True, capture_output=True, timeout=300)
    for name, (run, _) in runs.items():
        want, _ = _dequantised_expert_weights(run)
        got = load_file(str(root / f"dec_{name}.safetensors"))
        assert set(got) == set(want)
        for k, w in want.items():
            assert torch.equal(got[k], w), (name, k)


def test_compressed_tensors_export_refuses_float_and_act_bits(ct_runs, tmp_path, capsys):
    from moekit.cli import main

    root = ct_runs[0]
    run = tmp_path / "a8"
    assert main(["quantize", str(root / "runs" / "base"), str(run), "--group", "32", "--act-bits", "8"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "x"), "--format", "compressed-tensors"]) == 2
    assert "act-bits" in capsys.readouterr().err
    assert main(["export", str(root / "runs" / "base"), str(tmp_path / "y"), "--format",
                 "compressed-tensors"]) == 2
    assert "quantize" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_quantize_cli_hqq_act_bits_and_ebss(ct_runs, tmp_path, capsys):
    from moekit.cli import main
    from moekit.train import load_run

    base = ct_runs[0] / "runs" / "base"
    runs = {"ebss": ["--method", "gptq", "--bits", "4", "--calib", "ebss", "--calib-tokens", "64",
                     "--calib-seq-len", "16"],
            "act": ["--method", "rtn", "--bits", "4", "--act-bits", "6"]}
    if HAVE_HQQ:
        runs["hqq"] = ["--method", "hqq", "--bits", "3"]
    for name, flags in runs.items():
        out = tmp_path / name
        assert main(["quantize", str(base), str(out), "--group", "32", "--json", *flags]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["expert_bytes"] < summary["expert_bytes_source"]
        cfg = json.loads((out / "config.json").read_text())
        model, _ = load_run(out)
        ex = model.model.layers[0].mlp.experts
        if name == "hqq":
            assert ex.zero_dtype == torch.float16 and not ex.symmetric
        if name == "act":
            assert ex.act_bits == 6
        if name == "ebss":
            assert cfg["quantization"]["calib"] == "ebss"
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 100, 101, 102]]))).all()
    # bad input: one line, exit 2, nothing written
    for flags, needle in ((["--act-bits", "9"], "--act-bits"), (["--calib", "ebss", "--calib-data", "x.txt"], "ebss"),
                          (["--method", "hqq", "--bits", "ternary"], "bits")):
        if "hqq" in flags and not HAVE_HQQ:
            continue
        capsys.readouterr()
        assert main(["quantize", str(base), str(tmp_path / "bad"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not (tmp_path / "bad").exists()
