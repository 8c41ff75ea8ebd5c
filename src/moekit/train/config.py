"""Training settings, the TOML config file and the command-line flags generated from the dataclasses.

Every field of :class:`moekit.model.ModelConfig`, :class:`moekit.MoEConfig` and :class:`TrainConfig` is a
``moekit train`` flag (``--n-layers``, ``--num-experts``, ``--router``, ``--aux-loss``, ``--lr``, ...), and a
key of the matching table of a ``--config FILE.toml`` (``[model]``, ``[moe]``, ``[train]``). Flags override
the file, the file overrides the defaults. An unknown key is an error.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..config import MoEConfig, dataclass_from_dict
from ..model.config import ModelConfig

DTYPES = ("float32", "bfloat16")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class TrainConfig:
    """Optimiser, schedule, batching and bookkeeping of ``moekit train``; validated on construction.

    AdamW with linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr``; gradient
    clipping at ``grad_clip`` (0 disables). ``eval_every`` runs a validation pass on ``eval_windows`` windows
    during training (0: only at the end, where ``final_eval_windows`` windows are scored; None: all).

    ``expert_parallel`` shards the experts over that many processes (launch with torchrun; see
    :mod:`moekit.parallel`); ``overlap_chunks`` is the overlap degree r of the all-to-all exchange (0: chosen
    by the fitted cost model of :mod:`moekit.parallel.cost_model`).
    """

    steps: int = 400
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0
    eval_windows: int = 64
    final_eval_windows: int | None = 400
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    dtype: str = "float32"
    threads: int | None = None
    expert_parallel: int = field(default=1, metadata={
        "help": "shard the experts over this many processes (launch with torchrun --nproc-per-node N, "
                "N a multiple of it)"})
    overlap_chunks: int = field(default=1, metadata={
        "help": "overlap the expert all-to-all in r chunks (at most the experts per process; 0: r from a cost "
                "model fitted on this machine)"})

    def __post_init__(self):
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seq_len", self.seq_len, 2)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("seed", self.seed, 0)
        _check_int("eval_every", self.eval_every, 0)
        _check_int("eval_windows", self.eval_windows, 1)
        if self.final_eval_windows is not None:
            _check_int("final_eval_windows", self.final_eval_windows, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("keep_checkpoints", self.keep_checkpoints, 1)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        _check_int("expert_parallel", self.expert_parallel, 1)
        _check_int("overlap_chunks", self.overlap_chunks, 0)
        for name in ("lr", "beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be < 1, got {self.beta1}, {self.beta2}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_ratio
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, data, "train")


def default_model_config() -> ModelConfig:
    """The default model of ``moekit train``: 4 layers, width 256, 16 experts, top-2 (see BENCHMARKS.md)."""
    return ModelConfig()


# ---------------------------------------------------------------------------------------------- flags
# (section, field name, flag) for every setting; MoEConfig's dim comes from the model, its init_std is renamed.
_SKIP = {("moe", "dim"), ("model", "moe")}
_RENAME = {("moe", "init_std"): "moe-init-std"}


def _flag_specs():
    for section, cls in (("model", ModelConfig), ("moe", MoEConfig), ("train", TrainConfig)):
        for f in fields(cls):
            if (section, f.name) in _SKIP:
                continue
            yield section, f, _RENAME.get((section, f.name), f.name.replace("_", "-"))


def _parse_optional(inner):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return inner(text)
    return parse


def _parse_int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _parse_dict(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _converter(type_text: str):
    t = str(type_text).replace(" ", "")
    optional = "None" in t.split("|")
    base = [p for p in t.split("|") if p != "None"][0]
    parse = {"int": int, "float": float, "str": str, "list[int]": _parse_int_list, "dict": _parse_dict,
             "MoEConfig|dict": _parse_dict}.get(base, str)
    return _parse_optional(parse) if optional else parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, each defaulting to 'not given' so the TOML file and defaults show through."""
    groups = {name: parser.add_argument_group(f"{name} settings") for name in ("model", "moe", "train")}
    for section, f, flag in _flag_specs():
        dest = f"cfg__{section}__{f.name}"
        default = f.default if f.default is not MISSING else None
        help_text = f"default {default!r}" if f.default is not MISSING else ""
        if "help" in f.metadata:
            help_text = f"{f.metadata['help']} ({help_text})" if help_text else f.metadata["help"]
        if str(f.type).replace(" ", "") == "bool":
            groups[section].add_argument(f"--{flag}", dest=dest, action=argparse.BooleanOptionalAction,
                                         default=argparse.SUPPRESS, help=help_text)
        else:
            groups[section].add_argument(f"--{flag}", dest=dest, type=_converter(f.type),
                                         default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def read_toml(path: str | Path) -> dict:
    """Parse a ``--config`` TOML file: tables ``model``, ``moe`` and ``train`` only."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config: {path} is not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"model", "moe", "train"})
    if unknown:
        raise ValueError(f"--config: unknown table(s) {', '.join(unknown)} in {path}; allowed: model, moe, train")
    return data


def build_configs(args: argparse.Namespace, base: dict | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Defaults < ``base`` (a config.json / TOML dict with model, moe, train tables) < flags given in ``args``."""
    base = base or {}
    model = dict(base.get("model", {}))
    moe = dict(model.pop("moe", None) or {})
    moe.update(base.get("moe", {}))
    train = dict(base.get("train", {}))
    tables = {"model": model, "moe": moe, "train": train}
    for key, value in vars(args).items():
        if key.startswith("cfg__"):
            _, section, name = key.split("__", 2)
            tables[section]["init_std" if (section, name) == ("moe", "init_std") else name] = value
    if moe:  # unknown keys are rejected by MoEConfig.from_dict
        model["moe"] = moe_settings(model, moe)
    return ModelConfig.from_dict(model), TrainConfig.from_dict(train)


def moe_settings(model: dict, moe: dict) -> dict:
    """The model's default MoE settings updated with ``moe``.

    A default token-choice setting the chosen router does not take (Qwen3-MoE's ``norm_topk=True`` for hash
    routing, say) falls back to MoEConfig's neutral default instead of being an error; settings given in ``moe``
    are passed on as they are, so a setting the router cannot honour is still reported.
    """
    import inspect

    from .. import routing
    from ..config import ROUTER_FIELDS

    defaults = asdict(ModelConfig(**{k: model[k] for k in ("dim",) if k in model}).moe)
    defaults.pop("dim")
    params = inspect.signature(routing.get(moe.get("router", defaults["router"])).__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        neutral = {f.name: f.default for f in fields(MoEConfig)}
        for name in ROUTER_FIELDS:
            if name not in params and name not in moe:
                defaults[name] = neutral[name]
    return {**defaults, **moe}
