"""DERN (segment assignment and merging) and UNCURL (spectral clustering on router logits, neuron alignment)
against slow loops and brute force."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.compress import calibrate as C
from moekit.compress import dern as DN
from moekit.compress import prune as P
from moekit.compress import uncurl as U

from test_compress_prune import CAL, run, tiny_lm  # noqa: F401  (fixture)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _slow_dern(w_up, w_down, scores, kept, alpha):
    """Reference: loops over every dropped neuron, every kept expert and neuron."""
    E, D, F = w_down.shape
    seg = lambda e, j: torch.cat([w_up[e, j], w_up[e, F + j], w_down[e, :, j]]).double()  # noqa: E731
    acc = {(k, j): [(float(scores[k]), seg(k, j))] for k in kept for j in range(F)}
    assign = []
    for d in range(E):
        if d in kept:
            continue
        for j in range(F):
            best, where = -2.0, None
            for k in kept:
                for i in range(F):
                    c = _cos(seg(d, j), seg(k, i))
                    if c > best + 1e-12:
                        best, where = c, (k, i)
            assign.append(where if best >= alpha else None)
            if best >= alpha:
                acc[where].append((float(scores[d]), seg(d, j)))
    up = torch.zeros(len(kept), 2 * F, D, dtype=torch.float64)
    down = torch.zeros(len(kept), D, F, dtype=torch.float64)
    for n, k in enumerate(kept):
        for j in range(F):
            tot = sum(w for w, _ in acc[(k, j)])
            v = sum(w * s for w, s in acc[(k, j)]) / tot
            up[n, j], up[n, F + j], down[n, :, j] = v[:D], v[D:2 * D], v[2 * D:]
    return up, down, assign


def test_dern_assignment_and_merge_match_a_slow_loop():
    torch.manual_seed(0)
    E, D, F = 5, 3, 4
    w_up = torch.randn(E, 2 * F, D, dtype=torch.float64)
    w_down = torch.randn(E, D, F, dtype=torch.float64)
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    kept = [0, 2, 4]
    for alpha in (-1.0, 0.3):
        r = DN.dern_layer(w_up, w_down, True, scores, kept, alpha)
        up, down, assign = _slow_dern(w_up, w_down, scores, kept, alpha)
        assert r.w_up_KHD.shape == (3, 2 * F, D) and r.w_down_KDF.shape == (3, D, F)  # kept experts' shape
        torch.testing.assert_close(r.w_up_KHD, up)
        torch.testing.assert_close(r.w_down_KDF, down)
        assert r.assigned == sum(a is not None for a in assign) and r.assigned + r.discarded == 2 * F
    # the segment assignment itself against the brute-force argmax
    seg = DN.segments(w_up, w_down, True)
    k, j, _ = DN.assign_segments(seg[[1, 3]].reshape(-1, 3 * D), seg[kept], 0.3)
    got = [None if int(a) < 0 else (kept[int(a)], int(b)) for a, b in zip(k, j)]
    assert got == _slow_dern(w_up, w_down, scores, kept, 0.3)[2]


def test_dern_model_without_merged_segments_is_plain_pruning():
    model = tiny_lm(E=6, K=2)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    stats = C.calibrate(model, [ids], progress=False)
    keep = P.keep_sets(DN.dern_scores(stats), {0: 3, 1: 3}, {0: 2, 1: 2})
    plain = P.prune_model(model, keep)
    same, rep = DN.dern_model(model, stats, keep, alpha=1.0)
    # alpha = 1: only exactly parallel segments merge (none here)
    assert all(a == 0 for a, _ in rep.values())
    with torch.no_grad():
        torch.testing.assert_close(same(ids), plain(ids))
    merged, rep = DN.dern_model(model, stats, keep, alpha=-1.0)
    assert all(a == 3 * 8 for a, _ in rep.values())  # every dropped neuron merged somewhere
    assert merged.config.experts_per_layer == [3, 3]
    with torch.no_grad():
        assert not torch.allclose(merged(ids), plain(ids))


def test_align_permutation_matches_brute_force_and_undoes_a_permutation():
    torch.manual_seed(1)
    F, P_ = 4, 5
    a, b = torch.randn(F, P_), torch.randn(F, P_)
    perm = U.align_permutation(a, b)
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    best = max(itertools.permutations(range(F)), key=lambda p: sum(cos(a[j], b[p[j]]) for j in range(F)))
    assert perm.tolist() == list(best)
    # merging an expert with a neuron-permuted copy of itself gives the expert back (alignment is exact)
    D = 3
    w_up = torch.randn(1, 2 * F, D, dtype=torch.float64)
    w_down = torch.randn(1, D, F, dtype=torch.float64)
    p = torch.tensor([2, 0, 3, 1])
    w_up2 = torch.cat([w_up, w_up[:, torch.cat([p, p + F])]])
    w_down2 = torch.cat([w_down, w_down[:, :, p]])
    up, down = U.merge_aligned(w_up2, w_down2, True, [0, 1], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(up, w_up[0])
    torch.testing.assert_close(down, w_down[0])


def test_uncurl_spectral_clusters_follow_logit_blocks():
    s = C.LayerCalibration(0, "", 6, 2, 2)
    torch.manual_seed(2)
    base = torch.randn(40, 3, dtype=torch.float64)
    L = torch.cat([base[:, [0]], base[:, [0]] * 1.1, base[:, [1]], base[:, [1]] + 0.05, base[:, [2]],
                   base[:, [2]] * 0.9], dim=1)
    s.tokens, s.logit_sum_E, s.logit_gram_EE = 40, L.sum(0), L.T @ L
    assert U.uncurl_groups(C.CalibrationStats([s]), {0: 3}) == {0: [[0, 1], [2, 3], [4, 5]]}
    with pytest.raises(ValueError):
        U.spectral_clusters(np.eye(3), 4)


def test_cli_prune_dern_and_uncurl(run, capsys):  # noqa: F811
    from moekit.train import load_run

    assert main(["prune", "src", "d", "--method", "dern", "--keep", "0.5", "--dern-alpha", "0.0", "--json", *CAL]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["experts_per_layer"] == [2, 2]
    rec = json.loads(Path("d/config.json").read_text())["compression"]
    assert rec["method"] == "dern" and set(rec["dern"]["segments"]) == {"0", "1"}
    m, _ = load_run(Path("d"))
    assert m.model.layers[0].mlp.experts.gate_up_proj.shape == (2, 16, 16)
    assert main(["prune", "src", "u", "--method", "uncurl", "--keep", "0.5", *CAL]) == 0
    u, _ = load_run(Path("u"))
    assert u.config.experts_per_layer == [2, 2]
    assert main(["prune", "src", "x", "--method", "dern", "--keep", "0.5", "--dern-alpha", "2", *CAL]) == 2
    assert "--dern-alpha" in capsys.readouterr().err
