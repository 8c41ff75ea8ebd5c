"""`moekit bench --hf` smoke run on tiny models: the three implementations are timed on the same weights."""
import json

import pytest

pytest.importorskip("transformers")


def test_hf_bench_quick_json(capsys):
    from moekit.hf.bench import main

    assert main(["--quick", "--json", "--models", "olmoe"]) == 0
    out = json.loads(capsys.readouterr().out)
    row = out["models"]["olmoe"]
    assert {"eager", "grouped_mm", "moekit"} <= set(row) and all(row[k] > 0 for k in ("eager", "grouped_mm", "moekit"))
    assert row["speedup_vs_best"] == pytest.approx(row[row["best_transformers"]] / row["moekit"])
