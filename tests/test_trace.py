"""Routing traces: format round trip and error handling, recorder, statistics against brute force, disparity."""
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import moekit
from moekit.routing.base import Router, Routing
from moekit.trace import (Trace, TraceFormatError, coactivation, cross_layer_predictability, disparity_by_domain,
                          domain_expert_frequency, expert_load, load_entropy, load_trace, max_violation,
                          pad_assignments, record_routing, routing_disparity, save_trace, synthetic_trace,
                          token_entropy, trace_model, transition_counts, transition_matrices)
from moekit.trace.format import HEADER_KEY, TOKEN_FIELDS


def _variable_trace(seed=0, L=3, T=40, E=5, K=3):
    """Random trace with a variable number of experts per token (pads), as expert choice produces."""
    rng = np.random.default_rng(seed)
    experts = np.full((L, T, K), -1)
    weights = np.zeros((L, T, K), dtype=np.float32)
    for l in range(L):
        for t in range(T):
            k = rng.integers(0, K + 1)
            experts[l, t, :k] = rng.choice(E, size=k, replace=False)
            weights[l, t, :k] = np.sort(rng.random(k))[::-1]
    return Trace(experts=experts, weights=weights, num_experts=E, layer_names=[f"l{l}" for l in range(L)],
                 logits=rng.normal(size=(L, T, E)).astype(np.float32), domain_ids=rng.integers(-1, 3, T),
                 domain_names=["a", "b", "c"], doc_ids=np.arange(T) // 4)


def _assert_same(a: Trace, b: Trace):
    for name, tensor in a.tensors().items():
        other = b.tensors()[name]
        assert tensor.dtype == other.dtype, name
        assert torch.equal(tensor, other), name
    assert a.header() == b.header()


# ---------------------------------------------------------------------------------------------- format
def test_round_trip(tmp_path):
    trace = synthetic_trace(seed=1)
    path = save_trace(trace, tmp_path / "t.safetensors")
    loaded = load_trace(path)
    _assert_same(trace, loaded)
    assert loaded.experts.dtype == torch.int16 and loaded.weights.dtype == torch.float32
    assert all(getattr(loaded, n).dtype == torch.int32 for n in TOKEN_FIELDS)
    assert loaded.header()["format"] == "moekit-trace" and loaded.header()["version"] == 1
    assert os.listdir(tmp_path) == ["t.safetensors"]  # no temporary file left behind


def test_round_trip_variable_k_float16_logits_no_logits(tmp_path):
    trace = _variable_trace()
    trace.logits = trace.logits.half()
    save_trace(trace, tmp_path / "v.safetensors")
    _assert_same(trace, load_trace(tmp_path / "v.safetensors"))
    bare = synthetic_trace(keep_logits=False)
    save_trace(bare, tmp_path / "b.safetensors")
    assert load_trace(tmp_path / "b.safetensors").logits is None


def test_doc_example_reads_with_safetensors_alone(tmp_path):
    save_trace(synthetic_trace(), tmp_path / "trace.safetensors")
    doc = (Path(__file__).parents[1] / "docs" / "trace-format.md").read_text()
    code = re.search(r"## Reading a trace with safetensors alone\s+```python\n(.*?)```", doc, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "trace-format.md", "exec"), {})
    finally:
        os.chdir(cwd)


def _header_file(path, **changes):
    trace = synthetic_trace(num_tokens=100)
    header = {**trace.header(), **changes}
    save_file({k: v.contiguous() for k, v in trace.tensors().items()}, str(path),
              metadata={HEADER_KEY: json.dumps(header)})


@pytest.mark.parametrize("changes, message", [
    ({"version": 2}, "version 2"),
    ({"format": "other"}, "format 'other'"),
])
def test_other_format_or_version_is_refused(tmp_path, changes, message):
    _header_file(tmp_path / "t.safetensors", **changes)
    with pytest.raises(ValueError, match=message):
        load_trace(tmp_path / "t.safetensors")


def _one_sentence(exc: Exception) -> bool:
    return "\n" not in str(exc) and len(str(exc)) < 300


