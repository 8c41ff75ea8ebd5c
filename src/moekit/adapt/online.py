"""Test-time rewiring during generation (``moekit generate --rewire``): the online loop of Su et al. 2025,
"Rewiring Experts on the Fly: Continuous Rerouting for Better Online Adaptation in Mixture-of-Expert models"
(see :mod:`moekit.adapt.rewire` for the method and the defaults), around moekit's KV-cache decoding
(:func:`moekit.model.generate_batch`).

Per prompt: the offsets are reset to zero; they adapt on the prompt at prefill (when it holds at least two
tokens, i.e. one prediction); generation then runs with the adapted routers, and every ``every`` generated
tokens the offsets adapt again (``rewirer.steps`` optimiser steps) on the text so far (prompt + generated
tokens, the token just sampled included) before the next decoding step. Prompts are generated one after
another, since the offsets are one vector per layer shared by the whole batch.

What is recomputed after an adaptation. An offset of MoE layer ``i`` changes the output of decoder layer
``i`` and so the keys and values of every later layer, but not those of layers ``0..i`` (the attention of
layer ``i`` runs before its MoE). :class:`OnlineRewiring` keeps the residual-stream input of the first decoder
layer holding an adapted MoE layer (``first``) for every position fed so far (a forward pre-hook during
decoding), and after an adaptation reruns decoder layers ``first ..`` over those positions, rewriting their
part of the KV cache; layers ``0 .. first - 1`` (their cache, their compute) are left as they are. With every
MoE layer selected (the default) ``first`` is 0 and the whole cache is rebuilt in one prefill-sized pass.
The token just sampled is then decoded as usual (all layers, one position). With a router that carries
residual-stream momentum across layers (MomentumSMoE/AdamSMoE) the whole cache is rebuilt instead, since that
state starts at layer 0. Without a KV cache (``use_cache=False``) every step reruns the whole sequence anyway.

Legend: B batch, N positions fed so far, D model width.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..routing.base import MomentumState, RoutingContext
from .rewire import Rewirer

__all__ = ["Adaptation", "OnlineRewiring", "generate_rewired"]


@dataclass
class Adaptation:
    """One adaptation of the online loop: after ``generated`` new tokens (0: at prefill), on ``tokens``
    positions; the loss before/after (nats), the L2 norm of each selected layer's offset, per MoE layer the
    fraction of top-k choices on the adaptation text that differ from the unadapted model's, wall time, and
    which layers' KV cache was recomputed (``recomputed_from``: first decoder layer rerun; None at prefill)."""

    generated: int
    tokens: int
    loss_before: float
    loss_after: float
    delta_norms: list[float]
    routing_change: list[float]
    seconds: float
    recomputed_from: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        valid = [c for c in self.routing_change if c == c]
        return {"generated": self.generated, "tokens": self.tokens, "loss_before": self.loss_before,
                "loss_after": self.loss_after, "delta_norms": self.delta_norms,
                "routing_change": self.routing_change,
                "routing_change_mean": sum(valid) / len(valid) if valid else float("nan"),
                "seconds": self.seconds, "recomputed_from": self.recomputed_from}


