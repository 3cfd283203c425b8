"""lrp.evaluation against hand-computed values, brute-force numpy/scipy replicas, and a model
whose output depends only on a known voxel set."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import lrp
from lrp import evaluation as ev


# ---------------------------------------------------------------------------------------------
# Mass and rank accuracy.


def test_mass_accuracy_hand_values():
  r = np.array([[1.0, -2.0, 3.0, 0.5], [-1.0, -1.0, -1.0, -1.0], [0.0, 2.0, 0.0, 2.0]])
  m = np.array([[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 1, 1]], bool)
  got = np.asarray(ev.relevance_mass_accuracy(r, m))
  # positive mass 4.5, inside 1.5; no positive relevance (undefined); all positive inside
  np.testing.assert_allclose(got[[0, 2]], [1.5 / 4.5, 1.0], rtol=1e-6)
  assert np.isnan(got[1])
  # support: the element outside does not count at all
  support = np.array([[1, 1, 0, 1]], bool)
  np.testing.assert_allclose(ev.relevance_mass_accuracy(r[:1], m[:1], support=support),
                             [1.5 / 1.5], rtol=1e-6)


def _rank_brute_force(r, m):
  """Mean over every order of the tied values of |top-K in mask| / K (numpy, float64)."""
  k = int(m.sum())
  values = np.unique(r)
  accs = []
  # every permutation of each tie group, realised as a strict order by a tie-break key
  groups = [np.flatnonzero(r == v) for v in values]
  for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
    tb = np.zeros(len(r))
    for p in perms:
      tb[list(p)] = np.arange(len(p))
    order = np.lexsort((tb, -r))
    accs.append(m[order[:k]].sum() / k)
  return float(np.mean(accs))


def test_rank_accuracy_hand_values_and_ties():
  r = np.array([[3.0, 1.0, 1.0, 0.0]])
  m = np.array([[0, 1, 0, 1]], bool)
  # K = 2: element 0 (outside) then one of the two tied 1s, half a hit in expectation
  np.testing.assert_allclose(ev.relevance_rank_accuracy(r, m), [0.25], rtol=1e-6)
  rng = np.random.default_rng(0)
  for _ in range(12):
    r = rng.integers(-2, 3, (1, 7)).astype(np.float32)  # many ties
    m = rng.random((1, 7)) < 0.4
    if not m.any():
      m[0, 3] = True
    np.testing.assert_allclose(ev.relevance_rank_accuracy(r, m),
                               [_rank_brute_force(r[0], m[0])], rtol=1e-5)


def test_rank_accuracy_against_numpy_top_k_without_ties():
  rng = np.random.default_rng(1)
  r = rng.normal(size=(4, 6, 5, 3)).astype(np.float32)
  m = rng.random((4, 6, 5, 3)) < 0.3
  got = np.asarray(ev.relevance_rank_accuracy(r, m))
  for i in range(4):
    k = m[i].sum()
    top = np.argsort(-r[i].ravel())[:k]
    assert got[i] == pytest.approx(m[i].ravel()[top].sum() / k, abs=1e-6)
  assert np.isnan(np.asarray(ev.relevance_rank_accuracy(r[:1], np.zeros_like(m[:1])))[0])


def test_constant_map_scores_the_mask_share():
  rng = np.random.default_rng(2)
  m = rng.random((3, 8, 8, 8)) < 0.2
  support = rng.random((3, 8, 8, 8)) < 0.7
  share = (m & support).sum((1, 2, 3)) / support.sum((1, 2, 3))
  ones = np.ones(m.shape, np.float32)
  np.testing.assert_allclose(ev.mask_share(m, support), share, rtol=1e-6)
  np.testing.assert_allclose(ev.relevance_mass_accuracy(ones, m, support), share, rtol=1e-5)
  np.testing.assert_allclose(ev.relevance_rank_accuracy(ones, m, support), share, rtol=1e-5)


def test_mismatched_mask_raises():
  with pytest.raises(lrp.LRPError, match="does not broadcast"):
    ev.relevance_mass_accuracy(np.ones((2, 4, 4)), np.ones((2, 3, 4), bool))


# ---------------------------------------------------------------------------------------------
# Patches, baselines and perturbation curves.


def test_patch_scores_and_patch_mean_against_numpy():
  rng = np.random.default_rng(3)
  x = rng.random((2, 5, 4, 3, 2)).astype(np.float32)  # partial patches on axes 0 and 2
  p = (2, 2, 2)
  scores = np.asarray(ev.patch_scores(x, p))
  assert scores.shape == (2, 3, 2, 2)
  means = np.asarray(ev.patch_mean_baseline(x, p))
  for n, a, b, c in itertools.product(range(2), range(3), range(2), range(2)):
    block = x[n, 2 * a:2 * a + 2, 2 * b:2 * b + 2, 2 * c:2 * c + 2]
    assert scores[n, a, b, c] == pytest.approx(block.sum(), rel=1e-5)
    np.testing.assert_allclose(means[n, 2 * a:2 * a + 2, 2 * b:2 * b + 2, 2 * c:2 * c + 2],
                               np.broadcast_to(block.mean((0, 1, 2)), block.shape), rtol=1e-5)


def test_blur_baseline_against_scipy():
  rng = np.random.default_rng(4)
  x = rng.random((2, 9, 8, 7, 1)).astype(np.float32)
  got = np.asarray(ev.blur_baseline(x, sigma=1.3))
  want = np.stack([ndimage.gaussian_filter(x[i, ..., 0].astype(np.float64), 1.3, mode="constant",
                                           cval=0.0, truncate=3.0) for i in range(2)])[..., None]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_perturbation_curve_hand_values():
  # 2D, 4 x 4 input, 2 x 2 patches (4 patches); linear model, baseline 0.
  w = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) / 10.0
  x = np.ones((1, 4, 4, 1), np.float32)
  f = lambda u: jnp.sum(u * w, axis=(1, 2, 3))  # noqa: E731
  rel = (x * w)[..., 0]
  patch = {(a, b): rel[0, 2 * a:2 * a + 2, 2 * b:2 * b + 2].sum() for a in (0, 1) for b in (0, 1)}
  order = sorted(patch, key=lambda k: -patch[k])  # (1,1), (1,0), (0,1), (0,0)
  f0 = float(w.sum())
  expected = [f0]
  for k in range(1, 5):
    expected.append(f0 - sum(patch[o] for o in order[:k]))
  curve = ev.perturbation_curve(f, x, ev.patch_scores(rel, (2, 2)), 0.0, patch_size=(2, 2),
                                steps=4)
  np.testing.assert_allclose(curve.fractions, [0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(curve.outputs[0], expected, rtol=1e-5)
  np.testing.assert_allclose(curve.aopc, [np.mean(f0 - np.array(expected))], rtol=1e-5)
  # least relevant first, half of the patches in 2 steps
  lerf = ev.perturbation_curve(f, x, -ev.patch_scores(rel, (2, 2)), 0.0, patch_size=(2, 2),
                               steps=2, max_fraction=0.5)
  want = [f0, f0 - patch[order[3]], f0 - patch[order[3]] - patch[order[2]]]
  np.testing.assert_allclose(lerf.outputs[0], want, rtol=1e-5)
  np.testing.assert_allclose(ev.aopc(np.array([[3.0, 2.0, 0.0]])), [(0 + 1 + 3) / 3])


def test_support_limits_perturbation_to_eligible_patches():
  w = np.ones((1, 4, 4, 1), np.float32)
  x = np.ones((1, 4, 4, 1), np.float32)
  f = lambda u: jnp.sum(u * w, axis=(1, 2, 3))  # noqa: E731
  support = np.zeros((1, 4, 4), bool)
  support[0, 0, 0] = True  # only the top-left patch is eligible
  curve = ev.perturbation_curve(f, x, np.zeros((1, 2, 2)), 0.0, patch_size=(2, 2), steps=1,
                                support=support)
  np.testing.assert_allclose(curve.outputs[0], [16.0, 12.0])


# ---------------------------------------------------------------------------------------------
# A model whose output depends only on a known voxel set.


class MaskedLinear(nn.Module):
  """1x1x1 conv (positive weights) -> ReLU -> dense whose weights are zero outside a mask."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(2, (1, 1, 1), name="conv")(x))
    return nn.Dense(1, name="dense")(h.reshape(h.shape[0], -1))[:, 0]


