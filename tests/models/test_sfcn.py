"""SFCN against Peng et al.'s PyTorch code (re-typed below, float64), analytic counts, numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

from jax_brainage.errors import ConfigError, DataError
from jax_brainage.models import (SFCN, AgeBins, SFCNRegression, get_model, has_batch_stats,
                                 num_parameters, predicted_age, sfcn_variables_from_torch)

# Keys of the 'rbg' PRNG: XLA on CPU compiles threefry programs slowly (seconds each).
KEY = lambda seed: jax.random.key(seed, impl="rbg")
CHANNELS = [32, 64, 128, 256, 256, 64]


class TorchSFCN(tnn.Module):
  """Peng et al.'s reference SFCN (UKBiobank_deep_pretrain, dp_model/model_files/sfcn.py), re-typed
  with its module names: feature_extractor.conv_i = (conv, BN, maxpool, ReLU) for i < 5,
  conv_5 = (conv 1^3, BN, ReLU); classifier = (average_pool, dropout, conv_6); log_softmax."""

  def __init__(self, in_channels=1, output_dim=40, dropout=0.5):
    super().__init__()
    self.feature_extractor = tnn.Sequential()
    c_in = in_channels
    for i, c in enumerate(CHANNELS):
      if i < len(CHANNELS) - 1:
        block = tnn.Sequential(tnn.Conv3d(c_in, c, 3, padding=1), tnn.BatchNorm3d(c),
                               tnn.MaxPool3d(2, stride=2), tnn.ReLU())
      else:
        block = tnn.Sequential(tnn.Conv3d(c_in, c, 1, padding=0), tnn.BatchNorm3d(c), tnn.ReLU())
      self.feature_extractor.add_module(f"conv_{i}", block)
      c_in = c
    self.classifier = tnn.Sequential()
    # The original's AvgPool3d([5, 6, 5]) is global at 160x192x160; global at any size here.
    self.classifier.add_module("average_pool", tnn.AdaptiveAvgPool3d(1))
    self.classifier.add_module("dropout", tnn.Dropout(dropout))
    self.classifier.add_module(f"conv_{len(CHANNELS)}", tnn.Conv3d(c_in, output_dim, 1))

  def forward(self, x):
    return F.log_softmax(self.classifier(self.feature_extractor(x)).flatten(1), dim=1)


def analytic_count(in_channels=1, num_bins=40, regression=False):
  total, c_in = 0, in_channels
  for i, c in enumerate(CHANNELS):
    k3 = 1 if i == len(CHANNELS) - 1 else 27
    total += k3 * c_in * c + c + 2 * c  # conv weights + bias, BN scale + bias
    c_in = c
  return total + (c_in + 1 if regression else c_in * num_bins + num_bins)


def test_parameter_count_matches_reference_code():
  torch_count = sum(p.numel() for p in TorchSFCN(output_dim=40).parameters())
  assert torch_count == analytic_count() == 2_952_936
  model = SFCN(age_range=(42, 82))  # Peng et al.'s UK Biobank bins: 40 x 1 year
  assert num_parameters(model, (1, 160, 192, 160, 1)) == 2_952_936
  assert num_parameters(SFCN(age_range=(15, 85)), (1, 160, 192, 160, 3)) == analytic_count(3, 70)
  assert num_parameters(SFCNRegression(), (1, 160, 192, 160, 1)) == analytic_count(
      regression=True)


def test_layer_names():
  shapes = jax.eval_shape(lambda: SFCN().init(KEY(0), jnp.zeros((1, 32, 32, 32, 1))))
  names = [f"conv{i}" for i in range(1, 7)] + [f"bn{i}" for i in range(1, 7)] + ["bin_head"]
  assert sorted(shapes["params"]) == sorted(names)
  assert sorted(shapes["batch_stats"]) == sorted(f"bn{i}" for i in range(1, 7))


def test_age_bins_centres_by_hand():
  np.testing.assert_array_equal(AgeBins(42, 82).centers, np.arange(42, 82) + 0.5)
  bins = AgeBins(20, 80, 2.5)
  assert bins.num_bins == 24
  np.testing.assert_allclose(bins.centers, 21.25 + 2.5 * np.arange(24))
  assert SFCN(age_range=(20, 80), bin_width=2.5).bins == bins
  for bad in [dict(age_range=(20, 81), bin_width=2.0), dict(age_range=(80, 20)),
              dict(bin_width=0.0)]:
    with pytest.raises(ConfigError, match="age"):
      SFCN(**bad)


def numpy_variables(model, x_shape, seed=1):
  """Random float32 variables drawn with numpy (no PRNG compile); BN scales/variances > 0."""
  shapes = jax.eval_shape(lambda: model.init(KEY(0), jnp.zeros(x_shape)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name or "'var'" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 4
    return rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape).astype(np.float32)

  return jax.tree.map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def setup():
  """A 20-bin SFCN, its variables, an odd-sized 2-channel batch."""
  model = SFCN(age_range=(40, 60), dropout_rate=0.0)
  x = np.random.default_rng(0).uniform(size=(2, 33, 34, 35, 2)).astype(np.float32)
  return model, x, numpy_variables(model, x.shape)


def _to_torch(variables, x, num_bins):
  ref = TorchSFCN(in_channels=x.shape[-1], output_dim=num_bins, dropout=0.0).double()
  t = lambda a: torch.tensor(np.asarray(a, np.float64))
  p, s = variables["params"], variables["batch_stats"]
  blocks = [getattr(ref.feature_extractor, f"conv_{i}") for i in range(6)]
  with torch.no_grad():
    for i, block in enumerate(blocks, start=1):
      conv, bn = block[0], block[1]
      conv.weight.copy_(t(p[f"conv{i}"]["kernel"]).permute(4, 3, 0, 1, 2))
      conv.bias.copy_(t(p[f"conv{i}"]["bias"]))
      bn.weight.copy_(t(p[f"bn{i}"]["scale"]))
      bn.bias.copy_(t(p[f"bn{i}"]["bias"]))
      bn.running_mean.copy_(t(s[f"bn{i}"]["mean"]))
      bn.running_var.copy_(t(s[f"bn{i}"]["var"]))
    ref.classifier.conv_6.weight.copy_(t(p["bin_head"]["kernel"]).permute(4, 3, 0, 1, 2))
    ref.classifier.conv_6.bias.copy_(t(p["bin_head"]["bias"]))
  return ref, [b[1] for b in blocks], t(x).permute(0, 4, 1, 2, 3)


def test_inference_matches_reference_code(setup):
  model, x, variables = setup
  y = jax.jit(model.apply)(variables, x)
  assert y.shape == (2, 20) and y.dtype == jnp.float32
  ref, _, tx = _to_torch(variables, x, 20)
  with torch.no_grad():
    expected = ref.eval()(tx).numpy()
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.exp(np.asarray(y)).sum(-1), 1.0, rtol=1e-5)


def test_training_batch_norm_matches_reference_code(setup):
  model, x, variables = setup
  y, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  ref, bns, tx = _to_torch(variables, x, 20)
  with torch.no_grad():
    expected = ref.train()(tx).numpy()
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
  for i, bn in enumerate(bns, start=1):
    np.testing.assert_allclose(updates["batch_stats"][f"bn{i}"]["mean"],
                               bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
  # PyTorch tracks the unbiased variance, flax the biased one: equal up to n / (n - 1), which is
  # 1 + 1e-5 for bn1 (n = 2 x 33 x 34 x 35 voxels) and matters only for tiny late layers.
  np.testing.assert_allclose(updates["batch_stats"]["bn1"]["var"], bns[0].running_var.numpy(),
                             rtol=1e-4)


def test_expected_age_against_numpy(setup):
  model, _, _ = setup
  logits = np.random.default_rng(3).normal(0, 2, (5, 20))
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = np.exp(log_probs) @ (40.5 + np.arange(20))
  np.testing.assert_allclose(predicted_age(model, jnp.asarray(log_probs, jnp.float32)), expected,
                             rtol=1e-6)
  # A certain prediction gives that bin's centre; the range limits the expectation.
  one_hot = np.full((1, 20), -1e9, np.float32)
  one_hot[0, 7] = 0.0
  np.testing.assert_allclose(predicted_age(model, jnp.asarray(one_hot)), [47.5])


def test_dropout_only_in_training():
  model = SFCN(age_range=(40, 60), channels=(4, 4, 4, 4, 4, 8))  # dropout 0.5
  x = np.random.default_rng(0).uniform(size=(4, 32, 32, 32, 1)).astype(np.float32)
  variables = numpy_variables(model, x.shape)
  run = jax.jit(lambda v, x, key, train: model.apply(
      v, x, train=train, rngs={"dropout": key}, mutable=["batch_stats"])[0], static_argnums=3)
  np.testing.assert_array_equal(run(variables, x, KEY(1), False), run(variables, x, KEY(2), False))
  np.testing.assert_allclose(run(variables, x, KEY(1), False),
                             jax.jit(model.apply)(variables, x), atol=1e-5)
  assert not np.allclose(run(variables, x, KEY(1), True), run(variables, x, KEY(2), True))


def test_bf16_compute_float32_output(setup):
  model, x, variables = setup
  bf16 = SFCN(age_range=(40, 60), dropout_rate=0.0, dtype=jnp.bfloat16)
  y32 = jax.jit(model.apply)(variables, x)
  y16 = jax.jit(bf16.apply)(variables, x)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(np.exp(np.asarray(y16)).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(predicted_age(bf16, y16), predicted_age(model, y32), atol=0.1)
  np.testing.assert_allclose(y16, y32, atol=0.1)


def test_regression_variant():
  model = get_model("sfcn_regression", mean_age=48.5, channels=[4, 4, 4, 4, 4, 4])
  assert has_batch_stats(model) and not has_batch_stats(get_model("mrinet"))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 32, 32, 32, 1)), jnp.float32)
  variables = jax.jit(model.init)(KEY(0), x)
  assert float(variables["params"]["age_head"]["bias"][0]) == pytest.approx(48.5)
  kernel = variables["params"]["age_head"]["kernel"]
  assert kernel.shape == (4, 1)
  zeroed = {**variables, "params": {**variables["params"], "age_head": {
      "kernel": jnp.zeros_like(kernel), "bias": variables["params"]["age_head"]["bias"]}}}
  y = jax.jit(model.apply)(zeroed, x)
  assert y.shape == (3,) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, 48.5, rtol=1e-6)
  np.testing.assert_array_equal(predicted_age(model, y), y)


def test_regression_age_scale_multiplies_the_head():
  """age = age_scale * (w . h + b), b starting at mean_age / age_scale: the scaled model equals
  the plain one with its head weights and bias multiplied by the scale, by hand."""
  kw = dict(channels=[4, 4, 4, 4, 4, 4], dropout_rate=0.0)
  plain = SFCNRegression(mean_age=48.5, **kw)
  scaled = SFCNRegression(mean_age=48.5, age_scale=12.0, **kw)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 32, 32, 32, 1)), jnp.float32)
  variables = jax.jit(scaled.init)(KEY(0), x)
  assert float(variables["params"]["age_head"]["bias"][0]) == pytest.approx(48.5 / 12.0)
  head = variables["params"]["age_head"]
  by_hand = {**variables, "params": {**variables["params"], "age_head": {
      "kernel": head["kernel"] * 12.0, "bias": head["bias"] * 12.0}}}
  np.testing.assert_allclose(scaled.apply(variables, x), plain.apply(by_hand, x), rtol=1e-5)
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ConfigError, match="age_scale"):
      SFCNRegression(age_scale=bad)


def test_bad_input_is_a_one_line_error():
  with pytest.raises(DataError, match="too small"):
    jax.eval_shape(lambda: SFCN().init(KEY(0), jnp.zeros((1, 16, 32, 32, 1))))
  with pytest.raises(DataError, match=r"\[batch, x, y, z, channel\]"):
    jax.eval_shape(lambda: SFCN().init(KEY(0), jnp.zeros((32, 32, 32, 1))))
  with pytest.raises(ConfigError, match="bin_width"):
    get_model("sfcn", bin_widht=2.0)


def test_loads_reference_state_dict():
  torch.manual_seed(0)
  ref = TorchSFCN(in_channels=1, output_dim=20, dropout=0.0)
  with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
    for m in ref.modules():
      if isinstance(m, tnn.BatchNorm3d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
  # As saved from a DataParallel model, like the released UK Biobank weights.
  state = {f"module.{k}": v for k, v in ref.state_dict().items()}
  model = SFCN(age_range=(40, 60))
  variables = sfcn_variables_from_torch(state, model)
  x = np.random.default_rng(0).uniform(size=(2, 33, 34, 35, 1)).astype(np.float32)
  with torch.no_grad():
    expected = ref.double().eval()(torch.tensor(x, dtype=torch.float64).permute(0, 4, 1, 2, 3))
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), expected.numpy(), rtol=1e-4,
                             atol=1e-4)
  with pytest.raises(DataError, match="20 age bins"):
    sfcn_variables_from_torch(state, SFCN(age_range=(42, 82)))
  del state["module.feature_extractor.conv_3.1.running_var"]
  with pytest.raises(DataError, match="conv_3.1.running_var"):
    sfcn_variables_from_torch(state, model)
