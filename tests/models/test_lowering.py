"""The im2col conv lowering against a float64 numpy convolution and lax's convolution, and its
use by the models: same parameters, same outputs and gradients, XLA's conv for relevance."""

from __future__ import annotations

import itertools

import jax
import jax.extend.core  # noqa: F401 (jax.extend.core.jaxprs_in_params)
import jax.numpy as jnp
import numpy as np
import pytest

import lrp
from jax_brainage import models
from jax_brainage.errors import ConfigError
from jax_brainage.explain import maps
from jax_brainage.models import lowering
from jax_brainage.train import checkpoint, config_checks
from jax_brainage.train import config as config_lib

KEY = lambda seed: jax.random.key(seed, impl="rbg")


def numpy_conv(x, w, padding):
  """Direct float64 cross-correlation, channels last: x [n, X, Y, Z, Ci], w [kx, ky, kz, Ci, Co]."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  xp = np.pad(x, [(0, 0), *padding, (0, 0)])
  out = [xp.shape[i + 1] - w.shape[i] + 1 for i in range(3)]
  y = np.zeros((x.shape[0], *out, w.shape[-1]))
  for a, b, c in itertools.product(*(range(k) for k in w.shape[:3])):
    y += xp[:, a:a + out[0], b:b + out[1], c:c + out[2], :] @ w[a, b, c]
  return y


@pytest.mark.parametrize("kernel,padding", [((3, 3, 3), "SAME"), ((1, 1, 1), "SAME"),
                                            ((3, 2, 3), "VALID"),
                                            ((3, 3, 3), ((2, 0), (1, 1), (0, 1)))])
def test_im2col_equals_numpy_convolution(kernel, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 6, 5, 3)).astype(np.float32)
  w = rng.normal(size=(*kernel, 3, 4)).astype(np.float32)
  pads = (jax.lax.padtype_to_pads(x.shape[1:4], kernel, (1, 1, 1), padding)
          if isinstance(padding, str) else padding)
  got = lowering.im2col_conv(jnp.asarray(x), jnp.asarray(w), padding)
  np.testing.assert_allclose(np.asarray(got), numpy_conv(x, w, pads), rtol=1e-5, atol=1e-5)


def test_gradients_equal_lax_convolution():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 6, 2)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 5)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NDHWC", "DHWIO", "NDHWC"))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=dn)
  ours = lambda x, w: lowering.conv_general_dilated("im2col")(x, w, (1, 1, 1), "SAME",
                                                              dimension_numbers=dn)
  loss = lambda conv: lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2)
  for argnum in (0, 1):
    g_ref = jax.grad(loss(ref), argnum)(x, w)
    g_ours = jax.grad(loss(ours), argnum)(x, w)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,padding,shape", [
    ((2, 2, 2), "SAME", (2, 8, 6, 4, 3)), ((2, 2, 2), "SAME", (2, 7, 6, 5, 3)),
    ((2, 3, 2), "VALID", (2, 7, 8, 5, 3)), ((2, 2, 2), ((1, 0), (0, 1), (1, 1)), (1, 5, 5, 4, 2))])
def test_stride_equal_to_kernel_is_a_reshape_equal_to_numpy(kernel, padding, shape):
  """Non-overlapping windows (MRInet's patch stem): the stride-1 numpy convolution sampled every
  `kernel` voxels, with lax's padding for that stride; gradients as lax's."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.normal(size=(*kernel, shape[-1], 4)).astype(np.float32)
  pads = (jax.lax.padtype_to_pads(shape[1:4], kernel, kernel, padding)
          if isinstance(padding, str) else padding)
  full = numpy_conv(x, w, pads)
  want = full[:, ::kernel[0], ::kernel[1], ::kernel[2]]
  conv = lowering.conv_general_dilated("im2col")
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NDHWC", "DHWIO", "NDHWC"))
  ours = lambda x, w: conv(x, w, kernel, padding, dimension_numbers=dn)
  got = ours(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # A reshape, not XLA's convolution.
  assert "conv_general_dilated" not in _primitives(ours, jnp.asarray(x), jnp.asarray(w))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, kernel, padding, dimension_numbers=dn)
  loss = lambda conv: lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2)
  for argnum in (0, 1):
    np.testing.assert_allclose(np.asarray(jax.grad(loss(ours), argnum)(x, w)),
                               np.asarray(jax.grad(loss(ref), argnum)(x, w)),
                               rtol=1e-4, atol=1e-4)


