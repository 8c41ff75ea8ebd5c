"""Record the routing of every :class:`moekit.MoE` layer of a model into a :class:`~moekit.trace.Trace`.

Usage::

    with record_routing(model, keep_logits=True) as rec:
        for batch in batches:
            model(batch.input_ids)
            rec.annotate(tokens=batch.input_ids, doc_ids=batch.doc_ids, domain_ids=batch.domain_ids)
    trace = rec.trace(domain_names=corpus.domains, source={"data": "val"})

A forward hook on each MoE layer reads ``layer.last_routing`` after the call and converts its flat
``(token_ids, expert_ids, weights)`` list into padded ``[T, K]`` rows, so any router (token choice, expert
choice, thresholds) fits. Calls concatenate along the token axis. Tokens masked as padding
(``RoutingContext.token_mask``, carried on the routing) are not recorded: they and their annotations
(``annotate`` takes one value per token of the call, padding included) are left out of the trace.

Legend (docs/architecture.md): I layers, T tokens, K experts per token, E experts, S routed pairs.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..layer import MoE
from ..routing.base import Routing
from .format import TOKEN_FIELDS, Trace

__all__ = ["RoutingRecorder", "record_routing", "pad_assignments", "trace_model"]


def pad_assignments(token_ids_S: torch.Tensor, expert_ids_S: torch.Tensor, weights_S: torch.Tensor,
                    num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat routed pairs -> ``(experts_TK int64, weights_TK float32)`` on the CPU.

    ``K`` is the most experts any token got (at least 1); each row lists the token's experts by descending gate
    weight (ties keep the router's order) and is padded with expert ``-1``, weight 0.
    """
    token_S = token_ids_S.detach().to("cpu", torch.int64).reshape(-1)
    expert_S = expert_ids_S.detach().to("cpu", torch.int64).reshape(-1)
    weight_S = weights_S.detach().to("cpu", torch.float32).reshape(-1)
    by_weight_S = torch.argsort(-weight_S, stable=True)
    order_S = by_weight_S[torch.argsort(token_S[by_weight_S], stable=True)]
    token_S, expert_S, weight_S = token_S[order_S], expert_S[order_S], weight_S[order_S]
    counts_T = torch.bincount(token_S, minlength=num_tokens)
    width = max(1, int(counts_T.max())) if token_S.numel() else 1
    starts_T = torch.cumsum(counts_T, 0) - counts_T
    rank_S = torch.arange(token_S.numel()) - starts_T[token_S]
    experts_TK = torch.full((num_tokens, width), -1, dtype=torch.int64)
    weights_TK = torch.zeros((num_tokens, width), dtype=torch.float32)
    experts_TK[token_S, rank_S] = expert_S
    weights_TK[token_S, rank_S] = weight_S
    return experts_TK, weights_TK


@dataclass
class _Call:
    """One layer's routing in one forward call."""

    experts_TK: torch.Tensor
    weights_TK: torch.Tensor
    logits_TE: torch.Tensor | None
    batch_shape: tuple[int, ...]
    num_experts: int
    real_T: torch.Tensor | None = None  # the routing's token_mask: False = padding, left out of the trace


def _pad_width(x: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=value)


