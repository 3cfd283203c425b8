"""Training: the loop (`train_and_evaluate`), its configs, checkpoints and TensorBoard logs.

`brainage train --config configs/cpu.py --workdir W [--config.KEY VALUE ...]` runs it.
"""

from __future__ import annotations

from jax_brainage.train.checkpoint import Checkpoints
from jax_brainage.train.config import apply_overrides, base_config, load_config
from jax_brainage.train.data import TrainingData, from_arrays, open_training_data
from jax_brainage.train.trainer import (NonFiniteLossError, build_model, make_optimizer,
                                        make_schedule, train_and_evaluate)

__all__ = [
    "Checkpoints", "NonFiniteLossError", "TrainingData", "apply_overrides", "base_config",
    "build_model", "from_arrays", "load_config", "make_optimizer", "make_schedule",
    "open_training_data", "train_and_evaluate",
]
