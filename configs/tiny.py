"""Tiny preset: a narrow MRInet on a small simulated cohort at 4 mm; a smoke test of the whole path.

Command (simulates 120 subjects into data/sim-4mm and prepares data/sim-4mm-cache on first use):

    brainage train --config configs/tiny.py --workdir runs/tiny

Expected: finishes in a few minutes on 2 CPU cores (simulation and cache included); the
validation MAE falls below that of always predicting the mean training age (about 16 years for
ages uniform in 18-82) but stays far above the oracle MAE: the model is deliberately too small
and too briefly trained to be accurate. Use it to check an installation, not to judge a model.
"""

from __future__ import annotations

from jax_brainage.train.config import base_config


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.data.simulate.n = 120
  c.data.simulate.resolution = 4
  c.data.simulate.seed = 0
  c.data.simulate.out = "data/sim-4mm"
  c.data.cache = "data/sim-4mm-cache"
  c.data.sequences = ("T1w",)
  c.data.mode = "host"
  c.model.name = "mrinet"
  c.model.conv_features = (8, 8, 16, 16, 8)
  c.model.dense_features = 16
  c.model.dropout_rate = 0.2
  c.optimizer.learning_rate = 2e-3
  c.batch_size = 8
  c.num_epochs = 8
  c.patience = 0
  c.log_every_steps = 5
  return c
