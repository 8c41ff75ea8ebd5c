"""Quantisation of experts (issue 14, quantisation half): packing, RTN, GPTQ against a slow float64 reference,
AGQ's weighted Hessian, the MC integer program against brute force, QuantizedExperts against the float64 loop
reference, and ``moekit quantize`` -> ``moekit eval`` with its bad inputs."""
from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

import moekit
from moekit.compress import quant as Q
from moekit.experts import QuantizedExperts
from reference import reference_moe
from helpers import autograd_node_names, working_folder

ALL_BITS = (8, 4, 3, 2, "ternary")


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_codes_round_trip_and_byte_count(bits):
    maxq = 2 if bits == "ternary" else (1 << bits) - 1
    for n in (1, 7, 40, 123):
        u = torch.randint(0, maxq + 1, (n,))
        data = Q.pack_codes(u, bits)
        assert data.dtype == torch.uint8
        per_weight = 8 / 5 if bits == "ternary" else bits
        # dense packing: ceil over the packing unit (5 trits, 8 x 3 bits, 4 x 2 bits, 2 x 4 bits, 1 byte)
        unit = {8: 1, 4: 2, 3: 8, 2: 4, "ternary": 5}[bits]
        assert data.numel() == -(-n // unit) * unit * per_weight / 8
        assert torch.equal(Q.unpack_codes(data, bits, n), u.to(torch.int32))
    # extremes: all codes at the top of the range
    u = torch.full((24,), maxq)
    assert torch.equal(Q.unpack_codes(Q.pack_codes(u, bits), bits, 24), u.to(torch.int32))


def test_pack_layout_by_hand():
    # 4 bits: low nibble first; 2 bits: lowest bits first; 3 bits: little-endian 24-bit word; ternary: base 3
    assert Q.pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert Q.pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    word = sum(c << (3 * i) for i, c in enumerate([7, 1, 0, 0, 0, 0, 0, 5]))
    assert Q.pack_codes(torch.tensor([7, 1, 0, 0, 0, 0, 0, 5]), 3).tolist() == [word & 255, word >> 8 & 255,
                                                                              word >> 16]
    assert Q.pack_codes(torch.tensor([2, 1, 0, 0, 2]), "ternary").tolist() == [2 + 3 + 2 * 81]
    assert Q.pack_codes(torch.tensor([128, 0, 255]), 8).view(torch.int8).tolist() == [0, -128, 127]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_values_on_the_grid_round_trip_exactly(bits, symmetric):
    if bits == "ternary" and not symmetric:
        pytest.skip("ternary is symmetric only")
    rows, cols, group = 6, 64, 32
    w = torch.randn(rows, cols) * 0.05
    p = Q.pack(w, bits, group, symmetric)
    w_q = Q.unpack(p)
    # storage: packed codes + float16 scales (+ uint8 zero points when asymmetric)
    per = 1.6 if bits == "ternary" else bits
    groups = rows * cols // group
    assert p.nbytes == -(-rows * cols * per // 8) + 2 * groups + (0 if symmetric else groups)
    # the dequantised values are on the grid: quantising them with the same scales gives the same codes
    scale = p.scale.float().repeat_interleave(group, 1)
    zero = p.zero_points().repeat_interleave(group, 1)
    assert torch.equal(Q.quantize_codes(w_q, scale, zero, bits, symmetric), p.codes().float())
    assert torch.equal(w_q, scale * (p.codes() - zero))
    if bits != "ternary":  # integer grids are idempotent: re-fitting them on their own values changes nothing
        assert torch.equal(Q.unpack(Q.pack(w_q, bits, group, symmetric)), w_q)
    # round to nearest: most weights within half a step; integer grids clip by at most one more half step
    # (the float16 scale and the rounded zero point can move the range ends a little)
    err = (w_q - w).abs()
    assert (err <= scale / 2 * 1.001).float().mean() > 0.5
    if bits != "ternary":
        assert bool((err <= scale * 1.001).all())


def test_ternary_is_absmean_and_three_valued():
    w = torch.tensor([[0.4, -0.1, 0.0, 0.9, -0.6, 0.2, 0.05, -0.05]])
    p = Q.pack(w, "ternary", 4)
    s = torch.tensor([0.35, 0.225]).to(torch.float16).float()  # mean |w| of each group of 4
    assert torch.allclose(p.scale.float()[0], s)
    expected = torch.tensor([[1, 0, 0, 1], [-1, 1, 0, 0]]).float() * s[:, None]
    assert torch.equal(Q.unpack(p), expected.view(1, 8))


def test_dead_groups_get_no_nan():
    w = torch.zeros(4, 32)
    w[0, 0] = 1.0
    for bits in ALL_BITS:
        p = Q.pack(w, bits, 16)
        assert torch.isfinite(p.scale.float()).all() and torch.equal(Q.unpack(p)[1:], w[1:])


def test_group_must_divide():
    with pytest.raises(ValueError, match="group"):
        Q.pack(torch.randn(2, 48), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        Q.pack(torch.randn(2, 32), 5, 32)


# ------------------------------------------------------------------------------------------------ GPTQ
def slow_gptq(w, H, bits, group, symmetric, damp=0.01):
    """Reference GPTQ written as the optimal-brain-quantiser sequence in float64: quantise column i, spread its
    error over the remaining columns with row i of the current inverse Hessian, remove column i from the
    inverse (Gauss-Jordan step). Group grids are fitted when a group starts, on the updated weights."""
    W = w.double().clone()
    H = H.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    cols = W.shape[1]
    Wq = torch.zeros_like(W)
    for i in range(cols):
        if i % group == 0:
            scale, zero = Q.fit_grid(W[:, i:i + group], bits, symmetric)
        u = Q.quantize_codes(W[:, i], scale, zero, bits, symmetric)
        Wq[:, i] = scale * (u - zero)
        err = (W[:, i] - Wq[:, i]) / Hinv[i, i]
        for j in range(i + 1, cols):
            W[:, j] -= err * Hinv[i, j]
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return Wq


def _correlated_inputs(n, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5
    mix += torch.eye(cols, dtype=torch.float64)
    return torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix * torch.linspace(0.2, 3, cols)


@pytest.mark.parametrize("bits,group,symmetric", [(3, 8, True), (4, 16, False), (2, 32, False),
                                                  ("ternary", 8, True)])
def test_gptq_equals_slow_float64_reference(bits, group, symmetric):
    torch.manual_seed(1)
    w = torch.randn(5, 32, dtype=torch.float64) * 0.1
    x = _correlated_inputs(200, 32)
    H = x.T @ x
    fast = Q.unpack(Q.gptq(w, H, bits, group, symmetric), torch.float64)
    ref = slow_gptq(w, H, bits, group, symmetric)
    # the same codes (float16 scales are the same by construction); rounding ties may in principle differ
    assert (fast - ref).abs().max() < 1e-6


def test_gptq_beats_rtn_in_the_hessian_norm():
    torch.manual_seed(2)
    for seed in range(3):
        w = torch.randn(16, 64, dtype=torch.float64) * 0.05
        x = _correlated_inputs(512, 64, seed)
        H = x.T @ x
        for bits in (2, 3, 4):
            e_gptq = Q.hessian_error(w, Q.unpack(Q.gptq(w, H, bits, 32, False), torch.float64), H)
            e_rtn = Q.hessian_error(w, Q.unpack(Q.rtn(w, bits, 32, False), torch.float64), H)
            assert e_gptq < e_rtn


def test_gptq_with_identity_hessian_is_rtn():
    # with H = I no error is fed back (the inverse has no off-diagonal terms): GPTQ reduces to rounding
    w = torch.randn(8, 32) * 0.1
    fast = Q.unpack(Q.gptq(w, torch.eye(32), 4, 16, True))
    assert torch.equal(fast, Q.unpack(Q.rtn(w, 4, 16, True)))


def test_agq_hessian_is_routing_weighted_by_hand():
    """collect_expert_hessians: plain H_e = sum x x^T, AGQ H_e = sum g x x^T over the expert's tokens."""
    torch.manual_seed(3)
    layer = moekit.MoE(dim=8, hidden_dim=4, num_experts=3, top_k=2, aux_loss=None).double().eval()
    x = torch.randn(10, 8, dtype=torch.float64)
    recs = {w: Q.collect_expert_hessians(layer, [x], weighted=w, stats=True)[""] for w in (False, True)}
    routing = layer.router(x)
    ex = layer.experts
    for e in range(3):
        rows, weights = [], []
        for t in range(10):
            for k in range(2):
                if routing.topk_ids[t, k] == e:
                    rows.append(x[t])
                    weights.append(float(routing.topk_weights[t, k].detach()))
        X = torch.stack(rows) if rows else torch.zeros(0, 8, dtype=torch.float64)
        g = torch.tensor(weights, dtype=torch.float64)
        assert torch.allclose(recs[False]["up"][e], X.T @ X)
        assert torch.allclose(recs[True]["up"][e], (X * g[:, None]).T @ X)
        assert recs[True]["count"][e] == len(rows)
        a = torch.nn.functional.silu(X @ ex.gate_up_proj[e, :4].T) * (X @ ex.gate_up_proj[e, 4:].T)
        assert torch.allclose(recs[True]["down"][e], (a * g[:, None]).T @ a)


def test_agq_is_gptq_on_the_weighted_hessian():
    w = torch.randn(6, 32, dtype=torch.float64) * 0.1
    x = _correlated_inputs(100, 32, 5)
    g = torch.rand(100, dtype=torch.float64)
    H_w = (x * g[:, None]).T @ x
    agq = Q.quantize_matrix(w, "agq", 3, 16, True, H_w)
    assert (Q.unpack(agq, torch.float64) - slow_gptq(w, H_w, 3, 16, True)).abs().max() < 1e-6
    # and the weighting matters: the unweighted Hessian gives other codes
    assert not torch.equal(Q.unpack(agq), Q.unpack(Q.quantize_matrix(w, "gptq", 3, 16, True, x.T @ x)))


# ------------------------------------------------------------------------------------------------ MC allocation
def _brute_force(cost, choices, budget):
    best, arg = float("inf"), None
    for combo in itertools.product(range(len(choices)), repeat=cost.shape[0]):
        bits = [choices[k] for k in combo]
        if sum(bits) <= budget * len(bits) + 1e-9:
            value = sum(float(cost[e, k]) for e, k in enumerate(combo))
            if value < best:
                best, arg = value, bits
    return best, arg


@pytest.mark.parametrize("seed", range(6))
def test_mc_allocation_is_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    E = 3 + seed % 4
    choices = (2, 3, 4)
    q = torch.rand(E, 1, generator=g, dtype=torch.float64) * torch.tensor([[4.0, 1.0, 0.25]])  # error falls with bits
    f = torch.rand(E, generator=g, dtype=torch.float64)
    w = torch.rand(E, generator=g, dtype=torch.float64)
    cost = Q.mc_costs(f, w, q)
    assert torch.allclose(cost[:, 0], f * w.pow(1.5) * q[:, 0])
    for budget in (2.0, 2.5, 3.0, 3.4):
        bits = Q.mc_allocate(cost, choices, budget)
        assert sum(bits) <= budget * E + 1e-9
        value = sum(float(cost[e, choices.index(b)]) for e, b in enumerate(bits))
        best, _ = _brute_force(cost, choices, budget)
        assert value == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_mc_allocation_hand_case():
    # two experts, budget 3: the one whose error is weighted more gets 4 bits, the other 2
    cost = torch.tensor([[10.0, 5.0, 1.0], [1.0, 0.9, 0.8]], dtype=torch.float64)
    assert Q.mc_allocate(cost, (2, 3, 4), 3.0) == [4, 2]
    with pytest.raises(ValueError, match="budget"):
        Q.mc_allocate(cost, (2, 3, 4), 1.5)


# ------------------------------------------------------------------------------------------------ experts
def _quantized_layer(bits=4, group=4, symmetric=True, expert_bits=None, E=5, D=8, Fh=4, seed=0):
    torch.manual_seed(seed)
    dense = moekit.MoE(dim=D, hidden_dim=Fh, num_experts=E, top_k=2, aux_loss=None)
    opts = {"bits": bits, "group": group, "symmetric": symmetric}
    if expert_bits is not None:
        opts["expert_bits"] = expert_bits
    layer = moekit.MoE(dim=D, hidden_dim=Fh, num_experts=E, top_k=2, aux_loss=None, experts="quantized",
                       experts_options=opts)
    layer.router.load_state_dict(dense.router.state_dict())
    ex = layer.experts
    for e in range(E):
        b = ex.expert_bits[e]
        ex.set_packed("gate_up_proj", e, Q.rtn(dense.experts.gate_up_proj[e] * 10, b, group, symmetric))
        ex.set_packed("down_proj", e, Q.rtn(dense.experts.down_proj[e] * 10, b, group, symmetric))
    return layer


@pytest.mark.parametrize("kw", [dict(bits=4), dict(bits=3, symmetric=False), dict(bits="ternary"),
                                dict(bits=8, group=8), dict(expert_bits=[2, 3, 4, 8, 3])])
def test_quantized_experts_equal_the_loop_reference_on_dequantised_weights(kw):
    layer = _quantized_layer(**kw).double().eval()
    ex = layer.experts
    assert isinstance(ex, QuantizedExperts) and not list(ex.parameters())
    w_up, w_down = (w.double() for w in ex.dequantized())
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert any("FusedExperts" in name for name in autograd_node_names(out))
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_moe(x_ref, layer.router.weight.detach(), w_up, w_down, top_k=2)
    assert torch.allclose(out, ref.out, atol=1e-10)
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    (ref.out * cot).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-10)
    assert ex.fused_weights() == (None, None)
    # expert_rows (expert parallelism's call) too
    counts = torch.tensor([3, 0, 2, 4, 1])
    rows = torch.randn(10, 8, dtype=torch.float64)
    y = ex.expert_rows(rows, counts)
    start = 0
    for e, n in enumerate(counts.tolist()):
        h = rows[start:start + n] @ w_up[e].T
        ref_rows = (torch.nn.functional.silu(h[:, :4]) * h[:, 4:]) @ w_down[e].T
        assert torch.allclose(y[start:start + n], ref_rows, atol=1e-10)
        start += n


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_cpu_kernels_match_the_dequantised_path(bits, group):
    # int8 (one group per row) and int4 (groups of 32..256) weight-only kernels, bfloat16 activations
    layer = _quantized_layer(bits=bits, group=group, D=64, Fh=32).eval()
    x = torch.randn(7, 64)
    with torch.no_grad():
        fast = layer(x)
        layer.experts.kernel = "dequant"
        slow = layer(x)
    assert not torch.equal(fast, slow)  # the kernel path really ran (bfloat16 rounding shows)
    assert torch.allclose(fast, slow, atol=2e-2 * slow.abs().max(), rtol=0)


@pytest.mark.parametrize("expert_bits", [None, [2, 3, 4, 8, 3]])
def test_shard_and_state_dict(expert_bits):
    layer = _quantized_layer(expert_bits=expert_bits)
    ex = layer.experts
    full = {e: ex.dequantize_expert("down_proj", e) for e in range(5)}
    sd = layer.state_dict()
    assert all(v.dtype in (torch.uint8, torch.float16) for k, v in sd.items() if k.startswith("experts."))
    assert "experts.gate_up_proj_packed" in sd and "experts.down_proj_scales" in sd
    fresh = moekit.MoE(dim=8, hidden_dim=4, num_experts=5, top_k=2, aux_loss=None, experts="quantized",
                       experts_options={"bits": 4, "group": 4,
                                        **({"expert_bits": expert_bits} if expert_bits else {})})
    fresh.load_state_dict(sd)
    x = torch.randn(6, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    names = ex.shard(range(2, 4))
    assert ex.num_experts == 2 and "down_proj_scales" in names
    for e in range(2):
        assert torch.equal(ex.dequantize_expert("down_proj", e), full[e + 2])


def test_quantized_experts_memory_shrinks():
    E, D, Fh = 8, 128, 128
    dense = moekit.MoE(dim=D, hidden_dim=Fh, num_experts=E, top_k=2, aux_loss=None).experts
    q = moekit.MoE(dim=D, hidden_dim=Fh, num_experts=E, top_k=2, aux_loss=None, experts="quantized",
                   experts_options={"bits": 4, "group": 128}).experts
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    numel = E * 3 * D * Fh
    assert q.expert_nbytes() == numel // 2 + 2 * numel // 128
    assert q.expert_nbytes() / dense_bytes < 0.14


# ------------------------------------------------------------------------------------------------ CLI
TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "32", "--num-experts", "4", "--final-eval-windows", "2",
        "--max-seq-len", "64", "--no-progress"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from moekit.cli import main

    with working_folder(tmp_path_factory.mktemp("quant")) as path:
        text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))
        (path / "data.txt").write_text(text)
        assert main(["train", *TINY, "--data", "data.txt", "--name", "base"]) == 0
        yield path


def _eval(capsys, run):
    from moekit.cli import main

    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--max-windows", "4"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bits_per_byte"]


@pytest.mark.parametrize("flags", [["--method", "rtn", "--bits", "8"], ["--method", "gptq", "--bits", "3", "--asym"],
                                   ["--method", "agq", "--bits", "4"], ["--method", "ternary"],
                                   ["--method", "rtn", "--mixed", "2.5"]])
def test_quantize_then_eval(workdir, capsys, flags):
    from moekit.cli import main
    from moekit.train import load_run

    base = workdir / "runs" / "base"
    out = workdir / ("q_" + "_".join(f.strip("-") for f in flags))
    assert main(["quantize", str(base), str(out), "--group", "16", "--calib-tokens", "512", "--json", *flags]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["expert_bytes"] < summary["expert_bytes_source"]
    assert summary["file_bytes"] < summary["file_bytes_source"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["moe"]["experts"] == "quantized"
    model, _ = load_run(out)
    src_model, _ = load_run(base)
    # non-expert weights unchanged
    for k, v in src_model.state_dict().items():
        if ".experts." not in k:
            assert torch.equal(model.state_dict()[k], v)
    bpb_q, bpb = _eval(capsys, out), _eval(capsys, base)
    assert abs(bpb_q - bpb) < (0.02 if flags[-1] == "8" else 1.0)
    if "--mixed" in flags:
        for layer in cfg["model"]["moe_overrides"].values():
            bits = layer["experts_options"]["expert_bits"]
            assert sum(bits) / len(bits) <= 2.5 and set(bits) <= {2, 3, 4}
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private one


@pytest.mark.parametrize("args,needle", [
    (["--bits", "5"], "bits"),
    (["--group", "24"], "does not divide"),
    (["--method", "ternary", "--asym"], "symmetric"),
    (["--mixed", "1.5"], "--mixed"),
    (["--bits", "ternary"], "ternary"),
])
def test_quantize_bad_input(workdir, capsys, args, needle):
    from moekit.cli import main

    base = workdir / "runs" / "base"
    out = workdir / "bad_out"
    capsys.readouterr()
    assert main(["quantize", str(base), str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


def test_quantize_out_existing_or_src(workdir, capsys):
    from moekit.cli import main

    base = workdir / "runs" / "base"
    for out in (base, workdir / "data.txt", workdir / "runs"):
        capsys.readouterr()
        assert main(["quantize", str(base), str(out)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["quantize", str(workdir / "missing"), str(workdir / "x")]) == 2
    assert not (workdir / "x").exists()