def test_bad_files_raise_value_error(tmp_path):
    good = tmp_path / "good.safetensors"
    save_trace(synthetic_trace(num_tokens=200), good)
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "header-cut": data[:20],
        "empty": b"",
        "garbage": b"not a safetensors file at all" * 10,
        "bad-length": (10 ** 12).to_bytes(8, "little") + data[8:],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            load_trace(path)
        assert isinstance(info.value, TraceFormatError) and _one_sentence(info.value), name
    with pytest.raises(ValueError, match="does not exist"):
        load_trace(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a moekit trace"):
        load_trace(tmp_path / "plain.safetensors")


def test_missing_tensor_or_field(tmp_path):
    trace = synthetic_trace(num_tokens=50)
    tensors = {k: v for k, v in trace.tensors().items() if k != "doc_ids"}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={HEADER_KEY: json.dumps(trace.header())})
    with pytest.raises(ValueError, match="doc_ids"):
        load_trace(tmp_path / "m.safetensors")
    header = trace.header()
    del header["layer_names"]
    save_file(trace.tensors(), str(tmp_path / "h.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(ValueError, match="layer_names"):
        load_trace(tmp_path / "h.safetensors")
    _header_file(tmp_path / "s.safetensors", num_tokens=7)
    with pytest.raises(ValueError, match="header says"):
        load_trace(tmp_path / "s.safetensors")


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    old = synthetic_trace(num_tokens=30)
    save_trace(old, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moekit.io.save_file", boom)
    with pytest.raises(OSError):
        save_trace(synthetic_trace(num_tokens=60), path)
    _assert_same(old, load_trace(path))
    assert os.listdir(tmp_path) == ["t.safetensors"]


@pytest.mark.parametrize("experts, weights, message", [
    ([[[-1, 2]]], [[[0.0, 0.5]]], "pads must come after"),
    ([[[1, 1]]], [[[0.5, 0.5]]], "twice"),
    ([[[4, 1]]], [[[0.5, 0.5]]], ">= the layer's number"),
    ([[[1, -1]]], [[[0.5, 0.1]]], "weights must be 0"),
    ([[[1, -2]]], [[[0.5, 0.0]]], ">= -1"),
])
def test_trace_validation(experts, weights, message):
    with pytest.raises(ValueError, match=message):
        Trace(experts=experts, weights=weights, num_experts=4, layer_names=["x"])


def test_select_and_concat():
    trace = _variable_trace(T=30)
    first, second = trace.select(np.arange(30) < 12), trace.select(np.arange(12, 30))
    joined = Trace.concat([first, second])
    assert torch.equal(joined.experts[..., :trace.top_k], trace.experts[..., :joined.top_k])
    assert torch.equal(joined.domain_ids, trace.domain_ids) and torch.equal(joined.logits, trace.logits)
    assert (joined.seq_ids == -1).all()  # unknown stays unknown
    synth = synthetic_trace(num_tokens=100)
    doubled = Trace.concat([synth, synth])
    assert doubled.num_tokens == 200 and int(doubled.seq_ids[100]) == int(synth.seq_ids.max()) + 1


# ---------------------------------------------------------------------------------------------- recorder
def _two_layer_model():
    cfg = moekit.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2)
    return nn.Sequential(moekit.MoE(cfg), moekit.MoE(cfg)).eval()


def test_recorder_matches_last_routing():
    model = _two_layer_model()
    inputs = [torch.randn(2, 5, 16), torch.randn(3, 16)]
    seen = []
    with torch.no_grad(), record_routing(model, keep_logits=True) as rec:
        for i, x in enumerate(inputs):
            model(x)
            seen.append([layer.last_routing for layer in model])
            rec.annotate(tokens=torch.arange(x[..., 0].numel()).view(x.shape[:-1]) + 100 * i,
                         domain_ids=torch.full(x.shape[:-1], i))
    trace = rec.trace(domain_names=["first", "second"], source={"test": True})
    assert trace.layer_names == ["0", "1"] and trace.num_tokens == 13 and trace.top_k == 2
    assert trace.model["num_experts"] == 4 and trace.model["router"] == "topk" and trace.source == {"test": True}
    start = 0
    for routings in seen:
        T = routings[0].num_tokens
        for l, r in enumerate(routings):
            assert torch.equal(trace.experts[l, start:start + T].long(), r.topk_ids)
            assert torch.allclose(trace.weights[l, start:start + T], r.topk_weights.float())
            assert torch.equal(trace.logits[l, start:start + T], r.logits.float())
        start += T
    assert trace.positions.tolist() == [0, 1, 2, 3, 4] * 2 + [0, 1, 2]
    assert trace.seq_ids.tolist() == [0] * 5 + [1] * 5 + [2] * 3
    assert trace.tokens.tolist() == list(range(10)) + [100, 101, 102]
    assert trace.domain_ids.tolist() == [0] * 10 + [1] * 3
    assert (trace.doc_ids == -1).all()
    # the trace's flat pairs are the routing's pairs, for every layer
    last = trace.select(np.arange(10, 13))
    for l, r in enumerate(seen[1]):
        tok, exp, w = last.pairs(l)
        assert sorted(zip(tok.tolist(), exp.tolist())) == sorted(zip(r.token_ids.tolist(), r.expert_ids.tolist()))


class _ThresholdRouter(Router):
    """Test router: every expert whose softmax probability exceeds 1/E (0 to E experts per token)."""

    def __init__(self, dim, num_experts):
        super().__init__(dim, num_experts, 1)
        self.weight = nn.Parameter(torch.randn(num_experts, dim))

    def forward(self, x_TD, ctx=None):
        logits_TE = (x_TD @ self.weight.T).float()
        probs_TE = logits_TE.softmax(-1)
        token_S, expert_S = torch.nonzero(probs_TE > 1.0 / self.num_experts, as_tuple=True)
        return Routing(token_S, expert_S, probs_TE[token_S, expert_S], x_TD.shape[0], self.num_experts,
                       logits=logits_TE)


def test_recorder_variable_experts_per_token():
    model = _two_layer_model()
    for layer in model:
        layer.gate = _ThresholdRouter(16, 4)
    with torch.no_grad(), record_routing(model, layer_names=["1"]) as rec:
        model(torch.randn(4, 6, 16))
        routing = model[1].last_routing
    trace = rec.trace()
    assert trace.layer_names == ["1"]
    counts = torch.bincount(routing.token_ids, minlength=24)
    assert trace.top_k == int(counts.max())
    assert ((trace.experts[0] >= 0).sum(-1) == counts).all()
    tok, exp, w = trace.pairs(0)
    assert sorted(zip(tok.tolist(), exp.tolist(), w.tolist())) == sorted(
        zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), routing.weights.tolist()))
    assert (trace.weights[0, :, :-1] >= trace.weights[0, :, 1:]).all()  # sorted by weight


