"""explain.maps: every method against analytic values on a linear model, batch independence,
ensemble combination against per-member gradients, and subject-space maps against nibabel."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import lrp
from jax_brainage.data import prune
from jax_brainage.errors import ConfigError
from jax_brainage.explain import maps

CONTRACT_METHODS = ("epsilon_plus_flat", "epsilon_plus", "epsilon_gamma_box",
                    "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat", "sequential_preset_a",
                    "gradient", "gradient_x_input", "smoothgrad", "integrated_gradients")


class Linear(nn.Module):
  """age = w . x + b: every method has a closed form."""
  bias: float = 40.0

  @nn.compact
  def __call__(self, x, train=False):
    del train
    y = nn.Dense(1, bias_init=nn.initializers.constant(self.bias), name="head")(
        x.reshape((x.shape[0], -1)))
    return y[:, 0]


class SmallConv(nn.Module):
  """conv -> relu -> max-pool -> dense: a nonlinear model whose gradient depends on x."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(3, (3, 3, 3), name="conv1")(x))
    x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
    return nn.Dense(1, name="head")(x.reshape((x.shape[0], -1)))[:, 0]


def _linear_case(n=5):
  rng = np.random.default_rng(0)
  volumes = rng.integers(0, 256, size=(n, 4, 4, 4, 2), dtype=np.uint8)
  model = Linear()
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, 4, 2)))
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)[:, 0].reshape(4, 4, 4, 2)
  b = float(variables["params"]["head"]["bias"][0])
  x = volumes.astype(np.float64) / 255.0
  y = np.einsum("nxyzc,xyzc->n", x, w) + b
  return model, variables, volumes, x, w, b, y


def test_registry_names_the_contract_methods():
  assert set(CONTRACT_METHODS) <= set(maps.METHODS)
  assert maps.DEFAULT_METHOD in maps.METHODS
  assert {m.kind for m in maps.METHODS.values()} == {"lrp", "baseline"}
  assert maps.get_method("Epsilon-Plus-Flat").name == "epsilon_plus_flat"
  with pytest.raises(ConfigError, match="nope"):
    maps.get_method("nope")


@pytest.mark.parametrize("name", sorted(maps.METHODS))
def test_every_method_on_a_linear_model_is_analytic(name):
  model, variables, volumes, x, w, b, y = _linear_case()
  n_in = w.size
  eps = 1e-6
  expected = {
      "gradient": np.broadcast_to(w, x.shape),
      "smoothgrad": np.broadcast_to(w, x.shape),  # the gradient of a linear map is constant
      "gradient_x_input": x * w,
      "integrated_gradients": x * w,             # exact from the zero baseline
      # Epsilon on the dense layer: x w * y / (y + eps sign y); the bias keeps its share.
      "epsilon_all": x * w * (y / (y + eps * np.sign(y)))[:, None, None, None, None],
      "epsilon_plus": x * w * (y / (y + eps * np.sign(y)))[:, None, None, None, None],
      "epsilon_alpha2_beta1": x * w * (y / (y + eps * np.sign(y)))[:, None, None, None, None],
      # The only dense layer is not a convolution: no ZBox, Epsilon applies.
      "epsilon_gamma_box": x * w * (y / (y + eps * np.sign(y)))[:, None, None, None, None],
      "sequential_preset_a": x * w * (y / (y + 0.1 * np.sign(y)))[:, None, None, None, None],
      # The transformer composites are Epsilon(1e-6) on linear layers.
      "attn_lrp": x * w * (y / (y + eps * np.sign(y)))[:, None, None, None, None],
      "cp_lrp": x * w * (y / (y + eps * np.sign(y)))[:, None, None, None, None],
      # Flat on the first (only) layer: the prediction spread evenly over the inputs.
      "epsilon_plus_flat": np.broadcast_to((y / (n_in + eps))[:, None, None, None, None],
                                           x.shape),
      "epsilon_alpha2_beta1_flat": np.broadcast_to(
          (y / (n_in + eps))[:, None, None, None, None], x.shape),
  }[name]
  explainer = maps.Explainer(model, variables, name, batch_size=4)  # 5 = one full + one padded
  relevance, predicted = explainer(volumes)
  assert relevance.shape == volumes.shape and relevance.dtype == np.float32
  np.testing.assert_allclose(predicted, y, rtol=1e-5)
  np.testing.assert_allclose(relevance, expected, rtol=2e-4, atol=1e-6)


