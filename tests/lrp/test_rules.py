"""Every rule against a dense-matrix replica of the layer (numpy float64, textbook formulas)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrp
from lrp import rules
from tests.lrp import replica

LAYERS = {
    "dense": lambda bias: nn.Dense(5, use_bias=bias),
    "conv3d": lambda bias: nn.Conv(3, (3, 3, 3), strides=(2, 1, 1), padding="SAME", use_bias=bias),
    "conv_transpose3d": lambda bias: nn.ConvTranspose(2, (2, 3, 2), strides=(2, 1, 2),
                                                      use_bias=bias),
    "conv1d_grouped_dilated": lambda bias: nn.Conv(4, (3,), kernel_dilation=(2,), strides=(2,),
                                                   feature_group_count=2, padding=((2, 1),),
                                                   use_bias=bias),
}
SHAPES = {"dense": (2, 7), "conv3d": (2, 4, 3, 3, 2), "conv_transpose3d": (2, 2, 3, 2, 2),
          "conv1d_grouped_dilated": (2, 9, 4)}


class OneLayer(nn.Module):
  """[optional ReLU] -> layer; the ReLU makes the layer's input provably >= 0 (cost shortcut)."""
  kind: str
  bias: bool
  relu_first: bool

  @nn.compact
  def __call__(self, x):
    if self.relu_first:
      x = nn.relu(x)
    return LAYERS[self.kind](self.bias)(x)


def _setup(kind, bias, relu_first, seed):
  model = OneLayer(kind, bias, relu_first)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, SHAPES[kind], jnp.float64)
  variables = model.init(k2, x)
  if bias:  # flax initialises biases to zero: make them matter
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.random.normal(k3, a.shape, a.dtype) * 0.5 if "bias" in str(p) else a,
        variables)
  y = model.apply(variables, x)
  R = np.asarray(jax.random.normal(jax.random.fold_in(k3, 1), y.shape, jnp.float64))
  return model, variables, x, R


def _dense_replica(model, variables, x, ones_kernel=False):
  """(M [out, in], b [out]) of the layer on one sample (no ReLU), from the jacobian."""
  layer_vars = jax.tree.map(lambda a: a, variables)
  params = dict(layer_vars["params"])
  name = next(iter(params))
  lp = dict(params[name])
  if ones_kernel:
    lp["kernel"] = jnp.ones_like(lp["kernel"])
  lp_nob = dict(lp)
  if "bias" in lp_nob:
    lp_nob["bias"] = jnp.zeros_like(lp_nob["bias"])
  plain = OneLayer(model.kind, model.bias, False)
  x0 = x[0]
  # Columns of M: the bias-free layer applied to the standard basis (one batched call).
  basis = jnp.eye(x0.size, dtype=x.dtype).reshape((x0.size,) + x0.shape)
  M = np.asarray(plain.apply({"params": {name: lp_nob}}, basis)).reshape(x0.size, -1).T
  fb = plain.apply({"params": {name: lp}}, jnp.zeros_like(x0)[None])[0].reshape(-1)
  return M, np.asarray(fb)


RULES = {
    "epsilon": (lambda: rules.Epsilon(1e-6), lambda M, b, x, R, M1: replica.epsilon(M, b, x, R)),
    "epsilon_big": (lambda: rules.Epsilon(0.3),
                    lambda M, b, x, R, M1: replica.epsilon(M, b, x, R, 0.3)),
    "epsilon_zero_bias": (lambda: rules.Epsilon(1e-6, zero_bias=True),
                          lambda M, b, x, R, M1: replica.epsilon(M, 0 * b, x, R)),
    "zplus": (lambda: rules.ZPlus(), lambda M, b, x, R, M1: replica.zplus(M, b, x, R)),
    "alpha2beta1": (lambda: rules.AlphaBeta(2, 1),
                    lambda M, b, x, R, M1: replica.alpha_beta(M, b, x, R, 2.0, 1.0)),
    "alpha1beta0": (lambda: rules.AlphaBeta(1, 0),
                    lambda M, b, x, R, M1: replica.alpha_beta(M, b, x, R, 1.0, 0.0)),
    "gamma": (lambda: rules.Gamma(0.25), lambda M, b, x, R, M1: replica.gamma(M, b, x, R, 0.25)),
    "zbox": (lambda: rules.ZBox(-2.5, 3.0),
             lambda M, b, x, R, M1: replica.zbox(M, b, x, R, -2.5, 3.0)),
    "wsquare": (lambda: rules.WSquare(), lambda M, b, x, R, M1: replica.wsquare(M, b, x, R)),
    "flat": (lambda: rules.Flat(), lambda M, b, x, R, M1: replica.flat(M1, x, R)),
}


