"""Record the routing of a Hugging Face transformers MoE model into a moekit routing trace.

Usage::

    from moekit.hf.record import record_routing
    from moekit.trace import save_trace

    with record_routing(model) as rec:                    # forward hooks, removed on exit
        model.generate(input_ids, max_new_tokens=20)      # or model(input_ids), any number of calls
    save_trace(rec.trace(source={"prompt": "..."}), "trace.safetensors")

The sparse MoE blocks are found programmatically: every module with an ``experts`` submodule and a router
submodule named ``gate`` or ``router`` whose ``weight`` is ``[E, D]`` (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3, GPT-OSS and the other transformers 5 MoE families; Qwen2-MoE's ``shared_expert_gate`` is not a
router and shared experts are not recorded). In transformers 5 each router returns
``(router_logits, top_k_weights, top_k_index)``: a forward hook on the router reads all three, so the trace
holds exactly what the experts received. ``router_logits`` are the raw scores ``x W^T`` (plus the router's
bias where it has one, GPT-OSS) before softmax/sigmoid, score-correction bias and group-limited selection;
weights are the gate values that multiply each expert's output (after renormalisation and scaling). A router
that returns only logits (a plain ``nn.Linear``) is supported by also hooking the experts module's inputs
``(hidden_states, top_k_index, top_k_weights)``.

A forward pre-hook on ``model`` itself reads each call's ``input_ids`` and positions (``position_ids``, else
``cache_position``, else the KV-cache length), so with ``generate()`` the trace lists the prompt tokens, then
one token per sequence per generated step, at their true positions. A call that starts from an empty cache
starts new sequences (``seq_ids`` counted across calls); a call on a non-empty cache continues the previous
sequences. Padding (tokens whose ``attention_mask`` entry is 0) is not recorded.

Legend: T tokens, K experts per token, E experts, B batch, L sequence length.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..trace.format import Trace

__all__ = ["HFRoutingRecorder", "record_routing", "find_moe_blocks", "MoEBlock"]

_INDEX_KWARGS = ("top_k_index", "router_indices", "selected_experts", "topk_indices")
_WEIGHT_KWARGS = ("top_k_weights", "routing_weights", "router_scores", "topk_weights")


@dataclass
class MoEBlock:
    """A sparse MoE block of a transformers model: its module name, router and routed experts."""

    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The sparse MoE blocks of ``model`` in module order (see the module docstring for the rule)."""
    blocks = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        for attr in ("gate", "router"):
            router = getattr(module, attr, None)
            weight = getattr(router, "weight", None)
            if isinstance(router, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                blocks.append(MoEBlock(name, module, router, experts))
                break
    return blocks


@dataclass
class _Call:
    """Annotations of one forward call of the whole model."""

    tokens_BL: torch.Tensor | None
    positions_BL: torch.Tensor | None
    seq_base: int
    num_tokens: int
    real_BL: torch.Tensor | None = None  # from the call's attention_mask: False = padding, not recorded


def _pick(args, kwargs, position: int, names) -> torch.Tensor | None:
    for n in names:
        if isinstance(kwargs.get(n), torch.Tensor):
            return kwargs[n]
    if len(args) > position and isinstance(args[position], torch.Tensor):
        return args[position]
    return None


class HFRoutingRecorder:
    """Forward hooks on the routers of a transformers MoE model; see :func:`record_routing`."""

    def __init__(self, model: nn.Module, keep_logits: bool = True, logits_dtype: torch.dtype = torch.float32):
        if logits_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"logits_dtype must be torch.float16 or torch.float32, got {logits_dtype}")
        self.model = model
        self.blocks = find_moe_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no sparse MoE blocks (modules with .experts and a "
                             ".gate or .router of weight [experts, dim])")
        self.keep_logits = keep_logits
        self.logits_dtype = logits_dtype
        self.logits: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.experts: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.weights: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.calls: list[_Call] = []
        self._next_seq = 0
        self._handles: list = []

    # ------------------------------------------------------------------------------------------- hooks
    def attach(self) -> "HFRoutingRecorder":
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        for i, b in enumerate(self.blocks):
            self._handles.append(b.router.register_forward_hook(self._router_hook(i)))
            self._handles.append(b.experts.register_forward_pre_hook(self._experts_hook(i), with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, (tuple, list)) else output
            if self.keep_logits or not isinstance(output, (tuple, list)):
                self.logits[layer].append(logits.detach().reshape(-1, logits.shape[-1]).to("cpu", torch.float32))
            if isinstance(output, (tuple, list)) and len(output) >= 3:
                # a moekit.hf.surgery adapter pads variable-k rows (expert 0 at weight 0): not routed pairs
                self._add_selection(layer, output[2], output[1], getattr(module, "last_padding", None))
        return hook

    def _experts_hook(self, layer: int):
        def hook(module, args, kwargs):
            if len(self.experts[layer]) < len(self.logits[layer]):  # the router gave logits only
                index = _pick(args, kwargs, 1, _INDEX_KWARGS)
                weights = _pick(args, kwargs, 2, _WEIGHT_KWARGS)
                if index is None or weights is None:
                    raise RuntimeError(f"cannot read the routing of {self.blocks[layer].name}: its router returns "
                                       "only logits and its experts were called without (index, weights)")
                self._add_selection(layer, index, weights)
        return hook

    def _add_selection(self, layer: int, index: torch.Tensor, weights: torch.Tensor,
                       padding: torch.Tensor | None = None) -> None:
        """Rows in descending weight; slots flagged in ``padding [T, K]`` become expert -1 at weight 0, last."""
        index_TK = index.detach().reshape(-1, index.shape[-1]).to("cpu", torch.int64)
        weights_TK = weights.detach().reshape(-1, weights.shape[-1]).to("cpu", torch.float32)
        key_TK = -weights_TK
        if padding is not None and tuple(padding.shape) == tuple(index_TK.shape):
            pad_TK = padding.detach().to("cpu", torch.bool)
            index_TK = index_TK.masked_fill(pad_TK, -1)
            weights_TK = weights_TK.masked_fill(pad_TK, 0.0)
            key_TK = key_TK.masked_fill(pad_TK, float("inf"))
        order_TK = torch.argsort(key_TK, dim=-1, stable=True)  # descending weight, ties keep router order
        self.experts[layer].append(index_TK.gather(1, order_TK))
        self.weights[layer].append(weights_TK.gather(1, order_TK))

    def _on_model_call(self, module, args, kwargs):
        input_ids = _pick(args, kwargs, 0, ("input_ids",))
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None and input_ids.dim() == 2:
            B, L = input_ids.shape
        elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
            B, L = embeds.shape[:2]
        else:
            self.calls.append(_Call(None, None, -1, -1))
            return
        past = kwargs.get("past_key_values")
        past_len = 0
        if past is not None and hasattr(past, "get_seq_length"):
            past_len = int(past.get_seq_length())
        positions = kwargs.get("position_ids")
        cache_position = kwargs.get("cache_position")
        if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[-1] == L:
            positions_BL = positions.detach().to("cpu", torch.int64).expand(B, L)
        elif isinstance(cache_position, torch.Tensor) and cache_position.numel() == L:
            positions_BL = cache_position.detach().to("cpu", torch.int64).reshape(1, L).expand(B, L)
        else:
            positions_BL = (torch.arange(L) + past_len).expand(B, L)
        if past_len == 0 or not self.calls or self.calls[-1].seq_base < 0:
            base = self._next_seq
            self._next_seq += B
        else:
            base = self.calls[-1].seq_base
        tokens = input_ids.detach().to("cpu", torch.int64) if input_ids is not None else None
        mask = _pick(args, kwargs, 1, ("attention_mask",))
        real_BL = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= L:
            real_BL = mask[:, -L:].detach().to("cpu") != 0  # cached decoding: the mask covers the past too
        self.calls.append(_Call(tokens, positions_BL.clone(), base, B * L, real_BL))

    # ------------------------------------------------------------------------------------------- result
    @property
    def num_tokens(self) -> int:
        return sum(x.shape[0] for x in self.experts[0])

    def trace(self, domain_names=None, model: dict | None = None, source: dict | None = None) -> Trace:
        """The recorded routing as a :class:`moekit.trace.Trace` (tokens in call order, batches row-major)."""
        if not self.experts[0]:
            raise ValueError("no routing recorded: run the model inside record_routing(...) first")
        T = self.num_tokens
        for b, ex in zip(self.blocks, self.experts):
            if sum(x.shape[0] for x in ex) != T:
                raise ValueError(f"layer {b.name} routed {sum(x.shape[0] for x in ex)} tokens, the first MoE layer "
                                 f"{T}: record whole-model forward calls only")
        E = max(b.num_experts for b in self.blocks)
        K = max(x.shape[1] for ex in self.experts for x in ex)

        def pad(x, width, value):
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        experts = torch.stack([torch.cat([pad(x, K, -1) for x in ex]) for ex in self.experts])
        weights = torch.stack([torch.cat([pad(x, K, 0.0) for x in w]) for w in self.weights])
        logits = None
        if self.keep_logits:
            logits = torch.stack([torch.cat([pad(x, E, float("-inf")) for x in lg]) for lg in self.logits])
            logits = logits.to(self.logits_dtype)
        fields = self._annotations(T)
        keep_T = self._real_tokens(T)
        if keep_T is not None:  # padding (attention_mask 0) is not recorded
            experts, weights = experts[:, keep_T], weights[:, keep_T]
            logits = logits[:, keep_T] if logits is not None else None
            fields = {k: v[keep_T] for k, v in fields.items()}
        cfg = getattr(self.model, "config", None)
        info = {"architecture": type(self.model).__name__, "model_type": getattr(cfg, "model_type", None),
                "num_experts": E, "top_k": K, "num_moe_layers": len(self.blocks),
                "n_layers": getattr(cfg, "num_hidden_layers", None), "dim": getattr(cfg, "hidden_size", None)}
        return Trace(experts=experts, weights=weights, num_experts=E, layer_names=[b.name for b in self.blocks],
                     logits=logits, domain_names=list(domain_names or []),
                     num_experts_per_layer=[b.num_experts for b in self.blocks],
                     model={**info, **(model or {})}, source={"recorder": "moekit.hf.record", **(source or {})},
                     **fields)

    def _real_tokens(self, T: int) -> torch.Tensor | None:
        """``[T]`` bool of the recorded tokens that are not padding, when the calls account for every token and
        some call had an attention mask with padding; else None (everything recorded)."""
        if not self.calls or any(c.num_tokens < 0 for c in self.calls) or sum(c.num_tokens for c in self.calls) != T:
            return None
        if all(c.real_BL is None or bool(c.real_BL.all()) for c in self.calls):
            return None
        return torch.cat([c.real_BL.reshape(-1) if c.real_BL is not None else torch.ones(c.num_tokens, dtype=torch.bool)
                          for c in self.calls])

    def _annotations(self, T: int) -> dict:
        """tokens, positions, seq_ids from the model calls, when they account for every routed token."""
        if not self.calls or any(c.num_tokens < 0 for c in self.calls) or sum(c.num_tokens for c in self.calls) != T:
            return {}
        tokens, positions, seqs = [], [], []
        for c in self.calls:
            B, L = c.positions_BL.shape
            tokens.append(c.tokens_BL.reshape(-1) if c.tokens_BL is not None else torch.full((B * L,), -1))
            positions.append(c.positions_BL.reshape(-1))
            seqs.append((torch.arange(B) + c.seq_base).repeat_interleave(L))
        return {"tokens": torch.cat(tokens), "positions": torch.cat(positions).clamp(min=-1),
                "seq_ids": torch.cat(seqs)}


@contextmanager
def record_routing(model: nn.Module, keep_logits: bool = True,
                   logits_dtype: torch.dtype = torch.float32) -> Iterator[HFRoutingRecorder]:
    """Record every sparse MoE block's routing of the forward calls (or ``generate()``) run inside the block.

    ``keep_logits`` keeps the raw router logits ``[L, T, E]`` (float32, or ``logits_dtype``). Raises
    ``ValueError`` when ``model`` has no sparse MoE block. The hooks are removed on exit; call
    ``rec.trace(...)`` afterwards and save it with :func:`moekit.trace.save_trace`.
    """
    rec = HFRoutingRecorder(model, keep_logits=keep_logits, logits_dtype=logits_dtype).attach()
    try:
        yield rec
    finally:
        rec.detach()
