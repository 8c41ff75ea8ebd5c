"""Training: ``moekit train`` (loop, checkpoints, resume) and the evaluation behind ``moekit eval``."""
from .checkpoint import (RUN_FORMAT, RUN_VERSION, latest_checkpoint, load_checkpoint, load_model_weights,
                         read_run_config, save_checkpoint)
from .config import TrainConfig, add_config_flags, build_configs, read_toml
from .loop import NonFiniteLoss, Trainer, TrainingInterrupted, evaluate, load_run, new_run_config, run_training

__all__ = [
    "NonFiniteLoss", "RUN_FORMAT", "RUN_VERSION", "TrainConfig", "Trainer", "TrainingInterrupted", "add_config_flags", "build_configs",
    "evaluate", "latest_checkpoint", "load_checkpoint", "load_model_weights", "load_run", "new_run_config",
    "read_run_config", "read_toml", "run_training", "save_checkpoint",
]
