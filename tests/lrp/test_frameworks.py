"""Any JAX model through the same entry point: one small transformer written in flax linen,
flax NNX and Equinox with the same weights gives the same output and the same relevance
(AttnLRP and CP-LRP), to 1e-9 relative in float64. (Equinox adds a Linear's bias after a
transpose, where lrp sees a bias site instead of the layer's own bias: the same relevance up to
the stabiliser, hence epsilon 1e-12 here.)"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrp

D, T = 6, 4


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):  # [batch, T, D]
    y = nn.LayerNorm(name="ln")(x)
    q, k, v = (nn.Dense(D, name=n)(y) for n in ("q", "k", "v"))
    a = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(D), axis=-1)
    x = x + nn.Dense(D, name="o")(jnp.einsum("bqk,bkd->bqd", a, v))
    return nn.Dense(1, name="head")(nn.gelu(x).mean(1))[:, 0]


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.q, self.k, self.v, self.o = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))
    self.head = nnx.Linear(D, 1, rngs=rngs)

  def __call__(self, x):
    y = self.ln(x)
    q, k, v = self.q(y), self.k(y), self.v(y)
    a = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(D), axis=-1)
    x = x + self.o(jnp.einsum("bqk,bkd->bqd", a, v))
    return self.head(nnx.gelu(x).mean(1))[:, 0]


def _eqx_block(params):
  """The same block as an Equinox module (one sample [T, D]) holding the linen weights."""
  eqx = pytest.importorskip("equinox", reason="equinox is not installed")
  p = params["params"]

  def linear(name):
    lin = eqx.nn.Linear(D, p[name]["kernel"].shape[1], key=jax.random.key(0), dtype=jnp.float64)
    lin = eqx.tree_at(lambda m: m.weight, lin, p[name]["kernel"].T)
    return eqx.tree_at(lambda m: m.bias, lin, p[name]["bias"])

  class Block(eqx.Module):
    ln: eqx.nn.LayerNorm
    q: eqx.nn.Linear
    k: eqx.nn.Linear
    v: eqx.nn.Linear
    o: eqx.nn.Linear
    head: eqx.nn.Linear

    def __call__(self, x):
      y = jax.vmap(self.ln)(x)
      q, k, v = (jax.vmap(f)(y) for f in (self.q, self.k, self.v))
      a = jax.nn.softmax(q @ k.T / np.sqrt(D), axis=-1)
      x = x + jax.vmap(self.o)(a @ v)
      return self.head(jax.nn.gelu(x).mean(0))[0]

  ln = eqx.nn.LayerNorm(D, eps=1e-6, dtype=jnp.float64)
  ln = eqx.tree_at(lambda m: (m.weight, m.bias), ln, (p["ln"]["scale"], p["ln"]["bias"]))
  return Block(ln, *(linear(n) for n in ("q", "k", "v", "o", "head")))


def _models():
  linen = LinenBlock()
  x = jax.random.normal(jax.random.key(1), (2, T, D), jnp.float64)
  variables = linen.init(jax.random.key(0), x)
  variables = jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape, a.dtype), variables)
  block = NNXBlock(nnx.Rngs(0))
  p = variables["params"]
  for name in ("q", "k", "v", "o", "head"):
    getattr(block, name).kernel.value = p[name]["kernel"]
    getattr(block, name).bias.value = p[name]["bias"]
  block.ln.scale.value, block.ln.bias.value = p["ln"]["scale"], p["ln"]["bias"]
  return linen, variables, block, _eqx_block(variables), x


@pytest.mark.parametrize("name", ["attnlrp", "cp-lrp"])
def test_linen_nnx_and_equinox_give_the_same_relevance(name):
  with jax.enable_x64(True):
    linen, variables, block, eqx_block, x = _models()
    comp = lrp.composites.get(name, epsilon=1e-12, stabilizer=1e-12)
    ref = lrp.explain(linen.apply, variables, x, comp)
    for model in (block, eqx_block):
      got = lrp.explain(model, x, composite=comp)
      np.testing.assert_allclose(got.output, ref.output, rtol=1e-9)
      np.testing.assert_allclose(got.relevance, ref.relevance, rtol=1e-9,
                                 atol=1e-12 * np.abs(ref.relevance).max())
      kinds = sorted(k for _, k, _, _ in lrp.describe(model, x, composite=comp))
      assert kinds.count("softmax") == 1 and kinds.count("normalization") == 1
    # the (apply_fn, variables) pair jits like a linen model's
    fn, params = lrp.frameworks.adapt(block)
    jitted = jax.jit(lambda v, u: lrp.relevance(fn, v, u, comp))(params, x)
    np.testing.assert_allclose(jitted, ref.relevance, rtol=1e-9, atol=1e-12)


def test_a_plain_callable_without_variables_or_x_is_an_error():
  with pytest.raises(lrp.LRPError, match="x is missing"):
    lrp.relevance(lambda v, u: u.sum(1), jnp.ones((2, 3)))
  with pytest.raises(lrp.LRPError, match="not an NNX or Equinox module"):
    lrp.frameworks.adapt(object())
