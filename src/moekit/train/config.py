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
# torch.manual_seed takes seeds below 2**64; expert parallelism adds per-step offsets to the seed.
MAX_SEED = 2**63 - 1
# More intra-op threads than this is never useful, and asking OpenMP for 100000 crashed the process.
MAX_THREADS = 1024


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def _check_number(name, value, low, high=None, low_open=False, high_open=False):
    """A finite real number in the given range, else ``ValueError`` naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
        raise ValueError(f"{name} must be a finite number in {left}{low}, {'inf' if high is None else high}{right}, "
                         f"got {value!r}")


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
    device: str = field(default="cpu", metadata={
        "help": "cpu (default) or cuda / cuda:N (one GPU; expert parallelism runs on the CPU with gloo)"})
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
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("eval_every", self.eval_every, 0)
        _check_int("eval_windows", self.eval_windows, 1)
        if self.final_eval_windows is not None:
            _check_int("final_eval_windows", self.final_eval_windows, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("keep_checkpoints", self.keep_checkpoints, 1)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, MAX_THREADS)
        _check_int("expert_parallel", self.expert_parallel, 1)
        _check_int("overlap_chunks", self.overlap_chunks, 0)
        _check_number("lr", self.lr, 0, low_open=True)
        for name in ("beta1", "beta2"):
            _check_number(name, getattr(self, name), 0, 1, low_open=True, high_open=True)
        _check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        _check_number("weight_decay", self.weight_decay, 0)
        if not (isinstance(self.grad_clip, (int, float)) and not isinstance(self.grad_clip, bool)
                and self.grad_clip >= 0):  # inf: no clipping, the norm is still logged
            raise ValueError(f"grad_clip must be a number >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device == "cuda" or (
                self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device != "cpu" and self.expert_parallel > 1:
            raise ValueError("device: expert parallelism runs on the CPU (gloo); use device='cpu' with it")

    def check_device(self) -> None:
        """``ValueError`` unless ``device`` exists on this machine (checked when training starts, not when a
        run's config is read: a run trained on a GPU evaluates on the CPU)."""
        if self.device != "cpu":
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device={self.device!r}: no CUDA device is available")
            index = int(self.device[5:]) if ":" in self.device else 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device={self.device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                 f"device(s)")

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
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"name\": 1.5}}', got {text!r} "
                                         f"({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"name\": 1.5}}', got "
                                         f"{type(value).__name__} {text!r}")
    return value


def _converter(type_text: str):
    t = str(type_text).replace(" ", "")
    optional = "None" in t.split("|")
    base = [p for p in t.split("|") if p != "None"][0]
    parse = {"int": int, "float": float, "str": str, "list[int]": _parse_int_list, "dict": _parse_dict,
             "MoEConfig|dict": _parse_dict}.get(base, str)
    return _parse_optional(parse) if optional else parse


def _choices_help() -> dict[tuple[str, str], str]:
    """Help for settings whose allowed values are names, listed as registered when the parser is built (so
    routers of ``--plugin`` files appear)."""
    from .. import balance, routing

    return {
        ("moe", "router"): f"one of: {', '.join(routing.names())} (a --plugin file can register more)",
        ("moe", "aux_loss"): f"one of: {', '.join(balance.AUX_LOSSES)}, none",
        ("moe", "bias_update"): f"auxiliary-loss-free bias rule, one of: {', '.join(balance.BIAS_RULES)}, none",
        ("moe", "router_options"): "extra router constructor options as a JSON object, e.g. "
                                   "'{\"eval_routing\": \"token_choice\"}' (in TOML: a table)",
    }


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, each defaulting to 'not given' so the TOML file and defaults show through.

    The help shows the value a run gets when neither the flag nor the TOML file sets it: the fields of the
    default :class:`ModelConfig` (whose MoE settings differ from :class:`moekit.MoEConfig`'s own defaults,
    e.g. ``norm_topk=True`` as Qwen3-MoE) and of :class:`TrainConfig`.
    """
    groups = {name: parser.add_argument_group(f"{name} settings") for name in ("model", "moe", "train")}
    groups["moe"].add_argument("--ternary-experts", action="store_true", default=argparse.SUPPRESS,
                               help="MoTE: routed experts trained as ternary {-1,0,1} x absmean scale with a "
                                    "straight-through estimator (experts='ternary'); shared experts stay float")
    defaults = {"model": default_model_config(), "moe": default_model_config().moe, "train": None}
    choices = _choices_help()
    for section, f, flag in _flag_specs():
        dest = f"cfg__{section}__{f.name}"
        has_default = defaults[section] is not None or f.default is not MISSING or f.default_factory is not MISSING
        if defaults[section] is not None:
            default = getattr(defaults[section], f.name)
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        help_text = f"default {default!r}" if has_default else ""
        if (section, f.name) in choices:
            help_text = f"{choices[(section, f.name)]}; {help_text}" if help_text else choices[(section, f.name)]
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


def _table(data: dict, name: str, where: str) -> dict:
    """``data[name]`` as a dict (missing: empty); ``ValueError`` naming ``where`` and the key otherwise."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}: '{name}' must be a table/object, got {type(value).__name__}")
    return value


