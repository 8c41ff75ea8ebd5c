"""``ModelConfig``: the validated settings of the compact MoE decoder (:class:`moekit.model.MoELM`).

Field -> Hugging Face ``Qwen3MoeConfig`` field (see :mod:`moekit.model.hf_mapping`):
``vocab_size`` -> ``vocab_size``, ``dim`` -> ``hidden_size``, ``n_layers`` -> ``num_hidden_layers``, ``n_heads`` ->
``num_attention_heads``, ``n_kv_heads`` -> ``num_key_value_heads``, ``head_dim`` -> ``head_dim``, ``max_seq_len``
-> ``max_position_embeddings``, ``rope_theta`` -> ``rope_parameters["rope_theta"]``, ``norm_eps`` ->
``rms_norm_eps``, ``moe_every`` -> ``decoder_sparse_step``, ``dense_layers`` -> ``mlp_only_layers``,
``dense_hidden_dim`` -> ``intermediate_size``, ``moe.hidden_dim`` -> ``moe_intermediate_size``,
``moe.num_experts`` -> ``num_experts``, ``moe.top_k`` -> ``num_experts_per_tok``, ``moe.norm_topk`` ->
``norm_topk_prob``, ``tie_embeddings`` -> ``tie_word_embeddings``, ``init_std`` -> ``initializer_range``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..config import MoEConfig, dataclass_from_dict
from ..data.tokenizer import VOCAB_SIZE

DEFAULT_NUM_EXPERTS = 16
DEFAULT_TOP_K = 2


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


@dataclass
class ModelConfig:
    """Settings of :class:`moekit.model.MoELM`; invalid values raise ``ValueError`` naming the field.

    ``head_dim=None`` means ``dim // n_heads``. Layer ``i`` (0-based) has a MoE FFN when
    ``(i + 1) % moe_every == 0`` and ``i not in dense_layers`` (Qwen3-MoE's ``decoder_sparse_step`` and
    ``mlp_only_layers``), else a dense SwiGLU MLP of width ``dense_hidden_dim`` (``None`` means
    ``moe.hidden_dim * moe.top_k``: the same active FFN width as a MoE layer). ``moe`` is a
    :class:`moekit.MoEConfig` or its dict (``dim`` is taken from the model when missing); by default 16
    experts of width ``dim``, top-2, with the selected weights renormalised (``norm_topk``, as Qwen3-MoE
    checkpoints).
    """

    vocab_size: int = VOCAB_SIZE
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    moe_every: int = 1
    dense_layers: list[int] = field(default_factory=list)
    dense_hidden_dim: int | None = None
    moe: MoEConfig | dict | None = None
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "moe_every"):
            _positive_int(name, getattr(self, name))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"head_dim: dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embedding), got {self.head_dim}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            _positive_number(name, getattr(self, name))
        if not isinstance(self.dense_layers, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.dense_layers):
            raise ValueError(f"dense_layers must be a list of layer indices in [0, {self.n_layers}), "
                             f"got {self.dense_layers!r}")
        self.dense_layers = sorted(set(self.dense_layers))
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        self.moe = self._resolve_moe(self.moe)
        if self.dense_hidden_dim is None:
            self.dense_hidden_dim = self.moe.hidden_dim * self.moe.top_k
        _positive_int("dense_hidden_dim", self.dense_hidden_dim)

    def _resolve_moe(self, moe) -> MoEConfig:
        if moe is None:
            return MoEConfig(dim=self.dim, hidden_dim=self.dim, num_experts=DEFAULT_NUM_EXPERTS,
                             top_k=DEFAULT_TOP_K, norm_topk=True)
        if isinstance(moe, dict):
            moe = MoEConfig.from_dict({"dim": self.dim, **moe})
        if not isinstance(moe, MoEConfig):
            raise ValueError(f"moe must be a MoEConfig, a dict or None, got {type(moe).__name__}")
        if moe.dim != self.dim:
            raise ValueError(f"moe.dim must equal dim={self.dim}, got {moe.dim}")
        return moe

    def is_moe_layer(self, index: int) -> bool:
        """True when layer ``index`` holds a MoE FFN (else a dense MLP)."""
        return (index + 1) % self.moe_every == 0 and index not in self.dense_layers

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict:
        """JSON-safe dict (the ``moe`` settings nested as a dict); ``from_dict`` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return dataclass_from_dict(cls, data, "model")