@pytest.mark.parametrize("relu_first", [False, True], ids=["signed_x", "relu_x"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_rule_matches_dense_replica(kind, bias, relu_first):
  with jax.enable_x64(True):
    for seed in (0, 1):
      model, variables, x, R = _setup(kind, bias, relu_first, seed)
      xin = np.asarray(jnp.maximum(x, 0) if relu_first else x)
      M, b = _dense_replica(model, variables, x)
      M1, _ = _dense_replica(model, variables, x, ones_kernel=True)
      for rname, (make_rule, ref) in RULES.items():
        comp = lrp.composites.Composite(layer_map=[("linear", make_rule())])
        got = np.asarray(lrp.relevance(model.apply, variables, x, comp, seed=R))
        for i in range(x.shape[0]):
          want = ref(M, b, xin[i].reshape(-1), R[i].reshape(-1), M1)
          np.testing.assert_allclose(
              got[i].reshape(-1), want, rtol=1e-7, atol=1e-9,
              err_msg=f"{rname} {kind} bias={bias} relu={relu_first} seed={seed}")


def test_alpha_beta_golden_example():
  """lrp.md: x = (1, 1), W = (1, -1), b = -1, R = z = -1."""
  with jax.enable_x64(True):
    variables = {"params": {"Dense_0": {"kernel": jnp.array([[1.0], [-1.0]]),
                                        "bias": jnp.array([-1.0])}}}
    model = nn.Dense(1)
    x = jnp.array([[1.0, 1.0]])
    apply = lambda v, u: model.apply({"params": v["params"]["Dense_0"]}, u)[:, 0]
    for (a, b), want in (((1, 0), [-1.0, 0.0]), ((2, 1), [-2.0, 0.5])):
      comp = lrp.composites.Composite(layer_map=[("dense", rules.AlphaBeta(a, b, stabilizer=0.0))])
      got = lrp.relevance(apply, variables, x, comp)
      np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-12)


def test_alpha_beta_rejects_bad_parameters():
  with pytest.raises(lrp.CompositeError):
    rules.AlphaBeta(2, 2)
  with pytest.raises(lrp.CompositeError):
    rules.AlphaBeta(0.5, -0.5)


def test_stabilizer_truth_table():
  """zennit: [0, -0, 1, -1] with eps 1e-6 -> [1e-6, 1e-6, 1+1e-6, -1-1e-6]; clip and RMS."""
  with jax.enable_x64(True):
    z = jnp.array([[0.0, -0.0, 1.0, -1.0]])
    np.testing.assert_array_equal(np.asarray(lrp.stabilize(z, 1e-6)),
                                  [[1e-6, 1e-6, 1 + 1e-6, -1 - 1e-6]])
    np.testing.assert_array_equal(np.asarray(lrp.stabilize(z, 0.5, clip=True)),
                                  [[0.5, 0.5, 1.0, -1.0]])
    z2 = jnp.array([[3.0, -4.0], [0.0, 0.0]])
    rms = np.sqrt(np.mean(np.asarray(z2) ** 2, axis=1, keepdims=True))
    want = np.asarray(z2) + 0.1 * rms * np.where(np.asarray(z2) >= 0, 1, -1)
    np.testing.assert_allclose(np.asarray(lrp.Stabilizer(0.1, norm_scale=True)(z2)), want)
    assert float(lrp.stabilize(jnp.float32(0.0), 0.0)) == 0.0  # eps 0 is LRP-0: no shift
