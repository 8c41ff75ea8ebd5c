"""Calibration statistics, expert pruning (frequency, REAP, EASY-EP, NAEE + dynamic skipping), HC-SMoE / UNCURL
merging and the ``moekit prune`` / ``moekit merge`` commands, each against an independent reference."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moekit import MoE
from moekit.cli import main
from moekit.compress import calibrate as C
from moekit.compress import merge as M
from moekit.compress import prune as P
from moekit.model import MoELM, ModelConfig


def tiny_layer(E=4, K=2, D=6, F_=5, seed=0) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(dim=D, hidden_dim=F_, num_experts=E, top_k=K, norm_topk=True).double().eval()
    with torch.no_grad():
        layer.gate.weight.normal_(0, 1.0)
        layer.experts.gate_up_proj.normal_(0, 0.5)
        layer.experts.down_proj.normal_(0, 0.5)
    return layer


def tiny_lm(E=6, K=2, seed=0, **moe) -> MoELM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=264, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64,
                      moe={"num_experts": E, "top_k": K, "hidden_dim": 8, "norm_topk": True, **moe})
    model = MoELM(cfg).eval()
    with torch.no_grad():
        for layer in P.moe_layer_map(model).values():
            layer[1].gate.weight.normal_(0, 0.5)  # spread routing so experts differ in load
    return model


def expert_out(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Slow reference: SwiGLU expert e on one token, from the stored weights."""
    w_up = layer.experts.gate_up_proj[e]
    F_ = w_up.shape[0] // 2
    gate, up = w_up[:F_] @ x_D, w_up[F_:] @ x_D
    return layer.experts.down_proj[e] @ (F.silu(gate) * up)