def _decoder_index_of_moe(model) -> list[int]:
    """Decoder-layer index of each MoE layer (in :func:`moekit.layer.moe_layers` order)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        if getattr(layer, "is_moe", False):
            out.append(i)
    return out


class OnlineRewiring:
    """The per-prompt state of the online loop; pass it as ``refresh`` to :func:`moekit.model.generate_batch`
    (one prompt) after :meth:`start`. ``adaptations`` lists what each adaptation did."""

    def __init__(self, model, rewirer: Rewirer, every: int, on_adapt=None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"rewire every must be an integer >= 1, got {every!r}")
        self.model, self.rewirer, self.every = model, rewirer, every
        self.on_adapt = on_adapt
        moe_at = _decoder_index_of_moe(model)
        momentum = any(type(layer.gate).__module__.endswith("routing.momentum") for layer in rewirer.all_layers)
        self.first = 0 if momentum or len(moe_at) != len(rewirer.all_layers) else moe_at[rewirer.layers[0]]
        self.adaptations: list[Adaptation] = []
        self.prompt_len = 0
        self._hidden: list[torch.Tensor] = []
        self._recording = False
        self._handle = None

    # ------------------------------------------------------------------ residual stream at layer `first`
    def _keep_input(self, module, args, kwargs):
        if not self._recording:
            return
        kv_cache = args[4] if len(args) > 4 else kwargs.get("kv_cache")
        if kv_cache is None:  # an adaptation or a cache-less call: nothing to keep
            return
        start = args[5] if len(args) > 5 else kwargs.get("start_pos", 0)
        x_BND = args[0].detach()
        if start != sum(t.shape[1] for t in self._hidden):  # a fresh prefill
            self._hidden = []
        self._hidden.append(x_BND)

    def __enter__(self):
        if self.first > 0:
            self._handle = self.model.model.layers[self.first].register_forward_pre_hook(self._keep_input,
                                                                                          with_kwargs=True)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._hidden = []
        return False

    # ------------------------------------------------------------------ the loop
    def _adapt(self, ids: list[int], generated: int) -> Adaptation:
        t0 = time.perf_counter()
        report = self.rewirer.adapt(ids)
        a = Adaptation(generated, report.tokens, report.loss_before, report.loss_after, report.delta_norms,
                       report.routing_change, time.perf_counter() - t0)
        self.adaptations.append(a)
        return a

    def start(self, prompt_ids: list[int]) -> None:
        """Reset the offsets and adapt on the prompt (when it holds a prediction)."""
        self.rewirer.reset()
        self.adaptations = []
        self._hidden = []
        self._recording = True
        self.prompt_len = len(prompt_ids)
        if len(prompt_ids) >= 2 and self.rewirer.steps > 0:
            a = self._adapt(list(prompt_ids), 0)
            if self.on_adapt is not None:
                self.on_adapt(a)

    @torch.no_grad()
    def _recompute(self, ids: list[int], cache) -> int:
        """Rewrite the KV cache of decoder layers ``first ..`` over the ``len(ids) - 1`` positions fed so far
        (or all layers from the token ids when ``first`` is 0); returns the first layer rerun."""
        model = self.model
        N = len(ids) - 1
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            if self.first == 0 or sum(t.shape[1] for t in self._hidden) != N:  # (re-records the hidden states)
                self._hidden = []
                model(torch.tensor([ids[:N]], dtype=torch.int64, device=device), kv_cache=cache, start_pos=0)
                return 0
            self._recording = False
            decoder = model.model
            x_BND = torch.cat(self._hidden, dim=1)
            cos, sin = decoder.rotary_emb(torch.arange(N, device=device), x_BND.dtype)
            ids_BN = torch.tensor([ids[:N]], dtype=torch.int64, device=device)
            momentum, extras = MomentumState(), {}
            for layer in decoder.layers[self.first:]:
                ctx = RoutingContext(batch_shape=(1, N), input_ids=ids_BN, layer_index=layer.layer_index,
                                     kv_cache=cache, start_pos=0, momentum=momentum, extras=extras)
                x_BND = layer(x_BND, cos, sin, ctx, cache, 0)
            cache.length = N
            return self.first
        finally:
            self._recording = True
            model.train(was_training)

    def __call__(self, ids: list[int], cache) -> None:
        """Called by the decoding loop before feeding the last token of ``ids`` (the text so far)."""
        generated = len(ids) - self.prompt_len
        if generated <= 0 or generated % self.every or self.rewirer.steps == 0:
            return
        a = self._adapt(list(ids), generated)
        if cache is not None:
            t0 = time.perf_counter()
            a.recomputed_from = self._recompute(list(ids), cache)
            a.seconds += time.perf_counter() - t0
        if self.on_adapt is not None:
            self.on_adapt(a)


def generate_rewired(model, prompts, max_new_tokens: int, rewirer: Rewirer, every: int | None = None, *,
                     on_adapt=None, stream=None, **kwargs) -> list[tuple]:
    """:func:`moekit.model.generate_batch` with online rewiring, one prompt at a time (offsets reset per
    prompt). Returns ``[(Generation, [Adaptation, ...]), ...]`` in prompt order; the offsets are zero again on
    return. ``on_adapt(index, adaptation)`` is called after each adaptation; ``stream(index, piece)`` as in
    ``generate_batch``; other keyword arguments go to ``generate_batch``."""
    from ..model.generate import _prompt_lists, generate_batch

    every = rewirer.every if every is None else every
    seed = kwargs.pop("seed", 0)
    out = []
    try:
        for index, prompt in enumerate(_prompt_lists(prompts)):
            online = OnlineRewiring(model, rewirer, every,
                                    on_adapt=None if on_adapt is None else (lambda a, i=index: on_adapt(i, a)))
            with online:
                online.start(prompt)
                piece = None if stream is None else (lambda _i, text, i=index: stream(i, text))
                [gen] = generate_batch(model, [prompt], max_new_tokens, seed=seed + index, stream=piece,
                                       refresh=online, **kwargs)
            gen.index = index
            out.append((gen, list(online.adaptations)))
    finally:
        rewirer.detach()  # offsets zero, no longer requiring gradients
    return out

