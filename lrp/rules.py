"""LRP rules: one small class per rule, found by its paper name.

Notation (lrp.md): a linear layer z = W x + b with relevance R at its output and R_in at its input;
x+ = max(x, 0), x- = min(x, 0), same for W and b; "W^T s" is the vector-Jacobian product of the
(modified) layer. Each rule computes R_in from (x, z, R) for one layer; `lrp.relevance` installs it
as the backward pass of that layer (zennit's "modified gradient" convention: the cotangent at
every activation is its relevance).

Rules see a layer through a `LinearLayer` (lrp.interpret) that offers the effective linear map
(after BatchNorm folding) with weights unmodified ('w'), restricted to positive ('pos') or negative
('neg') weights, squared ('sq') or set to ones ('ones'), its transposes, and the effective bias.
When the layer's input is known to be non-negative (it is produced by a ReLU, or a max-pool of
one), the x- terms are exactly zero and are skipped: ZPlus then costs one extra forward and one
transposed pass, AlphaBeta and Gamma use W- = W - W+ to avoid further passes (lrp.md "Cost").
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

from lrp.core import CompositeError, Stabilizer

Stab = Union[float, Callable]


def _pos(a):
  return jnp.maximum(a, 0)


def _neg(a):
  return jnp.minimum(a, 0)


def _bias(layer, p, part=None):
  """Effective bias (full output shape) or its positive/negative part; 0.0 if there is none."""
  b = layer.bias(p)
  if b is None:
    return 0.0
  if part == "pos":
    return _pos(b)
  if part == "neg":
    return _neg(b)
  return b


class Rule:
  """Base class. `sites` names the kinds of rule sites a rule can serve."""

  sites = frozenset({"linear"})

  def __repr__(self):
    args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
    return f"{type(self).__name__}({args})"

  def linear(self, layer, x, p, z, R):
    """Relevance at the input of a linear layer.

    Args:
      layer: the `lrp.interpret.LinearLayer` (static structure of the layer).
      x: layer input, [batch, ...in].
      p: the layer's parameters (a dict pytree: w, and optionally a, A, b; see LinearLayer).
      z: the layer's unmodified output W x + b, [batch, ...out].
      R: relevance at the output, shape of z.
    Returns:
      R_in, shape of x.
    """
    raise NotImplementedError

  def norm(self, fn, xs, y, R):
    """Relevance at the inputs of a parameter-free sum (sum-pool, residual add): list like xs."""
    raise NotImplementedError

  def bilinear(self, fn, xs, y, R, kind, gate_pos):
    """Relevance at the two operands of y = fn(a, b), a matmul ('bilinear') or element-wise
    product ('product') of two activations; gate_pos: operands that are gates (softmax or
    sigmoid outputs). Returns [R_a, R_b]."""
    raise NotImplementedError

  def softmax(self, x, y, R, axes):
    """Relevance at the input x of y = softmax(x) over `axes` (shape of x)."""
    raise NotImplementedError

  def normalization(self, fn_const, x, y, R):
    """Relevance at the input x of a LayerNorm/RMSNorm y = f(x); fn_const is f with the
    normalisation scale 1/sqrt(var + eps) held constant (a linear map of x plus the bias)."""
    raise NotImplementedError


class Epsilon(Rule):
  """LRP-epsilon: R_in = x * W^T(R / stab(W x + b)); epsilon=0 is LRP-0.

  Args:
    epsilon: float (zennit's stabiliser, z + eps * sign(z)) or a callable z -> stabilised z
      (e.g. `lrp.core.Stabilizer(0.1, norm_scale=True)`).
    zero_bias: if True, b is dropped from the denominator (zennit's zero_params=['bias']).
  """

  sites = frozenset({"linear", "norm"})

  def __init__(self, epsilon: Stab = 1e-6, zero_bias: bool = False):
    self.epsilon = epsilon
    self.zero_bias = zero_bias
    self._stab = Stabilizer.ensure(epsilon)

  def linear(self, layer, x, p, z, R):
    if self.zero_bias and layer.bias(p) is not None:
      z = z - layer.bias(p)
    s = _ratio(R, self._stab(z))
    return x * layer.transpose(x, p, "w", s)

  def norm(self, fn, xs, y, R):
    return _proportional(fn, xs, y, R, self._stab)


class ZPlus(Rule):
  """LRP-z+ (alpha1beta0 for signed inputs):
  z = W+ x+ + W- x- + b+ ; R_in = x+ W+^T(R / stab z) + x- W-^T(R / stab z).
  """

  def __init__(self, stabilizer: Stab = 1e-6, zero_bias: bool = False):
    self.stabilizer = stabilizer
    self.zero_bias = zero_bias
    self._stab = Stabilizer.ensure(stabilizer)

  def linear(self, layer, x, p, z, R):
    b = 0.0 if self.zero_bias else _bias(layer, p, "pos")
    if layer.x_nonneg:
      s = _ratio(R, self._stab(layer.forward(x, p, "pos") + b))
      return x * layer.transpose(x, p, "pos", s)
    xp, xn = _pos(x), _neg(x)
    za = layer.forward(xp, p, "pos") + layer.forward(xn, p, "neg") + b
    s = _ratio(R, self._stab(za))
    return xp * layer.transpose(x, p, "pos", s) + xn * layer.transpose(x, p, "neg", s)


class AlphaBeta(Rule):
  """LRP-alpha-beta with the bias split correctly (b+ in the positive, b- in the negative part):

  z_a = W+ x+ + W- x- + b+ ; z_b = W- x+ + W+ x- + b-
  R_in = alpha [x+ W+^T s_a + x- W-^T s_a] - beta [x+ W-^T s_b + x- W+^T s_b],  s = R / stab(z).

  Args:
    alpha, beta: >= 0 with alpha - beta = 1 (else CompositeError).
  """

  def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: Stab = 1e-6,
               zero_bias: bool = False):
    if alpha < 0 or beta < 0:
      raise CompositeError(
          f"AlphaBeta needs alpha >= 0 and beta >= 0, got alpha={alpha}, beta={beta}")
    if abs((alpha - beta) - 1.0) > 1e-12:
      raise CompositeError(f"AlphaBeta needs alpha - beta = 1, got alpha={alpha}, beta={beta}")
    self.alpha = float(alpha)
    self.beta = float(beta)
    self.stabilizer = stabilizer
    self.zero_bias = zero_bias
    self._stab = Stabilizer.ensure(stabilizer)

  def linear(self, layer, x, p, z, R):
    bp = 0.0 if self.zero_bias else _bias(layer, p, "pos")
    bn = 0.0 if self.zero_bias else _bias(layer, p, "neg")
    a, b = self.alpha, self.beta
    if layer.x_nonneg:
      zp = layer.forward(x, p, "pos")
      sa = _ratio(R, self._stab(zp + bp))
      if b == 0.0:
        return x * (a * layer.transpose(x, p, "pos", sa))
      # W- x = W x - W+ x, and W-^T s = W^T s - W+^T s: two transposed passes instead of three.
      zw = z - _bias(layer, p)
      sb = _ratio(R, self._stab(zw - zp + bn))
      return x * (layer.transpose(x, p, "pos", a * sa + b * sb)
                  - b * layer.transpose(x, p, "w", sb))
    xp, xn = _pos(x), _neg(x)
    sa = _ratio(R, self._stab(layer.forward(xp, p, "pos") + layer.forward(xn, p, "neg") + bp))
    out = a * (xp * layer.transpose(x, p, "pos", sa) + xn * layer.transpose(x, p, "neg", sa))
    if b != 0.0:
      sb = _ratio(R, self._stab(layer.forward(xp, p, "neg") + layer.forward(xn, p, "pos") + bn))
      out = out - b * (xp * layer.transpose(x, p, "neg", sb)
                       + xn * layer.transpose(x, p, "pos", sb))
    return out


class Gamma(Rule):
  """Generalised LRP-gamma (zennit's), split by the sign of the input and of the output.

  W_g+ = W + g W+, W_g- = W + g W- (same for b, with b_g+ = b + g b+, b_g- = b + g b-):
  z+ = W_g+ x+ + W_g- x- + b_g+ ; z- = W_g- x+ + W_g+ x- + b_g-.
  Outputs with z > 0 (the unmodified output) propagate through z+, outputs with z < 0 through z-:
  R_in = x+ W_g+^T s+ + x- W_g-^T s+ + x+ W_g-^T s- + x- W_g+^T s-,
  s+ = [z > 0] R / stab(z+), s- = [z < 0] R / stab(z-). For x >= 0: rho(w) = w + g w+.
  """

  def __init__(self, gamma: float = 0.25, stabilizer: Stab = 1e-6, zero_bias: bool = False):
    if gamma < 0:
      raise CompositeError(f"Gamma needs gamma >= 0, got {gamma}")
    self.gamma = float(gamma)
    self.stabilizer = stabilizer
    self.zero_bias = zero_bias
    self._stab = Stabilizer.ensure(stabilizer)

  def linear(self, layer, x, p, z, R):
    g = self.gamma
    b = 0.0 if self.zero_bias else _bias(layer, p)
    bp = 0.0 if self.zero_bias else _bias(layer, p, "pos")
    bn = 0.0 if self.zero_bias else _bias(layer, p, "neg")
    zw = z - _bias(layer, p)  # W x
    up = jnp.where(z > 0, R, jnp.zeros_like(R))
    dn = jnp.where(z < 0, R, jnp.zeros_like(R))
    if layer.x_nonneg:
      zp = layer.forward(x, p, "pos")
      zpos = zw + g * zp + b + g * bp
      zneg = zw + g * (zw - zp) + b + g * bn
      sp, sn = _ratio(up, self._stab(zpos)), _ratio(dn, self._stab(zneg))
      # W_g+^T sp + W_g-^T sn = W^T(sp + (1+g) sn) + g W+^T(sp - sn), using W- = W - W+.
      return x * (layer.transpose(x, p, "w", sp + (1 + g) * sn)
                  + g * layer.transpose(x, p, "pos", sp - sn))
    xp, xn = _pos(x), _neg(x)
    f = layer.forward
    zpos = f(xp, p, "w") + g * f(xp, p, "pos") + f(xn, p, "w") + g * f(xn, p, "neg") + b + g * bp
    zneg = f(xp, p, "w") + g * f(xp, p, "neg") + f(xn, p, "w") + g * f(xn, p, "pos") + b + g * bn
    sp, sn = _ratio(up, self._stab(zpos)), _ratio(dn, self._stab(zneg))
    t = layer.transpose
    tw = t(x, p, "w", sp + sn)
    return (x * tw + g * (xp * t(x, p, "pos", sp) + xn * t(x, p, "neg", sp)
                          + xp * t(x, p, "neg", sn) + xn * t(x, p, "pos", sn)))


class ZBox(Rule):
  """LRP-z^B for inputs bounded by [low, high] (first layer on bounded inputs):

  z = W x - W+ l - W- h (the bias cancels, as in zennit) ; s = R / stab z ;
  R_in = x W^T s - l W+^T s - h W-^T s.

  Args:
    low, high: lowest and highest input values, scalars or arrays broadcastable (numpy rules) to
      the layer input [batch, ...] (e.g. per channel: shape [channel]).
  """

  def __init__(self, low, high, stabilizer: Stab = 1e-6):
    self.low = low
    self.high = high
    self.stabilizer = stabilizer
    self._stab = Stabilizer.ensure(stabilizer)

  def linear(self, layer, x, p, z, R):
    # Bounds without a batch axis give batch-free W+ l and W- h: computed once, broadcast.
    bshape = (1,) + tuple(x.shape[1:])
    try:
      batch_free = jnp.broadcast_shapes(jnp.shape(self.low), jnp.shape(self.high), bshape) == bshape
    except ValueError:
      batch_free = False
    shape = bshape if batch_free else x.shape
    lo = jnp.broadcast_to(jnp.asarray(self.low, x.dtype), shape)
    hi = jnp.broadcast_to(jnp.asarray(self.high, x.dtype), shape)
    zw = z - _bias(layer, p)
    zb = zw - layer.forward(lo, p, "pos") - layer.forward(hi, p, "neg")
    s = _ratio(R, self._stab(zb))
    # x W^T s - l W+^T s - h W-^T s with W- = W - W+: two transposed passes instead of three.
    return (x - hi) * layer.transpose(x, p, "w", s) + (hi - lo) * layer.transpose(x, p, "pos", s)


class WSquare(Rule):
  """LRP-w^2: R_in = (W^2)^T(R / stab(W^2 1 + b^2)).

  The squared bias stays in the denominator (zennit's convention: the bias absorbs relevance);
  zero_bias=True drops it, which makes the rule conservative.
  """

  def __init__(self, stabilizer: Stab = 1e-6, zero_bias: bool = False):
    self.stabilizer = stabilizer
    self.zero_bias = zero_bias
    self._stab = Stabilizer.ensure(stabilizer)

  def linear(self, layer, x, p, z, R):
    ones = jnp.ones_like(x)
    b = layer.bias(p)
    zs = layer.forward(ones, p, "sq")
    if b is not None and not self.zero_bias:
      zs = zs + jnp.square(b)
    return layer.transpose(x, p, "sq", _ratio(R, self._stab(zs)))


class Flat(Rule):
  """LRP-flat: all weights 1, no bias: R_in = 1^T(R / stab(1^T 1)), a uniform spread over the
  receptive field (the denominator counts the valid inputs of each output; padding excluded)."""

  def __init__(self, stabilizer: Stab = 1e-6):
    self.stabilizer = stabilizer
    self._stab = Stabilizer.ensure(stabilizer)

  def linear(self, layer, x, p, z, R):
    ones = jnp.ones_like(x)
    zs = layer.forward(ones, p, "ones")
    return layer.transpose(x, p, "ones", _ratio(R, self._stab(zs)))


class Pass(Rule):
  """Identity: relevance passes through unchanged (element-wise activations, dropout in
  inference). Served at activation sites; a linear layer cannot pass relevance unchanged."""

  sites = frozenset({"pass"})


class Norm(Rule):
  """Proportional split for parameter-free sums (sum/average pooling, residual additions):
  R_in_i = x_i * J_i^T(R / stab(f(x))), f the sum. Conserves relevance exactly up to eps."""

  sites = frozenset({"norm"})

  def __init__(self, stabilizer: Stab = 1e-6):
    self.stabilizer = stabilizer
    self._stab = Stabilizer.ensure(stabilizer)

  def norm(self, fn, xs, y, R):
    return _proportional(fn, xs, y, R, self._stab)


# ---------------------------------------------------------------------------------------------
# Transformer rules: AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022)
# ---------------------------------------------------------------------------------------------


class Uniform(Rule):
  """AttnLRP's rule for products of two activations (Achtibat et al., ICML 2024):

  - matmul (q k^T, a v; Prop. 3.3, epsilon and uniform rule): R_a = a * J_a^T(R / stab(2 y)),
    R_b = b * J_b^T(R / stab(2 y)); since y is bilinear, each operand receives half of R.
  - element-wise product (gates, GLU; Prop. 3.2): R_a = R_b = R / 2 exactly (LXT's mul2).
  """

  sites = frozenset({"bilinear"})

  def __init__(self, epsilon: Stab = 1e-6):
    self.epsilon = epsilon
    self._stab = Stabilizer.ensure(epsilon)

  def bilinear(self, fn, xs, y, R, kind, gate_pos):
    if kind == "product":
      return [R / 2, R / 2]
    s = _ratio(R, self._stab(2 * y))
    _, vjp = jax.vjp(fn, *xs)
    return [x * c for x, c in zip(xs, vjp(s))]


class ConstantGate(Rule):
  """CP-LRP's rule for products (Ali et al., ICML 2022): the gate is a constant.

  An operand that is a gate (the output of a softmax, i.e. attention weights, or of a logistic
  sigmoid) is treated as a constant weight, so all relevance flows through the other operand
  (the value path): matmul y = A v: R_v = v * J_v^T(R / stab(y)), R_A = 0; element-wise y = g * v:
  R_v = R, R_g = 0 (the "signal takes all" rule of Arras et al. for LSTM gates). With no gate
  among the operands (q k^T), or two, it is the AttnLRP `Uniform` rule.
  """

  sites = frozenset({"bilinear"})

  def __init__(self, epsilon: Stab = 1e-6):
    self.epsilon = epsilon
    self._stab = Stabilizer.ensure(epsilon)

  def bilinear(self, fn, xs, y, R, kind, gate_pos):
    if len(gate_pos) != 1:
      return Uniform(self.epsilon).bilinear(fn, xs, y, R, kind, gate_pos)
    v = 1 - gate_pos[0]
    out = [jnp.zeros_like(xs[0]), jnp.zeros_like(xs[1])]
    if kind == "product":
      out[v] = R
      return out
    _, vjp = jax.vjp(fn, *xs)
    out[v] = xs[v] * vjp(_ratio(R, self._stab(y)))[v]
    return out


class SoftmaxDTD(Rule):
  """AttnLRP's softmax rule (Achtibat et al., ICML 2024, Prop. 3.1; LXT's softmax): the deep
  Taylor decomposition of y = softmax(x) at x itself, the bias term absorbing the rest:

  R_in = x * (R - y * sum_axes(R)),

  i.e. x * J^T(R / y). Inputs of -inf (masked logits) are taken as 0, as LXT does. Not
  conservative: the bias term of the decomposition absorbs relevance.
  """

  sites = frozenset({"softmax"})

  def softmax(self, x, y, R, axes):
    x = jnp.where(jnp.isneginf(x), jnp.zeros_like(x), x)
    return x * (R - y * jnp.sum(R, axis=tuple(axes), keepdims=True))


class ConstantScale(Rule):
  """Normalisation layers (LayerNorm, RMSNorm) with the scale held constant: AttnLRP's identity
  rule on the scale (Achtibat et al., ICML 2024, Prop. 3.4) and CP-LRP's treatment of LayerNorm
  (Ali et al., ICML 2022). With c = 1/sqrt(var + eps) a constant, y = (x - mean(x)) * c * w + b
  is linear in x, and the epsilon rule applies to that map:

  R_in = x * J_c^T(R / stab(y))   (LXT's layer_norm; RMSNorm without bias: R_in = R).

  The centring (x - mean) redistributes relevance among the features; the bias b absorbs its
  share.
  """

  sites = frozenset({"normalization"})

  def __init__(self, epsilon: Stab = 1e-6):
    self.epsilon = epsilon
    self._stab = Stabilizer.ensure(epsilon)

  def normalization(self, fn_const, x, y, R):
    _, vjp = jax.vjp(fn_const, x)
    return x * vjp(_ratio(R, self._stab(y)))[0]


def _ratio(R, den):
  """R / den, with 0 where den == 0 (only possible with eps = 0: that relevance is absorbed
  instead of becoming NaN or Inf)."""
  safe = jnp.where(den == 0, jnp.ones_like(den), den)
  return jnp.where(den == 0, jnp.zeros_like(R), R / safe)


def _proportional(fn, xs, y, R, stab):
  s = _ratio(R, stab(y))
  _, vjp = jax.vjp(fn, *xs)
  cts = vjp(s)
  return [x * c for x, c in zip(xs, cts)]