# ------------------------------------------------------------------------------------------------ scores
def test_calibration_scores_match_a_slow_loop():
    layer = tiny_layer()
    torch.manual_seed(1)
    xs = [torch.randn(7, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)]
    stats = C.calibrate(layer, xs, all_experts=True, hessians=True, routing_weighted=True, progress=False)
    s = stats.layers[0]
    E, D = 4, 6
    x_TD = torch.cat([x.reshape(-1, D) for x in xs])
    count, wsum, reap, easy = np.zeros(E), np.zeros(E), np.zeros(E), np.zeros(E)
    out_sum, H, Hw, coact = np.zeros((E, D)), np.zeros((E, D, D)), np.zeros((E, D, D)), np.zeros((E, E))
    ratios = []
    with torch.no_grad():
        for x in x_TD:
            logits = layer.gate.weight @ x
            probs = torch.softmax(logits, 0)
            top = torch.topk(probs, 2).indices.tolist()
            w = probs[top] / probs[top].sum()
            ys = [expert_out(layer, e, x) for e in top]
            routed = sum(wi * y for wi, y in zip(w, ys))
            contrib = max(0.0, 1 - float(F.cosine_similarity(x, x + routed, dim=0)))
            ratios.append(float(min(w) / max(w)))
            for wi, e, y in zip(w.tolist(), top, ys):
                count[e] += 1
                wsum[e] += wi
                reap[e] += wi * float(y.norm())
                easy[e] += wi * float(y.norm()) * contrib
                H[e] += np.outer(x.numpy(), x.numpy())
                Hw[e] += wi * np.outer(x.numpy(), x.numpy())
            for a in top:
                for b in top:
                    coact[a, b] += 1
            for e in range(E):
                out_sum[e] += expert_out(layer, e, x).numpy()
    assert s.tokens == 17 and stats.tokens == 17
    assert s.count_E.tolist() == count.tolist()
    np.testing.assert_allclose(s.weight_sum_E.numpy(), wsum, rtol=1e-5)
    np.testing.assert_allclose(s.reap_E.numpy(), reap / np.maximum(count, 1), rtol=1e-5)
    np.testing.assert_allclose(s.easy_ep_sum_E.numpy(), easy, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(s.output_mean_ED.numpy(), out_sum / 17, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(s.hessian_EDD.numpy(), H, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(s.weighted_hessian_EDD.numpy(), Hw, rtol=1e-5, atol=1e-9)
    assert s.coact_EE.tolist() == coact.tolist()
    assert abs(s.ratio_median() - np.sort(ratios)[(len(ratios) - 1) // 2]) <= 1.0 / C.RATIO_BINS
    np.testing.assert_allclose(s.logit_mean_E.numpy(), (x_TD @ layer.gate.weight.T).mean(0).detach().numpy(), rtol=1e-5)
    # the scores the pruning methods rank by
    assert P.expert_scores(s, "frequency").tolist() == count.tolist()
    np.testing.assert_allclose(P.expert_scores(s, "easy_ep").numpy(), easy, rtol=1e-5, atol=1e-9)


def test_scores_hand_case():
    """Two experts, top-1 (norm_topk: weight 1), ungated ReLU experts with known outputs; REAP and EASY-EP by
    hand."""
    layer = MoE(dim=2, hidden_dim=1, num_experts=2, top_k=1, norm_topk=True, activation="relu").double().eval()
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # token goes to its larger coordinate
        layer.experts.up_proj.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]]))  # relu(x0), relu(2 x1)
        layer.experts.down_proj.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]]))  # -> [h, 0], [0, h]
    x = torch.tensor([[2.0, 1.0], [3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # tokens 0, 1 -> expert 0, outputs [2, 0], [3, 0]; token 2 -> expert 1, output [0, 2]
    s = C.calibrate(layer, [x], progress=False).layers[0]
    assert s.count_E.tolist() == [2, 1]
    assert s.reap_E.tolist() == pytest.approx([(2 + 3) / 2, 2.0])
    # contributions 1 - cos(x, x + y): token 0: x=[2,1], x+y=[4,1]; tokens 1 and 2: parallel -> 0
    c0 = 1 - (2 * 4 + 1 * 1) / (math.sqrt(5) * math.sqrt(17))
    assert c0 > 0.01 and s.easy_ep_sum_E.tolist() == pytest.approx([2 * c0, 0.0], abs=1e-12)


def test_require_min_tokens_names_the_experts():
    layer = tiny_layer(E=4, K=1)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[2, 0] = 10.0
    x = torch.zeros(5, 6, dtype=torch.float64)
    x[:, 0] = 1.0  # every token to expert 2
    stats = C.calibrate(layer, [x], progress=False)
    with pytest.raises(ValueError, match=r"\(layer 0, expert 0, 0 tokens\).*\(layer 0, expert 3, 0 tokens\)"):
        C.require_min_tokens(stats, 1)
    assert C.require_min_tokens(stats, 1, allow=True) == [(0, 0, 0), (0, 1, 0), (0, 3, 0)]
    assert "5" in stats.format_counts()


# ------------------------------------------------------------------------------------------------ slicing
def test_pruned_model_equals_masked_router_and_budgets():
    model = tiny_lm(E=6, K=2)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    keep = {0: [5, 1, 3], 1: [0, 2, 3, 4]}  # different counts per layer -> moe_overrides
    pruned = P.prune_model(model, keep)
    assert pruned.config.experts_per_layer == [3, 4]
    assert pruned.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 3
    with torch.no_grad():
        a = pruned(ids)
        with P.masked_model(model, keep):
            b = model(ids)
        c = model(ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-4  # pruning changed something
    # budgets: per layer rounds keep * E; global keeps round(keep * sum E), every layer >= top-k
    assert P.budgets({0: 6, 1: 6}, {0: 2, 1: 2}, 0.5) == {0: 3, 1: 3}
    with pytest.raises(ValueError, match="fewer than its top-k"):
        P.budgets({0: 6, 1: 6}, {0: 2, 1: 2}, 0.2)
    assert P.budgets({0: 6, 1: 6}, {0: 2, 1: 2}, 0.2, clamp_top_k=True) == {0: 1, 1: 1}
    scores = {0: torch.tensor([9.0, 8, 7, 1, 1, 1]), 1: torch.tensor([1.0, 1, 1, 1, 1, 5])}
    total = P.budgets({0: 6, 1: 6}, {0: 2, 1: 2}, 0.5, global_budget=True)
    got = P.keep_sets(scores, total, {0: 2, 1: 2})
    assert sum(len(k) for k in got.values()) == 6 and all(len(k) >= 2 for k in got.values())
    # normalised shares: layer 0 [.33, .30, .26, .04..], layer 1 [.1 .. .5]: 0,1 | 5,0 first, then .26 (0:2) ...
    assert got[0][:3] == [0, 1, 2] and 5 in got[1]


# ------------------------------------------------------------------------------------------------ NAEE
def _brute_force_layer_error(layer: MoE, x: torch.Tensor, keep: tuple[int, ...]) -> float:
    """Build the pruned layer by hand (sliced weights) and run it: squared error of the routed output."""
    E = layer.config.num_experts
    sub = MoE(dim=layer.config.dim, hidden_dim=layer.config.hidden_dim, num_experts=len(keep),
              top_k=layer.config.top_k, norm_topk=True).double().eval()
    idx = list(keep)
    with torch.no_grad():
        sub.gate.weight.copy_(layer.gate.weight[idx])
        sub.experts.gate_up_proj.copy_(layer.experts.gate_up_proj[idx])
        sub.experts.down_proj.copy_(layer.experts.down_proj[idx])
        assert E > len(keep)
        return float(((layer(x) - sub(x)) ** 2).sum())


def test_naee_matches_brute_force_over_all_drop_sets():
    layer = tiny_layer(E=6, K=2, D=6, seed=3)
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    errors = {c: _brute_force_layer_error(layer, x, c) for c in itertools.combinations(range(6), 3)}
    best = min(errors, key=errors.get)
    keep, err, how = P.naee_search(layer, x, 3)
    assert how == "exhaustive" and tuple(keep) == best
    assert err == pytest.approx(errors[best], rel=1e-6)
    # greedy beyond the limit: a valid set whose error is at least the optimum and among the candidates'
    gkeep, gerr, how = P.naee_search(layer, x, 3, max_combinations=5)
    assert how == "greedy" and len(gkeep) == 3
    assert gerr == pytest.approx(errors[tuple(gkeep)], rel=1e-6) and gerr >= errors[best] * (1 - 1e-6)


def test_dynamic_skipping_against_a_hand_rule():
    layer = tiny_layer(E=4, K=2, seed=5)
    x = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    stats = C.calibrate(layer, [x], progress=False)
    beta = stats.layers[0].ratio_median()
    with torch.no_grad():
        r = layer.router(x)
        w_TK, ids_TK = r.topk_weights, r.topk_ids
        w1 = w_TK.max(1).values
        keep_TK = w_TK >= beta * w1[:, None]
        expected = torch.zeros_like(x)
        for t in range(50):
            for k in range(2):
                if keep_TK[t, k]:
                    expected[t] += w_TK[t, k] * expert_out(layer, int(ids_TK[t, k]), x[t])
        skip = P.enable_dynamic_skipping(layer, {0: beta})
        got = layer(x)
        skip.remove()
    torch.testing.assert_close(got, expected)
    assert skip.skipped_pairs == int((~keep_TK).sum()) and skip.pairs == 100
    assert 0.3 <= skip.skipped_fraction / 0.5 <= 1.1  # about half the tokens lose their 2nd expert


# ------------------------------------------------------------------------------------------------ merging
def test_hc_smoe_clusters_like_scipy_and_hand_case():
    from scipy.cluster.hierarchy import fcluster, linkage

    feats = np.random.default_rng(0).normal(size=(10, 5))
    for n in (2, 4, 7):
        ours = M.cluster_experts(feats, n)
        labels = fcluster(linkage(feats, method="average"), t=n, criterion="maxclust")
        ref = sorted(([e for e in range(10) if labels[e] == c] for c in set(labels)), key=lambda g: g[0])
        assert ours == ref
    # 1-D hand case: average linkage joins {0, 1} (0.1), {2, 3} (0.2), then {4} stays apart of them at 3 clusters
    assert M.cluster_experts(np.array([[0.0], [0.1], [5.0], [5.2], [10.0]]), 3) == [[0, 1], [2, 3], [4]]


def test_merge_frequency_weighted_average_by_hand():
    model = tiny_lm(E=4, K=2)
    stats = C.CalibrationStats([C.LayerCalibration(i, "", 4, 2, 16) for i in (0, 1)])
    for s in stats.layers:
        s.tokens = 10
        s.count_E = torch.tensor([3, 1, 0, 6])
        s.output_sum_ED = torch.tensor([[0.0] * 16, [0.1] * 16, [5.0] * 16, [5.1] * 16], dtype=torch.float64) * 10
    merged, groups = M.merge_model(model, stats, {0: 2, 1: 2}, method="hc_smoe")
    assert groups == {0: [[0, 1], [2, 3]], 1: [[0, 1], [2, 3]]}
    old = model.model.layers[0].mlp
    new = merged.model.layers[0].mlp
    assert new.experts.gate_up_proj.shape[0] == 2 and merged.config.moe.num_experts == 2
    W = old.experts.gate_up_proj.detach()
    torch.testing.assert_close(new.experts.gate_up_proj[0], (3 * W[0] + 1 * W[1]) / 4)
    torch.testing.assert_close(new.experts.gate_up_proj[1], W[3])  # expert 2 has frequency 0: weight 0
    torch.testing.assert_close(new.experts.down_proj[0], (3 * old.experts.down_proj[0] + old.experts.down_proj[1]) / 4)
    torch.testing.assert_close(new.gate.weight, old.gate.weight[[0, 3]])  # dominant members' rows
    avg, _ = M.merge_model(model, stats, {0: 2, 1: 2}, router_rows="average")
    torch.testing.assert_close(avg.model.layers[0].mlp.gate.weight[0], old.gate.weight[[0, 1]].mean(0))


def test_uncurl_clusters_experts_with_correlated_logits():
    s = C.LayerCalibration(0, "", 4, 2, 2)
    # logits of experts 0/1 move together, 2/3 together (columns over 3 tokens)
    L = torch.tensor([[1.0, 1.1, -1.0, -1.2], [2.0, 2.1, 0.0, 0.1], [0.0, 0.2, 3.0, 3.1]], dtype=torch.float64)
    s.tokens, s.logit_sum_E, s.logit_gram_EE = 3, L.sum(0), L.T @ L
    assert M.merge_groups(C.CalibrationStats([s]), {0: 2}, "uncurl") == {0: [[0, 1], [2, 3]]}


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def run(tmp_path, monkeypatch):
    """A tiny run folder written directly (config.json + model.safetensors) on a small text corpus."""
    from moekit.io import atomic_save_safetensors, atomic_write_json
    from moekit.train import TrainConfig, new_run_config

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "(", ")", ":", "\n"]
    Path("text.txt").write_text(" ".join(rng.choice(words, 6000)))
    model = tiny_lm(E=4, K=2)
    cfg = new_run_config(model.config, TrainConfig(seq_len=32, batch_size=2, steps=1), str(Path("text.txt").resolve()))
    atomic_write_json(Path("src/config.json"), cfg)
    atomic_save_safetensors(Path("src/model.safetensors"), model.state_dict())
    return model


CAL = ["--calib-data", "text.txt", "--calib-tokens", "2000", "--no-progress"]


def test_cli_prune_writes_a_smaller_run_that_loads(run, capsys):
    from moekit.train import load_run

    assert main(["prune", "src", "out", "--method", "reap", "--keep", "0.5", *CAL]) == 0
    cfg = json.loads(Path("out/config.json").read_text())
    assert cfg["compression"]["method"] == "reap" and cfg["model"]["moe"]["num_experts"] == 2
    assert Path("out/model.safetensors").stat().st_size < 0.9 * Path("src/model.safetensors").stat().st_size
    pruned, _ = load_run(Path("out"))
    keep = {int(i): k for i, k in cfg["compression"]["kept"].items()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), P.masked_model(run, keep):
        torch.testing.assert_close(pruned(ids), run(ids), rtol=1e-5, atol=1e-5)
    assert main(["eval", "out", "--max-windows", "2", "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bits_per_byte"])
    # global budget: per-layer counts may differ and the run still loads
    assert main(["prune", "src", "glob", "--method", "frequency", "--keep", "0.75", "--global", *CAL]) == 0
    g, _ = load_run(Path("glob"))
    assert sum(g.config.experts_per_layer) == 6
    # merge: fewer experts for real
    assert main(["merge", "src", "merged", "--method", "hc_smoe", "--keep", "0.5", *CAL]) == 0
    m, _ = load_run(Path("merged"))
    assert m.config.experts_per_layer == [2, 2]
    assert Path("merged/model.safetensors").stat().st_size < 0.9 * Path("src/model.safetensors").stat().st_size
    # naee with dynamic skipping
    assert main(["prune", "src", "naee", "--method", "naee", "--keep", "0.75", "--clamp-top-k", "--dynamic-skip",
                 "--json", *CAL]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["experts_per_layer"] == [3, 3] and 0 < summary["skipped_fraction"] < 1
    assert not [p for p in Path(".").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_cli_prune_hf_format_round_trip(run, capsys):
    transformers = pytest.importorskip("transformers")
    assert main(["prune", "src", "hf", "--method", "frequency", "--keep", "0.5", "--format", "hf", *CAL]) == 0
    rec = json.loads(Path("hf/moekit_compression.json").read_text())
    keep = {int(i): k for i, k in rec["kept"].items()}
    hf = transformers.AutoModelForCausalLM.from_pretrained("hf").eval()
    assert hf.config.num_experts == 2
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    ours = P.prune_model(run, keep)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), ours(ids).float(), rtol=1e-4, atol=1e-4)
        with P.masked_model(run, keep):
            torch.testing.assert_close(hf(ids).logits.float(), run(ids).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--keep", "0"], "--keep must be a fraction in (0, 1]"),
    (["--keep", "1.5"], "--keep must be a fraction in (0, 1]"),
    (["--keep", "0.25"], "fewer than its top-k"),
    (["--keep", "0.5", "--calib-tokens", "10"], "calibration too small"),
    (["--keep", "0.5", "--calib-tokens", "99999999"], "calibration too small"),
    (["--keep", "0.5", "--global", "--format", "hf"], "--format hf needs the same expert count"),
])
def test_cli_bad_input_one_line_exit_2(run, capsys, argv, message):
    args = ["prune", "src", "out", "--method", "frequency", *CAL, *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not Path("out").exists()


def test_cli_bad_paths(run, capsys):
    for out in ("src", "src/inner"):
        assert main(["prune", "src", out, "--method", "frequency", "--keep", "0.5", *CAL]) == 2
        assert "outside SRC" in capsys.readouterr().err
    Path("taken").mkdir()
    assert main(["merge", "src", "taken", "--method", "hc_smoe", "--keep", "0.5", *CAL]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["prune", "src", "x", "--method", "frequency", "--keep", "0.5", "--calib-domain", "nope",
                 "--calib-tokens", "100"]) == 2


def test_interrupted_write_leaves_nothing(run, monkeypatch, capsys):
    import moekit.io

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(moekit.io, "atomic_save_safetensors", interrupted)
    assert main(["prune", "src", "out", "--method", "frequency", "--keep", "0.5", *CAL]) == 130
    assert not Path("out").exists()
    assert not [p for p in Path(".").iterdir() if p.name.startswith(".")]
