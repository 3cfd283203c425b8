"""The 3D ViT (models/vit.py): parameter count, a float64 numpy replica of the forward pass,
determinism, the 3D sine-cosine embedding, one-line errors, training through the trainer, and
its explanation with lrp's transformer composites (AttnLRP, CP-LRP): every piece is found as a
rule site, CP-LRP conserves the output where it promises to (no biases), the flip average is
explained as the mean of its two passes, and the trained model's maps come through
`explain.maps` (the rules themselves are checked against LXT in tests/lrp/test_lxt.py)."""

from __future__ import annotations

import math

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import lrp
from jax_brainage import models
from jax_brainage.explain import maps
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.models import vit as vit_lib
from jax_brainage.train import artifact, experiment
from jax_brainage.train import config as config_lib
from jax_brainage.train import config_checks
from jax_brainage.train import config_loading
from jax_brainage.train import data as data_lib
from tests.train.conftest import blob_cohort, tiny_config

TINY = dict(mean_age=50.0, age_scale=7.0, patch_size=4, width=12, depth=2, num_heads=3,
            mlp_dim=20, dense_features=8)


def _tiny(**kw):
  return models.get_model("vit", **{**TINY, **kw})


def _init(model, shape, seed=0):
  return model.init(jax.random.key(seed), jnp.zeros(shape, jnp.float32))


# ---------------------------------------------------------------------------------------------
# A float64 numpy replica written from the architecture's definition (ViT, pre-norm).


def _layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _replica(params, x, model, pos=None):
  """Predicted age `[batch]` of the ViT with `params` on x `[batch, X, Y, Z, C]` (float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, s = x.shape[0], model.patch_size
  grid = [-(-n // s) for n in x.shape[1:4]]
  # SAME padding (TF's, as lax computes it): g * s - n zeros per axis, half (rounded down)
  # before the volume and the rest after it.
  lo = [(g * s - n) // 2 for g, n in zip(grid, x.shape[1:4])]
  padded = np.zeros((b, *(g * s for g in grid), x.shape[-1]))
  padded[:, lo[0]:lo[0] + x.shape[1], lo[1]:lo[1] + x.shape[2], lo[2]:lo[2] + x.shape[3]] = x
  patches = padded.reshape(b, grid[0], s, grid[1], s, grid[2], s, -1)
  patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, s ** 3 * x.shape[-1])
  kernel = p["patch_embed"]["kernel"].reshape(-1, model.width)  # [s, s, s, C, W] -> rows
  h = patches @ kernel + p["patch_embed"]["bias"]
  pos = p["pos_embed"] if pos is None else pos
  h = h + pos.reshape(-1, model.width)
  hd = model.width // model.num_heads
  for i in range(1, model.depth + 1):
    blk = p[f"block{i}"]
    a = _layer_norm(h, blk["norm1"])
    q, k, v = (np.einsum("btw,whd->bthd", a, blk["attn"][n]["kernel"]) + blk["attn"][n]["bias"]
               for n in ("query", "key", "value"))
    att = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd))
    o = np.einsum("bhqk,bkhd->bqhd", att, v)
    h = h + np.einsum("bqhd,hdw->bqw", o, blk["attn"]["out"]["kernel"]) + blk["attn"]["out"]["bias"]
    a = _layer_norm(h, blk["norm2"])
    u = a @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"]
    u = 0.5 * u * (1 + erf(u / math.sqrt(2)))  # exact GELU
    h = h + u @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
  h = _layer_norm(h, p["norm"]).mean(1)
  h = np.maximum(h @ p["dense1"]["kernel"] + p["dense1"]["bias"], 0)
  return (h @ p["age_head"]["kernel"] + p["age_head"]["bias"])[:, 0] * model.age_scale


@pytest.mark.parametrize("shape", [(2, 16, 20, 16, 2), (2, 14, 17, 13, 1)],
                         ids=["divisible", "padded"])
def test_forward_equals_a_numpy_replica(shape):
  model = _tiny()
  variables = _init(model, shape)
  x = jax.random.normal(jax.random.key(1), shape)
  out = model.apply(variables, x)
  assert out.shape == (shape[0],) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _replica(variables["params"], x, model), rtol=1e-5, atol=1e-4)
  grid = vit_lib.patch_grid(shape[1:4], 4)
  assert variables["params"]["pos_embed"].shape == (*grid, 12)


def test_parameter_count_matches_the_architecture():
  """Counted by hand: patch projection, positions, per block 2 LN + q, k, v, out + MLP, the
  final LN and MRInet's head."""
  w, m, c, p, d, hidden = 12, 20, 3, 4, 2, 8
  grid = vit_lib.patch_grid((16, 20, 16), p)
  block = 2 * 2 * w + 4 * (w * w + w) + (w * m + m) + (m * w + w)
  expected = (p ** 3 * c * w + w) + math.prod(grid) * w + d * block + 2 * w + (w * hidden
                                                                               + hidden) + hidden + 1
  assert models.num_parameters(_tiny(), (1, 16, 20, 16, c)) == expected


