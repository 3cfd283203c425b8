"""Tiny preset: a narrow MRInet on a small simulated cohort at 4 mm; a smoke test of the whole path.

Command (simulates 120 subjects into data/sim-4mm and prepares data/sim-4mm-cache on first use):

    brainage train --config configs/tiny.py --workdir runs/tiny

Expected (measured 2026-11-24 on 2 otherwise idle CPU cores, `brainage demo --preset tiny`,
jax 0.10.2): the validation MAE stays near the mean-age predictor's (~18 years on its 12
validation subjects) for ~12 epochs, then falls; best validation MAE 12.7 years, test MAE 12.0
years (mean-age predictor 16.8 on the same 12 test subjects), r = 0.75; 302 s of training at
6.9 volumes/s, 323 s for the whole demo (over the 5-minute goal by ~25 s). The cohort's oracle
MAE is 1.54 years, but on 4 mm T1w cubes a ridge regression on all voxels reaches only ~10.3
years and the best single image summary (fraction of dark voxels, CSF) correlates r = 0.69 with
age: this preset shows that the path learns, not what MRInet can reach. Without
model.scale_output (raw-years output) the prediction spread stays < 0.3 years after 13 epochs;
at learning rate 1e-3..2e-3 it collapses to a constant (most ReLUs inactive).
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
  c.model.scale_output = True      # age = mean + SD * head: leaves the mean age sooner
  c.optimizer.learning_rate = 5e-4  # the study's; 1e-3..2e-3 killed the ReLUs (constant output)
  c.optimizer.warmup_steps = 50
  c.batch_size = 4
  c.num_epochs = 20
  c.patience = 0
  c.log_every_steps = 5
  return c
