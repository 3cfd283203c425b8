"""Composite mapping, canonizers, batch/jit/vmap/sharding consistency, intermediate layers,
attribution baselines and errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrp
from lrp import rules
from tests.lrp import nets

LRP0 = lrp.composites.EpsilonAll(epsilon=0.0, stabilizer=0.0)


# ------------------------------------------------------------------ composite mapping


class DefinedBackwards(nn.Module):
  """Layers defined in the opposite order of their use on the data path."""

  def setup(self):
    self.late = nn.Dense(1, name="late")
    self.mid = nn.Conv(2, (3, 3), name="mid")
    self.early = nn.Conv(2, (3, 3), name="early")

  def __call__(self, x):
    x = nn.relu(self.early(x))
    x = nn.relu(self.mid(x))
    return self.late(x.reshape((x.shape[0], -1)))[:, 0]


def test_first_layer_is_first_on_the_data_path_not_in_definition_order():
  model = DefinedBackwards()
  variables, x = nets.init(model, (2, 5, 5, 1))
  sites = {n.split("/")[-1]: (k, first, rule) for n, k, first, rule in
           lrp.describe(model.apply, variables, x, lrp.composites.EpsilonPlusFlat())
           if k in ("conv", "dense")}
  assert sites["early"][1] and not sites["mid"][1] and not sites["late"][1]
  assert isinstance(sites["early"][2], rules.Flat)
  assert isinstance(sites["mid"][2], rules.ZPlus)
  assert isinstance(sites["late"][2], rules.Epsilon)


def test_name_precedence_over_first_and_type_maps():
  model = DefinedBackwards()
  variables, x = nets.init(model, (2, 5, 5, 1))
  named = rules.Gamma(0.5)
  comp = lrp.composites.Composite(
      layer_map=[("linear", rules.Epsilon())], first_map=[("conv", rules.Flat())],
      name_map=[(("early", "late"), named)])
  got = {n.split("/")[-1]: r for n, k, _, r in lrp.describe(model.apply, variables, x, comp)}
  assert got["early"] is named and got["late"] is named  # name beats first and type
  assert isinstance(got["mid"], rules.Epsilon)
  comp2 = lrp.composites.Composite(layer_map=[("linear", rules.Epsilon())],
                                   name_map={"*/m?d": rules.ZPlus()})
  got2 = {n.split("/")[-1]: r for n, k, _, r in lrp.describe(model.apply, variables, x, comp2)}
  assert isinstance(got2["mid"], rules.ZPlus) and isinstance(got2["early"], rules.Epsilon)


def test_every_parameterised_layer_is_covered_and_unmapped_raises():
  model = nets.MiniMRInet()
  variables, x = nets.init(model, (1, 6, 6, 6, 1))
  for comp in (lrp.composites.EpsilonPlus(), lrp.composites.EpsilonAlpha2Beta1Flat(),
               lrp.composites.EpsilonGammaBox(0.0, 1.0)):
    linear = [(n, r) for n, k, _, r in lrp.describe(model.apply, variables, x, comp)
              if k in ("conv", "dense")]
    assert sorted(n.split("/")[-1] for n, _ in linear) == ["conv1", "conv2", "dense1", "out"]
    assert all(r is not None for _, r in linear)
  preset = {n.split("/")[-1]: r for n, k, _, r in lrp.describe(
      model.apply, variables, x, lrp.composites.SequentialPresetA())}
  assert (preset["conv2"].alpha, preset["conv2"].beta) == (1.0, 0.0)
  assert preset["out"].epsilon == 0.1
  with pytest.raises(lrp.UnsupportedLayerError, match="dense layer 'MiniMRInet/dense1'"):
    lrp.relevance(model.apply, variables, x,
                  lrp.composites.Composite(layer_map=[("conv", rules.ZPlus())]))


def test_unfolded_batchnorm_and_bilinear_layers_raise_naming_them():
  class BN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(3, name="d")(x))
      x = nn.BatchNorm(use_running_average=True, name="bn")(x + 1.0)
      return x.sum(1)

  model = BN()
  variables, x = nets.init(model, (2, 4))
  with pytest.raises(lrp.UnsupportedLayerError, match="'BN/bn'"):
    lrp.relevance(model.apply, variables, x, lrp.composites.EpsilonPlus())
  with pytest.raises(lrp.UnsupportedLayerError, match="bilinear"):
    lrp.relevance(lambda v, u: jnp.einsum("bi,bi->b", u @ v, u), jnp.eye(4), x)

  def scanned(v, u):  # dense layers inside lax.scan: no rule can be installed there
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ v), None), u, None, length=2)[0].sum(1)

  with pytest.raises(lrp.UnsupportedLayerError, match="scan"):
    lrp.relevance(scanned, jnp.eye(4), x)


# ------------------------------------------------------------------ canonizers


class ConvBN(nn.Module):
  """BN after a conv, BN before a conv (VALID padding: the shift folds into a constant bias)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3, 3), padding="SAME", name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
    x = nn.BatchNorm(use_running_average=True, name="bn2")(x)
    x = nn.Conv(2, (2, 2, 2), padding="VALID", name="conv2")(x)
    return nn.Dense(1, name="out")(nn.relu(x).reshape((x.shape[0], -1)))[:, 0]


