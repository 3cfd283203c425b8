"""MRInet against the study's numbers, hand-computed sizes and a PyTorch replica (float64)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jax_brainage.errors import ConfigError, DataError
from jax_brainage.models import MRInet, get_model, num_parameters, predicted_age

# Keys of the 'rbg' PRNG: XLA on CPU compiles threefry programs slowly (seconds each).
KEY = lambda seed: jax.random.key(seed, impl="rbg")


def random_params(model, x_shape, seed=0, scale=1.0):
  """Parameters drawn with numpy (no PRNG compile): N(0, scale^2 / fan_in) kernels and biases."""
  shapes = jax.eval_shape(lambda: model.init(KEY(0), jnp.zeros(x_shape)))["params"]
  rng = np.random.default_rng(seed)

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else leaf.shape[0]
    return jnp.asarray(rng.normal(0, scale / np.sqrt(fan_in), leaf.shape), jnp.float32)

  return jax.tree.map(draw, shapes)


# The study's layer table: (features, kernel side); each conv is followed by max-pool 3/2 SAME.
TABLE = [(16, 3), (16, 3), (32, 3), (64, 3), (32, 1)]


def analytic_count(side: tuple[int, int, int], channels: int = 1) -> int:
  total, c_in = 0, channels
  for c, k in TABLE:
    total += k**3 * c_in * c + c
    c_in = c
  flat = c_in
  for s in side:
    for _ in TABLE:
      s = math.ceil(s / 2)  # TF "SAME" pooling with stride 2
    flat *= s
  return total + flat * 64 + 64 + 64 + 1


@pytest.mark.parametrize("side,expected", [(198, 781_265), (98, 209_873)])
def test_parameter_count_matches_the_study(side, expected):
  shape = (1, side, side, side, 1)
  assert analytic_count((side,) * 3) == expected
  assert num_parameters(MRInet(), shape) == expected


def test_parameter_count_with_three_sequences():
  # Only conv1 grows: 27 weights per extra channel and output feature.
  assert num_parameters(MRInet(), (1, 98, 98, 98, 3)) == 209_873 + 2 * 27 * 16
  assert analytic_count((98,) * 3, channels=3) == 209_873 + 2 * 27 * 16


def test_layer_names_and_shapes_at_anisotropic_odd_size():
  # Hand computation of SAME 3/2 pooling, ceil(n / 2) five times:
  # 33 -> 17 -> 9 -> 5 -> 3 -> 2 ; 20 -> 10 -> 5 -> 3 -> 2 -> 1 ; 27 -> 14 -> 7 -> 4 -> 2 -> 1.
  shapes = jax.eval_shape(
      lambda: MRInet().init(KEY(0), jnp.zeros((2, 33, 20, 27, 2))))["params"]
  assert sorted(shapes) == ["age_head", "conv1", "conv2", "conv3", "conv4", "conv5", "dense1"]
  assert shapes["conv1"]["kernel"].shape == (3, 3, 3, 2, 16)
  assert shapes["conv5"]["kernel"].shape == (1, 1, 1, 64, 32)
  assert shapes["dense1"]["kernel"].shape == (2 * 1 * 1 * 32, 64)
  assert shapes["age_head"]["kernel"].shape == (64, 1)


def _tf_same_pool(x: torch.Tensor) -> torch.Tensor:
  """Max-pool 3^3 stride 2 with TensorFlow's SAME padding (extra padding goes after)."""
  pads = []
  for n in reversed(x.shape[2:]):  # F.pad takes the last dimension first
    out = -(-n // 2)
    total = max((out - 1) * 2 + 3 - n, 0)
    pads += [total // 2, total - total // 2]
  return F.max_pool3d(F.pad(x, pads, value=-math.inf), 3, stride=2)


def _torch_mrinet(params, x: np.ndarray, patch_stem: int = 0) -> np.ndarray:
  """Keras MRInet re-typed in PyTorch (NCDHW, float64), weights taken from the flax tree; with
  `patch_stem` p, conv1 is a p^3 conv of stride p (TF SAME: padded after) and has no pool."""
  t = lambda a: torch.tensor(np.asarray(a, np.float64))
  h = t(x).permute(0, 4, 1, 2, 3)
  for i in range(1, 6):
    p = params[f"conv{i}"]
    kernel = t(p["kernel"]).permute(4, 3, 0, 1, 2)
    if i == 1 and patch_stem:
      pads = []
      for n in reversed(h.shape[2:]):
        pads += [0, -n % patch_stem]
      h = F.relu(F.conv3d(F.pad(h, pads), kernel, t(p["bias"]), stride=patch_stem))
      continue
    h = F.conv3d(h, kernel, t(p["bias"]), padding="same")
    h = _tf_same_pool(F.relu(h))
  h = h.permute(0, 2, 3, 4, 1).flatten(1)  # Keras flattens channels-last
  h = F.relu(h @ t(params["dense1"]["kernel"]) + t(params["dense1"]["bias"]))
  return (h @ t(params["age_head"]["kernel"]) + t(params["age_head"]["bias"]))[:, 0].numpy()


def test_forward_matches_pytorch_replica():
  model = MRInet(mean_age=47.0)
  x = np.random.default_rng(1).uniform(size=(2, 33, 20, 27, 2)).astype(np.float32)
  # Random biases too, so that bias handling and padding placement are both exercised.
  params = random_params(model, x.shape, seed=2)
  y = jax.jit(model.apply)({"params": params}, x)
  assert y.shape == (2,) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), _torch_mrinet(params, np.asarray(x)),
                             rtol=1e-5, atol=1e-4)


