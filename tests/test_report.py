"""The routing report: HTML with PNG plots from a trace and/or metrics.jsonl, and the terminal summary."""
import json
import re

import numpy as np
import pytest

from moekit.report import analyse, build_report, read_metrics, report_inputs, summary_text
from moekit.trace import save_trace, synthetic_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics_file(path, steps=120, layers=3, experts=8, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            load = rng.integers(20, 200, (layers, experts)).tolist()
            rec = {"step": step, "loss": 3.0 / step ** 0.3, "bits_per_byte": 4.3 / step ** 0.3,
                   "max_vio": [float(rng.random()) for _ in range(layers)], "load": load}
            if step % 40 == 0:
                rec["val_bits_per_byte"] = 4.5 / step ** 0.3
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 121, "loss": 1.0, "lo')  # a line cut off while training runs
    return path


def _images(index):
    html = index.read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    for src in sources:
        png = index.parent / src
        assert "/" not in src and png.is_file(), src
        data = png.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), src
    return sources


def test_report_trace_and_metrics(tmp_path):
    trace = synthetic_trace(num_layers=3, num_tokens=2000, num_experts=8, domain_strength=2.0, coupling=1.5)
    metrics = _metrics_file(tmp_path / "metrics.jsonl")
    index = build_report(tmp_path / "report", trace, metrics, title="test <report>", num_resamples=200)
    assert index == tmp_path / "report" / "index.html"
    sources = _images(index)
    for name in ("load.png", "coactivation.png", "transitions.png", "predictability.png", "domain_expert.png",
                 "disparity.png", "train_max_vio.png", "train_loss.png", "train_load.png"):
        assert name in sources
    html = index.read_text()
    assert "test &lt;report&gt;" in html and "MaxVio" in html and "domain0 vs domain1" in html
    summary = (tmp_path / "report" / "summary.txt").read_text()
    assert "MaxVio" in summary and "disparity domain0 - domain1" in summary
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]  # no temporary files


def test_report_trace_only_and_metrics_only(tmp_path):
    trace = synthetic_trace(num_layers=2, num_tokens=600, num_experts=4, top_k=1, num_domains=1,
                            keep_logits=False)
    sources = _images(build_report(tmp_path / "t", trace=trace))
    assert "load.png" in sources and "disparity.png" not in sources and "coactivation.png" not in sources
    sources = _images(build_report(tmp_path / "m", metrics_path=_metrics_file(tmp_path / "metrics.jsonl")))
    assert set(sources) == {"train_max_vio.png", "train_loss.png", "train_load.png"}
    with pytest.raises(ValueError, match="needs a trace"):
        build_report(tmp_path / "none")


def test_report_groups(tmp_path):
    a = synthetic_trace(num_layers=2, num_tokens=1000, num_experts=6, seed=1)
    b = synthetic_trace(num_layers=2, num_tokens=1000, num_experts=6, seed=2, skew=2.0)
    an = analyse(a, groups=(a, b), labels=("user set", "other set"), num_resamples=100)
    assert an.disparity.label_a == "user set"
    index = build_report(tmp_path / "r", analysis=an)
    assert "disparity.png" in _images(index) and "user set vs other set" in index.read_text()
    no_groups = build_report(tmp_path / "n", a, groups=False)
    assert "disparity.png" not in _images(no_groups)
    with pytest.raises(ValueError, match="not in this trace"):
        analyse(a, groups=("domain0", "nope"))


def test_summary_text(tmp_path):
    trace = synthetic_trace(num_layers=2, num_tokens=2000, num_experts=8, domain_strength=3.0)
    metrics = _metrics_file(tmp_path / "metrics.jsonl", layers=2)
    text = summary_text(trace, metrics, num_resamples=200)
    assert "2,000 tokens" in text and "MaxVio per layer" in text and "cross-layer prediction" in text
    assert "entropy" in text and "training: 120 records" in text
    assert re.search(r"top: L\d E[03] [+-]0\.\d+", text)
    assert len(text.splitlines()) <= 10


def test_read_metrics(tmp_path):
    path = _metrics_file(tmp_path / "metrics.jsonl", steps=10, layers=2, experts=4)
    m = read_metrics(path)
    assert m.num_records == 10 and m.skipped_lines == 1 and m.load.shape == (10, 2, 4)
    assert np.isfinite(m.val_bits_per_byte).sum() == 0 and np.isfinite(m.loss).all()
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"step": 1, "load": [[1, 1, 2], [0, 0, 4]]}) + "\n\n")
    m = read_metrics(bare)
    assert np.allclose(m.max_vio[0], [0.5, 2.0])  # computed from the load
    with pytest.raises(ValueError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="no training record"):
        read_metrics(tmp_path / "empty.jsonl")


def test_report_inputs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match="neither"):
        report_inputs(run)
    _metrics_file(run / "metrics.jsonl", steps=5)
    trace, metrics = report_inputs(run)
    assert trace is None and metrics == run / "metrics.jsonl"
    save_trace(synthetic_trace(num_tokens=100), run / "trace.safetensors")
    trace, metrics = report_inputs(run)
    assert trace.num_tokens == 100 and metrics is not None
    trace, metrics = report_inputs(run / "trace.safetensors")
    assert trace.num_tokens == 100 and metrics is None
    with pytest.raises(ValueError, match="neither a run folder nor a trace file"):
        report_inputs(tmp_path / "missing")