class RoutingRecorder:
    """Forward hooks on the MoE layers of a model; see :func:`record_routing`."""

    def __init__(self, model: nn.Module, layer_names: Sequence[str] | None = None, keep_logits: bool = False,
                 logits_dtype: torch.dtype = torch.float32):
        if logits_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"logits_dtype must be torch.float16 or torch.float32, got {logits_dtype}")
        found = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
        if layer_names is None:
            layer_names = list(found)
        else:
            layer_names = list(layer_names)
            unknown = [n for n in layer_names if n not in found]
            if unknown:
                raise ValueError(f"layer_names: {', '.join(map(repr, unknown))} are not moekit.MoE layers of the "
                                 f"model; MoE layers: {', '.join(found) or 'none'}")
        if not layer_names:
            raise ValueError("the model has no moekit.MoE layer to record")
        self.layer_names = layer_names
        self.layers = [found[n] for n in layer_names]
        self.keep_logits = keep_logits
        self.logits_dtype = logits_dtype
        self._calls: list[list[_Call]] = [[] for _ in layer_names]
        self._annotations: list[dict[str, torch.Tensor]] = []
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(module: MoE, inputs, output) -> None:
            routing: Routing | None = module.last_routing
            if routing is None:
                return
            experts_TK, weights_TK = pad_assignments(routing.token_ids, routing.expert_ids, routing.weights,
                                                     routing.num_tokens)
            logits_TE = None
            if self.keep_logits and routing.logits is not None:
                logits_TE = routing.logits.detach().to("cpu", self.logits_dtype)
            batch_shape = tuple(inputs[0].shape[:-1]) if inputs and isinstance(inputs[0], torch.Tensor) else ()
            real_T = None if routing.token_mask is None else routing.token_mask.detach().to("cpu").bool()
            self._calls[index].append(_Call(experts_TK, weights_TK, logits_TE, batch_shape, routing.num_experts,
                                            real_T))
        return hook

    def close(self) -> None:
        """Remove the hooks (the recorded calls are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def num_calls(self) -> int:
        """Forward calls recorded so far (those of the first recorded layer)."""
        return len(self._calls[0])

    def annotate(self, *, tokens=None, positions=None, doc_ids=None, domain_ids=None, seq_ids=None) -> None:
        """Per-token annotations of one forward call: the ``i``-th ``annotate`` describes the ``i``-th call.

        Each value has one entry per token of the call (any shape, e.g. ``[B, L]`` like ``input_ids``). A field
        given for one call must be given for every call. Fields never given default to ``-1`` (unknown), except
        ``positions`` (the index along the last batch dimension, ``0..L-1``; pass real positions when decoding
        with a KV cache) and ``seq_ids`` (one id per row of each call's batch, counted across calls).
        """
        values = dict(tokens=tokens, positions=positions, doc_ids=doc_ids, domain_ids=domain_ids, seq_ids=seq_ids)
        self._annotations.append({k: torch.as_tensor(v).detach().to("cpu").reshape(-1)
                                  for k, v in values.items() if v is not None})

    def _default_fields(self) -> dict[str, torch.Tensor]:
        positions, seq_ids, next_seq = [], [], 0
        for call in self._calls[0]:
            rows = 1
            for d in call.batch_shape[:-1]:
                rows *= int(d)
            length = int(call.batch_shape[-1]) if call.batch_shape else call.experts_TK.shape[0]
            positions.append(torch.arange(length, dtype=torch.int32).repeat(rows))
            seq_ids.append(torch.arange(next_seq, next_seq + rows, dtype=torch.int32).repeat_interleave(length))
            next_seq += rows
        return {"positions": torch.cat(positions), "seq_ids": torch.cat(seq_ids)}

    def _token_fields(self, call_sizes: list[int]) -> dict[str, torch.Tensor | None]:
        num_calls = len(call_sizes)
        if self._annotations and len(self._annotations) != num_calls:
            raise ValueError(f"annotate() was called {len(self._annotations)} times for {num_calls} forward calls; "
                             "call it once per forward call")
        defaults = self._default_fields()
        out: dict[str, torch.Tensor | None] = {}
        for name in TOKEN_FIELDS:
            given = [a.get(name) for a in self._annotations]
            if not any(v is not None for v in given):
                out[name] = defaults.get(name)
                continue
            for i, (value, size) in enumerate(zip(given, call_sizes)):
                if value is None:
                    raise ValueError(f"annotate(): {name} was given for some forward calls but not for call {i}")
                if value.numel() != size:
                    raise ValueError(f"annotate(): {name} of call {i} has {value.numel()} entries for {size} tokens")
            out[name] = torch.cat(given)
        keep = self._kept(self._calls[0])
        if keep is not None:
            out = {k: (v[keep] if v is not None else None) for k, v in out.items()}
        return out

    @staticmethod
    def _kept(calls: list[_Call]) -> torch.Tensor | None:
        """``[T]`` bool over the calls' tokens: False for padding (None when no call had any)."""
        if all(c.real_T is None or bool(c.real_T.all()) for c in calls):
            return None
        return torch.cat([c.real_T if c.real_T is not None else torch.ones(c.experts_TK.shape[0], dtype=torch.bool)
                          for c in calls])

    def trace(self, domain_names: Sequence[str] = (), model: dict | None = None,
              source: dict | None = None) -> Trace:
        """Everything recorded so far as one :class:`Trace`.

        ``model`` extends the shape information taken from the first layer's config (``dim``, ``hidden_dim``,
        ``num_experts``, ``top_k``, ``router``, ...); ``source`` is free-form (run folder, data, split).
        """
        counts = [len(calls) for calls in self._calls]
        if counts[0] == 0:
            raise ValueError("no forward call was recorded")
        if len(set(counts)) != 1:
            raise ValueError(f"the MoE layers were called different numbers of times ({counts}); every recorded "
                             "layer must see every token")
        call_sizes = [c.experts_TK.shape[0] for c in self._calls[0]]
        keep = self._kept(self._calls[0])
        for name, calls in zip(self.layer_names, self._calls):
            if [c.experts_TK.shape[0] for c in calls] != call_sizes:
                raise ValueError(f"layer {name} saw a different number of tokens than {self.layer_names[0]}")
            mine = self._kept(calls)
            if (mine is None) != (keep is None) or (mine is not None and not torch.equal(mine, keep)):
                raise ValueError(f"layer {name} saw a different token mask than {self.layer_names[0]}")
        if self.keep_logits:
            for name, calls in zip(self.layer_names, self._calls):
                if any(c.logits_TE is None for c in calls):
                    raise ValueError(f"keep_logits: the router of layer {name} gives no logits")
        width = max(c.experts_TK.shape[1] for calls in self._calls for c in calls)
        experts_ITK = torch.stack([torch.cat([_pad_width(c.experts_TK, width, -1) for c in calls])
                                   for calls in self._calls])
        weights_ITK = torch.stack([torch.cat([_pad_width(c.weights_TK, width, 0.0) for c in calls])
                                   for calls in self._calls])
        if keep is not None:  # padding is not recorded
            experts_ITK, weights_ITK = experts_ITK[:, keep], weights_ITK[:, keep]
        per_layer = [calls[0].num_experts for calls in self._calls]
        num_experts = max(per_layer)
        logits_ITE = None
        if self.keep_logits:
            logits_ITE = torch.stack([torch.cat([_pad_width(c.logits_TE, num_experts, float("-inf")) for c in calls])
                                      for calls in self._calls])
            if keep is not None:
                logits_ITE = logits_ITE[:, keep]
        return Trace(experts=experts_ITK, weights=weights_ITK, num_experts=num_experts,
                     layer_names=self.layer_names, logits=logits_ITE, domain_names=list(domain_names),
                     num_experts_per_layer=per_layer, model={**self._model_info(), **(model or {})},
                     source=dict(source or {}), **self._token_fields(call_sizes))

    def _model_info(self) -> dict:
        cfg = self.layers[0].config
        info = {"dim": cfg.dim, "hidden_dim": cfg.hidden_dim, "num_experts": cfg.num_experts, "top_k": cfg.top_k,
                "router": cfg.router, "num_shared_experts": cfg.num_shared_experts,
                "num_moe_layers": len(self.layers)}
        routers = sorted({layer.config.router for layer in self.layers})
        if len(routers) > 1:
            info["routers"] = routers
        return info


@contextmanager
def record_routing(model: nn.Module, layer_names: Sequence[str] | None = None, *, keep_logits: bool = False,
                   logits_dtype: torch.dtype = torch.float32) -> Iterator[RoutingRecorder]:
    """Record the routing of every :class:`moekit.MoE` in ``model`` (or those named in ``layer_names``, module
    names such as ``"model.layers.0.mlp"``) during the ``with`` block; yields a :class:`RoutingRecorder`.

    ``keep_logits`` also stores the router logits ``[T, E]`` (as ``logits_dtype``). The hooks are removed on
    exit; ``recorder.trace(...)`` builds the :class:`Trace` (inside or after the block).
    """
    recorder = RoutingRecorder(model, layer_names, keep_logits=keep_logits, logits_dtype=logits_dtype)
    try:
        yield recorder
    finally:
        recorder.close()


def trace_model(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, domain_names: Sequence[str] = (),
                keep_logits: bool = False, logits_dtype: torch.dtype = torch.float32,
                layer_names: Sequence[str] | None = None, model_info: dict | None = None,
                source: dict | None = None) -> Trace:
    """Run ``model`` on every batch (eval mode, no gradients) and return the trace of its MoE layers.

    Each batch is a mapping with ``input_ids`` (``[B, L]``, what the model is called with), optionally
    ``attention_mask`` (``[B, L]``, False/0 = padding: passed to the model, padding is left out of the trace) and
    ``positions``, ``doc_ids``, ``domain_ids``, ``seq_ids`` of the same shape; ``tokens`` are the
    ``input_ids``. Pass every optional field in every batch or in none. The model's training mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_routing(model, layer_names, keep_logits=keep_logits,
                                             logits_dtype=logits_dtype) as rec:
            for batch in batches:
                if "input_ids" not in batch:
                    raise ValueError("each batch must hold 'input_ids'")
                input_ids = batch["input_ids"]
                if batch.get("attention_mask") is not None:  # padding: not recorded (see RoutingRecorder)
                    model(input_ids, attention_mask=batch["attention_mask"])
                else:
                    model(input_ids)
                rec.annotate(tokens=input_ids, **{k: batch[k] for k in TOKEN_FIELDS[1:] if batch.get(k) is not None})
    finally:
        model.train(was_training)
    return rec.trace(domain_names=domain_names, model=model_info, source=source)