def test_unsupported_convolutions_go_to_lax():
  """Strides, dilation and groups are not im2col's: the result must still be lax's."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 8, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 4)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NDHWC", "DHWIO", "NDHWC"))
  conv = lowering.conv_general_dilated("im2col")
  for kwargs in (dict(window_strides=(2, 2, 2), feature_group_count=2),
                 dict(window_strides=(1, 1, 1), rhs_dilation=(2, 2, 2), feature_group_count=2)):
    strides = kwargs.pop("window_strides")
    got = conv(x, w, strides, "SAME", dimension_numbers=dn, **kwargs)
    want = jax.lax.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=dn, **kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _primitives(fn, *args) -> set[str]:
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


MODELS = [
    ("mrinet", dict(conv_features=(4, 4, 8, 8, 4), dense_features=8, dropout_rate=0.0,
                    mean_age=50.0, age_scale=15.0)),
    ("mrinet", dict(conv_features=(4, 4, 8, 8, 4), dense_features=8, dropout_rate=0.0,
                    mean_age=50.0, patch_stem=2)),
    ("sfcn_regression", dict(channels=(4, 8, 8, 8, 8, 4), dropout_rate=0.0, mean_age=50.0)),
]


@pytest.mark.parametrize("name,kwargs", MODELS)
def test_models_give_the_same_numbers_under_every_lowering(name, kwargs):
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 32, 32, 32, 2)), jnp.float32)
  xla = models.get_model(name, conv_lowering="xla", **kwargs)
  im2col = models.get_model(name, conv_lowering="im2col", **kwargs)
  variables = xla.init(KEY(0), x[:1])
  # Same parameter tree: a checkpoint trained under one lowering loads under the other.
  assert (jax.tree.structure(im2col.init(KEY(0), x[:1])) == jax.tree.structure(variables))
  np.testing.assert_allclose(np.asarray(im2col.apply(variables, x)),
                             np.asarray(xla.apply(variables, x)), rtol=1e-5, atol=1e-4)
  assert "conv_general_dilated" not in _primitives(lambda v: im2col.apply(v, x), variables)

  def loss(model):
    def f(params):
      out, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.mean((out - jnp.array([30.0, 70.0])) ** 2)
    return f

  g_xla = jax.grad(loss(xla))(variables["params"])
  g_im2col = jax.grad(loss(im2col))(variables["params"])
  # Biases in front of a BatchNorm have a true gradient of 0 (float noise on both sides), so the
  # tolerance is relative to the largest gradient of the model.
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_xla))
  for a, b in zip(jax.tree.leaves(g_im2col), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-4 * scale)


def test_auto_uses_im2col_on_cpu_below_the_patch_budget(monkeypatch):
  assert jax.default_backend() == "cpu"
  name, kwargs = MODELS[0]
  model = models.get_model(name, conv_lowering="auto", **kwargs)
  x = jnp.zeros((1, 32, 32, 32, 1))
  variables = model.init(KEY(0), x)
  assert "conv_general_dilated" not in _primitives(lambda v: model.apply(v, x), variables)
  # conv1's patches: 32^3 voxels x 27 taps x 4 bytes = 3.5 MB; the deeper layers' are smaller.
  monkeypatch.setattr(lowering, "AUTO_PATCH_BYTES", 1 << 20)
  prims = _primitives(lambda v: model.apply(v, x), variables)
  assert "conv_general_dilated" in prims and "dot_general" in prims


def test_relevance_runs_on_xla_convolutions_and_matches():
  """Explanations rebuild the model with one conv per layer; the maps equal the xla model's."""
  name, kwargs = MODELS[0]
  im2col = models.get_model(name, conv_lowering="im2col", **kwargs)
  xla = models.get_model(name, conv_lowering="xla", **kwargs)
  x = jnp.asarray(np.random.default_rng(4).uniform(size=(1, 32, 32, 32, 1)), jnp.float32)
  variables = xla.init(KEY(0), x)
  apply_fn = maps.regression_apply(im2col)
  prims = _primitives(lambda v: apply_fn(v, x), variables)
  assert "conv_general_dilated" in prims
  composite = lrp.composites.EpsilonPlusFlat()
  got = lrp.relevance(apply_fn, variables, x, composite=composite)
  want = lrp.relevance(lambda v, x: xla.apply(v, x), variables, x, composite=composite)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)
  assert lowering.for_relevance(xla) is xla


def test_bad_lowering_is_a_one_line_config_error():
  with pytest.raises(ConfigError, match="conv_lowering"):
    models.get_model("mrinet", conv_lowering="winograd")
  config = config_lib.base_config()
  config.model.conv_lowering = "winograd"
  with pytest.raises(ConfigError, match="model.conv_lowering"):
    config_checks.validate(config)


def test_lowering_is_not_part_of_the_architecture():
  """A checkpoint trained with im2col resumes and predicts under xla (and the reverse)."""
  stored = {"model": "mrinet", "model_kwargs": {"conv_lowering": "im2col", "mean_age": 40.0}}
  checkpoint.check_manifest(stored, {"model": "mrinet",
                                     "model_kwargs": {"conv_lowering": "xla", "mean_age": 41.0}},
                            "ckpt")
  with pytest.raises(ConfigError, match="another architecture"):
    checkpoint.check_manifest(stored, {"model": "mrinet", "model_kwargs": {"dense_features": 8}},
                              "ckpt")


