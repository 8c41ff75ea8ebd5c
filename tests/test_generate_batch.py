"""Batched and streaming generation: ``moekit.generate`` (padded batches, per-sequence stops, text streaming),
the model's ``attention_mask`` and ``moekit generate --prompts / --stop / --json``.

References are independent of the generation code: logits of each prompt run alone without any mask, and a
plain greedy loop that re-runs the whole unpadded sequence at every step and takes the argmax.
"""
from __future__ import annotations

import json

import pytest
import torch

import moekit
import moekit.train
from moekit.cli import main
from moekit.model import KVCache, ModelConfig, MoELM
from moekit.model.generate import TextStream

TINY = ["--batch-size", "4", "--seq-len", "32", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
        "--n-kv-heads", "1", "--hidden-dim", "32", "--num-experts", "4", "--checkpoint-every", "5",
        "--final-eval-windows", "4", "--max-seq-len", "128", "--no-progress"]

BOS = 256
# Prompt lengths 1, 2, 6, 13 and 17 tokens (BOS included): every row of a batch gets a different padding.
PROMPTS = ["", "x", "hello", "def f(x):\n  r", "import os, sys\n\nc"]


def tiny_model(seed=0, router="topk", **overrides) -> MoELM:
    torch.manual_seed(seed)
    settings = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.3,
                    moe=dict(hidden_dim=16, num_experts=4, top_k=2, norm_topk=True, router=router))
    settings.update(overrides)
    return MoELM(ModelConfig(**settings)).eval()


def ids_of(text: str) -> list[int]:
    return [BOS, *text.encode("utf-8")]


@torch.no_grad()
def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by brute force: the whole sequence alone, no cache, no mask, at every step."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


# ------------------------------------------------------------------------------------------ attention mask
@pytest.mark.parametrize("router", ["topk", "attention"])  # attention: the explicit (need_weights) path
def test_padded_prompt_logits_equal_unpadded(router):
    model = tiny_model(router=router)
    prompts = [ids_of(p) for p in PROMPTS]
    P = max(map(len, prompts))
    ids = torch.tensor([[258] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        cache = KVCache.for_model(model, len(prompts), P + 3)
        cached = [model(ids, kv_cache=cache, start_pos=0, attention_mask=mask)[:, -1]]
        steps = torch.tensor([[ord("a"), ord("b"), ord("c")]] * len(prompts))
        for j in range(3):  # decode three more tokens, one at a time, through the cache
            mask = torch.cat((mask, torch.ones(len(prompts), 1, dtype=torch.bool)), dim=1)
            cached.append(model(steps[:, j:j + 1], kv_cache=cache, start_pos=P + j, attention_mask=mask)[:, -1])
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p + steps[b].tolist()]))[0]
            n = len(p)
            assert torch.isfinite(padded[b]).all()
            torch.testing.assert_close(padded[b, P - n:], alone[:n], rtol=0, atol=1e-5)
            for j in range(4):
                torch.testing.assert_close(cached[j][b], alone[n - 1 + j], rtol=0, atol=1e-5)


def test_token_mask_reaches_the_moe_layers():
    model = tiny_model()
    seen = []
    for layer in moekit.moe_layers(model):
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[1].token_mask))
    ids = torch.tensor([[258, 258, BOS, 1], [BOS, 1, 2, 3]])
    mask = ids != 258
    with torch.no_grad():
        model(ids, attention_mask=mask)
        assert len(seen) == 2 and all(torch.equal(m, mask) for m in seen)
        seen.clear()
        model(ids)
        assert seen == [None, None]
        seen.clear()
        cache = KVCache.for_model(model, 2, 8)
        model(ids, kv_cache=cache, attention_mask=mask)
        model(ids[:, :1], kv_cache=cache, start_pos=4, attention_mask=torch.cat((mask, mask[:, :1]), dim=1))
        assert torch.equal(seen[-1], mask[:, :1])  # this call's tokens only