@pytest.fixture(scope="module")
def masked_model():
  side = 12
  rng = np.random.default_rng(5)
  mask = np.zeros((side, side, side), bool)
  mask[2:6, 3:9, 4:8] = True  # a block ...
  mask[8:10, 8:11, 1:3] = True  # ... and a second one
  model = MaskedLinear()
  x = jnp.asarray(rng.uniform(0.2, 1.0, (3, side, side, side, 1)).astype(np.float32))
  conv = {"kernel": jnp.asarray(rng.uniform(0.5, 1.5, (1, 1, 1, 1, 2)), jnp.float32),
          "bias": jnp.zeros((2,), jnp.float32)}
  w = rng.uniform(0.2, 1.0, (side, side, side, 2)) * mask[..., None]
  dense = {"kernel": jnp.asarray(w.reshape(-1, 1), jnp.float32),
           "bias": jnp.zeros((1,), jnp.float32)}
  variables = {"params": {"conv": conv, "dense": dense}}
  return model, variables, x, np.broadcast_to(mask, x.shape[:-1])


@pytest.mark.parametrize("method", [
    "epsilon_plus_flat", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1",
    "sequential_preset_a", "gradient", "gradient_x_input", "smoothgrad", "integrated_gradients"])
def test_every_method_finds_the_voxels_the_output_depends_on(masked_model, method):
  model, variables, x, mask = masked_model
  C = lrp.composites
  composites = {"epsilon_plus_flat": C.EpsilonPlusFlat(), "epsilon_plus": C.EpsilonPlus(),
                "epsilon_gamma_box": C.EpsilonGammaBox(0.0, 1.0),
                "epsilon_alpha2_beta1": C.EpsilonAlpha2Beta1(),
                "sequential_preset_a": C.SequentialPresetA()}
  A = lrp.attribution
  if method in composites:
    rel = lrp.relevance(model.apply, variables, x, composite=composites[method])
  elif method == "smoothgrad":
    rel = A.smoothgrad(model.apply, variables, x, key=jax.random.PRNGKey(1), n_samples=4)
  else:
    rel = getattr(A, method)(model.apply, variables, x)
  voxel = ev.pool_channels(rel)
  np.testing.assert_allclose(ev.relevance_mass_accuracy(voxel, mask), 1.0, atol=1e-4)
  np.testing.assert_allclose(ev.relevance_rank_accuracy(voxel, mask), 1.0, atol=1e-4)


