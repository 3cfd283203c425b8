"""Shared fixtures of tests/explain: one tiny trained workdir per test process.

The tiny demo (10 simulated subjects at 4 mm, 32^3 cubes, one epoch of a narrow MRInet) gives a
real training workdir, cache, BIDS dataset and atlas in ~20 s on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_OVERRIDES = ["--config.data.simulate.n", "10", "--config.num_epochs", "1",
                  "--config.data.image_shape", "(32, 32, 32)", "--config.num_image_summaries", "0"]


@pytest.fixture(scope="session")
def explain_workdir(tmp_path_factory) -> Path:
  """A trained single-model workdir W with W/data (BIDS + derivatives/simulation/atlas)."""
  from jax_brainage import demo

  workdir = tmp_path_factory.mktemp("explain") / "demo"
  demo.run_demo(workdir, "tiny", overrides=TINY_OVERRIDES, quiet=True, workers=2)
  return workdir