def test_pad_assignments():
    experts, weights = pad_assignments(torch.tensor([2, 0, 0, 0, 2]), torch.tensor([1, 3, 0, 2, 0]),
                                       torch.tensor([0.2, 0.1, 0.5, 0.3, 0.7]), num_tokens=4)
    assert experts.tolist() == [[0, 2, 3], [-1, -1, -1], [0, 1, -1], [-1, -1, -1]]
    assert torch.allclose(weights, torch.tensor([[0.5, 0.3, 0.1], [0, 0, 0], [0.7, 0.2, 0], [0, 0, 0]]))


def test_recorder_errors():
    model = _two_layer_model()
    with pytest.raises(ValueError, match="not moekit.MoE"):
        record_routing(model, layer_names=["nope"]).__enter__()
    with pytest.raises(ValueError, match="no moekit.MoE"):
        record_routing(nn.Linear(2, 2)).__enter__()
    with torch.no_grad(), record_routing(model) as rec:
        with pytest.raises(ValueError, match="no forward call"):
            rec.trace()
        model(torch.randn(5, 16))
        model(torch.randn(2, 16))
        rec.annotate(tokens=torch.arange(5))
        with pytest.raises(ValueError, match="once per forward call"):
            rec.trace()
        rec.annotate(tokens=torch.arange(3))
        with pytest.raises(ValueError, match="3 entries for 2 tokens"):
            rec.trace()
    assert not model[0]._forward_hooks  # hooks removed on exit


def test_trace_model_over_batches():
    cfg = moekit.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2)
    model = nn.Sequential(nn.Embedding(50, 16), moekit.MoE(cfg), moekit.MoE(cfg)).train()
    batches = [{"input_ids": torch.randint(0, 50, (2, 6)), "doc_ids": torch.full((2, 6), i),
                "domain_ids": torch.full((2, 6), i % 2)} for i in range(3)]
    trace = trace_model(model, batches, domain_names=["x", "y"], model_info={"n_layers": 2},
                        source={"data": "test"})
    assert model.training  # restored
    assert trace.layer_names == ["1", "2"] and trace.num_tokens == 36 and trace.model["n_layers"] == 2
    assert trace.tokens.tolist() == torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()
    assert trace.doc_ids.tolist() == [0] * 12 + [1] * 12 + [2] * 12 and trace.seq_ids.max() == 5
    assert trace.domain_names == ["x", "y"] and trace.source == {"data": "test"}


# ---------------------------------------------------------------------------------------------- statistics
def _brute_rows(trace, l):
    return [[int(e) for e in row if e >= 0] for row in trace.experts[l].tolist()]