def check_model_for_training(model_cfg: ModelConfig, train_cfg: TrainConfig, where: str = "settings") -> None:
    """The checks that involve both configs and the byte tokenizer: ``seq_len`` within the model's
    ``max_seq_len`` and a vocabulary that holds every id the tokenizer produces."""
    from ..data.tokenizer import NUM_USED_IDS

    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"{where}: seq_len={train_cfg.seq_len} exceeds the model's max_seq_len="
                         f"{model_cfg.max_seq_len}; lower --seq-len or raise --max-seq-len")
    if model_cfg.vocab_size < NUM_USED_IDS:
        raise ValueError(f"{where}: vocab_size={model_cfg.vocab_size} is smaller than the byte tokenizer's "
                         f"{NUM_USED_IDS} ids (bytes, BOS, EOS, PAD); use --vocab-size {NUM_USED_IDS} or more")


def build_configs(args: argparse.Namespace, base: dict | None = None,
                  where: str = "settings") -> tuple[ModelConfig, TrainConfig]:
    """Defaults < ``base`` (a config.json / TOML dict with model, moe, train tables) < flags given in ``args``.

    Every setting is validated here, including the ones that involve two tables (``seq_len`` against
    ``max_seq_len``, the vocabulary against the tokenizer) and the router's own checks (through ``MoEConfig``),
    so that a command can refuse bad input before it writes anything. ``where`` names the source in errors.
    """
    base = base or {}
    if not isinstance(base, dict):
        raise ValueError(f"{where}: expected a table/object, got {type(base).__name__}")
    model = dict(_table(base, "model", where))
    moe = model.pop("moe", None) or {}
    if not isinstance(moe, dict):
        raise ValueError(f"{where}: 'model.moe' must be a table/object, got {type(moe).__name__}")
    moe = dict(moe)
    moe.update(_table(base, "moe", where))
    train = dict(_table(base, "train", where))
    tables = {"model": model, "moe": moe, "train": train}
    for key, value in vars(args).items():
        if key.startswith("cfg__"):
            _, section, name = key.split("__", 2)
            tables[section]["init_std" if (section, name) == ("moe", "init_std") else name] = value
    if getattr(args, "ternary_experts", False):  # MoTE (moekit.experts.ternary); --experts-options keeps its group
        if moe.get("experts", "dense") not in ("dense", "ternary"):
            raise ValueError(f"--ternary-experts conflicts with --experts {moe['experts']}")
        moe["experts"] = "ternary"
    if moe:  # unknown keys are rejected by MoEConfig.from_dict
        model["moe"] = moe_settings(model, moe)
    model_cfg, train_cfg = ModelConfig.from_dict(model), TrainConfig.from_dict(train)
    check_model_for_training(model_cfg, train_cfg, where)
    return model_cfg, train_cfg


# Keys a run's config.json must hold (those every moekit version wrote): a missing one is an error naming it,
# never a silent default (a resume without seq_len would train on other batch shapes).
RUN_MODEL_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "moe")
RUN_MOE_KEYS = ("hidden_dim", "num_experts", "top_k", "router")
RUN_TRAIN_KEYS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "seed", "dtype")


def check_run_config(cfg: dict, where: str) -> tuple[ModelConfig, TrainConfig]:
    """Validate the tables of a run's ``config.json`` (``where`` names the file) and build its configs.

    ``model``, ``model.moe`` and ``train`` must be objects holding the keys above, ``data`` an object whose
    ``path`` is a string or null; every value must pass the configs' own checks. Raises ``ValueError`` naming
    the file and the key."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} does not hold a JSON object")
    for name in ("model", "train"):
        if name not in cfg:
            raise ValueError(f"{where}: the '{name}' table is missing")
        if not isinstance(cfg[name], dict):
            raise ValueError(f"{where}: '{name}' must be an object, got {type(cfg[name]).__name__}")
    model, train = cfg["model"], cfg["train"]
    for table, keys, prefix in ((model, RUN_MODEL_KEYS, "model"), (train, RUN_TRAIN_KEYS, "train")):
        missing = [k for k in keys if k not in table]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(f'{prefix}.{k}' for k in missing)}")
    if not isinstance(model["moe"], dict):
        raise ValueError(f"{where}: 'model.moe' must be an object, got {type(model['moe']).__name__}")
    missing = [k for k in RUN_MOE_KEYS if k not in model["moe"]]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(f'model.moe.{k}' for k in missing)}")
    run_data_path(cfg, where)
    try:
        model_cfg, train_cfg = ModelConfig.from_dict(dict(model)), TrainConfig.from_dict(dict(train))
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{where}: invalid settings ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    check_model_for_training(model_cfg, train_cfg, where)
    return model_cfg, train_cfg


def run_data_path(cfg: dict, where: str = "run config") -> str | None:
    """The ``data.path`` of a run config: a string, or None for the embedded corpus."""
    data = cfg.get("data")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: 'data' must be an object like {{\"path\": ...}}, got {type(data).__name__}")
    path = data.get("path")
    if path is not None and not (isinstance(path, str) and path):
        raise ValueError(f"{where}: 'data.path' must be a non-empty string or null, got {path!r}")
    return path


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