def test_patch_stem_matches_pytorch_replica_on_block_1s_grid():
  model = MRInet(mean_age=47.0, conv_features=(8, 16, 32, 64, 32), patch_stem=2)
  x = np.random.default_rng(3).uniform(size=(2, 33, 20, 27, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda: model.init(KEY(0), jnp.zeros(x.shape)))["params"]
  assert shapes["conv1"]["kernel"].shape == (2, 2, 2, 3, 8)
  # ceil(n / 2) as block 1's pool, then four pools: 33 -> 17 -> 9 -> 5 -> 3 -> 2 etc.
  assert shapes["dense1"]["kernel"].shape == (2 * 1 * 1 * 32, 64)
  params = random_params(model, x.shape, seed=4)
  y = jax.jit(model.apply)({"params": params}, x)
  np.testing.assert_allclose(np.asarray(y), _torch_mrinet(params, x, patch_stem=2),
                             rtol=1e-5, atol=1e-4)
  with pytest.raises(ConfigError, match="patch_stem"):
    MRInet(patch_stem=1)


def test_output_bias_is_mean_age():
  model = MRInet(mean_age=52.3)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 32, 32, 32, 1)), jnp.float32)
  params = jax.jit(model.init)(KEY(1), x)["params"]
  assert all(float(jnp.abs(params[f"conv{i}"]["bias"]).max()) == 0 for i in range(1, 6))
  assert float(params["age_head"]["bias"][0]) == pytest.approx(52.3)
  # Zero input through ReLU layers with zero biases: only the output bias remains.
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply({"params": params}, jnp.zeros_like(x)), 52.3, rtol=1e-6)
  # Zero weights: any input gives the output bias.
  zeroed = dict(params, age_head=dict(params["age_head"],
                                      kernel=jnp.zeros_like(params["age_head"]["kernel"])))
  np.testing.assert_allclose(apply({"params": zeroed}, x), 52.3, rtol=1e-6)


def test_dropout_only_in_training():
  model = MRInet()
  x = np.random.default_rng(0).uniform(size=(8, 32, 32, 32, 1)).astype(np.float32)
  variables = {"params": random_params(model, x.shape, seed=1)}

  def run(x, rngs, train):
    _, state = model.apply(variables, x, train=train, rngs=rngs,
                           capture_intermediates=lambda m, _: m.name == "dropout")
    return state["intermediates"]["dropout"]["__call__"][0]

  run = jax.jit(run, static_argnums=2)
  dropout_output = lambda train, key=None: np.asarray(
      run(x, {"dropout": key} if key is not None else {}, train))
  features = dropout_output(False)
  np.testing.assert_array_equal(features, dropout_output(False, KEY(5)))
  dropped = dropout_output(True, KEY(5))
  kept = dropped != 0
  # Inverted dropout at rate 0.5: kept units are scaled by 1 / (1 - 0.5).
  np.testing.assert_allclose(dropped[kept], 2 * features[kept], rtol=1e-6)
  active = features != 0
  assert active.sum() > 100
  assert 0.35 < (~kept[active]).mean() < 0.65
  assert not np.array_equal(dropped, dropout_output(True, KEY(6)))
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)  # training without a dropout key must fail loudly


