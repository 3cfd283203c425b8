"""Training: the experiment (`train_and_evaluate`), its configs, checkpoints and TensorBoard logs.

Modules: trainer.py (one model, or M stacked members), steps.py (schedule, optimiser, loss,
jitted update and evaluation steps), members.py (stacked ensemble members), loop.py (the loop
shared by both), data.py (what the trainer reads), config.py (the keys), config_checks.py,
config_loading.py (files and overrides), checkpoint.py, summary.py.

`brainage train --config configs/cpu.py --workdir W [--config.KEY VALUE ...]` runs it.
"""

from __future__ import annotations

from jax_brainage.train.checkpoint import Checkpoints
from jax_brainage.train.config import base_config
from jax_brainage.train.config_loading import apply_overrides, load_config
from jax_brainage.train.data import TrainingData, from_arrays, open_training_data
from jax_brainage.train.loop import NonFiniteLossError
from jax_brainage.train.steps import make_optimizer, make_schedule
from jax_brainage.train.trainer import train_and_evaluate

__all__ = [
    "Checkpoints", "NonFiniteLossError", "TrainingData", "apply_overrides", "base_config",
    "from_arrays", "load_config", "make_optimizer", "make_schedule",
    "open_training_data", "train_and_evaluate",
]
