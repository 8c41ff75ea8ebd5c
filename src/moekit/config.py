"""``MoEConfig``: the validated settings of one MoE layer."""
from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field, fields

from . import balance, routing
from . import experts as experts_registry
from .dispatch.plan import DROP_POLICIES
from .experts.activations import ACTIVATIONS

# Router settings that MoEConfig holds as fields and hands to the router's constructor when it accepts them.
# The value of a router setting that means "this method is off": asking a router that has no such method
# for it to be off is not an error.
ROUTER_OFF_VALUES = {"aux_loss": None, "bias_update": None, "z_loss_coef": 0.0, "jitter": 0.0}
ROUTER_FIELDS = (
    "score_func", "norm_topk", "scaling_factor", "num_groups", "topk_groups", "jitter",
    "aux_loss", "aux_loss_coef", "z_loss_coef", "bias_update", "bias_update_rate",
)


def dataclass_from_dict(cls, data, what: str):
    """``cls(**data)`` for a dataclass, with ``ValueError`` naming unknown keys instead of a ``TypeError``."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} settings must be a table/dict, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} setting(s): {', '.join(unknown)}")
    return cls(**data)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class MoEConfig:
    """Settings of :class:`moekit.MoE`; invalid values raise ``ValueError`` naming the field.

    Model: ``dim`` (model width D), ``hidden_dim`` (expert hidden width F), ``num_experts`` (E), ``top_k``
    (K), ``activation`` (``swiglu``, ``geglu``, ``gelu``, ``relu``).
    Shared experts: ``num_shared_experts`` FFNs of width ``shared_hidden_dim`` (default ``hidden_dim``)
    always on, optionally gated by ``sigmoid(x W)`` (``shared_expert_gate``, as Qwen2-MoE).
    Experts: ``experts``, a name of :func:`moekit.experts.names` (default ``dense``), with ``experts_options`` for
    anything that kind takes beyond the model settings.
    Dispatch: ``capacity_factor`` (None = dropless) with ``drop_policy`` (``position`` or ``probs``) and
    ``pad_to_capacity``; ``capacity_factor`` applies in training, ``eval_capacity_factor`` at inference (default
    None: dropless, so a token's output does not depend on the other tokens of the call, as in most frameworks).
    Router: ``router`` (a name of :func:`moekit.routing.names`), the token-choice settings in
    ``ROUTER_FIELDS`` (see :class:`moekit.routing.topk.TopKRouter`), and ``router_options`` for anything a
    particular router takes beyond them.
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2
    activation: str = "swiglu"
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    shared_expert_gate: bool = False
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    drop_policy: str = "position"
    pad_to_capacity: bool = False
    router: str = "topk"
    score_func: str = "softmax"
    norm_topk: bool = False
    scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    jitter: float = 0.0
    aux_loss: str | None = "switch"
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 0.0
    bias_update: str | None = None
    bias_update_rate: float = 1e-3
    router_options: dict = field(default_factory=dict)
    experts: str = "dense"
    experts_options: dict = field(default_factory=dict)
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("dim", "hidden_dim", "num_experts", "top_k"):
            _positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) \
                or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        if self.shared_hidden_dim is not None:
            _positive_int("shared_hidden_dim", self.shared_hidden_dim)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and 0 < value < math.inf):
                raise ValueError(f"{name} must be None (dropless) or a finite number > 0, got {value!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        routing.get(self.router)  # ValueError naming the allowed routers
        if self.aux_loss is not None and self.aux_loss not in balance.AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {balance.AUX_LOSSES} or None, got {self.aux_loss!r}")
        if self.bias_update is not None and self.bias_update not in balance.BIAS_RULES:
            raise ValueError(f"bias_update must be one of {balance.BIAS_RULES} or None, got {self.bias_update!r}")
        if not isinstance(self.router_options, dict):
            raise ValueError(f"router_options must be a dict, got {type(self.router_options).__name__}")
        experts_registry.get(self.experts)  # ValueError naming the allowed experts
        if not isinstance(self.experts_options, dict):
            raise ValueError(f"experts_options must be a dict, got {type(self.experts_options).__name__}")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) \
                or not 0 < self.init_std < math.inf:
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std!r}")
        self._check_router()

    def _check_router(self) -> None:
        """Build the router once on the meta device (no memory, no computation), so that every check of its
        constructor (groups dividing the experts, jitter range, unknown ``router_options``, ...) runs when the
        config is made, not when a layer is built from it. Its warnings are left to the real construction."""
        import warnings

        import torch

        kwargs = self.router_kwargs()
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                routing.get(self.router)(dim=self.dim, num_experts=self.num_experts, top_k=self.top_k, **kwargs)
        except TypeError as exc:  # an option the router's constructor does not take
            raise ValueError(f"router {self.router!r}: invalid router_options {sorted(self.router_options)} "
                             f"({exc})") from None

    def router_kwargs(self) -> dict:
        """Keyword options for the router's constructor.

        Token-choice settings are passed when the router accepts them; a non-default setting the router does
        not accept raises ``ValueError`` instead of being silently ignored.
        """
        cls = routing.get(self.router)
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        defaults = {f.name: f.default for f in fields(self)}
        kwargs = {}
        for name in ROUTER_FIELDS:
            value = getattr(self, name)
            if name in params or takes_any:
                kwargs[name] = value
            elif value != defaults[name] and not (name in ROUTER_OFF_VALUES and value == ROUTER_OFF_VALUES[name]):
                raise ValueError(f"{name}: router {self.router!r} does not take this setting")
        kwargs.update(self.router_options)
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MoEConfig":
        return dataclass_from_dict(cls, data, "moe")