def test_attention_mask_shape_is_checked():
    model = tiny_model()
    ids = torch.tensor([[BOS, 1, 2]])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(ids, attention_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="start_pos=0"):
        model(ids, start_pos=2, attention_mask=torch.ones(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ batched generation
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_greedy_equals_each_prompt_alone(use_cache):
    model = tiny_model()
    n = 10
    batch = moekit.generate(model, PROMPTS, n, use_cache=use_cache, eos_id=None)
    assert [r.index for r in batch] == list(range(len(PROMPTS)))
    for prompt, r in zip(PROMPTS, batch):
        assert r.prompt_ids == ids_of(prompt) and r.stop_reason == "length" and r.new_tokens == n
        assert r.new_ids == reference_greedy(model, ids_of(prompt), n)
        alone = moekit.generate(model, prompt, n, use_cache=use_cache, eos_id=None)[0]
        assert alone.new_ids == r.new_ids
    # the tensor API of moekit.model.generate (same-length prompts) agrees as well
    rows = torch.tensor([ids_of("abc"), ids_of("xyz")])
    out = moekit.model.generate(model, rows, n, use_cache=use_cache)
    assert out[:, 4:].tolist() == [reference_greedy(model, row, n) for row in rows.tolist()]


def test_batched_greedy_with_id_prompts():
    # another seed and GQA layout, prompts given as id lists (no BOS)
    model = tiny_model(seed=3, n_heads=2, n_kv_heads=1, n_layers=3)
    prompts = [[5], [7, 8, 9, 10, 11, 12, 13], [40, 41, 42]]
    batch = moekit.generate(model, prompts, 8, eos_id=None)
    assert [r.new_ids for r in batch] == [reference_greedy(model, p, 8) for p in prompts]


def test_eos_and_stop_strings_stop_each_sequence_on_its_own():
    model = tiny_model()
    n = 16
    refs = [reference_greedy(model, ids_of(p), n) for p in PROMPTS]
    # EOS: a token that the first prompt produces at some step; each prompt must stop at its own first one
    eos = refs[0][3]
    got = moekit.generate(model, PROMPTS, n, eos_id=eos)
    for ref, r in zip(refs, got):
        if eos in ref:
            k = ref.index(eos) + 1
            assert (r.new_ids, r.stop_reason) == (ref[:k], "eos")
        else:
            assert (r.new_ids, r.stop_reason) == (ref, "length")
    assert len({r.new_tokens for r in got}) > 1  # the prompts really stopped at different steps
    # stop strings: an ASCII pair some continuation contains
    pairs = [bytes(ref[i:i + 2]).decode() for ref in refs for i in range(2, n - 1)
             if all(32 <= t < 127 for t in ref[i:i + 2])]
    assert pairs, "the test model produces no printable pair"
    stops = [pairs[0], "\u00e9t\u00e9"]  # the second one never appears
    got = moekit.generate(model, PROMPTS, n, eos_id=None, stop=stops)
    for ref, r in zip(refs, got):
        data = b""
        for k, t in enumerate(ref):
            data += bytes([t]) if t < 256 else b""
            if data.endswith(pairs[0].encode()):
                assert (r.new_ids, r.stop_reason, r.stop) == (ref[:k + 1], "stop", pairs[0])
                assert r.text == data[:-2].decode("utf-8", errors="replace")
                break
        else:
            assert (r.new_ids, r.stop_reason, r.stop) == (ref, "length", None)
            assert r.text == bytes(t for t in ref if t < 256).decode("utf-8", errors="replace")
    assert "stop" in {r.stop_reason for r in got}


def test_sampling_in_a_batch_matches_each_prompt_alone_with_its_seed():
    model = tiny_model()
    batch = moekit.generate(model, PROMPTS[:3], 12, temperature=1.0, top_p=0.9, seed=5, eos_id=None)
    for i, r in enumerate(batch):
        alone = moekit.generate(model, PROMPTS[i], 12, temperature=1.0, top_p=0.9, seed=5 + i, eos_id=None)[0]
        assert alone.new_ids == r.new_ids


def test_generate_arguments_are_checked():
    model = tiny_model()
    for kwargs, match in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-1), "max_new_tokens"),
                          (dict(max_new_tokens=60), "max_seq_len"), (dict(stop=[""]), "stop"),
                          (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p")]:
        with pytest.raises(ValueError, match=match):
            moekit.generate(model, PROMPTS, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="empty"):
        moekit.generate(model, [], 4)
    with pytest.raises(ValueError, match="vocabulary"):
        moekit.generate(model, [[1, 999]], 4)


# ------------------------------------------------------------------------------------------ streaming
def test_text_stream_never_splits_characters_nor_shows_stop_prefixes():
    text = "na\u00efve \u20ac1 \U0001F600 caf\u00e9 ab"
    data = text.encode("utf-8")
    stops = [b"caf\xc3\xa9 z", b"zz"]  # the first shares "café " with the text, neither occurs in it

    def held(d: bytes) -> int:  # the longest tail of d that could still grow into a stop string
        return max([j for stop in stops for j in range(1, len(stop)) if d.endswith(stop[:j])], default=0)

    stream = TextStream(stops)
    pieces = []
    for k in range(1, len(data) + 1):  # one byte at a time, as the model produces them
        piece = stream.feed(data[:k])
        assert "\ufffd" not in piece
        pieces.append(piece)
        shown = "".join(pieces).encode("utf-8")
        assert data[:k].startswith(shown)
        # never a byte that may belong to a stop string, and at most an unfinished character (3 bytes) more
        assert k - held(data[:k]) - 3 <= len(shown) <= k - held(data[:k])
    assert any(held(data[:k]) >= 5 for k in range(len(data)))  # the hold-back was exercised
    pieces.append(stream.finish(data))
    assert "".join(pieces) == text
    # a held-back prefix that turns into a stop string is never shown
    stream = TextStream([b"STOP"])
    shown = stream.feed(b"abcST") + stream.feed(b"abcSTO")
    assert shown == "abc"
    assert shown + stream.finish(b"abc") == "abc"
    # a truncated character at the end becomes U+FFFD, as a one-shot decode gives
    stream = TextStream()
    assert stream.feed(b"ok\xe2\x82") + stream.finish(b"ok\xe2\x82") == b"ok\xe2\x82".decode("utf-8", "replace")


def test_stream_callback_pieces_concatenate_to_each_text():
    model = tiny_model()
    refs = [reference_greedy(model, ids_of(p), 12) for p in PROMPTS]
    pair = next(bytes(ref[i:i + 2]).decode() for ref in refs for i in range(11)
                if all(32 <= t < 127 for t in ref[i:i + 2]))
    pieces: dict[int, list[str]] = {}
    got = moekit.generate(model, PROMPTS, 12, eos_id=None, stop=[pair],
                          stream=lambda i, piece: pieces.setdefault(i, []).append(piece))
    for r in got:
        assert "".join(pieces.get(r.index, [])) == r.text
    assert any(len(v) > 1 for v in pieces.values())


# ------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(["train", *TINY, "--name", "g", "--steps", "3", "--out", str(root)]) == 0
        finally:
            torch.set_num_threads(threads)
    return root / "g"


def _json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


CLI_PROMPTS = ["def ", "import os", "x", "class Foo(object):"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "14"]


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_cli_prompts_file_batched_equals_each_prompt_alone(run, tmp_path, capsys, cache):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(CLI_PROMPTS[:2]) + "\n\n" + "\n".join(CLI_PROMPTS[2:]) + "\n")  # a blank line
    batch = _json(capsys, ["generate", str(run), "--prompts", str(path), *GREEDY, "--json", *cache])
    assert [p["prompt"] for p in batch["prompts"]] == CLI_PROMPTS
    assert [p["line"] for p in batch["prompts"]] == [1, 2, 4, 5]
    model, _ = moekit.train.load_run(run)
    for prompt, rec in zip(CLI_PROMPTS, batch["prompts"]):
        alone = _json(capsys, ["generate", str(run), "--prompt", prompt, *GREEDY, "--json", *cache])
        assert alone["prompts"][0]["text"] == rec["text"]
        ref = reference_greedy(model, ids_of(prompt), rec["new_tokens"])
        assert ref[-1] == 257 or rec["new_tokens"] == 14  # stopped by EOS or the limit
        assert rec["text"] == bytes(t for t in ref if t < 256).decode("utf-8", errors="replace")


