"""The transformer rules on plain-JAX models, against formulas written out in numpy (float64):
softmax (AttnLRP Prop. 3.1), the matmuls of attention (uniform epsilon, Prop. 3.3), LayerNorm and
RMSNorm with the scale held constant (Prop. 3.4), CP-LRP's constant attention weights and gates,
conservation where the rules promise it, and the one-line error for an uncovered primitive."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrp

B, T, D = 2, 4, 5


def _params(seed=0, bias=True):
  keys = jax.random.split(jax.random.key(seed), 8)
  p = {n: 0.6 * jax.random.normal(k, (D, D), jnp.float64)
       for n, k in zip(("q", "k", "v", "o"), keys)}
  p["ln_w"] = 1.0 + 0.3 * jax.random.normal(keys[4], (D,), jnp.float64)
  p["ln_b"] = (0.3 if bias else 0.0) * jax.random.normal(keys[5], (D,), jnp.float64)
  p["head"] = jax.random.normal(keys[6], (D,), jnp.float64)
  return p


def _layer_norm(x, w, b):
  m = x.mean(-1, keepdims=True)
  c = jax.lax.rsqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-6)
  return (x - m) * c * w[None, None] + b[None, None]  # explicit ranks: no implicit promotion


def block(p, x):
  """LayerNorm, single-head attention, residual, mean over tokens, linear head: [B, T, D] -> [B]."""
  y = _layer_norm(x, p["ln_w"], p["ln_b"])
  q, k, v = y @ p["q"], y @ p["k"], y @ p["v"]
  a = jax.nn.softmax(q @ jnp.swapaxes(k, 1, 2) / np.sqrt(D), axis=-1)
  x = x + (a @ v) @ p["o"]
  return x.mean(1) @ p["head"]


def _x(seed=1):
  return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float64)


def test_sites_and_rules_by_paper_name():
  with jax.enable_x64(True):
    rows = lrp.describe(block, _params(), _x(), lrp.composites.get("AttnLRP"))
    kinds = [k for _, k, _, _ in rows]
    assert kinds.count("softmax") == 1 and kinds.count("normalization") == 1
    assert kinds.count("bilinear") == 2 and kinds.count("dense") == 5
    by_kind = {k: r for _, k, _, r in rows}
    assert isinstance(by_kind["softmax"], lrp.rules.SoftmaxDTD)
    assert isinstance(by_kind["bilinear"], lrp.rules.Uniform)
    cp = {k: r for _, k, _, r in lrp.describe(block, _params(), _x(), lrp.composites.get("cp_lrp"))}
    assert isinstance(cp["bilinear"], lrp.rules.ConstantGate)
  with pytest.raises(lrp.CompositeError, match="unknown composite 'nope'"):
    lrp.composites.get("nope")


def test_softmax_rule_is_the_taylor_decomposition_at_x():
  with jax.enable_x64(True):
    x = _x()
    R = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
    comp = lrp.composites.Composite(layer_map=[("softmax", lrp.rules.SoftmaxDTD())])
    got = lrp.relevance(lambda v, u: jax.nn.softmax(u, axis=-1), None, x, comp, seed=R)
    xs, Rs = np.asarray(x), np.asarray(R)
    s = np.exp(xs - xs.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, xs * (Rs - s * Rs.sum(-1, keepdims=True)), rtol=1e-10)
    # written by hand (no max shift) it is found too
    def hand(v, u):
      e = jnp.exp(u)
      return e / e.sum(-1, keepdims=True)

    np.testing.assert_allclose(lrp.relevance(hand, None, x, comp, seed=R), got, rtol=1e-10)


def test_layer_norm_rule_against_its_linear_map():
  """R_in = x * J_c^T (R / y) with J_c the Jacobian of (x - mean) * c * w at constant c."""
  with jax.enable_x64(True):
    p, x = _params(), _x()
    comp = lrp.composites.get("attnlrp", epsilon=0.0, stabilizer=0.0)
    got = lrp.relevance(lambda v, u: _layer_norm(u, v["ln_w"], v["ln_b"]), p, x, comp)
    xs, w, b = np.asarray(x), np.asarray(p["ln_w"]), np.asarray(p["ln_b"])
    c = 1 / np.sqrt(xs.var(-1, keepdims=True) + 1e-6)
    y = (xs - xs.mean(-1, keepdims=True)) * c * w + b
    s = y / y * w * c  # R = y (the output itself): R / y = 1, then * w * c
    want = xs * (s - s.mean(-1, keepdims=True))  # transpose of the centring
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_rms_norm_passes_relevance_unchanged():
  with jax.enable_x64(True):
    x = _x()

    def rms(v, u):
      return u * jax.lax.rsqrt((u ** 2).mean(-1, keepdims=True) + 1e-6) * v[None, None]

    w = 1.0 + jnp.arange(D, dtype=jnp.float64) / D
    R = jax.random.normal(jax.random.key(5), x.shape, jnp.float64)
    got = lrp.relevance(rms, w, x, lrp.composites.get("attnlrp", epsilon=0.0), seed=R)
    np.testing.assert_allclose(got, R, rtol=1e-10)


def test_uniform_rule_on_a_matmul_gives_each_operand_half():
  with jax.enable_x64(True):
    x = _x()
    comp = lrp.composites.get("attnlrp", epsilon=0.0, stabilizer=0.0)
    e = lrp.explain(lambda v, u: (u @ jnp.swapaxes(u[:, ::-1] * 1.5, 1, 2)).sum((1, 2)), None,
                    x, comp)
    np.testing.assert_allclose(e.relevance.sum((1, 2)), e.output, rtol=1e-10)


def test_cp_lrp_conserves_relevance_without_biases():
  """CP-LRP holds attention weights and the scale constant: with no bias anywhere, the sum of
  the input relevance is the output (AttnLRP's softmax rule absorbs some: not conservative)."""
  with jax.enable_x64(True):
    p, x = _params(bias=False), _x()
    cp = lrp.explain(block, p, x, lrp.composites.get("cp-lrp", epsilon=0.0, stabilizer=0.0))
    np.testing.assert_allclose(cp.relevance.sum((1, 2)), cp.output, rtol=1e-9)
    np.testing.assert_allclose(cp.delta, 0.0, atol=1e-9 * float(jnp.abs(cp.output).max()))
    attn = lrp.explain(block, p, x, lrp.composites.get("attnlrp", epsilon=0.0, stabilizer=0.0))
    assert float(jnp.abs(attn.delta).max()) > 1e-6


def test_cp_lrp_gate_takes_no_relevance():
  with jax.enable_x64(True):
    x = _x()

    def glu(v, u):
      return (jax.nn.sigmoid(u @ v) * u).sum((1, 2))

    w = jax.random.normal(jax.random.key(7), (D, D), jnp.float64)
    cp = lrp.explain(glu, w, x, lrp.composites.get("cp-lrp", epsilon=0.0, stabilizer=0.0))
    # all relevance flows through the signal u: R_in = u * sigmoid(u @ w)
    np.testing.assert_allclose(cp.relevance, x * jax.nn.sigmoid(x @ w), rtol=1e-10)
    attn = lrp.explain(glu, w, x, lrp.composites.get("attnlrp", epsilon=0.0, stabilizer=0.0))
    np.testing.assert_allclose(attn.relevance.sum((1, 2)), attn.output, rtol=1e-9)


def test_jit_equals_eager_and_batch_is_per_sample():
  with jax.enable_x64(True):
    p, x = _params(), _x()
    comp = lrp.composites.get("attnlrp")
    eager = lrp.relevance(block, p, x, comp)
    jitted = jax.jit(lambda v, u: lrp.relevance(block, v, u, comp))(p, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(lrp.relevance(block, p, x[1:], comp), eager[1:], rtol=1e-10)


def test_an_uncovered_primitive_raises_naming_it():
  x = jnp.ones((2, 3))
  with pytest.raises(lrp.UnsupportedLayerError, match="primitive div of two activations"):
    lrp.relevance(lambda v, u: (u / (u @ v + 2.0)).sum(1), jnp.eye(3), x,
                  lrp.composites.get("attnlrp"))
  with pytest.raises(lrp.UnsupportedLayerError, match=r"bilinear layer .* \(dot_general\) has no "
                     r"rule in EpsilonPlus"):
    lrp.relevance(lambda v, u: ((u @ v) @ u.T).sum(1), jnp.eye(3), x,
                  lrp.composites.get("epsilon-plus"))