class Folded(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3, 3), padding="SAME", name="conv1")(x))
    x = nn.Conv(2, (2, 2, 2), padding="VALID", name="conv2")(x)
    return nn.Dense(1, name="out")(nn.relu(x).reshape((x.shape[0], -1)))[:, 0]


def _random_bn(variables, key):
  keys = iter(jax.random.split(key, 16))
  stats = {}
  for bn in ("bn1", "bn2"):
    stats[bn] = {"mean": jax.random.normal(next(keys), (3,), jnp.float64),
                 "var": jax.random.uniform(next(keys), (3,), jnp.float64, 0.2, 2.0)}
  params = jax.tree.map(lambda a: a, variables["params"])
  for bn in ("bn1", "bn2"):
    params[bn] = {"scale": jax.random.normal(next(keys), (3,), jnp.float64),  # signed scales
                  "bias": jax.random.normal(next(keys), (3,), jnp.float64)}
  params["conv1"]["bias"] = jax.random.normal(next(keys), (3,), jnp.float64)
  return {"params": params, "batch_stats": stats}


def _numpy_fold(v, eps=1e-5):
  """The textbook fold (lrp.md): W' = W * s, b' = (b - mean) * s + beta; BN before a conv:
  W' = W * s on the input channels, b' = b + sum W * (beta - mean * s)."""
  p = jax.tree.map(np.asarray, v["params"])
  st = jax.tree.map(np.asarray, v["batch_stats"])
  s1 = p["bn1"]["scale"] / np.sqrt(st["bn1"]["var"] + eps)
  s2 = p["bn2"]["scale"] / np.sqrt(st["bn2"]["var"] + eps)
  sh2 = p["bn2"]["bias"] - st["bn2"]["mean"] * s2
  k1 = p["conv1"]["kernel"] * s1
  b1 = (p["conv1"]["bias"] - st["bn1"]["mean"]) * s1 + p["bn1"]["bias"]
  k2 = p["conv2"]["kernel"] * s2[:, None]
  b2 = p["conv2"]["bias"] + np.einsum("xyzio,i->o", p["conv2"]["kernel"], sh2)
  return {"params": {"conv1": {"kernel": k1, "bias": b1}, "conv2": {"kernel": k2, "bias": b2},
                     "out": p["out"]}}


def test_batchnorm_folding_output_and_relevance_match_the_textbook_fold():
  with jax.enable_x64(True):
    model = ConvBN()
    variables, x = nets.init(model, (2, 5, 4, 4, 1), 0, jnp.float64)
    variables = _random_bn(variables, jax.random.key(7))
    x = x - 0.5
    f, folded = lrp.canonizers.canonize(model.apply, variables, x)
    assert sorted(n.split("/")[-1] for n in folded) == ["conv1", "conv2"]
    np.testing.assert_allclose(np.asarray(f(variables, x)), np.asarray(model.apply(variables, x)),
                               rtol=1e-12)
    ref_vars = _numpy_fold(variables)
    np.testing.assert_allclose(np.asarray(Folded().apply(ref_vars, x)),
                               np.asarray(model.apply(variables, x)), rtol=1e-12)
    for comp in (lrp.composites.EpsilonGammaBox(-1.0, 1.0),):
      got = lrp.relevance(model.apply, variables, x, comp)
      want = lrp.relevance(Folded().apply, ref_vars, x, comp)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ consistency


@pytest.fixture(scope="module")
def mini():
  model = nets.MiniMRInet()
  variables, x = nets.init(model, (4, 6, 6, 5, 1), 2)
  return model, variables, x


def test_batch_consistency_and_jit(mini):
  model, variables, x = mini
  comp = lrp.composites.EpsilonGammaBox(0.0, 1.0)
  apply = functools.partial(model.apply, train=False)
  fn = jax.jit(lambda v, u: lrp.relevance(apply, v, u, comp))
  batch = fn(variables, x)
  one = lrp.relevance(apply, variables, x[2:3], comp)  # no jit, batch of one
  np.testing.assert_allclose(np.asarray(batch[2]), np.asarray(one[0]), rtol=2e-5, atol=1e-7)