def test_bf16_compute_keeps_float32_params_and_output():
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 32, 1)).astype(np.float32)
  f32 = MRInet(mean_age=50.0)
  bf16 = MRInet(mean_age=50.0, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: bf16.init(KEY(1), jnp.zeros(x.shape)))["params"]
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(shapes))
  params = random_params(f32, x.shape, seed=1, scale=2.0)
  y32 = jax.jit(f32.apply)({"params": params}, x)
  y16 = jax.jit(bf16.apply)({"params": params}, x)
  assert y16.dtype == jnp.float32
  spread = float(jnp.max(jnp.abs(y32 - 50.0)))
  assert spread > 0.05
  np.testing.assert_allclose(y16, y32, atol=0.05 * spread)


def test_registry_and_predicted_age():
  model = get_model("mrinet", mean_age=40.0, dtype="bfloat16", conv_features=[8, 8, 8, 8, 8])
  assert isinstance(model, MRInet) and model.dtype == jnp.bfloat16
  assert model.conv_features == (8, 8, 8, 8, 8)
  ages = jnp.array([40.5, 61.0])
  np.testing.assert_array_equal(predicted_age(model, ages), ages)
  with pytest.raises(ConfigError, match="mrinet2"):
    get_model("mrinet2")
  with pytest.raises(ConfigError, match="mean_ag"):
    get_model("mrinet", mean_ag=40.0)
  with pytest.raises(ConfigError, match="dtype"):
    get_model("mrinet", dtype="float8")
  with pytest.raises(ConfigError, match="conv_kernels"):
    get_model("mrinet", conv_features=[8, 8])


def test_bad_input_rank_is_a_one_line_error():
  with pytest.raises(DataError, match=r"\[batch, x, y, z, channel\]"):
    jax.eval_shape(lambda: MRInet().init(KEY(0), jnp.zeros((32, 32, 32, 1))))


def test_age_scale_multiplies_the_head_and_keeps_the_study_network():
  """age = age_scale * (w . h + b): checked against the PyTorch replica times the scale and
  against hand-set head values; the parameter count is the study's."""
  x = np.random.default_rng(3).uniform(size=(2, 33, 20, 27, 1)).astype(np.float32)
  plain, scaled = MRInet(mean_age=47.0), MRInet(mean_age=47.0, age_scale=12.5)
  assert num_parameters(scaled, (1, 98, 98, 98, 1)) == 209_873
  params = random_params(plain, x.shape, seed=4)
  y = jax.jit(scaled.apply)({"params": params}, x)
  np.testing.assert_allclose(np.asarray(y), 12.5 * _torch_mrinet(params, x), rtol=1e-5,
                             atol=1e-3)
  # Zero head kernel: every input gives 12.5 * b.
  head = dict(kernel=jnp.zeros_like(params["age_head"]["kernel"]), bias=jnp.array([3.0]))
  y = jax.jit(scaled.apply)({"params": dict(params, age_head=head)}, x)
  np.testing.assert_allclose(np.asarray(y), [37.5, 37.5], rtol=1e-6)


def test_age_scale_starts_at_the_mean_age():
  model = MRInet(mean_age=52.3, age_scale=18.5, conv_features=(4, 4, 4, 4, 4),
                 dense_features=8)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 32, 1)), jnp.float32)
  params = jax.jit(model.init)(KEY(1), x)["params"]
  assert float(params["age_head"]["bias"][0]) == pytest.approx(52.3 / 18.5)
  # Zero input, zero hidden biases: only the bias survives, scaled back to years.
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, jnp.zeros_like(x)), 52.3,
                             rtol=1e-6)
  for bad in (0.0, -3.0, float("nan")):
    with pytest.raises(ConfigError, match="age_scale"):
      MRInet(age_scale=bad)
  assert get_model("mrinet", age_scale=7.0).age_scale == 7.0


