"""A preallocated key/value cache for incremental decoding.

Legend (docs/architecture.md): B batch, G key/value heads, J positions, A head width.

Keys are stored after RoPE and ``k_norm``, as ``Qwen3MoeAttention`` stores them in its ``DynamicCache``.
The model writes the keys/values of positions ``start_pos ... start_pos + L - 1`` and attends to everything up
to ``start_pos + L - 1``; ``length`` is the number of positions held after the last forward.

Routers that read earlier tokens (``similarity``, ``attention`` in :mod:`moekit.routing.graph`) keep their
per-position state here too, with :meth:`KVCache.update_routing`; the buffers are allocated on first use.
"""
from __future__ import annotations

import torch


class KVCache:
    """Per-layer ``[B, K, max_len, H]`` key and value buffers."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k_BGJA = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v_BGJA = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self._routing: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> "KVCache":
        """A cache matching ``model`` (a :class:`moekit.model.MoELM`): its layers, heads, dtype and device."""
        cfg = model.config
        param = model.model.embed_tokens.weight
        return cls(cfg.n_layers, batch_size, max_len or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim,
                   dtype=param.dtype, device=param.device)

    def update(self, layer: int, k_BGLA: torch.Tensor, v_BGLA: torch.Tensor,
               start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store positions ``start_pos ... start_pos + L - 1``; return keys and values ``[B, K, start_pos + L, H]``."""
        end = start_pos + k_BGLA.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to position {end}")
        if k_BGLA.shape[0] != self.batch_size:
            raise ValueError(f"KV cache has batch size {self.batch_size}, got {k_BGLA.shape[0]}")
        self.k_BGJA[layer][:, :, start_pos:end] = k_BGLA
        self.v_BGJA[layer][:, :, start_pos:end] = v_BGLA
        return self.k_BGJA[layer][:, :, :end], self.v_BGJA[layer][:, :, :end]

    def update_routing(self, layer: int, name: str, value_BLX: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Store a router's per-position state ``value_BLX`` (``[B, L, ...]``) for positions ``start_pos ...``
        under ``(layer, name)``; return the stored positions ``0 ... start_pos - 1`` followed by ``value_BLX``
        itself (so gradients reach this call's values), ``[B, start_pos + L, ...]``."""
        end = start_pos + value_BLX.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to position {end}")
        if value_BLX.shape[0] != self.batch_size:
            raise ValueError(f"KV cache has batch size {self.batch_size}, got {value_BLX.shape[0]}")
        key = (layer, name)
        buffer = self._routing.get(key)
        if buffer is None or buffer.shape[2:] != value_BLX.shape[2:] or buffer.dtype != value_BLX.dtype:
            if start_pos != 0:
                raise ValueError(f"KV cache holds no routing state {name!r} of layer {layer} before position "
                                 f"{start_pos}; fill it from position 0")
            buffer = value_BLX.new_zeros((self.batch_size, self.max_len, *value_BLX.shape[2:]))
            self._routing[key] = buffer
        buffer[:, start_pos:end] = value_BLX.detach()
        return torch.cat((buffer[:, :start_pos], value_BLX), dim=1)

    def select(self, index_B: torch.Tensor | list[int]) -> None:
        """Keep only the sequences ``index_B`` (in that order), keys, values and routing state alike: batched
        generation drops the sequences that finished so later steps compute only the others."""
        index = torch.as_tensor(index_B, dtype=torch.int64, device=self.k_BGJA[0].device if self.k_BGJA else None)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"select needs a non-empty list of sequence indices, got shape {tuple(index.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= self.batch_size:
            raise ValueError(f"sequence indices must be in [0, {self.batch_size}), got {index.tolist()}")
        self.k_BGJA = [k.index_select(0, index) for k in self.k_BGJA]
        self.v_BGJA = [v.index_select(0, index) for v in self.v_BGJA]
        self._routing = {key: buf.index_select(0, index.to(buf.device)) for key, buf in self._routing.items()}
        self.batch_size = int(index.numel())

    def reset(self) -> None:
        self.length = 0