def _ensemble_of_one(model, variables, sequences):
  """A single model as every trained model is held: an ensemble of one member, identity head."""
  from jax_brainage.ensemble import head as head_lib

  sub = types.SimpleNamespace(name="model", sequences=sequences, regions=(), members=1,
                              model=model, variables=jax.tree.map(lambda a: a[None], variables))
  head = head_lib.MultiLevelHead({"model": head_lib.mean_head(1)},
                                 head_lib.LinearHead(np.ones(1)), ("model",))
  return types.SimpleNamespace(subs=(sub,), head=head)


def test_relevance_of_a_trained_model_namespace_and_float_inputs():
  model, variables, volumes, x, w, b, y = _linear_case(3)
  trained = _ensemble_of_one(model, variables, ("T1w", "FLAIR"))
  from_uint8 = maps.relevance(trained, volumes, "gradient_x_input", batch_size=2)
  from_float = maps.relevance(trained, x.astype(np.float32), "gradient_x_input", batch_size=8)
  np.testing.assert_allclose(from_uint8, x * w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(from_float, from_uint8, rtol=1e-5, atol=1e-7)


def test_maps_do_not_depend_on_the_batch():
  rng = np.random.default_rng(3)
  volumes = rng.integers(0, 256, size=(5, 6, 6, 6, 1), dtype=np.uint8)
  model = SmallConv()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 6, 1)))
  smooth = maps.Explainer(model, variables, "smoothgrad", batch_size=4, seed=7)
  batched, _ = smooth(volumes)
  alone, _ = smooth(volumes[3:4], rows=np.array([3]))
  np.testing.assert_allclose(alone[0], batched[3], rtol=1e-5, atol=1e-7)
  smooth.seed = 8  # the noise keys are made on the host: no new compilation
  other_seed, _ = smooth(volumes)
  assert np.max(np.abs(other_seed - batched)) > 1e-6
  # An LRP composite, batched and sharded, against lrp.relevance on one volume at a time.
  lrp_maps, _ = maps.Explainer(model, variables, "epsilon_plus", batch_size=4)(volumes)
  direct_fn = jax.jit(lambda v, x: lrp.relevance(model.apply, v, x,
                                                   composite=lrp.composites.EpsilonPlus()))
  for i in (0, 4):
    x = volumes[i:i + 1].astype(np.float32) / np.float32(255)
    direct = direct_fn(variables, jnp.asarray(x))
    np.testing.assert_allclose(lrp_maps[i], np.asarray(direct)[0], rtol=1e-4, atol=1e-7)


