"""Tiny models and a learnable synthetic cohort for the trainer tests."""

from __future__ import annotations

import numpy as np
import pytest

from jax_brainage.train import config as config_lib
from jax_brainage.train import config_checks
from jax_brainage.train import config_loading
from jax_brainage.train import data as data_lib


def blob_cohort(n: int = 40, side: int = 16, seed: int = 0):
  """uint8 volumes `[n, side, side, side, 1]` whose bright cube grows with age (years), plus
  noise: a task a tiny CNN learns in a few dozen steps."""
  rng = np.random.default_rng(seed)
  ages = rng.uniform(20, 80, n).astype(np.float32)
  images = rng.integers(0, 40, (n, side, side, side, 1)).astype(np.uint8)
  c = side // 2
  for i, age in enumerate(ages):
    r = int(round(1 + (age - 20) / 60 * (side // 2 - 2)))
    images[i, c - r:c + r, c - r:c + r, c - r:c + r, 0] += 200
  return images, ages


def tiny_config(**overrides):
  """A locked config for a tiny MRInet (~5,000 parameters) on 16^3 inputs."""
  c = config_lib.base_config()
  c.data.cache = "/unused-in-memory-data"
  c.data.mode = "host"
  c.model.conv_features = (4, 8, 8, 8, 8)
  c.model.dense_features = 16
  c.model.dropout_rate = 0.0
  c.batch_size = 8
  c.num_epochs = 2
  c.patience = 0
  c.optimizer.learning_rate = 1e-2
  c.log_every_steps = 2
  c.num_image_summaries = 1
  for key, value in overrides.items():
    config_loading.set_key(c, key, value)
  config_checks.validate(c)
  return c


@pytest.fixture(scope="session")
def make_config():
  return tiny_config


@pytest.fixture(scope="session")
def blob_data():
  images, ages = blob_cohort()
  return data_lib.from_arrays(images, ages, ("T1w",), split_seed=0)


@pytest.fixture(scope="session")
def zscore_blob_data():
  """The blob cohort as a z-scored cache stores it: float16 (x - mean) / sd per subject."""
  images, ages = blob_cohort()
  x = images.astype(np.float64)
  mean = x.mean(axis=(1, 2, 3, 4), keepdims=True)
  std = x.std(axis=(1, 2, 3, 4), keepdims=True)
  return data_lib.from_arrays(((x - mean) / std).astype(np.float16), ages, ("T1w",), split_seed=0)