def test_statistics_against_brute_force():
    trace = _variable_trace(seed=3)
    L, T, E = trace.num_layers, trace.num_tokens, trace.num_experts
    load = expert_load(trace)
    for l in range(L):
        rows = _brute_rows(trace, l)
        brute_load = [sum(e in r for r in rows) for e in range(E)]
        assert load[l].tolist() == brute_load
        mean = sum(brute_load) / E
        assert math.isclose(max_violation(trace)[l], (max(brute_load) - mean) / mean)
        total = sum(brute_load)
        assert math.isclose(load_entropy(trace)[l], -sum(c / total * math.log2(c / total) for c in brute_load if c))
        co = coactivation(trace, l)
        for i in range(E):
            for j in range(E):
                expect = sum(i in r for r in rows) if i == j else sum(i in r and j in r for r in rows)
                assert co[i, j] == expect
        probs = torch.softmax(trace.logits[l].double(), -1)
        brute_h = float(-(probs * probs.log2()).sum(-1).mean())
        assert math.isclose(token_entropy(trace)[l], brute_h, rel_tol=1e-5)
    for l in range(L - 1):
        a, b = _brute_rows(trace, l), _brute_rows(trace, l + 1)
        brute = np.zeros((E, E), dtype=int)
        for t in range(T):
            for i in a[t]:
                for j in b[t]:
                    brute[i, j] += 1
        assert (transition_counts(trace, l) == brute).all()
        assert (transition_matrices(trace)[l] == brute).all()
    freq, tokens = domain_expert_frequency(trace)
    domains = trace.domain_ids.tolist()
    for d in range(3):
        members = [t for t in range(T) if domains[t] == d]
        assert tokens[d] == len(members)
        for l in range(L):
            rows = _brute_rows(trace, l)
            for e in range(E):
                assert math.isclose(freq[l, d, e], sum(e in rows[t] for t in members) / len(members))


def test_statistics_edge_cases():
    uniform = Trace(experts=np.arange(8).reshape(1, 8, 1) % 4, weights=np.ones((1, 8, 1)), num_experts=4,
                    layer_names=["x"])
    assert max_violation(uniform)[0] == 0.0 and math.isclose(load_entropy(uniform)[0], 2.0)
    assert token_entropy(uniform) is None and transition_matrices(uniform).shape == (0, 4, 4)
    collapsed = Trace(experts=np.zeros((1, 8, 1), dtype=int), weights=np.ones((1, 8, 1)), num_experts=4,
                      layer_names=["x"])
    assert max_violation(collapsed)[0] == 3.0 and load_entropy(collapsed)[0] == 0.0
    with pytest.raises(ValueError):
        transition_counts(uniform, 0)


def _brute_predictability(trace, l, fit, held):
    E = trace.num_experts
    a, b = _brute_rows(trace, l), _brute_rows(trace, l + 1)
    counts = np.zeros((E, E))
    popularity = np.zeros(E)
    for t in fit:
        for i in a[t]:
            for j in b[t]:
                counts[i, j] += 1
        for j in b[t]:
            popularity[j] += 1
    hits = used = top1 = tokens = 0
    for t in held:
        if not b[t]:
            continue
        score = [sum(counts[i, j] for i in a[t]) + popularity[j] / (popularity.sum() + 1) for j in range(E)]
        ranked = sorted(range(E), key=lambda j: (-score[j], j))
        hits += len(set(ranked[:len(b[t])]) & set(b[t]))
        used += len(b[t])
        top1 += ranked[0] == b[t][0]
        tokens += 1
    return hits / used, top1 / tokens


def test_cross_layer_predictability():
    chain = synthetic_trace(num_layers=3, num_tokens=600, num_experts=8, top_k=1, coupling=50.0)
    p = cross_layer_predictability(chain)
    assert np.allclose(p.hit_rate, 1.0) and np.allclose(p.top1_accuracy, 1.0)
    assert (p.baseline_hit_rate < 0.5).all()
    trace = _variable_trace(seed=5, T=60)
    p = cross_layer_predictability(trace, seed=7)
    perm = np.random.default_rng(7).permutation(60)
    fit, held = np.sort(perm[:30]), np.sort(perm[30:])
    for l in range(trace.num_layers - 1):
        hit, top1 = _brute_predictability(trace, l, fit, held)
        assert math.isclose(p.hit_rate[l], hit) and math.isclose(p.top1_accuracy[l], top1)


