"""The stabiliser shared by every rule, and the library's errors.

The stabiliser follows zennit's convention (zennit.core.stabilize): z + eps * sign(z) with
sign(0) = +1, so that 0.0 and -0.0 both become +eps and the sign of a denominator is never flipped
(the unsigned `z + eps` of some implementations flips signs near zero).
"""

from __future__ import annotations

from typing import Callable, Union

import jax.numpy as jnp


class LRPError(ValueError):
  """Base class of the errors raised by lrp (one line naming the layer or argument)."""


class UnsupportedLayerError(LRPError):
  """A layer the library cannot propagate relevance through, or one without a rule."""


class CompositeError(LRPError):
  """A composite or rule that is inconsistent (e.g. alpha - beta != 1)."""


def stabilize(z, epsilon: float = 1e-6, clip: bool = False, norm_scale: bool = False):
  """Stabilised denominator, zennit's convention.

  Args:
    z: denominator, any shape; axis 0 is the batch.
    epsilon: the shift (or the clipping bound with `clip`), >= 0.
    clip: if True, return sign(z) * max(|z|, eps) instead of z + eps * sign(z).
    norm_scale: if True, eps is scaled by the root mean square of z over all axes but the
      batch axis (eps * sqrt(mean z^2)), i.e. a relative stabiliser per sample.

  Returns:
    array of z's shape and dtype, never zero where epsilon > 0.
  """
  z = jnp.asarray(z)
  sign = jnp.where(z >= 0, jnp.ones((), z.dtype), -jnp.ones((), z.dtype))  # sign(0) = sign(-0) = +1
  eps = jnp.asarray(epsilon, z.dtype)
  if norm_scale:
    axes = tuple(range(1, z.ndim))
    eps = eps * jnp.sqrt(jnp.mean(jnp.square(z), axis=axes, keepdims=True))
  if clip:
    return sign * jnp.maximum(jnp.abs(z), eps)
  return z + sign * eps


class Stabilizer:
  """A configured stabiliser: `Stabilizer(1e-6, clip=False, norm_scale=False)(z)`.

  Rules take either a float (the epsilon of `stabilize`) or any callable `z -> stabilised z`.
  """

  def __init__(self, epsilon: float = 1e-6, clip: bool = False, norm_scale: bool = False):
    if not epsilon >= 0:
      raise CompositeError(f"stabiliser epsilon must be >= 0, got {epsilon!r}")
    self.epsilon = float(epsilon)
    self.clip = bool(clip)
    self.norm_scale = bool(norm_scale)

  def __call__(self, z):
    return stabilize(z, self.epsilon, clip=self.clip, norm_scale=self.norm_scale)

  def __repr__(self):
    extra = (", clip=True" if self.clip else "") + (", norm_scale=True" if self.norm_scale else "")
    return f"Stabilizer({self.epsilon!r}{extra})"

  @classmethod
  def ensure(cls, stabilizer: Union[float, Callable]) -> Callable:
    """A float becomes `Stabilizer(float)`; a callable is returned as it is."""
    if callable(stabilizer):
      return stabilizer
    return cls(float(stabilizer))