def test_lrp_through_the_age_scale_is_gradient_times_input():
  """LRP-0 on a ReLU / max-pool network without biases equals gradient x input (the scale is a
  constant multiply that passes relevance) and conserves the output exactly."""
  import lrp

  model = MRInet(mean_age=0.0, age_scale=9.0, conv_features=(4, 4, 4, 4, 4), dense_features=8)
  x = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 32, 32, 32, 1)), jnp.float32)
  params = random_params(model, x.shape, seed=6, scale=2.0)
  params = jax.tree.map(lambda p: jnp.zeros_like(p) if p.ndim == 1 else p, params)
  variables = {"params": params}
  relevance = jax.jit(lambda v, x: lrp.relevance(
      model.apply, v, x, composite=lrp.composites.EpsilonAll(epsilon=0.0, stabilizer=1e-12)))(
          variables, x)
  grad = jax.grad(lambda x: jnp.sum(model.apply(variables, x)))(x)
  output = np.asarray(model.apply(variables, x), np.float64)
  assert np.all(np.abs(output) > 1e-3)
  np.testing.assert_allclose(np.asarray(relevance), np.asarray(grad * x), rtol=1e-3,
                             atol=1e-5 * np.abs(output).max())
  np.testing.assert_allclose(np.asarray(relevance, np.float64).sum((1, 2, 3, 4)), output,
                             rtol=1e-3)


def test_flip_average_is_the_mean_over_the_mirror_at_inference_only():
  """Against the plain network on the volume and on its numpy mirror (axis x); training passes
  are the plain network's; the parameters are the same."""
  kwargs = dict(mean_age=47.0, conv_features=(4, 4, 8, 8, 4), dense_features=8, dropout_rate=0.0)
  plain, tta = MRInet(**kwargs), MRInet(flip_average=True, **kwargs)
  x = np.random.default_rng(7).uniform(size=(3, 20, 18, 16, 2)).astype(np.float32)
  params = random_params(plain, x.shape, seed=8)
  assert (jax.tree.structure(jax.eval_shape(lambda: tta.init(KEY(0), x))["params"])
          == jax.tree.structure(params))
  v = {"params": params}
  mirrored = np.ascontiguousarray(x[:, ::-1])
  want = 0.5 * (np.asarray(plain.apply(v, x), np.float64)
                + np.asarray(plain.apply(v, mirrored), np.float64))
  assert np.abs(np.asarray(plain.apply(v, x)) - np.asarray(plain.apply(v, mirrored))).min() > 1e-4
  np.testing.assert_allclose(np.asarray(jax.jit(tta.apply)(v, x)), want, rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(np.asarray(tta.apply(v, x, train=True)),
                             np.asarray(plain.apply(v, x)), rtol=1e-6)


def test_lrp_of_the_flip_average_is_the_mean_of_both_passes_maps():
  """The sum rule gives each pass relevance = half its age, so the map is the mean of the plain
  network's map of the volume and its map of the mirror, mirrored back (LRP-epsilon, the
  study's alpha2-beta1, and a ZBox first layer: every pass sees `[batch, ...]` bounds). In
  float64: alpha-beta's float32 cancellation alone differs by ~0.3%."""
  import lrp

  with jax.enable_x64(True):
    kwargs = dict(mean_age=40.0, conv_features=(4, 4, 4, 4, 4), dense_features=8,
                  dropout_rate=0.0, dtype=jnp.float64, param_dtype=jnp.float64)
    plain, tta = MRInet(**kwargs), MRInet(flip_average=True, **kwargs)
    x = jnp.asarray(np.random.default_rng(9).uniform(size=(2, 32, 24, 16, 1)), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          random_params(plain, x.shape, seed=10))
    variables = {"params": params}
    composites = [lrp.composites.EpsilonAll(epsilon=1e-6),
                  lrp.composites.EpsilonAlpha2Beta1(),
                  lrp.composites.EpsilonGammaBox(low=0.0, high=1.0)]
    for composite in composites:
      explain = jax.jit(lambda model, v, x: lrp.relevance(model.apply, v, x,
                                                          composite=composite),
                        static_argnums=0)
      got = np.asarray(explain(tta, variables, x))
      own = np.asarray(explain(plain, variables, x))
      mirror = np.asarray(explain(plain, variables, jnp.flip(x, axis=1)))[:, ::-1]
      want = 0.5 * (own + mirror)
      assert np.abs(own - mirror).max() > 0.1 * np.abs(want).max()  # the passes differ
      assert np.linalg.norm(got - want) < 1e-5 * np.linalg.norm(want), repr(composite)
