"""The experiment the multi-process tests train: a tiny MRInet on a learnable 16^3 cohort.

Shared by the test (reference run in the pytest process, 1 process x 4 CPU devices) and by
`multihost_worker.py` (2 processes x 2 CPU devices each), so both train exactly the same thing.
"""

from __future__ import annotations

import numpy as np

from jax_brainage.train import config as config_lib
from jax_brainage.train import config_checks
from jax_brainage.train import config_loading
from jax_brainage.train import data as data_lib

STEPS_PER_EPOCH = 4  # 32 training subjects / batch 8
EPOCHS = 2
RESUME_AT = 5  # stop the multi-process run mid-epoch here; resume on another process count


def members_supported() -> bool:
  """Whether the trainer stacks ensemble members (config key ensemble.members)."""
  base = config_lib.base_config()
  return "ensemble" in base and "members" in base.ensemble


def make_data() -> data_lib.TrainingData:
  """uint8 volumes `[40, 16, 16, 16, 1]` whose bright cube grows with age (years), plus noise;
  the study's seeded 80/10/10 split (32 / 4 / 4 subjects)."""
  rng = np.random.default_rng(7)
  n, side = 40, 16
  ages = rng.uniform(20, 80, n).astype(np.float32)
  images = rng.integers(0, 40, (n, side, side, side, 1)).astype(np.uint8)
  c = side // 2
  for i, age in enumerate(ages):
    r = int(round(1 + (age - 20) / 60 * (side // 2 - 2)))
    images[i, c - r:c + r, c - r:c + r, c - r:c + r, 0] += 200
  return data_lib.from_arrays(images, ages, ("T1w",), split_seed=0)


def make_config(members: int | None = None):
  """Tiny MRInet, batch 8 (splits over 4 devices and 2 processes), a loss point every step,
  dropout and augmentation on (their keys must not depend on the process layout); by default
  two stacked members when the trainer supports them."""
  c = config_lib.base_config()
  c.data.cache = "/unused-in-memory-data"
  c.data.mode = "host"
  c.model.conv_features = (4, 8, 8, 8, 8)
  c.model.dense_features = 16
  c.model.dropout_rate = 0.2
  c.batch_size = 8
  c.num_epochs = EPOCHS
  c.patience = 0
  c.optimizer.learning_rate = 1e-2
  c.log_every_steps = 1
  c.num_image_summaries = 1
  c.augment.shift_voxels = 1
  members = (2 if members_supported() else 1) if members is None else members
  if members > 1:
    config_loading.set_key(c, "ensemble.members", members)
  config_checks.validate(c)
  return c


def simulate_config(root):
  """A config whose training data is a 3-subject T1w cohort at 4 mm simulated into `root`/sim
  and prepared into `root`/cache on first use."""
  c = config_lib.base_config()
  c.data.simulate.n, c.data.simulate.resolution = 3, 4
  c.data.simulate.out = str(root / "sim")
  c.data.cache = str(root / "cache")
  c.data.sequences = ("T1w",)
  c.data.workers = 1
  config_checks.validate(c)
  return c
