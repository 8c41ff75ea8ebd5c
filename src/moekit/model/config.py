"""``ModelConfig``: the validated settings of the compact MoE decoder (:class:`moekit.model.MoELM`).

Field -> Hugging Face ``Qwen3MoeConfig`` field (see :mod:`moekit.model.hf_mapping`):
``vocab_size`` -> ``vocab_size``, ``dim`` -> ``hidden_size``, ``n_layers`` -> ``num_hidden_layers``, ``n_heads`` ->
``num_attention_heads``, ``n_kv_heads`` -> ``num_key_value_heads``, ``head_dim`` -> ``head_dim``, ``max_seq_len``
-> ``max_position_embeddings``, ``rope_theta`` -> ``rope_parameters["rope_theta"]``, ``norm_eps`` ->
``rms_norm_eps``, ``moe_every`` -> ``decoder_sparse_step``, ``dense_layers`` -> ``mlp_only_layers``,
``dense_hidden_dim`` -> ``intermediate_size``, ``moe.hidden_dim`` -> ``moe_intermediate_size``,
``moe.num_experts`` -> ``num_experts``, ``moe.top_k`` -> ``num_experts_per_tok``, ``moe.norm_topk`` ->
``norm_topk_prob``, ``tie_embeddings`` -> ``tie_word_embeddings``, ``init_std`` -> ``initializer_range``.
``moe_overrides`` has no field of its own there: Qwen3-MoE gives every MoE layer the same experts, so a model
whose MoE layers differ is not exported, and overrides that agree with each other are written as the fields above.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from ..config import MoEConfig, dataclass_from_dict
from ..data.tokenizer import VOCAB_SIZE

DEFAULT_NUM_EXPERTS = 16
DEFAULT_TOP_K = 2


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


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

    ``moe_overrides`` describes MoE layers that differ from ``moe`` (what uneven expert pruning produces):
    ``{layer_index: {setting: value}}`` with any :class:`moekit.MoEConfig` field except ``dim`` (typically
    ``num_experts``, ``top_k``, ``hidden_dim``). In TOML: ``[model.moe_overrides]`` with lines such as
    ``1 = {num_experts = 8, top_k = 1}``; keys may be strings of integers (as JSON and TOML store them). Every
    key must be a MoE layer (a dense FFN is chosen with ``dense_layers`` / ``moe_every``). :meth:`layer_moe`
    gives each layer's resolved settings; empty overrides (the default) mean every MoE layer uses ``moe``.
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
    moe_overrides: dict = field(default_factory=dict, metadata={
        "help": "per-layer MoE settings as JSON, e.g. '{\"1\": {\"num_experts\": 8, \"top_k\": 1}}'"})
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
        self.moe_overrides = self._resolve_overrides(self.moe_overrides)

    def _resolve_overrides(self, overrides) -> dict[int, dict]:
        """``overrides`` with integer keys in layer order and plain dict values; each layer's settings are
        built once here so that a bad value is reported now, naming the layer."""
        if overrides is None:
            return {}
        if not isinstance(overrides, dict):
            raise ValueError(f"moe_overrides must be a dict {{layer_index: {{setting: value}}}}, "
                             f"got {type(overrides).__name__}")
        allowed = {f.name for f in fields(MoEConfig)} - {"dim"}
        out: dict[int, dict] = {}
        for key, settings in overrides.items():
            index = key
            if isinstance(key, str) and key.strip().lstrip("-").isdigit():
                index = int(key)
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n_layers:
                raise ValueError(f"moe_overrides: key {key!r} is not a layer index in [0, {self.n_layers})")
            if index in out:
                raise ValueError(f"moe_overrides: layer {index} is given twice")
            if not self.is_moe_layer(index):
                raise ValueError(f"moe_overrides: layer {index} has a dense FFN (dense_layers={self.dense_layers}, "
                                 f"moe_every={self.moe_every}); only MoE layers {self.moe_layer_indices} take "
                                 f"overrides")
            if isinstance(settings, MoEConfig):
                settings = {k: v for k, v in asdict(settings).items() if k != "dim"}
            if not isinstance(settings, dict):
                raise ValueError(f"moe_overrides: layer {index} must map to a table/dict of MoE settings, "
                                 f"got {type(settings).__name__}")
            unknown = sorted(set(settings) - allowed)
            if "dim" in settings:
                raise ValueError(f"moe_overrides: layer {index}: dim is the model's width, not a per-layer setting")
            if unknown:
                raise ValueError(f"moe_overrides: layer {index}: unknown setting(s) {', '.join(unknown)}")
            out[index] = dict(settings)
        out = dict(sorted(out.items()))
        for index, settings in out.items():
            try:
                replace(self.moe, **settings)
            except ValueError as exc:
                raise ValueError(f"moe_overrides: layer {index}: {exc}") from None
        return out

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

    def layer_moe(self, index: int) -> MoEConfig | None:
        """The MoE settings of layer ``index``: ``moe`` with the layer's ``moe_overrides`` applied, or None for a
        layer with a dense FFN."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n_layers:
            raise ValueError(f"layer index must be in [0, {self.n_layers}), got {index!r}")
        if not self.is_moe_layer(index):
            return None
        settings = self.moe_overrides.get(index)
        return replace(self.moe, **settings) if settings else self.moe

    @property
    def layer_moes(self) -> dict[int, MoEConfig]:
        """``{layer_index: MoEConfig}`` of every MoE layer, in layer order."""
        return {i: self.layer_moe(i) for i in self.moe_layer_indices}

    @property
    def experts_per_layer(self) -> list[int]:
        """Routed experts of each MoE layer, in layer order."""
        return [m.num_experts for m in self.layer_moes.values()]

    def to_dict(self) -> dict:
        """JSON-safe dict (the ``moe`` settings nested as a dict, ``moe_overrides`` keys as strings, as JSON
        stores them); ``from_dict`` inverts it."""
        data = asdict(self)
        data["moe_overrides"] = {str(i): dict(v) for i, v in self.moe_overrides.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return dataclass_from_dict(cls, data, "model")
