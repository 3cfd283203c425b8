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


# ---------------------------------------------------------------------------------------------
# Model-parameter randomisation.


def _top_numpy(a, k):
  top = np.zeros(a.shape, bool)
  top[np.argsort(-np.abs(a), kind="stable")[:k]] = True
  return top


def test_map_similarity_against_scipy():
  from scipy import stats

  rng = np.random.default_rng(7)
  a = rng.integers(-3, 4, (3, 4, 5, 2)).astype(np.float32)  # many ties, both signs
  b = a + rng.integers(-2, 3, a.shape).astype(np.float32)
  support = rng.random((3, 4, 5, 2)) < 0.7
  for sup in (None, support):
    got = ev.map_similarity(a, b, sup, top_fraction=0.25)
    for i in range(3):
      keep = np.ones(a[i].size, bool) if sup is None else sup[i].ravel()
      ai, bi = a[i].ravel()[keep], b[i].ravel()[keep]
      np.testing.assert_allclose(got.spearman_abs[i],
                                 stats.spearmanr(np.abs(ai), np.abs(bi)).statistic, atol=1e-5)
      np.testing.assert_allclose(got.spearman[i], stats.spearmanr(ai, bi).statistic, atol=1e-5)
      np.testing.assert_allclose(got.pearson[i], stats.pearsonr(ai, bi).statistic, atol=1e-5)
      k = max(1, int(np.round(0.25 * len(ai))))
      ta, tb = _top_numpy(ai, k), _top_numpy(bi, k)
      np.testing.assert_allclose(got.top_iou[i], (ta & tb).sum() / (ta | tb).sum(), atol=1e-6)
  # a constant map has no rank correlation (scipy: nan as well)
  same = ev.map_similarity(np.ones((1, 6)), np.arange(6.0)[None])
  assert np.isnan(same.spearman[0]) and np.isnan(same.pearson[0])


class TwoLinear(nn.Module):
  """x [batch, 8] -> Dense(5, "first") -> Dense(1, "second") -> [batch]; no activation."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, name="second")(nn.Dense(5, name="first")(x))[:, 0]


@pytest.fixture(scope="module")
def linear_model():
  model = TwoLinear()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  variables = model.init(jax.random.PRNGKey(2), x)
  # trained-looking biases (non-constant), so that they are re-drawn as well
  variables = {"params": {name: {"kernel": layer["kernel"],
                                 "bias": jnp.linspace(-0.5, 0.5, layer["bias"].shape[0])}
                          for name, layer in variables["params"].items()}}
  return model, variables, x


def _gradient_x_input(model):
  return lambda v, x: lrp.attribution.gradient_x_input(model.apply, v, x)


def test_randomisation_changes_a_linear_net_map_at_every_layer(linear_model):
  """Gradient x input of a linear net is x * (W1 W2): either layer changes it. The maps after
  each step are recomputed in numpy from the randomised weights, and compared with scipy."""
  from scipy import stats

  model, variables, x = linear_model
  key = jax.random.PRNGKey(5)
  out = ev.model_parameter_randomisation(model.apply, variables, x, _gradient_x_input(model),
                                         key=key, top_fraction=0.25)
  assert out.layers == ("second", "first")  # default: last defined first
  xn = np.asarray(x, np.float64)

  def numpy_map(v):
    w1 = np.asarray(v["params"]["first"]["kernel"], np.float64)
    w2 = np.asarray(v["params"]["second"]["kernel"], np.float64)
    return xn * (w1 @ w2)[:, 0]

  def numpy_output(v):
    p = {k: {n: np.asarray(a, np.float64) for n, a in d.items()} for k, d in v["params"].items()}
    h = xn @ p["first"]["kernel"] + p["first"]["bias"]
    return (h @ p["second"]["kernel"] + p["second"]["bias"])[:, 0]

  original = numpy_map(variables)
  current = variables
  np.testing.assert_allclose(out.outputs[0], numpy_output(variables), rtol=1e-5, atol=1e-5)
  for s, layer in enumerate(out.layers):
    current = ev.randomise_layer(current, layer, jax.random.fold_in(key, s))
    m = numpy_map(current)
    np.testing.assert_allclose(out.outputs[s + 1], numpy_output(current), rtol=1e-5, atol=1e-5)
    for i in range(len(xn)):
      np.testing.assert_allclose(out.spearman[s, i],
                                 stats.spearmanr(original[i], m[i]).statistic, atol=1e-5)
      np.testing.assert_allclose(out.spearman_abs[s, i], stats.spearmanr(
          np.abs(original[i]), np.abs(m[i])).statistic, atol=1e-5)
      np.testing.assert_allclose(out.pearson[s, i],
                                 stats.pearsonr(original[i], m[i]).statistic, atol=1e-5)
  # the map changed after each step (for every sample), and so did the model
  assert np.all(np.abs(np.asarray(out.spearman)) < 0.99)
  assert np.all(np.abs(np.asarray(out.outputs[1:] - out.outputs[:-1])) > 1e-3)


def test_map_that_ignores_the_model_passes_as_identical(linear_model):
  """The check can fail a bad method: `x` itself as the "attribution" correlates exactly 1 with
  itself at every step, while the model's output changes."""
  model, variables, x = linear_model
  out = ev.model_parameter_randomisation(model.apply, variables, x, lambda v, u: u,
                                         key=jax.random.PRNGKey(0))
  for field in ("spearman_abs", "spearman", "pearson", "top_iou"):
    np.testing.assert_array_equal(getattr(out, field), 1.0)
  assert not np.allclose(out.outputs[0], out.outputs[-1])