def test_flip_average_is_the_mean_over_the_mirror_and_train_mode_is_one_pass():
  model = _tiny(flip_average=True)
  shape = (2, 16, 16, 16, 1)
  variables = _init(model, shape)
  x = jax.random.normal(jax.random.key(2), shape)
  plain = _replica(variables["params"], x, model)
  mirror = _replica(variables["params"], np.flip(np.asarray(x), axis=1), model)
  np.testing.assert_allclose(model.apply(variables, x), 0.5 * (plain + mirror), rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_allclose(model.apply(variables, x, train=True), plain, rtol=1e-5, atol=1e-4)


def test_sincos_embedding_is_the_3d_sine_cosine_formula():
  grid, width = (3, 4, 2), 12
  e = vit_lib.sincos_embedding(grid, width)
  assert e.shape == (*grid, width) and e.dtype == np.float32
  n = width // 6
  for (i, j, k) in [(0, 0, 0), (2, 3, 1), (1, 2, 0)]:
    want = []
    for c in (i, j, k):
      ang = c / 10000.0 ** (np.arange(n) / n)
      want += [np.sin(ang), np.cos(ang)]
    np.testing.assert_allclose(e[i, j, k], np.concatenate(want), rtol=1e-6)
  model = _tiny(pos_embedding="sincos")
  shape = (1, 16, 16, 8, 1)
  variables = _init(model, shape)
  assert "pos_embed" not in variables["params"]
  x = jax.random.normal(jax.random.key(3), shape)
  pos = vit_lib.sincos_embedding(vit_lib.patch_grid(shape[1:4], 4), 12).astype(np.float64)
  np.testing.assert_allclose(model.apply(variables, x),
                             _replica(variables["params"], x, model, pos=pos), rtol=1e-5,
                             atol=1e-4)


def test_same_seed_same_numbers_and_jit_agrees():
  model = _tiny(conv_lowering="im2col")
  shape = (3, 16, 16, 16, 1)
  a, b = _init(model, shape, seed=4), _init(model, shape, seed=4)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = _init(model, shape, seed=5)
  assert not np.allclose(a["params"]["patch_embed"]["kernel"], c["params"]["patch_embed"]["kernel"])
  x = jax.random.normal(jax.random.key(6), shape)
  np.testing.assert_array_equal(model.apply(a, x), model.apply(a, x))
  # The im2col lowering (space-to-depth matmul) and XLA's conv compute the same embedding.
  xla = model.clone(conv_lowering="xla")
  np.testing.assert_allclose(jax.jit(model.apply)(a, x), xla.apply(a, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(width=10, num_heads=3), r"ViT: width 10 is not a multiple of num_heads 3"),
    (dict(pos_embedding="rope"), r"ViT: pos_embedding must be one of"),
    (dict(pos_embedding="sincos", width=16, num_heads=4), r"sincos .* divisible by 6"),
    (dict(depth=0), r"ViT: depth must be a positive integer"),
    (dict(dropout_rate=1.0), r"ViT: dropout_rate must be in \[0, 1\)"),
    (dict(conv_lowering="fft"), r"ViT: conv_lowering must be one of"),
])
def test_bad_fields_are_one_line_config_errors(kw, match):
  with pytest.raises(ConfigError, match=match) as info:
    _tiny(**kw)
  assert "\n" not in str(info.value)