def test_cli_jsonl_prompts_and_json_schema(run, tmp_path, capsys):
    text = tmp_path / "p.txt"
    text.write_text("\n".join(CLI_PROMPTS) + "\n")
    lines = [json.dumps({"prompt": p, "id": i}) for i, p in enumerate(CLI_PROMPTS)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    sniffed = tmp_path / "p.input"  # not named .jsonl: every line is a JSON object with "prompt"
    sniffed.write_text("\n".join(lines))
    outs = [_json(capsys, ["generate", str(run), "--prompts", str(p), *GREEDY, "--json"])
            for p in (text, jsonl, sniffed)]
    texts = [[r["text"] for r in o["prompts"]] for o in outs]
    assert texts[0] == texts[1] == texts[2]
    assert [r["prompt"] for r in outs[1]["prompts"]] == CLI_PROMPTS
    out = outs[1]
    assert set(out) == {"batch_size", "cache", "new_tokens", "seconds", "tokens_per_s", "prompts"}
    assert out["batch_size"] == 4 and out["cache"] is True
    assert out["new_tokens"] == sum(r["new_tokens"] for r in out["prompts"])
    assert out["seconds"] > 0 and out["tokens_per_s"] == pytest.approx(out["new_tokens"] / out["seconds"])
    for i, r in enumerate(out["prompts"]):
        assert set(r) == {"index", "line", "prompt", "text", "prompt_tokens", "new_tokens", "stop_reason", "stop",
                          "seconds", "tokens_per_s"}
        assert r["index"] == i and r["prompt_tokens"] == 1 + len(CLI_PROMPTS[i].encode())
        assert 1 <= r["new_tokens"] <= 14 and r["stop_reason"] in ("eos", "stop", "length") and r["stop"] is None
        assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["seconds"])
    # a file where only some lines are JSON is plain text: each line literally
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(lines[0] + "\nplain\n")
    out = _json(capsys, ["generate", str(run), "--prompts", str(mixed), *GREEDY, "--json"])
    assert [r["prompt"] for r in out["prompts"]] == [lines[0], "plain"]