def test_parameters_the_map_does_not_depend_on(linear_model):
  """The gradient of a linear net does not depend on its biases: randomising only the first
  layer's bias changes the output but leaves the gradient map exactly as it was."""
  model, variables, x = linear_model
  gradient = lambda v, u: lrp.attribution.gradient(model.apply, v, u)
  out = ev.model_parameter_randomisation(model.apply, variables, x, gradient,
                                         key=jax.random.PRNGKey(0), layers=["first/bias"])
  assert out.layers == ("first/bias",)
  np.testing.assert_allclose(out.spearman, 1.0, atol=1e-6)
  np.testing.assert_allclose(out.pearson, 1.0, atol=1e-6)
  assert not np.allclose(out.outputs[0], out.outputs[1])


def test_randomisation_is_deterministic_for_a_fixed_key(linear_model):
  model, variables, x = linear_model
  run = lambda k: ev.model_parameter_randomisation(model.apply, variables, x,
                                                   _gradient_x_input(model), key=k)
  a, b, c = run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(4))
  for field in ("outputs", "spearman_abs", "spearman", "pearson", "top_iou"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert not np.array_equal(a.outputs, c.outputs)


def test_randomise_layer_keeps_each_leafs_spread():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.normal(0.3, 0.05, (200, 300)), jnp.float32)
  variables = {"params": {"a": {"kernel": kernel, "bias": jnp.full((300,), 0.1)},
                          "b": {"kernel": jnp.ones((3, 3), jnp.bfloat16)}},
               "batch_stats": {"a": {"mean": jnp.zeros(3)}}}
  new = ev.randomise_layer(variables, "a", jax.random.PRNGKey(0))
  k = np.asarray(new["params"]["a"]["kernel"])
  assert k.dtype == np.float32
  assert np.std(k) == pytest.approx(0.05, rel=0.02) and abs(np.mean(k)) < 0.002  # N(0, sd^2)
  np.testing.assert_array_equal(new["params"]["a"]["bias"], variables["params"]["a"]["bias"])
  assert new["params"]["b"] is variables["params"]["b"]  # other layers untouched
  assert new["batch_stats"] is variables["batch_stats"]
  np.testing.assert_array_equal(variables["params"]["a"]["kernel"], kernel)  # not in place
  assert list(new["params"]) == ["a", "b"]
  # A constant bf16 leaf stays, with its dtype.
  b = ev.randomise_layer(variables, ("b",), jax.random.PRNGKey(0))["params"]["b"]["kernel"]
  assert b.dtype == jnp.bfloat16


def test_bad_layer_names_raise_one_line_errors(linear_model):
  model, variables, x = linear_model
  for layer, key in (("third", "'third'"), ("first/weights", "'weights'"),
                     ("first/kernel/x", "'x'")):
    with pytest.raises(lrp.LRPError, match=key) as e:
      ev.model_parameter_randomisation(model.apply, variables, x, lambda v, u: u,
                                       key=jax.random.PRNGKey(0), layers=["second", layer])
    assert "\n" not in str(e.value)
  with pytest.raises(lrp.LRPError, match="no 'params' collection"):
    ev.layer_order(model.apply, {"weights": {}}, x)


class Applied(nn.Module):
  """Defined (and applied) in the order c, z, b: neither alphabetical nor its reverse."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, name="b")(nn.relu(nn.Dense(2, name="z")(nn.Dense(3, name="c")(x))))[:, 0]


def test_default_order_is_output_first_even_after_tree_operations():
  model = Applied()
  x = jnp.ones((2, 4))
  variables = model.init(jax.random.PRNGKey(0), x)
  assert list(variables["params"]) == ["c", "z", "b"]  # definition order, as flax stores it
  restored = jax.tree.map(jnp.asarray, variables)  # what any tree operation does: sorted
  assert list(restored["params"]) == ["b", "c", "z"]
  for v in (variables, restored):
    assert ev.layer_order(model.apply, v, x) == ("b", "z", "c")
    out = ev.model_parameter_randomisation(model.apply, v, x, lambda w, u: u,
                                           key=jax.random.PRNGKey(0))
    assert out.layers == ("b", "z", "c")
  # params_key=None: variables are the parameter tree itself
  assert ev.layer_order(lambda p, u: model.apply({"params": p}, u), variables["params"], x,
                        params_key=None) == ("b", "z", "c")
