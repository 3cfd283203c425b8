"""Test set-up: several fake CPU devices so that sharding code runs in every test run."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")
