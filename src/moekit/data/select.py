"""Corpora restricted to some of their domains: training without held-out domains (``moekit train
--exclude-domains``), fine-tuning on one domain (``moekit finetune --data domain:NAME``), evaluation on chosen
domains (``moekit eval --domains``).

:func:`select_domains` returns an in-memory :class:`~moekit.data.Corpus` holding the kept documents of both
splits, concatenated in their original order (so the validation windows of the subset are those of a corpus
built from the kept documents alone), with the kept domains renumbered in their original order. Nothing is
written to the cache folder. A run records its selection in ``config.json`` as ``data.include_domains`` /
``data.exclude_domains`` (lists of names); :func:`corpus_for_run` applies it.
"""
from __future__ import annotations

import numpy as np

from .corpus import SPLITS, Corpus

__all__ = ["select_domains", "parse_domains", "corpus_for_run", "DOMAIN_PREFIX", "split_data_spec"]

DOMAIN_PREFIX = "domain:"


def parse_domains(text: str | None, what: str = "domains") -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (None stays None); ``ValueError`` for an empty list or name."""
    if text is None:
        return None
    names = [t.strip() for t in str(text).split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"{what}: expected domain names separated by commas, e.g. email,json; got {text!r}")
    return list(dict.fromkeys(names))


def split_data_spec(data: str | None) -> tuple[str | None, list[str] | None]:
    """``--data`` of ``moekit finetune``: ``"domain:A,B"`` -> ``(None, ["A", "B"])`` (domains of the source
    run's corpus); a path -> ``(path, None)``."""
    if data is not None and data.startswith(DOMAIN_PREFIX):
        return None, parse_domains(data[len(DOMAIN_PREFIX):], "--data domain:")
    return data, None


def select_domains(corpus: Corpus, include: list[str] | None = None, exclude: list[str] | None = None) -> Corpus:
    """The documents of ``corpus`` whose domain is in ``include`` (default: all) and not in ``exclude``.

    ``ValueError`` naming the unknown names (and listing the corpus's domains), or when nothing is left."""
    if include is None and exclude is None:
        return corpus
    known = list(corpus.domains)
    for what, names in (("include", include), ("exclude", exclude)):
        unknown = [n for n in (names or []) if n not in known]
        if unknown:
            raise ValueError(f"unknown domain(s) {', '.join(unknown)} (to {what}); the corpus has: {', '.join(known)}")
    kept = [d for d in known if (include is None or d in include) and d not in (exclude or [])]
    if not kept:
        raise ValueError("the domain selection leaves no domain of the corpus")
    new_id = {known.index(name): i for i, name in enumerate(kept)}
    index = {k: v for k, v in corpus.index.items() if k != "splits"}
    index.update(domains=kept, splits={}, selection={"include": include, "exclude": exclude,
                                                     "source_domains": known})
    arrays = {}
    for split in SPLITS:
        tokens = corpus.tokens(split)
        docs = [d for d in corpus.documents(split) if d["domain"] in new_id]
        pieces, records, offset = [], [], 0
        for d in docs:
            pieces.append(np.asarray(tokens[d["offset"]:d["offset"] + d["length"]]))
            records.append({**d, "domain": new_id[d["domain"]], "offset": offset})
            offset += d["length"]
        arrays[split] = np.concatenate(pieces) if pieces else np.zeros(0, dtype=tokens.dtype)
        index["splits"][split] = {"num_tokens": offset, "documents": records}
    return Corpus(corpus.root, index, arrays["train"], arrays["val"], kept)


def corpus_for_run(run_config: dict, where: str = "run config") -> Corpus:
    """The corpus a run trains on: its ``data.path`` (None: the embedded corpus) restricted to its
    ``data.include_domains`` / ``data.exclude_domains`` when set."""
    from .corpus import load_corpus

    data = run_config.get("data") or {}
    path = data.get("path") if isinstance(data, dict) else None
    corpus = load_corpus(path)
    if not isinstance(data, dict):
        return corpus
    sel = {}
    for key in ("include_domains", "exclude_domains"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{where}: 'data.{key}' must be a non-empty list of domain names, got {value!r}")
        sel[key] = value
    if sel["include_domains"] is None and sel["exclude_domains"] is None:
        return corpus
    return select_domains(corpus, sel["include_domains"], sel["exclude_domains"])