def test_input_of_the_wrong_rank_is_a_data_error():
  model = _tiny()
  with pytest.raises(DataError, match=r"ViT: input must be \[batch, x, y, z, channel\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16)))


def test_config_keys_reach_the_model_and_bad_values_are_refused():
  c = config_lib.base_config()
  c.data.cache = "/unused"
  for key, value in (("model.name", "vit"), ("model.vit.patch_size", 4), ("model.vit.width", 12),
                     ("model.vit.num_heads", 3), ("model.vit.depth", 1),
                     ("model.vit.pos_embedding", "sincos"), ("model.flip_average", True),
                     ("model.scale_output", True)):
    config_loading.set_key(c, key, value)
  config_checks.validate(c)
  model = models.get_model("vit", **config_lib.model_kwargs(c, 40.0, 9.0))
  assert (model.patch_size, model.width, model.num_heads, model.depth, model.pos_embedding,
          model.flip_average, model.age_scale, model.mean_age) == (4, 12, 3, 1, "sincos", True,
                                                                    9.0, 40.0)
  config_loading.set_key(c, "model.vit.num_heads", 5)
  with pytest.raises(ConfigError, match=r"config.model.vit.width=12: must be a multiple"):
    config_checks.validate(c)


# ---------------------------------------------------------------------------------------------
# The trainer trains it like any other model (nothing special-cased).


@pytest.mark.slow  # compiles training, evaluation, prediction and two relevance maps
def test_tiny_vit_trains_through_the_experiment_and_loads_as_an_ensemble(tmp_path):
  images, ages = blob_cohort()
  data = data_lib.from_arrays(images, ages, ("T1w",), split_seed=0)
  config = tiny_config(num_epochs=3)
  for key, value in (("model.name", "vit"), ("model.vit.patch_size", 4), ("model.vit.width", 12),
                     ("model.vit.num_heads", 2), ("model.vit.depth", 1),
                     ("model.vit.mlp_dim", 24), ("model.scale_output", True),
                     ("optimizer.learning_rate", 3e-3), ("optimizer.name", "adamw"),
                     ("optimizer.grad_clip_norm", 1.0)):
    config_loading.set_key(config, key, value)
  config_checks.validate(config)
  result = experiment.train(config, tmp_path, quiet=True, data=data)
  assert result["stopped"] == "done" and result["step"] == 12
  assert all(np.isfinite(h["val_loss"]) for h in result["history"])
  # Better than always predicting the mean training age (numpy baseline) after 12 steps.
  baseline = np.mean(np.abs(ages[data.split.val] - ages[data.split.train].mean()))
  assert result["best_val_mae"] < baseline
  # Restored as any trained model: an ensemble of one whose module is the ViT, predicting what
  # the replica computes from the stored parameters.
  (sub,) = artifact.load(tmp_path).subs
  assert isinstance(sub.model, models.ViT) and sub.model.width == 12
  pred = sub.predict(images[:4])
  params = jax.tree.map(lambda a: np.asarray(a[0]), sub.variables)["params"]
  np.testing.assert_allclose(pred[:, 0], _replica(params, images[:4] / 255.0, sub.model),
                             rtol=1e-4, atol=1e-3)
  # The one relevance path (explain.maps) explains it with the transformer composites; CP-LRP's
  # relevance equals a direct lrp call on the stored parameters (maps scales uint8 by 1/255).
  model = artifact.load(tmp_path)
  for method in ("attn_lrp", "cp_lrp"):
    r = maps.relevance(model, images[:2], method, batch_size=2)
    assert r.shape == (2, 16, 16, 16, 1) and np.all(np.isfinite(r))
  direct = lrp.relevance(sub.model.apply, jax.tree.map(lambda a: a[0], sub.variables),
                         jnp.asarray(images[:2] / 255.0, jnp.float32), lrp.composites.CPLRP())
  np.testing.assert_allclose(r, direct, rtol=1e-4, atol=1e-5 * float(np.abs(direct).max()))


# ---------------------------------------------------------------------------------------------
# Explained with the transformer composites.


def _x64_vit(**kw):
  return _tiny(dtype=jnp.float64, param_dtype=jnp.float64, **kw)


def test_every_piece_of_the_vit_is_a_rule_site_of_its_kind():
  """Per block: q, k, v, out, fc1, fc2 dense; the two attention matmuls bilinear; one softmax;
  two LayerNorms; two residual sums. Plus the patch embedding (conv, with the position
  embedding folded in as a bias), the final LayerNorm, the token mean and the head's 2 dense."""
  model, shape = _tiny(), (1, 16, 16, 12, 2)
  variables = _init(model, shape)
  sites = lrp.describe(model.apply, variables, jnp.ones(shape), lrp.composites.get("attnlrp"))
  kinds = collections.Counter(kind for _, kind, _, _ in sites)
  depth = TINY["depth"]
  assert {k: kinds[k] for k in ("conv", "dense", "bilinear", "softmax", "normalization",
                                "residual", "sum")} == {
      "conv": 1, "dense": 6 * depth + 2, "bilinear": 2 * depth, "softmax": depth,
      "normalization": 2 * depth + 1, "residual": 2 * depth, "sum": 1}
  rules = {(name, kind): str(rule) for name, kind, _, rule in sites}
  assert rules[("ViT/block1/attn", "softmax")].startswith("SoftmaxDTD")
  assert rules[("ViT/block2/norm1", "normalization")].startswith("ConstantScale")
  assert rules[("ViT/block1/attn/bqhd,bkhd->bhqk", "bilinear")].startswith("Uniform")


def test_cp_lrp_conserves_the_output_without_biases_and_attn_lrp_is_finite():
  """CP-LRP holds attention weights and LayerNorm scales constant, so with every bias (and the
  position embedding) zero and epsilon 0 the network is a linear map of x for fixed gates and
  the input relevance sums to the predicted age (float64); AttnLRP's softmax rule is not
  conservative, its maps are finite."""
  with jax.enable_x64(True):
    model, shape = _x64_vit(), (2, 16, 16, 12, 2)
    x = jax.random.normal(jax.random.key(1), shape, jnp.float64)
    variables = _init(model, shape)
    zero = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if any(getattr(k, "key", "") in ("bias", "pos_embed")
                                                  for k in path) else a, variables)
    cp = lrp.composites.get("cp-lrp", epsilon=0.0, stabilizer=0.0)
    e = lrp.explain(model.apply, zero, x, cp)
    np.testing.assert_allclose(np.sum(np.asarray(e.relevance), axis=(1, 2, 3, 4)),
                               _replica(zero["params"], x, model), rtol=1e-6)
    for params in (variables, zero):
      r = lrp.relevance(model.apply, params, x, lrp.composites.get("attnlrp"))
      assert r.shape == shape and np.all(np.isfinite(r)) and np.any(np.asarray(r) != 0)


def test_flip_average_relevance_is_the_mean_of_the_two_passes():
  """The mean of the volume's and its mirror's age splits the relevance in proportion to the two
  halves (sum rule): R = R_plain(x) / 2 + mirror(R_plain(mirror x)) / 2."""
  with jax.enable_x64(True):
    shape = (2, 16, 16, 12, 1)
    x = jax.random.normal(jax.random.key(2), shape, jnp.float64)
    flip, plain = _x64_vit(flip_average=True), _x64_vit()
    variables = _init(plain, shape)
    c = lrp.composites.get("attnlrp", epsilon=1e-12, stabilizer=1e-12)
    both = lrp.relevance(flip.apply, variables, x, c)
    one = lrp.relevance(plain.apply, variables, x, c)
    mirrored = jnp.flip(lrp.relevance(plain.apply, variables, jnp.flip(x, axis=1), c), axis=1)
    np.testing.assert_allclose(both, 0.5 * one + 0.5 * mirrored, rtol=1e-6, atol=1e-9)