def test_random_map_scores_the_mask_share(masked_model):
  _, _, x, mask = masked_model
  rel = np.random.default_rng(6).random(mask.shape).astype(np.float32)
  share = np.asarray(ev.mask_share(mask))
  assert 0.05 < share[0] < 0.2
  np.testing.assert_allclose(ev.relevance_mass_accuracy(rel, mask), share, atol=0.02)
  # K = 108 mask voxels: the top-K hit rate of a random map has SD ~0.023 per subject
  assert np.mean(ev.relevance_rank_accuracy(rel, mask)) == pytest.approx(share[0], abs=0.04)


def test_most_relevant_first_drops_faster_than_random(masked_model):
  model, variables, x, mask = masked_model
  rel = lrp.relevance(model.apply, variables, x, composite=lrp.composites.EpsilonPlusFlat())
  out = ev.region_perturbation(model.apply, x, rel, 0.0, key=jax.random.PRNGKey(3),
                               patch_size=(2, 2, 2), steps=8, max_fraction=0.5,
                               variables=variables, random_repeats=2)
  f0 = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(out.morf.outputs[:, 0], f0, rtol=1e-5)
  morf, rnd, lerf = (np.asarray(c.aopc) for c in (out.morf, out.random, out.lerf))
  assert np.all(morf > rnd) and np.all(rnd > lerf)
  assert np.all(np.asarray(out.abpc) > 0)
  # Every mask patch is gone once half of the patches are: the output is then the bias (0).
  np.testing.assert_allclose(out.morf.outputs[:, -1], 0.0, atol=1e-4)
  # The least relevant half holds none of the mask: the output does not move.
  np.testing.assert_allclose(out.lerf.outputs, np.broadcast_to(f0[:, None], out.lerf.outputs.shape),
                             rtol=1e-5)
