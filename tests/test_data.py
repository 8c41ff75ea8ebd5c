"""Tests of moekit.data: the embedded corpus, user text, batching and the unigram baseline."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit import data
from moekit.data import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID
from moekit.data.sources import stdlib_dir, stdlib_files


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    return data.stdlib_corpus(cache_dir=tmp_path_factory.mktemp("cache"))


def _all_docs(corpus):
    return corpus.documents("train") + corpus.documents("val")


def test_tokenizer_round_trip_and_ids():
    tok = data.ByteTokenizer()
    ids = tok.encode("héllo", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) == 2 + len("héllo".encode())
    assert tok.decode(ids) == "héllo"
    assert tok.vocab_size == data.VOCAB_SIZE == 264 and data.VOCAB_SIZE % 8 == 0
    assert (BOS_ID, EOS_ID, PAD_ID) == (256, 257, 258)


def test_split_hash_is_pinned():
    # The split must be identical on every machine: pin two values of the hash.
    assert data.split_hash("json/__init__.py") == pytest.approx(0.8331606855189765, abs=0)
    assert data.split_hash("pydoc_data/topics.py#assert") == pytest.approx(0.44659522879050606, abs=0)


def test_split_is_deterministic(stdlib, tmp_path):
    again = data.stdlib_corpus(cache_dir=tmp_path)  # a fresh build in another folder
    assert again.root != stdlib.root
    assert again.index == stdlib.index
    assert np.array_equal(again.train, stdlib.train) and np.array_equal(again.val, stdlib.val)
    val = len(stdlib.val) / (len(stdlib.val) + len(stdlib.train))
    assert 0.02 < val < 0.15
    assert stdlib.index["split_mode"] == "file"


def test_domains_present(stdlib):
    for name in ("json", "pydoc", "email", "asyncio", "toplevel"):
        assert name in stdlib.domains
    train_domains = {stdlib.domains[d["domain"]] for d in stdlib.documents("train")}
    val_domains = {stdlib.domains[d["domain"]] for d in stdlib.documents("val")}
    assert {"json", "pydoc"} <= train_domains & val_domains
    docs_per_domain = {}
    for d in _all_docs(stdlib):
        docs_per_domain[d["domain"]] = docs_per_domain.get(d["domain"], 0) + 1
    for domain, count in docs_per_domain.items():  # every domain of 2+ documents can be evaluated
        if count >= 2:
            assert stdlib.domains[domain] in val_domains


def test_no_test_packages(stdlib):
    paths = [d["path"] for d in _all_docs(stdlib)]
    assert "json/__init__.py" in paths and "os.py" in paths
    for path in paths:
        parts = path.split("#")[0].split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), path
        assert path.endswith(".py") or path.startswith("pydoc_data/topics.py#"), path
    assert not any(p.startswith("pydoc_data/") and "#" not in p for p in paths)


def test_document_layout_and_pydoc_text(stdlib):
    by_path = {d["path"]: (split, d) for split in ("train", "val") for d in stdlib.documents(split)}
    split, doc = by_path["json/__init__.py"]
    tokens = stdlib.tokens(split)[doc["offset"]:doc["offset"] + doc["length"]]
    assert tokens[0] == BOS_ID and tokens[-1] == EOS_ID
    assert bytes(tokens[1:-1].astype(np.uint8)) == (stdlib_dir() / "json/__init__.py").read_bytes()
    assert stdlib.domains[doc["domain"]] == "json"
    split, doc = by_path["pydoc_data/topics.py#assert"]
    text = data.ByteTokenizer().decode(stdlib.tokens(split)[doc["offset"]:doc["offset"] + doc["length"]])
    assert stdlib.domains[doc["domain"]] == "pydoc"
    assert text.startswith('The "assert" statement') and "topics = {" not in text


def test_stdlib_file_walk_excludes_tests():
    files = stdlib_files()
    assert all(not f.startswith(("test/", "idlelib/idle_test/", "lib2to3/tests/")) for f in files)
    assert "json/decoder.py" in files


def test_cache_is_reused(stdlib):
    index_mtime = (stdlib.root / "index.json").stat().st_mtime_ns
    again = data.stdlib_corpus(cache_dir=stdlib.root.parent)
    assert again.root == stdlib.root
    assert (stdlib.root / "index.json").stat().st_mtime_ns == index_mtime
    assert not [p for p in stdlib.root.parent.iterdir() if ".tmp-" in p.name]
    assert isinstance(again.train, np.memmap) and again.train.dtype == np.uint16


def test_train_batches_deterministic_and_restorable(stdlib):
    a = data.TrainBatches(stdlib.train, batch_size=4, seq_len=32, seed=7)
    b = data.TrainBatches(stdlib.train, batch_size=4, seq_len=32, seed=7)
    first = [next(a) for _ in range(3)]
    for x, y in zip(first, [next(b) for _ in range(3)]):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    inputs, targets = first[0]
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.int64
    scored = targets != IGNORE_INDEX
    assert torch.equal(inputs[:, 1:][scored[:, :-1]], targets[:, :-1][scored[:, :-1]])
    assert not (targets == BOS_ID).any()
    other = next(data.TrainBatches(stdlib.train, batch_size=4, seq_len=32, seed=8))
    assert not torch.equal(other[0], inputs)
    state = json.loads(json.dumps(a.state_dict()))
    expected = next(a)
    resumed = data.TrainBatches(stdlib.train, batch_size=4, seq_len=32, seed=7)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="seed"):
        data.TrainBatches(stdlib.train, 4, 32, seed=9).load_state_dict(state)


def test_train_batches_reject_bad_settings():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(ValueError, match="seq_len"):
        data.TrainBatches(tokens, batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="batch_size"):
        data.TrainBatches(tokens, batch_size=0, seq_len=4)


def test_val_batches_cover_split_once(stdlib):
    seq_len = 256
    batches = list(data.val_batches(stdlib, batch_size=64, seq_len=seq_len))
    targets = torch.cat([b.targets for b in batches])
    domains = torch.cat([b.domain_ids for b in batches])
    assert torch.equal(domains == -1, targets == IGNORE_INDEX)
    val = np.asarray(stdlib.val[1:], dtype=np.int64)
    expected = torch.from_numpy(val[(val < 256) | (val == EOS_ID)])
    assert torch.equal(targets[targets != IGNORE_INDEX], expected)
    assert (torch.cat([b.input_ids for b in batches]) == PAD_ID).sum() < seq_len
    # Per-token domains agree with the document index.
    doc = stdlib.documents("val")[3]
    first = torch.cat([b.domain_ids for b in batches]).reshape(-1)[doc["offset"]]  # target doc["offset"] + 1
    assert first == doc["domain"]
    subset = list(data.val_batches(stdlib, batch_size=8, seq_len=seq_len, max_windows=20))
    again = list(data.val_batches(stdlib, batch_size=8, seq_len=seq_len, max_windows=20))
    assert sum(b.input_ids.shape[0] for b in subset) == 20
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(subset, again))
    assert len({int(d) for b in subset for d in b.domain_ids.unique()}) > 5  # spread over the split


def _write_folder(root: Path) -> Path:
    (root / "books").mkdir(parents=True)
    (root / "books" / "a.txt").write_text("alpha " * 200, encoding="utf-8")
    (root / "books" / "deep").mkdir()
    (root / "books" / "deep" / "b.txt").write_text("beta " * 200, encoding="utf-8")
    (root / "notes.md").write_text("# notes\n" * 100, encoding="utf-8")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1") * 50)
    (root / ".hidden").write_text("secret", encoding="utf-8")
    return root


def test_user_text_folder(tmp_path):
    root = _write_folder(tmp_path / "text")
    corpus = data.load_corpus(root, cache_dir=tmp_path / "cache")
    assert corpus.domains == ["books", "notes"]
    paths = sorted(d["path"] for d in _all_docs(corpus))
    assert paths == ["books/a.txt", "books/deep/b.txt", "notes.md"]
    tok = data.ByteTokenizer()
    text = tok.decode(corpus.train) + tok.decode(corpus.val)
    assert "secret" not in text and "caf" not in text
    assert text.count("alpha") == 200 and text.count("beta") == 200
    assert corpus.index["source"]["kind"] == "text"
    assert data.load_corpus(root, cache_dir=tmp_path / "cache").root == corpus.root


def test_user_single_file_splits_by_position(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("".join(f"line {i}\n" for i in range(400)), encoding="utf-8")
    corpus = data.text_corpus(path, cache_dir=tmp_path / "cache")
    assert corpus.index["split_mode"] == "position" and corpus.domains == ["story"]
    tok = data.ByteTokenizer()
    full = path.read_text(encoding="utf-8")
    assert tok.decode(corpus.train) + tok.decode(corpus.val) == full
    assert 0.03 < len(corpus.val) / len(full) < 0.08
    assert tok.decode(corpus.val).endswith("line 399\n")


def test_bad_data_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_corpus(tmp_path / "missing", cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        data.load_corpus(tmp_path / "empty", cache_dir=tmp_path / "cache")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "x.bin").write_bytes(b"\x00\x01\x02" * 10)
    (tmp_path / "binary" / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable text"):
        data.load_corpus(tmp_path / "binary", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_corpus(tmp_path / "binary", cache_dir=tmp_path / "cache", val_fraction=1.5)


def test_unigram_baseline_by_hand():
    a, b, c = ord("a"), ord("b"), ord("c")
    train = np.array([BOS_ID, a, a, b, EOS_ID], dtype=np.uint16)
    val = np.array([BOS_ID, a, c, EOS_ID], dtype=np.uint16)
    # counts a:2 b:1 EOS:1 (N=4), add-one over 257 symbols
    expected = -(math.log2(3 / 261) + math.log2(1 / 261) + math.log2(2 / 261)) / 3
    assert data.unigram_bits_per_byte(train, val) == pytest.approx(expected, rel=1e-12)
    probs = data.unigram_probs(train)
    assert probs.shape == (257,) and probs.sum() == pytest.approx(1.0)


def test_unigram_baseline_on_corpus(tmp_path):
    corpus = data.load_corpus(_write_folder(tmp_path / "text"), cache_dir=tmp_path / "cache")
    result = data.unigram_baseline(corpus)
    assert result["bits_per_byte"] == pytest.approx(data.unigram_bits_per_byte(corpus.train, corpus.val))
    counts = {}
    for vb in data.val_batches(corpus, batch_size=4, seq_len=64):
        for name_id, n in zip(*np.unique(vb.domain_ids[vb.domain_ids >= 0].numpy(), return_counts=True)):
            counts[corpus.domains[name_id]] = counts.get(corpus.domains[name_id], 0) + n
    weighted = sum(result["per_domain"][k] * n for k, n in counts.items()) / sum(counts.values())
    assert weighted == pytest.approx(result["bits_per_byte"])


def test_stdlib_unigram_is_a_sensible_number(stdlib):
    bpb = data.unigram_baseline(stdlib)["bits_per_byte"]
    assert 4.0 < bpb < 6.0


def test_domain_bits_accumulator():
    acc = data.DomainBits(["x", "y"])
    nats = torch.tensor([[math.log(2), 2 * math.log(2), 5.0]])
    acc.add(nats, torch.tensor([[0, 1, -1]]))
    assert acc.num_tokens == 2
    assert acc.bits_per_byte() == pytest.approx(1.5)
    assert acc.per_domain() == pytest.approx({"x": 1.0, "y": 2.0})
