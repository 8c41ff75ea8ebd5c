"""Tokenised corpora on disk: build once into a cache folder, read back memory-mapped.

Layout of a corpus folder (``<cache root>/corpus-<key>/``, written to a temporary folder and moved into place
with ``os.replace``, so a reader never sees a half-written corpus):

* ``train.npy``, ``val.npy`` -- ``uint16`` token ids (see :mod:`moekit.data.tokenizer`), loaded with
  ``numpy.load(mmap_mode="r", allow_pickle=False)``. Each split is the concatenation of its documents, each
  stored as ``BOS bytes... EOS``.
* ``index.json`` -- ``format``, ``source`` (what was read), ``split_mode``, ``val_fraction``, ``domains`` (names,
  the index is the domain id) and, per split, ``num_tokens`` and ``documents``: ``{path, domain, offset,
  length}`` with ``offset``/``length`` in tokens (BOS and EOS included).

Train/validation split: by document, ``blake2b(path) / 2**64 < val_fraction`` puts a document in validation
(identical on every run and machine); a domain of two or more documents that would get none gives its
smallest-hash document to validation, so every such domain can be evaluated (:func:`assign_splits`). When
that leaves a split empty (a single file, a handful of files), the split falls back to position: the last
``val_fraction`` of every document's bytes (at least one byte) is validation (``split_mode: "position"``).

The cache root is ``cache_dir`` when given, else ``$MOEKIT_CACHE``, else ``$XDG_CACHE_HOME/moekit``, else
``~/.cache/moekit``. The folder key hashes the format version, ``val_fraction``, the source folder and each
source file's relative path, size and modification time, so an edited file rebuilds the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import sources
from .sources import Document
from .tokenizer import BOS_ID, EOS_ID

FORMAT_VERSION = 1
VAL_FRACTION = 0.05
SPLITS = ("train", "val")


def split_hash(path: str) -> float:
    """A stable number in [0, 1) for a document path: ``blake2b(path) / 2**64``, the same on every machine."""
    digest = hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_splits(docs: Sequence[tuple[str, str]], val_fraction: float = VAL_FRACTION) -> list[str]:
    """``"train"`` or ``"val"`` for each ``(path, domain)``: validation when ``split_hash(path) < val_fraction``,
    plus, in a domain of two or more documents with none below the threshold, the one with the smallest hash
    (so per-domain evaluation covers every such domain)."""
    hashes = [split_hash(path) for path, _ in docs]
    out = ["val" if h < val_fraction else "train" for h in hashes]
    by_domain: dict[str, list[int]] = {}
    for i, (_, domain) in enumerate(docs):
        by_domain.setdefault(domain, []).append(i)
    for members in by_domain.values():
        if len(members) >= 2 and all(out[i] == "train" for i in members):
            out[min(members, key=lambda i: hashes[i])] = "val"
    return out


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder that holds the ``corpus-<key>`` folders (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("MOEKIT_CACHE"):
        return Path(os.environ["MOEKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moekit"


def _check_fraction(val_fraction: float) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")


@dataclass
class Corpus:
    """A built corpus: memory-mapped ``train``/``val`` token arrays, ``domains`` and the document index."""

    root: Path
    index: dict
    train: np.ndarray
    val: np.ndarray
    domains: list[str] = field(default_factory=list)
    _doc_arrays: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Corpus":
        root = Path(root)
        index = json.loads((root / "index.json").read_text(encoding="utf-8"))
        if index.get("format") != FORMAT_VERSION:
            raise ValueError(f"{root}: corpus format {index.get('format')!r}, expected {FORMAT_VERSION}")
        arrays = {s: np.load(root / f"{s}.npy", mmap_mode="r", allow_pickle=False) for s in SPLITS}
        return cls(root, index, arrays["train"], arrays["val"], list(index["domains"]))

    def tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.train if split == "train" else self.val

    def documents(self, split: str) -> list[dict]:
        self.tokens(split)
        return self.index["splits"][split]["documents"]

    def domain_ids(self, split: str, positions: np.ndarray) -> np.ndarray:
        """Domain id (int64) of the document holding each token position of ``split``."""
        if split not in self._doc_arrays:
            docs = self.documents(split)
            self._doc_arrays[split] = (
                np.fromiter((d["offset"] for d in docs), dtype=np.int64, count=len(docs)),
                np.fromiter((d["domain"] for d in docs), dtype=np.int64, count=len(docs)),
            )
        starts, domains = self._doc_arrays[split]
        doc = np.searchsorted(starts, np.asarray(positions, dtype=np.int64), side="right") - 1
        return domains[np.clip(doc, 0, None)]

    def domain_token_counts(self, split: str) -> dict[str, int]:
        counts = {name: 0 for name in self.domains}
        for d in self.documents(split):
            counts[self.domains[d["domain"]]] += d["length"]
        return counts

    def summary(self) -> str:
        return (f"{self.index['source'].get('kind', '?')} corpus at {self.root}: {len(self.train):,} train / "
                f"{len(self.val):,} val tokens, {len(self.domains)} domains")


def _assign_splits(docs: Sequence[Document], val_fraction: float) -> tuple[str, dict[str, list[Document]]]:
    by_file = {s: [] for s in SPLITS}
    for doc, split in zip(docs, assign_splits([(d.path, d.domain) for d in docs], val_fraction)):
        by_file[split].append(doc)
    if by_file["train"] and by_file["val"]:
        return "file", by_file
    by_position = {s: [] for s in SPLITS}
    for doc in docs:
        n_val = max(1, int(round(len(doc.data) * val_fraction))) if len(doc.data) > 1 else 0
        cut = len(doc.data) - n_val
        if cut > 0:
            by_position["train"].append(Document(doc.path, doc.domain, doc.data[:cut]))
        if n_val > 0:
            by_position["val"].append(Document(doc.path, doc.domain, doc.data[cut:]))
    return "position", by_position


def _write_split(path: Path, docs: Sequence[Document], domain_id: dict[str, int]) -> dict:
    total = sum(len(d.data) + 2 for d in docs)
    tokens = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(total,))
    records, offset = [], 0
    for doc in docs:
        n = len(doc.data)
        tokens[offset] = BOS_ID
        tokens[offset + 1:offset + 1 + n] = np.frombuffer(doc.data, dtype=np.uint8)
        tokens[offset + 1 + n] = EOS_ID
        records.append({"path": doc.path, "domain": domain_id[doc.domain], "offset": offset, "length": n + 2})
        offset += n + 2
    tokens.flush()
    del tokens
    return {"num_tokens": total, "documents": records}


def build_corpus(docs: Sequence[Document], out_dir: str | os.PathLike, source: dict,
                 val_fraction: float = VAL_FRACTION) -> Corpus:
    """Tokenise ``docs`` into ``out_dir`` (atomically: temporary folder, then ``os.replace``) and load it.

    If ``out_dir`` already holds a valid corpus (another process won the race), that one is loaded.
    """
    _check_fraction(val_fraction)
    if sum(len(d.data) for d in docs) < 2:
        raise ValueError("not enough text to build a corpus: need at least 2 bytes")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    mode, splits = _assign_splits(docs, val_fraction)
    domains = sorted({d.domain for d in docs})
    domain_id = {name: i for i, name in enumerate(domains)}
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        index = {"format": FORMAT_VERSION, "source": source, "split_mode": mode, "val_fraction": val_fraction,
                 "domains": domains, "splits": {}}
        for split in SPLITS:
            index["splits"][split] = _write_split(tmp / f"{split}.npy", splits[split], domain_id)
        (tmp / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Corpus.load(out_dir)


def _key(payload: dict) -> str:
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode("utf-8"), digest_size=10).hexdigest()


def _manifest(root: Path, files: Sequence[Path]) -> list:
    out = []
    for f in files:
        st = f.stat()
        out.append([f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def _cached(root: Path, build) -> Corpus:
    if (root / "index.json").is_file():
        try:
            return Corpus.load(root)
        except (ValueError, OSError, KeyError):
            shutil.rmtree(root, ignore_errors=True)  # a stale or damaged cache entry: rebuild it
    elif root.exists():
        shutil.rmtree(root, ignore_errors=True)
    return build()


def stdlib_corpus(cache_dir: str | os.PathLike | None = None, val_fraction: float = VAL_FRACTION,
                  stdlib: str | os.PathLike | None = None) -> Corpus:
    """The embedded corpus (Python standard library code plus pydoc topics), built on first use."""
    _check_fraction(val_fraction)
    root = Path(stdlib) if stdlib is not None else sources.stdlib_dir()
    files = [root / rel for rel in sources.stdlib_files(root)]
    topics = root / sources.PYDOC_TOPICS
    if topics.is_file():
        files.append(topics)
    source = {"kind": "stdlib", "path": str(root)}
    key = _key({"format": FORMAT_VERSION, "val_fraction": val_fraction, "source": source,
                "files": _manifest(root, files)})
    out = cache_root(cache_dir) / f"corpus-{key}"
    return _cached(out, lambda: build_corpus(sources.stdlib_documents(root), out, source, val_fraction))


def text_corpus(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                val_fraction: float = VAL_FRACTION) -> Corpus:
    """A corpus of the user's text file or folder (``--data PATH``), built on first use.

    Raises ``FileNotFoundError`` (missing path) or ``ValueError`` (empty folder, no usable text).
    """
    _check_fraction(val_fraction)
    root, files = sources.text_files(path)
    source = {"kind": "text", "path": str(Path(path).expanduser().resolve())}
    key = _key({"format": FORMAT_VERSION, "val_fraction": val_fraction, "source": source,
                "files": _manifest(root, files)})
    out = cache_root(cache_dir) / f"corpus-{key}"
    return _cached(out, lambda: build_corpus(sources.text_documents(path), out, source, val_fraction))


def load_corpus(data: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                val_fraction: float = VAL_FRACTION) -> Corpus:
    """``text_corpus(data)`` when ``data`` is given (``--data PATH``), else the embedded ``stdlib_corpus()``."""
    if data is None:
        return stdlib_corpus(cache_dir, val_fraction)
    return text_corpus(data, cache_dir, val_fraction)