def test_vmap_over_stacked_members_equals_loop(mini):
  model, variables, x = mini
  members = [model.init(jax.random.key(s), x) for s in (10, 11)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
  comp = lrp.composites.SequentialPresetA()
  got = jax.jit(jax.vmap(lambda v: lrp.relevance(model.apply, v, x, comp)))(stacked)
  single = jax.jit(lambda v: lrp.relevance(model.apply, v, x, comp))
  wants = [single(v) for v in members]
  for m in range(len(members)):
    np.testing.assert_allclose(np.asarray(got[m]), np.asarray(wants[m]), rtol=2e-5, atol=1e-7)
  # vmap over samples (each a batch of one) == the batched call
  per_sample = jax.jit(jax.vmap(
      lambda u: lrp.relevance(model.apply, members[0], u[None], comp)[0]))(x)
  np.testing.assert_allclose(np.asarray(per_sample), np.asarray(wants[0]), rtol=2e-5, atol=1e-7)


def test_sharded_input_over_devices(mini):
  model, variables, x = mini
  devices = jax.devices()
  assert len(devices) == 4
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  xs = jax.device_put(x, sharding)
  comp = lrp.composites.EpsilonPlusFlat()
  fn = jax.jit(lambda v, u: lrp.relevance(model.apply, v, u, comp))
  got = fn(variables, xs)
  assert got.sharding.is_equivalent_to(sharding, got.ndim)
  np.testing.assert_allclose(np.asarray(got), np.asarray(fn(variables, x)), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ seeds, delta, layers


def test_seed_options_and_convergence_delta():
  with jax.enable_x64(True):
    model = nn.Dense(3)
    variables, x = nets.init(model, (2, 4), 0, jnp.float64)
    variables = {"params": {"kernel": variables["params"]["kernel"],
                            "bias": jnp.array([0.3, -0.2, 0.1])}}
    W, b = np.asarray(variables["params"]["kernel"]), np.asarray(variables["params"]["bias"])
    xn = np.asarray(x)
    z = xn @ W + b
    comp = lrp.composites.EpsilonAll(epsilon=0.0)
    onehot = np.array([0.0, 1.0, 0.0])
    e = lrp.explain(model.apply, variables, x, comp, seed=onehot)
    np.testing.assert_allclose(np.asarray(e.relevance), xn * W[:, 1] / z[:, 1:2], rtol=1e-10)
    # delta = sum R_in - sum R_start; LRP-0 loses exactly the bias share b / z of the start
    want_delta = -b[1] / z[:, 1]
    np.testing.assert_allclose(np.asarray(e.delta), want_delta, rtol=1e-10)
    ref = z[0]
    e2 = lrp.explain(model.apply, variables, x, comp, seed=lambda y: y - jnp.asarray(ref)[None])
    np.testing.assert_allclose(np.asarray(e2.start), z - ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.asarray(e2.relevance[0]), 0.0, atol=1e-15)  # contrast with itself


def test_relevance_at_intermediate_layers():
  with jax.enable_x64(True):
    model = nets.MiniMRInet(bias=False)
    variables, x = nets.init(model, (2, 6, 6, 5, 1), 4, jnp.float64)
    e = lrp.explain(model.apply, variables, x, LRP0, layers=("out", "conv2"))
    e_out = lrp.explain(model.apply, variables, x, LRP0, layers=("conv2",), where="output")
    _, inter = model.apply(variables, x, capture_intermediates=True)
    h = np.asarray(inter["intermediates"]["dense1"]["__call__"][0])
    h = np.maximum(h, 0)
    w = np.asarray(variables["params"]["out"]["kernel"])[:, 0]
    np.testing.assert_allclose(np.asarray(e.layers["out"]), h * w, rtol=1e-9, atol=1e-14)
    for r in (e.layers["conv2"], e_out.layers["conv2"]):  # LRP-0 without biases conserves
      np.testing.assert_allclose(np.asarray(r.reshape(2, -1).sum(1)), np.asarray(e.output),
                                 rtol=1e-9)
    with pytest.raises(lrp.LRPError, match="layers are"):
      lrp.explain(model.apply, variables, x, LRP0, layers=("nope",))


# ------------------------------------------------------------------ attribution baselines


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name="d1")(x))
    return nn.Dense(1, name="d2")(x)[:, 0]


def test_attribution_baselines():
  with jax.enable_x64(True):
    model = MLP()
    variables, x = nets.init(model, (3, 6), 5, jnp.float64)
    apply = model.apply
    ref_grad = jax.grad(lambda u: apply(variables, u).sum())(x)
    att = lrp.attribution
    np.testing.assert_allclose(np.asarray(att.gradient(apply, variables, x)), np.asarray(ref_grad))
    np.testing.assert_allclose(np.asarray(att.gradient_x_input(apply, variables, x)),
                               np.asarray(x * ref_grad))
    sg0 = att.smoothgrad(apply, variables, x, key=jax.random.key(0), n_samples=2, noise_level=0.0)
    np.testing.assert_allclose(np.asarray(sg0), np.asarray(ref_grad), rtol=1e-12)
    sg = att.smoothgrad(apply, variables, x, key=jax.random.key(1), n_samples=3)
    manual = []
    span = (x.max(axis=1) - x.min(axis=1))[:, None]
    for k in jax.random.split(jax.random.key(1), 3):
      xn = x + jax.random.normal(k, x.shape, x.dtype) * 0.1 * span
      manual.append(jax.grad(lambda u: apply(variables, u).sum())(xn))
    np.testing.assert_allclose(np.asarray(sg), np.asarray(sum(manual) / 3), rtol=1e-10)
    ig = att.integrated_gradients(apply, variables, x, n_steps=256)
    completeness = apply(variables, x) - apply(variables, jnp.zeros_like(x))
    np.testing.assert_allclose(np.asarray(ig.sum(1)), np.asarray(completeness), rtol=1e-2,
                               atol=1e-4)
