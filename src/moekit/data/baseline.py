"""The order-0 (unigram) baseline: what a model that ignores context scores, in bits per byte.

Symbol frequencies of the training split over the scored alphabet (256 bytes plus EOS, 257 symbols; BOS and
PAD are never scored, see :mod:`moekit.data.tokenizer`) with add-one (Laplace) smoothing,
``p(s) = (count(s) + 1) / (N + 257)``, scored on every scored token of the validation split:
``bits per byte = -mean log2 p(target)``. These are exactly the targets :func:`moekit.data.val_batches` scores,
so a model's validation bits per byte is directly comparable; a useful model must beat this number.
"""
from __future__ import annotations

import numpy as np

from .corpus import Corpus
from .tokenizer import BYTE_VOCAB, EOS_ID, NUM_SCORED_SYMBOLS, PAD_ID


def _symbols(tokens: np.ndarray) -> np.ndarray:
    """Counts over the scored alphabet: index 0-255 the bytes, 256 EOS."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=PAD_ID + 1)
    return np.concatenate([counts[:BYTE_VOCAB], counts[EOS_ID:EOS_ID + 1]]).astype(np.float64)


def unigram_probs(train_tokens: np.ndarray) -> np.ndarray:
    """Add-one smoothed probabilities ``[257]`` of the scored symbols (bytes, then EOS)."""
    counts = _symbols(train_tokens)
    return (counts + 1.0) / (counts.sum() + NUM_SCORED_SYMBOLS)


def unigram_bits_per_byte(train_tokens: np.ndarray, val_tokens: np.ndarray) -> float:
    """Order-0 bits per byte of ``val_tokens`` under the smoothed unigram of ``train_tokens``."""
    val_counts = _symbols(val_tokens)
    if val_counts.sum() == 0:
        raise ValueError("the validation tokens hold no scored symbol")
    return float(-(val_counts * np.log2(unigram_probs(train_tokens))).sum() / val_counts.sum())


def unigram_baseline(corpus: Corpus) -> dict:
    """``{"bits_per_byte": float, "per_domain": {domain: float}}`` of the order-0 model on ``corpus``."""
    val = np.asarray(corpus.val, dtype=np.int64)
    bits_V = -np.log2(unigram_probs(corpus.train))
    symbol = np.where(val == EOS_ID, BYTE_VOCAB, val)
    scored = (val < BYTE_VOCAB) | (val == EOS_ID)
    domain = corpus.domain_ids("val", np.nonzero(scored)[0])
    bits = bits_V[symbol[scored]]
    per_sum = np.bincount(domain, weights=bits, minlength=len(corpus.domains))
    per_count = np.bincount(domain, minlength=len(corpus.domains))
    per_domain = {name: float(per_sum[i] / per_count[i]) for i, name in enumerate(corpus.domains) if per_count[i]}
    return {"bits_per_byte": float(bits.mean()), "per_domain": per_domain}