# ---------------------------------------------------------------------------------------------- disparity
def test_disparity_finds_the_specialised_expert():
    trace = synthetic_trace(num_layers=2, num_tokens=3000, num_experts=8, seed=2)
    experts = trace.experts.clone()
    domain_a = (trace.domain_ids == 0) & (experts[1, :, 0] != 5)
    experts[1, domain_a, 1] = 5  # domain A's tokens all use expert 5 at layer 1
    trace = Trace(**{**trace.__dict__, "experts": experts})
    d = disparity_by_domain(trace, "domain0", 1, num_resamples=300)
    assert d.unit == "document" and d.units_a == d.units_b == 30
    assert d.label_a == "domain0" and d.label_b == "domain1"
    top = d.top(3)
    assert (top[0].layer, top[0].expert) == (1, 5) and top[0].difference > 0.5 and top[0].ci_low > 0
    assert math.isclose(top[0].value_a, 1.0)
    again = disparity_by_domain(trace, 0, 1, num_resamples=300)
    assert np.array_equal(again.ci_low, d.ci_low)  # seeded


def test_disparity_signs_for_two_specialised_domains():
    trace = synthetic_trace(num_layers=2, num_tokens=3000, num_experts=8, domain_strength=2.5, seed=2)
    d = disparity_by_domain(trace, "domain0", "domain1", num_resamples=300)
    top = d.top(4)
    assert {(x.layer, x.expert) for x in top} == {(0, 0), (1, 0), (0, 3), (1, 3)}
    for x in top:  # domain0 prefers expert 0, domain1 expert 3
        assert (x.difference > 0 and x.ci_low > 0) if x.expert == 0 else (x.difference < 0 and x.ci_high < 0)


def test_disparity_identical_groups_include_zero():
    trace = synthetic_trace(num_layers=2, num_tokens=2000, num_experts=8, domain_strength=2.0, seed=4)
    for unit in ("document", "token", "sequence"):
        d = routing_disparity(trace, trace, unit=unit, num_resamples=300)
        assert np.allclose(d.difference, 0.0)
        assert (d.ci_low <= 0).all() and (d.ci_high >= 0).all() and not d.top()
        assert (d.ci_high - d.ci_low > 0).any()
    weight = routing_disparity(trace, labels=("x", "y"), measure="weight", num_resamples=100)
    assert not weight.significant.any()


def test_disparity_two_traces_and_token_paths_agree():
    a = synthetic_trace(num_layers=2, num_tokens=4000, num_experts=6, seed=1, skew=0.0)
    b = synthetic_trace(num_layers=2, num_tokens=4000, num_experts=6, seed=2, skew=1.5)
    b.doc_ids = torch.full_like(b.doc_ids, -1)  # no documents: falls back to tokens
    d = routing_disparity(a, b, labels=("flat", "skewed"), num_resamples=400)
    assert d.unit == "token" and d.label_b == "skewed"
    assert d.top(1)[0].expert in (0, 5)
    # the exact binomial draw (token units) and the general resampling (one token per sequence) agree
    b.seq_ids = torch.arange(b.num_tokens, dtype=torch.int32)
    a.seq_ids = torch.arange(a.num_tokens, dtype=torch.int32)
    general = routing_disparity(a, b, unit="sequence", num_resamples=400)
    width_binomial, width_general = d.ci_high - d.ci_low, general.ci_high - general.ci_low
    assert np.allclose(width_binomial, width_general, rtol=0.25)


def test_disparity_errors():
    trace = synthetic_trace(num_tokens=200)
    with pytest.raises(ValueError, match="same"):
        disparity_by_domain(trace, 0, "domain0")
    with pytest.raises(ValueError, match="not in this trace"):
        disparity_by_domain(trace, "nope", 0)
    with pytest.raises(ValueError, match="unit"):
        routing_disparity(trace, unit="page")
    with pytest.raises(ValueError, match="no tokens"):
        routing_disparity(trace, trace, np.zeros(200, bool), None)
    with pytest.raises(ValueError, match="differ in number"):
        routing_disparity(trace, synthetic_trace(num_experts=4))


def test_disparity_sparse_and_dense_unit_sums_agree(monkeypatch):
    trace = synthetic_trace(num_layers=2, num_tokens=1500, num_experts=6, domain_strength=1.0, doc_len=30)
    dense = disparity_by_domain(trace, 0, 1, measure="weight", num_resamples=200)
    monkeypatch.setattr("moekit.trace.disparity._MAX_DENSE_SUMS", 0)
    sparse = disparity_by_domain(trace, 0, 1, measure="weight", num_resamples=200)
    assert np.allclose(dense.ci_low, sparse.ci_low) and np.allclose(dense.ci_high, sparse.ci_high)
    assert np.allclose(dense.value_a, sparse.value_a) and dense.units_a == sparse.units_a == 25
