"""Shared fixtures of tests/explain: one tiny trained single-model workdir per test process.

Simulate -> prepare -> train as `brainage demo` does, without the demo's later stages: 10
simulated subjects at 4 mm (T1w), 32^3 cubes, one epoch of the tiny preset's narrow MRInet,
pinned to a single model (the preset itself may train an ensemble). ~20 s on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_OVERRIDES = ["--config.data.simulate.n", "10", "--config.num_epochs", "1",
                  "--config.data.image_shape", "(32, 32, 32)", "--config.num_image_summaries", "0",
                  "--config.data.sequences", "('T1w',)", "--config.ensemble.members", "1"]


@pytest.fixture(scope="session")
def explain_workdir(tmp_path_factory) -> Path:
  """A trained single-model workdir W with W/data (BIDS + derivatives/simulation/atlas) and
  W/cache."""
  from jax_brainage import demo
  from jax_brainage.data import bids
  from jax_brainage.data import prepare as prepare_lib
  from jax_brainage.data import simulate
  from jax_brainage.data.preprocess import Preprocessing
  from jax_brainage.train import trainer

  workdir = (tmp_path_factory.mktemp("explain") / "demo").resolve()
  data = workdir / "data"
  config = demo.preset_config("tiny", workdir, data, TINY_OVERRIDES)
  with config.unlocked():
    config.ensemble.sub_ensembles = ()
  s = config.data.simulate
  sequences = tuple(config.data.sequences)
  simulate.write_cohort(data, simulate.CohortConfig(
      seed=int(s.seed), n=int(s.n), resolution_mm=int(s.resolution), sequences=sequences),
      workers=1, progress=False)
  prep = Preprocessing(sequences=sequences, shape=tuple(int(v) for v in config.data.image_shape))
  prepare_lib.prepare(bids.read_bids(data, sequences), config.data.cache, prep, workers=1,
                      progress=False)
  trainer.train_and_evaluate(config, workdir, quiet=True)
  return workdir
