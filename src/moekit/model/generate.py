"""Autoregressive sampling from a :class:`moekit.model.MoELM`: greedy, temperature and nucleus (top-p), for a
batch of prompts of any lengths, each stopping on its own, with text streamed as it is produced.

Nucleus sampling follows Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"
(arXiv:1904.09751): keep the smallest set of most likely tokens whose probability reaches ``top_p``.
Sampling draws from CPU ``torch.Generator`` objects, one per prompt seeded ``seed + index``, so a seed gives
the same tokens on any device for the same logits, and prompt ``i`` of a batch draws what it draws alone
with ``seed + i``.

Batching (:func:`generate_batch`): prompts are left-padded to the longest one and the model gets an
``attention_mask`` (pad keys masked out of attention, rotary positions counted per sequence from its first real
token, ``RoutingContext.token_mask`` for the MoE layers), so with a causal router each prompt's logits are
those it has alone and greedy output is the same token for token. Finished sequences leave the batch (their
rows are dropped from the KV cache), so later steps compute only the others. With a router that is not causal
(expert choice, batch Sinkhorn) a token's route depends on the other tokens of the batch, and batched output
can differ from single-prompt output.

Legend (docs/architecture.md): B batch, L length, J positions attended (cache included), V vocabulary.
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..data.tokenizer import BOS_ID, BYTE_VOCAB, EOS_ID, PAD_ID
from .cache import KVCache

STOP_REASONS = ("eos", "stop", "length")


def _as_batch(prompt_ids) -> tuple[torch.Tensor, bool]:
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    if ids.dim() == 1:
        return ids[None, :], True
    if ids.dim() != 2:
        raise ValueError(f"prompt_ids must be a sequence of ids or a [batch, length] tensor, got {tuple(ids.shape)}")
    return ids, False


def top_p_filter(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus of mass ``top_p`` and renormalise."""
    if top_p >= 1.0:
        return probs_BV
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    sorted_BV = sorted_BV.masked_fill(mass_before_BV >= top_p, 0.0)  # the top token always stays
    kept_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
    return kept_BV / kept_BV.sum(dim=-1, keepdim=True)