def test_ensemble_maps_weigh_members_by_the_head():
  from jax_brainage.ensemble import head as head_lib

  subs, inputs, reference, predicted = [], {}, {}, {}
  rng = np.random.default_rng(0)
  n = 3
  model = SmallConv()
  grad = jax.jit(jax.grad(lambda v, u: jnp.sum(model.apply(v, u)), argnums=1))
  for name, sequences, seeds in (("t1", ("T1w",), (0, 1)), ("both", ("FLAIR", "T1w"), (2, 3, 4))):
    shape = (1, 6, 6, 6, len(sequences))
    members = [model.init(jax.random.PRNGKey(s), jnp.zeros(shape)) for s in seeds]
    subs.append(types.SimpleNamespace(
        name=name, sequences=sequences, regions=(), members=len(seeds), model=model,
        variables=jax.tree.map(lambda *a: np.stack(a), *members)))
    inputs[name] = rng.integers(0, 256, size=(n, 6, 6, 6, len(sequences)), dtype=np.uint8)
    x = jnp.asarray(inputs[name].astype(np.float32) / np.float32(255))
    # Reference: x * d(age)/dx by jax.grad, one member at a time (no lrp, no vmap).
    reference[name] = [np.asarray(x * grad(v, x)) for v in members]
    predicted[name] = np.stack([np.asarray(model.apply(v, x)) for v in members])
  head = head_lib.MultiLevelHead(
      level1={"t1": head_lib.LinearHead(np.array([0.7, 0.5]), 1.0),
              "both": head_lib.LinearHead(np.array([0.2, 0.9, -0.3]), -2.0)},
      level2=head_lib.LinearHead(np.array([0.6, 0.3]), 3.0), names=("t1", "both"))
  ensemble = types.SimpleNamespace(subs=tuple(subs), head=head)
  em = maps.ensemble_maps(ensemble, inputs, "gradient_x_input", batch_size=2)
  assert em.sequences == ("T1w", "FLAIR")
  for name in ("t1", "both"):
    np.testing.assert_allclose(em.members[name], np.stack(reference[name]), rtol=1e-4,
                               atol=1e-6)
    level1 = head.level1[name].weights
    np.testing.assert_allclose(em.subs[name], sum(w * r for w, r in zip(level1, reference[name])),
                               rtol=1e-4, atol=1e-6)
  w_t1 = 0.6 * np.array([0.7, 0.5])
  w_both = 0.3 * np.array([0.2, 0.9, -0.3])
  t1 = sum(w_t1[m] * reference["t1"][m][..., 0] for m in range(2))
  t1 = t1 + sum(w_both[m] * reference["both"][m][..., 1] for m in range(3))
  flair = sum(w_both[m] * reference["both"][m][..., 0] for m in range(3))
  np.testing.assert_allclose(em.ensemble, np.stack([t1, flair], axis=-1), rtol=1e-4, atol=1e-6)
  # Members two per jitted call (bounded memory; "both" pads its last group): the same maps.
  grouped = maps.ensemble_maps(ensemble, inputs, "gradient_x_input", batch_size=2,
                               members_per_call=2)
  np.testing.assert_allclose(grouped.ensemble, em.ensemble, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(grouped.members["both"], em.members["both"], rtol=1e-5, atol=1e-8)
  for name in ("t1", "both"):  # the members' predicted ages come back too
    np.testing.assert_allclose(em.member_predictions[name], predicted[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Subject space.


def _oblique_subject(resample_to=None):
  """A subject image stored LPI-ish with permuted axes, a brain blob off centre."""
  shape = (22, 26, 20)
  affine = np.array([[0.0, 0.0, -2.0, 30.0],
                     [-2.0, 0.0, 0.0, 40.0],
                     [0.0, 2.0, 0.0, -20.0],
                     [0.0, 0.0, 0.0, 1.0]])
  data = np.zeros(shape, np.float32)
  data[4:17, 6:20, 3:15] = 1.0 + np.arange(13 * 14 * 12).reshape(13, 14, 12) % 7
  img = nib.Nifti1Image(data, affine)
  cube, inverse = prune.to_cube(img, (16, 16, 16), voxel_size_mm=resample_to)
  return img, cube, inverse


def test_subject_space_indicator_lands_on_its_world_coordinates():
  img, cube, inverse = _oblique_subject()
  c = np.array([5, 9, 3])
  indicator = np.zeros(inverse.cube_shape, np.float32)
  indicator[tuple(c)] = 2.5
  out = maps.to_subject_space(indicator, inverse)
  assert out.shape == img.shape
  np.testing.assert_array_equal(out.affine, img.affine)
  assert np.asarray(out.dataobj).dtype == np.float32
  hits = np.argwhere(np.asarray(out.dataobj) != 0)
  assert len(hits) == 1 and float(np.asarray(out.dataobj)[tuple(hits[0])]) == 2.5
  world_cube = inverse.cube_affine @ np.append(c, 1.0)
  world_subject = img.affine @ np.append(hits[0], 1.0)
  np.testing.assert_allclose(world_subject, world_cube, atol=1e-6)
  # And a whole map: every subject voxel inside the cube holds the cube voxel at its world point.
  rng = np.random.default_rng(0)
  rel = rng.normal(size=inverse.cube_shape).astype(np.float32)
  data = np.asarray(maps.to_subject_space(rel, inverse).dataobj)
  ijk = np.indices(img.shape).reshape(3, -1)
  world = img.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
  cube_idx = np.rint(np.linalg.inv(inverse.cube_affine) @ world)[:3].astype(int)
  inside = np.all((cube_idx >= 0) & (cube_idx < 16), axis=0)
  expected = np.zeros(ijk.shape[1], np.float32)
  expected[inside] = rel[tuple(cube_idx[:, inside])]
  np.testing.assert_array_equal(data.reshape(-1), expected)
  assert inside.sum() > 1000  # most of the cube lies inside the image
  # The image itself goes back exactly (inside the cube).
  back = np.asarray(maps.to_subject_space(cube, inverse).dataobj).reshape(-1)
  np.testing.assert_array_equal(back[inside], np.asarray(img.dataobj).reshape(-1)[inside])


def test_subject_space_of_a_resampled_cube_keeps_the_relevance_sum():
  img, cube, inverse = _oblique_subject(resample_to=4.0)
  assert inverse.resampled
  rel = np.zeros(inverse.cube_shape, np.float32)
  rel[4:12, 4:12, 4:12] = 1.0  # 512 voxels of 64 mm^3 -> 4096 of 8 mm^3
  out = maps.to_subject_space(rel, inverse)
  np.testing.assert_array_equal(out.affine, img.affine)
  total = float(np.sum(np.asarray(out.dataobj), dtype=np.float64))
  assert total == pytest.approx(rel.sum(), rel=0.05)
  unscaled = maps.to_subject_space(rel, inverse, preserve_sum=False)
  assert float(np.sum(np.asarray(unscaled.dataobj))) == pytest.approx(8 * total, rel=1e-4)
