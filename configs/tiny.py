"""Tiny preset: a narrow MRInet on a small simulated cohort at 4 mm; a smoke test of the whole path.

Command (simulates 120 subjects into data/sim-4mm and prepares data/sim-4mm-cache on first use):

    brainage train --config configs/tiny.py --workdir runs/tiny

Expected: the validation MAE stays near that of always predicting the mean training age
(~16 years for ages uniform in 18-82) for the first ~8 epochs (about 200 steps: MRInet's
raw-years output needs that many Adam steps to leave the mean), then falls to ~7 years from
epoch 9 on (this cohort's oracle MAE is 1.54 years). Measured on 2 shared, heavily loaded CPU
cores (2026-11-24): ~2.4 training volumes/s, ~2 minutes to simulate and prepare the cohort;
expect it to be several times faster on a quiet machine. A smoke test of the whole path, not a
model to judge.
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
  c.model.dropout_rate = 0.0
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 50
  c.batch_size = 4
  c.num_epochs = 20
  c.patience = 0
  c.log_every_steps = 5
  return c