def next_token(logits_BV: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """Token ids ``[B]``: argmax when ``temperature == 0``, else a draw from the tempered nucleus."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float().cpu() / temperature, dim=-1)
    probs_BV = top_p_filter(probs_BV, top_p)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1).to(logits_BV.device)


@dataclass
class Generation:
    """What :func:`generate_batch` produced for one prompt.

    ``new_ids`` holds every token the model produced, the EOS or the tokens of the stop string that ended it
    included; ``text`` is the new text without them (byte tokens decoded as UTF-8, invalid sequences
    replaced, special ids dropped). ``stop_reason`` is ``"eos"``, ``"stop"`` (``stop`` holds the stop string)
    or ``"length"`` (``max_new_tokens`` reached). ``seconds`` runs from the start of the call to the step
    that finished this prompt.
    """

    index: int
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    stop_reason: str
    stop: str | None
    seconds: float

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def new_tokens(self) -> int:
        return len(self.new_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        return {"index": self.index, "text": self.text, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "stop_reason": self.stop_reason, "stop": self.stop,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


class TextStream:
    """Turns a growing byte string into text pieces that never split a UTF-8 character and never show bytes
    that may yet turn out to be the start of a stop string; the pieces concatenate to the final text.

    ``feed(all_bytes)`` with everything produced so far returns the newly safe text; ``finish(final_bytes)``
    (the bytes of the final text, a prefix of what was fed) returns the rest.
    """

    def __init__(self, stops: Sequence[bytes] = ()):
        self.stops = [bytes(s) for s in stops]
        self.emitted = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _held_back(self, data: bytes) -> int:
        """Length of the longest tail of ``data`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(data)), longest, -1):
                if data.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def feed(self, data: bytes) -> str:
        safe = len(data) - self._held_back(data)
        if safe <= self.emitted:
            return ""
        piece = self._decoder.decode(bytes(data[self.emitted:safe]))
        self.emitted = safe
        return piece

    def finish(self, final: bytes) -> str:
        if len(final) < self.emitted:  # cannot happen with stop strings checked after every byte
            raise RuntimeError("text stream emitted bytes beyond the final text")
        piece = self._decoder.decode(bytes(final[self.emitted:]), final=True)
        self.emitted = len(final)
        return piece


class _Sequence:
    """The running state of one prompt: its new tokens, new bytes, stop checks and text stream."""

    def __init__(self, index: int, prompt: list[int], eos_id: int | None, stops: list[tuple[str, bytes]],
                 stream: Callable[[int, str], None] | None, seed: int, sampling: bool):
        self.index, self.prompt, self.eos_id, self.stops = index, prompt, eos_id, stops
        self.new_ids: list[int] = []
        self.data = bytearray()
        self.stream = stream
        self.text_stream = TextStream([b for _, b in stops])
        self.generator = torch.Generator().manual_seed(seed + index) if sampling else None
        self.result: Generation | None = None

    def push(self, token: int, last: bool, t0: float) -> bool:
        """Append ``token``; True while the sequence goes on."""
        self.new_ids.append(token)
        if self.eos_id is not None and token == self.eos_id:
            return self._finish("eos", None, t0)
        if 0 <= token < BYTE_VOCAB:
            self.data.append(token)
            for text, raw in self.stops:
                if self.data.endswith(raw):
                    return self._finish("stop", text, t0)
        if last:
            return self._finish("length", None, t0)
        if self.stream is not None:
            piece = self.text_stream.feed(self.data)
            if piece:
                self.stream(self.index, piece)
        return True

    def _finish(self, reason: str, stop: str | None, t0: float) -> bool:
        final = bytes(self.data[:len(self.data) - len(stop.encode("utf-8"))] if stop is not None else self.data)
        if self.stream is not None:
            piece = self.text_stream.finish(final)
            if piece:
                self.stream(self.index, piece)
        self.result = Generation(self.index, list(self.prompt), self.new_ids, final.decode("utf-8", errors="replace"),
                                 reason, stop, time.perf_counter() - t0)
        return False


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, minimum: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < minimum:
        raise ValueError(f"max_new_tokens must be an integer >= {minimum}, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _prompt_lists(prompts) -> list[list[int]]:
    """Prompts as id lists: a string is BOS followed by its UTF-8 bytes; id sequences are kept as they are."""
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    else:
        prompts = list(prompts)
        if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            prompts = [prompts]  # one prompt given as a flat id list
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append([BOS_ID, *p.encode("utf-8")])
        elif isinstance(p, bytes):
            out.append([BOS_ID, *p])
        else:
            ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            if not ids:
                raise ValueError(f"prompt {i} holds no token (give at least BOS)")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"prompt {i} must be a string or a sequence of integer token ids")
            out.append(ids)
    return out


@torch.no_grad()
def _run(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int,
         use_cache: bool, eos_id: int | None, stops: list[tuple[str, bytes]],
         stream: Callable[[int, str], None] | None, threads: int | None = None,
         refresh: Callable | None = None) -> list[Generation]:
    """The decoding loop shared by :func:`generate_batch` and :func:`generate` (arguments already checked).
    Every model call runs under :class:`moekit.threads.ThreadPolicy` (``threads`` None: the ``auto`` policy).
    ``refresh(ids, cache)`` (one prompt only; test-time rewiring, :mod:`moekit.adapt.online`) is called before
    each decoding step with the text so far and may change the model and rewrite ``cache`` in place."""
    from ..threads import ThreadPolicy

    policy = ThreadPolicy(threads)
    model_call = model

    def model(ids_BL, **kw):  # noqa: F811  (the model, called under the thread policy)
        with policy.call(ids_BL.numel()):
            return model_call(ids_BL, **kw)

    device = next(model_call.parameters()).device
    vocab = model_call.config.vocab_size
    pad_id = PAD_ID if PAD_ID < vocab else 0  # any id works: pad positions are masked out
    t0 = time.perf_counter()
    seqs = [_Sequence(i, p, eos_id, stops, stream, int(seed), temperature > 0) for i, p in enumerate(prompts)]
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    ids_BL = torch.tensor([[pad_id] * (P - n) + p for n, p in zip(lengths, prompts)], dtype=torch.int64,
                          device=device)
    mask_BJ = None
    if min(lengths) < P:
        mask_BJ = torch.tensor([[False] * (P - n) + [True] * n for n in lengths], device=device)
    active = list(range(len(prompts)))  # the rows of the batch, as indices into seqs
    was_training = model_call.training
    model_call.eval()
    try:
        cache = KVCache.for_model(model_call, len(prompts), P + max_new_tokens) if use_cache else None
        logits_BV = model(ids_BL, kv_cache=cache, start_pos=0, attention_mask=mask_BJ)[:, -1]
        pos = P
        for step in range(max_new_tokens):
            if temperature == 0:
                token_B = logits_BV.argmax(dim=-1)
            else:
                probs_BV = top_p_filter(torch.softmax(logits_BV.float().cpu() / temperature, dim=-1), top_p)
                token_B = torch.cat([torch.multinomial(probs_BV[r:r + 1], 1, generator=seqs[i].generator)[0]
                                     for r, i in enumerate(active)]).to(device)
            last = step + 1 == max_new_tokens
            keep = [r for r, (i, t) in enumerate(zip(active, token_B.tolist())) if seqs[i].push(t, last, t0)]
            if not keep:
                break
            if len(keep) < len(active):  # drop finished sequences from the batch
                keep_B = torch.tensor(keep, dtype=torch.int64, device=device)
                active = [active[r] for r in keep]
                token_B = token_B.index_select(0, keep_B)
                ids_BL = ids_BL.index_select(0, keep_B)
                if cache is not None:
                    cache.select(keep_B)
                if mask_BJ is not None:
                    mask_BJ = mask_BJ.index_select(0, keep_B)
                    if bool(mask_BJ.all()):
                        mask_BJ = None  # no padding left: plain causal attention
            if mask_BJ is not None:
                mask_BJ = torch.cat((mask_BJ, mask_BJ.new_ones(len(active), 1)), dim=1)
            if refresh is not None:  # test-time rewiring (moekit.adapt.online): may adapt and rewrite the cache
                refresh(seqs[active[0]].prompt + seqs[active[0]].new_ids, cache)
            if cache is not None:
                logits_BV = model(token_B[:, None], kv_cache=cache, start_pos=pos, attention_mask=mask_BJ)[:, -1]
                pos += 1
            else:
                ids_BL = torch.cat((ids_BL, token_B[:, None]), dim=1)
                logits_BV = model(ids_BL, attention_mask=mask_BJ)[:, -1]
    finally:
        model_call.train(was_training)
    return [s.result for s in seqs]


def generate_batch(model, prompts, max_new_tokens: int = 200, *, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0, use_cache: bool = True, eos_id: int | None = EOS_ID, stop: Sequence[str] = (),
                   stream: Callable[[int, str], None] | None = None, threads: int | None = None,
                   refresh: Callable | None = None) -> list[Generation]:
    """Continue every prompt of ``prompts`` by up to ``max_new_tokens`` tokens, as one padded batch.

    ``prompts``: strings (each becomes BOS followed by its UTF-8 bytes, as ``moekit generate`` does) or token
    id lists (used as given), or one such prompt alone. Each prompt stops on its own: at ``eos_id`` (None
    never stops), when its new text ends with one of the ``stop`` strings, or after ``max_new_tokens``.
    ``temperature=0`` is greedy (default), otherwise a tempered nucleus draw (``top_p``) seeded with
    ``seed + index``. ``use_cache`` decodes incrementally with a :class:`KVCache`; without it each step runs
    the whole sequence again (same greedy tokens). ``stream(index, piece)`` is called with each new piece of
    text as soon as it is safe to show (whole UTF-8 characters, never the start of a stop string); the pieces
    of a prompt concatenate to its ``text``. ``threads``: intra-op threads of every model call, None for the
    ``auto`` policy of :mod:`moekit.threads` (one thread for calls of at most 8 token rows). ``refresh``: see
    ``_run`` (one prompt; :func:`moekit.adapt.generate_rewired` passes it).

    Returns one :class:`Generation` per prompt, in order. ``ValueError`` for bad arguments, including a prompt
    whose length plus ``max_new_tokens`` exceeds the model's ``max_seq_len``. The model runs in eval mode and
    is put back as it was.
    """
    _check_sampling(max_new_tokens, temperature, top_p, minimum=1)
    if isinstance(stop, str):
        stop = [stop]
    stops = []
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        stops.append((s, s.encode("utf-8")))
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)):
        raise ValueError(f"eos_id must be an integer token id or None, got {eos_id!r}")
    ids = _prompt_lists(prompts)
    cfg = model.config
    for i, p in enumerate(ids):
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt {i}: {len(p)} tokens plus max_new_tokens={max_new_tokens} exceed the model's "
                             f"max_seq_len={cfg.max_seq_len}")
    if threads is not None:
        from ..threads import parse_threads

        threads = parse_threads(threads)
    if refresh is not None and len(ids) != 1:
        raise ValueError("refresh (test-time rewiring) works on one prompt at a time")
    return _run(model, ids, max_new_tokens, temperature, top_p, seed, use_cache, eos_id, stops, stream, threads,
                refresh)


def generate(model, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, use_cache: bool = True, eos_id: int | None = None) -> torch.Tensor:
    """Continue ``prompt_ids`` (ids ``[L]`` or ``[B, L]``) by up to ``max_new_tokens`` tokens; the tensor form
    of :func:`generate_batch` (``moekit.generate``), for prompts of one length.

    Returns the prompt followed by the new tokens, with the prompt's rank (``[L + n]`` or ``[B, L + n]``).
    ``temperature=0`` is greedy; ``use_cache`` decodes incrementally with a :class:`KVCache` (greedy gives the
    same tokens either way). With ``eos_id``, a sequence that produced it is continued with ``eos_id`` and
    generation stops once every sequence has. Sampling seeds row ``b`` with ``seed + b``. The model runs in
    eval mode and is put back as it was.
    """
    _check_sampling(max_new_tokens, temperature, top_p, minimum=0)
    ids_BL, single = _as_batch(prompt_ids)
    if ids_BL.shape[1] == 0:
        raise ValueError("prompt_ids must hold at least one token (for example BOS)")
    device = next(model.parameters()).device
    rows = ids_BL.tolist()
    if max_new_tokens > 0:
        results = _run(model, rows, max_new_tokens, temperature, top_p, seed, use_cache, eos_id, [], None)
        n = max(r.new_tokens for r in results)
        rows = [row + r.new_ids + [eos_id] * (n - r.new_tokens) for row, r in zip(rows, results)]
    out = torch.tensor(rows, dtype=torch.int64, device=device)
    return out[0] if single else out
