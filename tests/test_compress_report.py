"""``moekit compress-report``: the Pareto front against brute force, router agreement by hand, and one tiny
report end to end (files written atomically, bad input one line + exit 2). Also ``moekit eval --dynamic-skip``
reading the betas that ``moekit prune --dynamic-skip`` stored."""
from __future__ import annotations

import json
import random
from pathlib import Path

from moekit.cli import main
from moekit.compress import report as R

from test_compress_prune import CAL, run  # noqa: F401  (fixture)


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        pts = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(12)]
        dominated = lambda i: any(  # noqa: E731
            pts[j][0] <= pts[i][0] and pts[j][1] <= pts[i][1] and pts[j] != pts[i] for j in range(len(pts)))
        expect = {pts[i] for i in range(len(pts)) if not dominated(i)}
        got = [pts[i] for i in R.pareto_front(pts)]
        assert set(got) == expect and len(got) == len(expect)  # duplicates of a front point counted once


def test_router_agreement_by_hand():
    orig = {0: [[{0, 1}, {2, 3}]], 1: [[{1, 2}, {0, 3}]]}
    # pruned layer 0 kept experts [0, 2, 3] -> new ids 0, 1, 2; layer 1 merged {0,1} -> 0, {2,3} -> 1
    comp = {0: [[{0, 1}, {1, 2}]], 1: [[{0, 1}, {1}]]}
    groups = {0: [[0], [2], [3]], 1: [[0, 1], [2, 3]]}
    # layer 0: token0 O={0,1} C->{0,2}: 1/2; token1 O={2,3} C->{2,3}: 1; layer 1: {1,2} vs {0,1,2,3}: 1; {0,3} vs {2,3}: 1/2
    assert R.router_agreement(orig, comp, groups) == (0.5 + 1 + 1 + 0.5) / 4
    assert R.router_agreement(orig, orig, None) == 1.0


def test_tiny_report_end_to_end(run, capsys):  # noqa: F811
    cfg = R.ReportConfig(prune_methods=("frequency",), merge_methods=("hc_smoe",), keeps=(0.5,),
                         quant=(("rtn", 8),), eval_windows=2, calib_tokens=2000, agreement_windows=2,
                         decode_tokens=4, decode_repeats=1)
    report = R.run_report("src", cfg, progress=False)
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"original", "frequency keep 0.5", "hc_smoe keep 0.5", "rtn 8 bits"}
    assert all("error" not in r for r in rows.values())
    assert rows["frequency keep 0.5"]["expert_bytes"] == rows["original"]["expert_bytes"] // 2
    assert rows["rtn 8 bits"]["router_agreement"] > 0.9
    assert 0 <= rows["frequency keep 0.5"]["router_agreement"] <= 1
    assert any(r.get("pareto") for r in rows.values())
    R.write_outputs(report, "rep")
    assert {p.name for p in Path("rep").iterdir()} == {"report.json", "report.md", "size_quality.png", "index.html"}
    assert "| frequency | keep 0.5 |" in Path("rep/report.md").read_text()
    assert json.loads(Path("rep/report.json").read_text())["rows"][0]["label"] == "original"
    assert not [p for p in Path(".").iterdir() if p.name.startswith(".")]
    capsys.readouterr()
    assert main(["compress-report", "src", "rep", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1
    assert main(["compress-report", "src", "rep2", "--methods", "nope"]) == 2
    assert "--methods" in capsys.readouterr().err


def test_eval_dynamic_skip_reads_stored_betas(run, capsys):  # noqa: F811
    assert main(["prune", "src", "n", "--method", "naee", "--keep", "0.75", "--clamp-top-k", "--dynamic-skip",
                 "--json", *CAL]) == 0
    betas = json.loads(Path("n/config.json").read_text())["compression"]["betas"]
    capsys.readouterr()
    assert main(["eval", "n", "--max-windows", "2", "--json", "--dynamic-skip"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["dynamic_skip"]["betas"] == betas and 0 < out["dynamic_skip"]["skipped_fraction"] < 1
    assert "config.json" in captured.err
    assert main(["eval", "n", "--max-windows", "2", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "dynamic_skip" not in plain and plain["bits_per_byte"] != out["bits_per_byte"]
    assert main(["generate", "n", "--prompt", "a", "--max-new-tokens", "3", "--dynamic-skip", "--json"]) == 0
    assert "routed experts skipped" in capsys.readouterr().err
