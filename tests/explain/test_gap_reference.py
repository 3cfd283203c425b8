"""Maps of the gap (`--target gap`): the nearest-neighbour reference choice against a numpy
brute force, and integrated gradients from reference scans against the closed form on a linear
model and completeness (sum = f(x) - mean_j f(x_j)) on a nonlinear one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_brainage.errors import ConfigError
from jax_brainage.explain import maps, reference
from test_maps import Linear, SmallConv


def _brute_force_correlation(a: np.ndarray, b: np.ndarray, pool: int) -> float:
  """Pearson correlation of two cubes [X, Y, Z, C] after pool^3 block means (loops)."""
  def pooled(x):
    X, Y, Z = (d // pool for d in x.shape[:3])
    out = np.zeros((X, Y, Z, x.shape[3]))
    for i in range(X):
      for j in range(Y):
        for k in range(Z):
          out[i, j, k] = x[i * pool:(i + 1) * pool, j * pool:(j + 1) * pool,
                           k * pool:(k + 1) * pool].mean(axis=(0, 1, 2))
    return out.ravel()
  return float(np.corrcoef(pooled(a.astype(np.float64)), pooled(b.astype(np.float64)))[0, 1])


@pytest.mark.parametrize("pool", [1, 2])
def test_nearest_scans_are_the_most_correlated(pool):
  rng = np.random.default_rng(0)
  candidates = rng.normal(size=(12, 6, 7, 5, 2)).astype(np.float16)
  subject = (candidates[3] + 0.8 * rng.normal(size=candidates.shape[1:])).astype(np.float16)
  corr = [_brute_force_correlation(subject, c, pool) for c in candidates]
  want = np.argsort(-np.array(corr), kind="stable")[:4]
  got = reference.nearest(reference.similarity_features(subject[None], pool)[0],
                          reference.similarity_features(candidates, pool), 4)
  np.testing.assert_array_equal(got, want)
  assert got[0] == 3


def test_the_subject_itself_is_not_its_reference():
  rng = np.random.default_rng(1)
  candidates = rng.integers(0, 256, size=(6, 4, 4, 4, 1), dtype=np.uint8)
  features = reference.similarity_features(candidates, 1)
  got = reference.nearest(features[2], features, 3)
  assert 2 not in got and len(got) == 3
  # uint8 cubes are compared as network inputs (/ 255): correlation is scale-free anyway
  np.testing.assert_allclose(features, reference.similarity_features(
      candidates.astype(np.float32) * 7.0 + 3.0, 1), atol=1e-5)


def test_pool_factor():
  assert reference.pool_factor((30, 30, 30)) == 1          # 27k voxels: as they are
  assert reference.pool_factor((40, 50, 40)) == 2          # 80k -> 10k
  assert reference.pool_factor((160, 192, 160)) == 5       # 4.9M -> 39k


def _references(volumes, k, rng):
  noise = rng.integers(-20, 21, size=(len(volumes), k, *volumes.shape[1:]))
  return np.clip(volumes[:, None].astype(int) + noise, 0, 255).astype(np.uint8)


def test_integrated_gradients_from_references_on_a_linear_model():
  model = Linear()
  rng = np.random.default_rng(0)
  volumes = rng.integers(0, 256, size=(5, 4, 4, 4, 2), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, 4, 2)))
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)[:, 0].reshape(4, 4, 4, 2)
  refs = _references(volumes, 3, rng)
  explainer = maps.Explainer(model, variables, "integrated_gradients", batch_size=4)
  got, predicted = explainer(volumes, references=refs)
  # exact for a linear map: (x - mean_j x_j) w
  want = (volumes / 255.0 - (refs / 255.0).mean(1)) * w
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  with pytest.raises(ConfigError, match="gradient_x_input"):
    maps.Explainer(model, variables, "gradient_x_input")(volumes, references=refs)


def test_integrated_gradients_from_references_is_complete():
  model = SmallConv()
  rng = np.random.default_rng(2)
  volumes = rng.integers(0, 256, size=(3, 6, 6, 6, 1), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 6, 6, 6, 1)))
  refs = _references(volumes, 2, rng)
  got, predicted = maps.Explainer(model, variables, "integrated_gradients",
                                  batch_size=4)(volumes, references=refs)
  f = lambda v: np.asarray(model.apply(variables, jnp.asarray(v, jnp.float32) / 255.0))  # noqa
  reference_mean = f(refs.reshape(-1, *refs.shape[2:])).reshape(3, 2).mean(1)
  np.testing.assert_allclose(predicted, f(volumes), rtol=1e-5)
  # 16 midpoint steps per path: the sum matches f(x) - mean f(x_j) to the rule's error
  delta = f(volumes) - reference_mean
  np.testing.assert_allclose(got.reshape(3, -1).sum(1), delta,
                             atol=0.02 * np.abs(delta).max() + 1e-4)