def test_cli_stop_string(run, tmp_path, capsys):
    free = _json(capsys, ["generate", str(run), "--prompt", "def ", *GREEDY, "--json"])["prompts"][0]
    full = free["text"]
    stop = next((full[i:i + 2] for i in range(2, len(full) - 1) if all(" " <= c <= "~" for c in full[i:i + 2])),
                None)
    if stop is None:
        pytest.skip("no printable pair in the continuation")
    rec = _json(capsys, ["generate", str(run), "--prompt", "def ", *GREEDY, "--json", "--stop", stop,
                         "--stop", "never-produced"])["prompts"][0]
    assert rec["stop_reason"] == "stop" and rec["stop"] == stop and rec["text"] == full[:full.index(stop)]


class _Recorder:
    def __init__(self):
        self.chunks, self.flushes = [], 0

    def write(self, s):
        self.chunks.append(s)

    def flush(self):
        self.flushes += 1


def test_cli_streams_a_single_prompt(run, capsys, monkeypatch):
    rec = _json(capsys, ["generate", str(run), "--prompt", "import os", *GREEDY, "--json"])["prompts"][0]
    out = _Recorder()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["generate", str(run), "--prompt", "import os", *GREEDY]) == 0
    monkeypatch.undo()
    assert "".join(out.chunks) == "import os" + rec["text"] + "\n"
    assert len(out.chunks) >= 3 and out.flushes >= len(out.chunks) - 1  # written and flushed piece by piece
    err = capsys.readouterr().err
    assert f"{rec['new_tokens']} tokens" in err


def test_cli_bad_inputs_exit_2_with_one_line(run, tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(moekit.train, "load_run", no_model)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "y" * 120 + "\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    not_str = tmp_path / "num.jsonl"
    not_str.write_text('{"prompt": 3}\n')
    cases = [
        (["--prompts", str(empty)], "holds no prompts"),
        (["--prompts", str(blank)], "holds no prompts"),
        (["--prompts", str(long), "--max-new-tokens", "8"], "line 2"),  # 121 + 8 > 128
        (["--prompt", "z" * 125, "--max-new-tokens", "8"], "max_seq_len"),
        (["--prompts", str(bad_jsonl)], "line 2"),
        (["--prompts", str(not_str)], "must be a string"),
        (["--prompts", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--stop", ""], "--stop"),
        (["--prompt", "a", "--prompts", str(long)], "not allowed with"),  # argparse: SystemExit(2)
    ]
    for extra, needle in cases:
        capsys.readouterr()
        try:
            code = main(["generate", str(run), *extra])
        except SystemExit as exc:
            code = exc.code
        assert code == 2, extra
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (extra, captured.err)


# ------------------------------------------------------------------------------------------ thread policy
def test_thread_policy_runs_small_calls_on_one_thread(monkeypatch):
    """Under ``auto`` every decoding call (few token rows) runs on one thread and the prefill of a long batch
    on torch's count; a fixed ``--threads`` applies to every call; the count is restored afterwards."""
    from moekit.threads import SMALL_CALL_ROWS, ThreadPolicy, parse_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        policy = ThreadPolicy()
        seen = []
        for rows in (1, SMALL_CALL_ROWS, SMALL_CALL_ROWS + 1):
            with policy.call(rows):
                seen.append(torch.get_num_threads())
            assert torch.get_num_threads() == 2
        assert seen == [1, 1, 2]
        with ThreadPolicy(3).call(1):
            assert torch.get_num_threads() == 3
        assert parse_threads("auto") is None and parse_threads("4") == 4
        for bad in ("0", "-1", "x", "100000"):
            with pytest.raises(ValueError, match="--threads"):
                parse_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_generate_threads_flag_bad_value_exits_2(capsys, tmp_path):
    from moekit.cli import main

    assert main(["generate", str(tmp_path / "no-run"), "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]