def test_restored_models_use_xla_convolutions_and_predict_with_auto():
  """A workdir's model (what users hand to lrp) has one conv per layer; prediction may not."""
  manifest = {"model": "mrinet", "model_kwargs": {"conv_lowering": "auto", "mean_age": 40.0,
                                                  "conv_features": [4, 4, 8, 8, 4]}}
  model = models.build_model(manifest)
  assert model.conv_lowering == "xla"
  assert lowering.for_inference(model).conv_lowering == "auto"
  assert models.build_model({"model": "mrinet", "model_kwargs": {}}).conv_lowering == "xla"


def test_trainer_compiles_a_step_per_lowering():
  """The lowering is resumable (not in the experiment fingerprint) yet compiles another program:
  the trainer's setup cache must not hand the xla step to an im2col config."""
  from jax_brainage import sharding
  from jax_brainage.train import steps
  setups = {}
  for name in ("xla", "im2col"):
    config = config_lib.base_config()
    config.data.cache = "/unused"
    config.model.conv_features = (4, 4, 8, 8, 4)
    config.model.conv_lowering = name
    setups[name] = steps.build_setup(config, (16, 16, 16), 1, 50.0, 10, sharding.make_mesh())
    assert setups[name].model.conv_lowering == name
  assert setups["xla"] is not setups["im2col"]


def numpy_max_pool(x, window, strides, padding):
  """Float64 max-pooling with argmax routing: returns (pooled, index of each window's winner).

  x `[n, X, Y, Z, C]`; SAME pads with -inf as XLA and Keras do (low side gets the smaller half).
  """
  x = np.asarray(x, np.float64)
  n, *spatial, c = x.shape
  geometry = []
  for size, k, s in zip(spatial, window, strides):
    if padding == "SAME":
      m = -(-size // s)
      lo = max((m - 1) * s + k - size, 0) // 2
    else:
      m, lo = (size - k) // s + 1, 0
    geometry.append((m, lo))
  out = np.full((n, *(m for m, _ in geometry), c), -np.inf)
  winner = np.zeros(out.shape + (3,), np.int64)
  for idx in itertools.product(*(range(m) for m, _ in geometry)):
    starts = [i * s - lo for i, s, (_, lo) in zip(idx, strides, geometry)]
    for tap in itertools.product(*(range(k) for k in window)):
      pos = [a + t for a, t in zip(starts, tap)]
      if any(p < 0 or p >= size for p, size in zip(pos, spatial)):
        continue
      v = x[:, pos[0], pos[1], pos[2], :]
      better = v > out[(slice(None), *idx, slice(None))]
      out[(slice(None), *idx, slice(None))] = np.where(better, v,
                                                       out[(slice(None), *idx, slice(None))])
      winner[(slice(None), *idx, slice(None))] = np.where(
          better[..., None], np.array(pos), winner[(slice(None), *idx, slice(None))])
  return out, winner


POOLS = [((3, 3, 3), (2, 2, 2), "SAME", (2, 7, 6, 5, 3)),
         ((2, 2, 2), (2, 2, 2), "VALID", (1, 5, 7, 4, 2))]


@pytest.mark.parametrize("window,strides,padding,shape", POOLS)
def test_max_pool_and_its_separable_gradient_against_numpy(window, strides, padding, shape):
  """Values equal a direct max; the gradient routes each window's cotangent to its maximum
  (continuous random inputs: every maximum is unique)."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=shape).astype(np.float32)
  want, winner = numpy_max_pool(x, window, strides, padding)
  g = rng.normal(size=want.shape).astype(np.float32)
  want_grad = np.zeros(shape, np.float64)
  for idx in itertools.product(*(range(d) for d in want.shape[:-1])):
    for ch in range(shape[-1]):
      px, py, pz = winner[(*idx, ch)]
      want_grad[idx[0], px, py, pz, ch] += g[(*idx, ch)]
  np.testing.assert_array_equal(
      np.asarray(lowering.separable_max_pool(jnp.asarray(x), window, strides, padding)), want)
  for name in ("im2col", "xla"):
    pool = lambda v: lowering.max_pool(v, window, strides, padding, name)
    out, vjp = jax.vjp(pool, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out), want)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), want_grad, rtol=1e-6,
                               atol=1e-6)


def test_max_pool_gradient_splits_ties_and_keeps_the_forward_primitive():
  """All-equal windows share their cotangent evenly (the total is conserved); the forward pass
  is still one reduce_window_max, the primitive lrp routes winner-take-all."""
  x = jnp.zeros((1, 4, 4, 4, 1))
  g = jnp.ones((1, 2, 2, 2, 1))
  pool = lambda v: lowering.max_pool(v, (2, 2, 2), (2, 2, 2), "VALID", "im2col")
  dx = jax.vjp(pool, x)[1](g)[0]
  np.testing.assert_allclose(np.asarray(dx), np.full(x.shape, 1 / 8), rtol=1e-6)
  prims = _primitives(pool, x)
  assert "reduce_window_max" in prims and "select_and_scatter_add" not in prims
  grad_prims = lambda name: _primitives(jax.grad(lambda v: jnp.sum(
      lowering.max_pool(v, (2, 2, 2), (2, 2, 2), "VALID", name))), x)
  assert "select_and_scatter_add" in grad_prims("xla")
  assert "select_and_scatter_add" not in grad_prims("im2col")
