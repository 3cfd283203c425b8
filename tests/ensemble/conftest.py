"""Ensembles of randomly initialised tiny MRInets, stacked by hand (no training needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_brainage import models
from jax_brainage.ensemble.model import SubEnsemble

SHAPE = (16, 16, 16)


def tiny_manifest(sequences=("T1w",), shape=SHAPE, mean_age=50.0) -> dict:
  """A trainer-style model manifest of a tiny MRInet."""
  return {"model": "mrinet",
          "model_kwargs": {"mean_age": mean_age, "conv_features": [3, 4, 4, 4, 4],
                           "dense_features": 8, "dropout_rate": 0.5, "dtype": "float32"},
          "image_shape": list(shape), "sequences": list(sequences), "mean_train_age": mean_age,
          "num_params": 0, "loss": "mse"}


def random_members(manifest: dict, members: int, seed: int, *, zero_bias: bool = False):
  """(model, [per-member variables], stacked variables): member m's parameters drawn with numpy
  (seed + m; He-normal kernels, small biases; shapes from jax.eval_shape, nothing compiled), the
  age head's bias moved per member so that members disagree by years."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in manifest["model_kwargs"].items()}
  model = models.get_model(manifest["model"], **kwargs)
  x = jnp.zeros((1, *manifest["image_shape"], len(manifest["sequences"])), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, train=False))
  mean_age = float(manifest["model_kwargs"].get("mean_age", 50.0))
  each = []
  for m in range(members):
    rng = np.random.default_rng(seed + m)

    def draw(path, s):
      name = path[-1].key
      if name == "kernel":
        fan_in = int(np.prod(s.shape[:-1]))
        gain = 20.0 if path[-2].key == "age_head" else 1.0  # ages varying by years
        return rng.normal(0, gain * np.sqrt(2.0 / fan_in), s.shape).astype(np.float32)
      if zero_bias:
        return np.zeros(s.shape, np.float32)
      if path[-2].key == "age_head":
        return np.full(s.shape, mean_age + 2.0 * (m - members / 2), np.float32)
      return rng.normal(0, 0.05, s.shape).astype(np.float32)

    each.append({"params": jax.tree_util.tree_map_with_path(draw, shapes["params"])})
  stacked = jax.tree.map(lambda *a: np.stack(a), *each)
  return model, each, stacked


def volumes(n: int, seed: int, channels: int = 1, shape=SHAPE) -> np.ndarray:
  """uint8 `[n, X, Y, Z, C]` random 'brains': a bright blob of random size and noise."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
  r = np.linalg.norm(grid, axis=-1)
  out = np.zeros((n, *shape, channels), np.uint8)
  for i in range(n):
    for c in range(channels):
      radius = rng.uniform(0.3, 0.9)
      img = 200 * (r < radius) + rng.uniform(0, 55, shape)
      out[i, ..., c] = img.astype(np.uint8)
  return out


@pytest.fixture(scope="module")
def two_subs():
  """Two sub-ensembles: 'a' (T1w, 3 members) and 'b' (T1w+FLAIR, 2 members)."""
  ma, mb = tiny_manifest(("T1w",)), tiny_manifest(("T1w", "FLAIR"))
  model_a, each_a, stacked_a = random_members(ma, 3, seed=10)
  model_b, each_b, stacked_b = random_members(mb, 2, seed=20)
  subs = (SubEnsemble("a", ("T1w",), (), ma, 3, stacked_a),
          SubEnsemble("b", ("T1w", "FLAIR"), ("cerebellum",), mb, 2, stacked_b))
  return {"subs": subs, "models": {"a": model_a, "b": model_b},
          "each": {"a": each_a, "b": each_b}}
