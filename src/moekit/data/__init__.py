"""Data: the embedded corpus (the Python standard library and its pydoc topics), user text, the byte
tokenizer, batching and the order-0 baseline.

Typical use::

    corpus = moekit.data.load_corpus()            # or load_corpus("path/to/text") for --data PATH
    batches = moekit.data.TrainBatches(corpus.train, batch_size=16, seq_len=256, seed=0)
    input_ids_BL, targets_BL = next(batches)
    for vb in moekit.data.val_batches(corpus, batch_size=16, seq_len=256):
        ...                                         # vb.input_ids, vb.targets, vb.domain_ids
    moekit.data.unigram_baseline(corpus)["bits_per_byte"]

Modules: :mod:`.tokenizer` (ids), :mod:`.sources` (which files, which domains), :mod:`.corpus` (split, cache
folder layout), :mod:`.batches`, :mod:`.baseline`, :mod:`.metrics`.
"""
from .baseline import unigram_baseline, unigram_bits_per_byte, unigram_probs
from .batches import TrainBatches, ValBatch, val_batches, val_window_starts
from .corpus import (VAL_FRACTION, Corpus, assign_splits, build_corpus, cache_root, load_corpus, split_hash,
                     stdlib_corpus, text_corpus)
from .metrics import DomainBits
from .sources import Document, stdlib_documents, text_documents
from .tokenizer import (BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID, VOCAB_SIZE, ByteTokenizer)

__all__ = [
    "BOS_ID", "EOS_ID", "IGNORE_INDEX", "PAD_ID", "VOCAB_SIZE", "VAL_FRACTION",
    "ByteTokenizer", "Corpus", "Document", "DomainBits", "TrainBatches", "ValBatch",
    "assign_splits", "build_corpus", "cache_root", "load_corpus", "split_hash", "stdlib_corpus", "stdlib_documents",
    "text_corpus", "text_documents", "unigram_baseline", "unigram_bits_per_byte", "unigram_probs",
    "val_batches", "val_window_starts",
]
