"""Conservation (hypothesis), LRP-0 == gradient x input, golden max-pool, Norm sites, no NaN."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import lrp
from lrp import rules
from tests.lrp import nets

LRP0 = lrp.composites.EpsilonAll(epsilon=1e-30, stabilizer=1e-30)  # eps -> 0; 0/0 stays 0


@settings(max_examples=3, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**16), levels=st.integers(2, 4))
def test_conservation_end_to_end_with_ties(seed, levels):
  """Biases zeroed, eps -> 0: sum of input relevance == output, through overlapping 3/2 SAME
  max-pooling of a quantised input (ties), a residual sum and average pooling."""
  with jax.enable_x64(True):
    model = nets.ResidualAvgNet()
    variables, x = nets.init(model, (2, 8, 8, 6, 1), seed, jnp.float64)
    x = jnp.floor(x * levels) / levels  # few grey levels: ties inside the pooling windows
    e = lrp.explain(model.apply, variables, x, LRP0)
    np.testing.assert_allclose(np.asarray(e.relevance.reshape(2, -1).sum(1)), np.asarray(e.output),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(e.delta), 0.0, atol=1e-9 * float(jnp.abs(e.output).max()))


@settings(max_examples=3, derandomize=True, deadline=None)
@given(seed=st.integers(0, 2**16), rule=st.sampled_from(["zplus", "ab21", "ab10", "flat", "eps0"]))
def test_conservation_per_layer(seed, rule):
  """Conservative rules on one conv layer without bias: sum R_in == sum R_out per sample."""
  make = {"zplus": rules.ZPlus(1e-30), "ab21": rules.AlphaBeta(2, 1, 1e-30),
          "ab10": rules.AlphaBeta(1, 0, 1e-30), "flat": rules.Flat(1e-30),
          "eps0": rules.Epsilon(1e-30)}[rule]
  with jax.enable_x64(True):
    model = nn.Conv(2, (3, 3, 3), strides=(2, 2, 2), padding="SAME", use_bias=False)
    variables, x = nets.init(model, (2, 5, 5, 4, 1), seed, jnp.float64)
    R = jax.random.uniform(jax.random.key(seed + 1), model.apply(variables, x).shape, jnp.float64)
    got = lrp.relevance(model.apply, variables, x,
                        lrp.composites.Composite(layer_map=[("conv", make)]), seed=R)
    np.testing.assert_allclose(np.asarray(got.reshape(2, -1).sum(1)),
                               np.asarray(R.reshape(2, -1).sum(1)), rtol=1e-9)


def test_lrp0_equals_gradient_times_input():
  """LRP-0 (seeded with the output) == x * df/dx on a ReLU / max-pool net without biases."""
  with jax.enable_x64(True):
    model = nets.MiniMRInet(bias=False)
    variables, x = nets.init(model, (2, 7, 6, 5, 1), 3, jnp.float64)
    got = lrp.relevance(model.apply, variables, x, LRP0)
    grad = jax.grad(lambda u: model.apply(variables, u).sum())(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x * grad), rtol=1e-9, atol=1e-14)


def test_maxpool_3d_winner_takes_all_golden():
  x = jnp.arange(16.0).reshape(2, 2, 2, 2, 1)
  x = x.at[1, 0, 1, 0, 0].set(100.0)  # the second sample's winner is not the last voxel
  apply = lambda v, u: nn.max_pool(u, (2, 2, 2), strides=(2, 2, 2)).reshape(u.shape[0])
  got = np.asarray(lrp.relevance(apply, {}, x, LRP0))
  want = np.zeros((2, 2, 2, 2, 1))
  want[0, 1, 1, 1, 0] = 7.0
  want[1, 0, 1, 0, 0] = 100.0
  np.testing.assert_array_equal(got, want)


def test_residual_sum_is_a_norm_site_not_doubled():
  """y = relu(conv(x)) + x: the sum splits R in proportion (x-branch gets x / y of it)."""
  with jax.enable_x64(True):
    class Res(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = nn.relu(nn.Dense(4, use_bias=False, name="d")(x))
        return (h + x).sum(axis=1)

    model = Res()
    variables, x = nets.init(model, (3, 4), 1, jnp.float64)
    e = lrp.explain(model.apply, variables, x, LRP0)
    np.testing.assert_allclose(np.asarray(e.relevance.sum(1)), np.asarray(e.output), rtol=1e-10)
    sites = lrp.describe(model.apply, variables, x, LRP0)
    assert ("Res", "residual") in {(n, k) for n, k, _, _ in sites}
    # Reference by hand: R at the sum's output is the output's own entries (sum: Norm, y / y),
    # the skip branch keeps x_i * R_i / y_i = x_i; the dense branch gets h_i, split by LRP-0.
    W = np.asarray(variables["params"]["d"]["kernel"])
    xn = np.asarray(x)
    z = xn @ W
    h = np.maximum(z, 0)
    want = xn + xn * ((h / np.where(z == 0, 1, z)) @ W.T)
    np.testing.assert_allclose(np.asarray(e.relevance), want, rtol=1e-9)


def test_average_pooling_norm_conserves():
  with jax.enable_x64(True):
    apply = lambda v, u: nn.avg_pool(u, (3, 3, 3), strides=(2, 2, 2), padding="SAME").reshape(
        u.shape[0], -1).sum(1)
    x = jax.random.uniform(jax.random.key(0), (2, 6, 5, 4, 1), jnp.float64)
    e = lrp.explain(apply, {}, x, LRP0)
    np.testing.assert_allclose(np.asarray(e.relevance.reshape(2, -1).sum(1)),
                               np.asarray(e.output), rtol=1e-10)


def test_no_nan_on_random_inits_dead_layers_and_extreme_eps():
  model = nets.MiniMRInet()
  variables, x = nets.init(model, (2, 6, 6, 6, 1), 0)
  dead = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.zeros_like(a) if "conv2" in str(p) else a, variables)  # z == 0 everywhere
  cases = [(variables, lrp.composites.SequentialPresetA()),
           (variables, lrp.composites.EpsilonAll(epsilon=1e6, stabilizer=1e6)),
           (dead, lrp.composites.EpsilonGammaBox(0.0, 1.0)),
           (dead, lrp.composites.EpsilonAll(epsilon=0.0, stabilizer=0.0))]
  for v, comp in cases:
    r = lrp.relevance(model.apply, v, x, comp)
    assert bool(jnp.all(jnp.isfinite(r))), (comp, "dead" if v is dead else "random")
  r = lrp.relevance(model.apply, dead, x, lrp.composites.EpsilonPlus())
  assert float(jnp.abs(r).max()) == 0.0  # nothing flows through a dead layer
