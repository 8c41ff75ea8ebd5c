"""Byte-level tokenizer: every byte is its own token, plus three special ids.

Ids (``VOCAB_SIZE = 264``: 259 used ids rounded up to a multiple of 8 so embedding and output matrices keep
aligned shapes; ids 259-263 are never produced):

====== ======= ==========================================================================================
id     name    meaning
====== ======= ==========================================================================================
0-255  bytes   the byte value itself (text is encoded as UTF-8)
256    BOS     start of a document; also the natural one-token prompt for generation
257    EOS     end of a document (the document separator)
258    PAD     filler in the last, partial validation window; never a training input
====== ======= ==========================================================================================

``IGNORE_INDEX = -100`` marks targets that are not scored (``torch.nn.functional.cross_entropy``'s default
``ignore_index``): BOS targets (always predictable after EOS) and padding. Every other target -- the 256
bytes and EOS -- is scored, so "bits per byte" means bits per scored symbol (bytes plus one EOS per document).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

BYTE_VOCAB = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
NUM_USED_IDS = 259
VOCAB_SIZE = 264
IGNORE_INDEX = -100
# Symbols a model is scored on: the bytes and EOS.
NUM_SCORED_SYMBOLS = BYTE_VOCAB + 1

SPECIAL_TOKENS = {"<bos>": BOS_ID, "<eos>": EOS_ID, "<pad>": PAD_ID}


def is_scored(ids: np.ndarray) -> np.ndarray:
    """Boolean mask of the ids that count as targets: bytes (< 256) and EOS."""
    return (ids < BYTE_VOCAB) | (ids == EOS_ID)


class ByteTokenizer:
    """Encode text (UTF-8) or bytes to byte ids and back; see the module docstring for the special ids."""

    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID

    def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = list(data)
        if bos:
            ids.insert(0, BOS_ID)
        if eos:
            ids.append(EOS_ID)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The byte tokens of ``ids`` as bytes; special and unused ids are dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of the byte tokens (UTF-8, invalid sequences replaced by default); specials are dropped."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def to_dict(self) -> dict:
        return {"type": "bytes", "vocab_size": VOCAB_SIZE, "bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID}
