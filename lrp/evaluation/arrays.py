"""Array helpers shared by the scores: batched maps, every axis after the first a feature axis."""

from __future__ import annotations

import jax.numpy as jnp

from lrp.core import LRPError


def flat_features(a):
  """`[batch, ...]` -> `[batch, features]`: every axis after the batch axis flattened into one."""
  return jnp.reshape(a, (a.shape[0], -1))


def check_pair(relevance, mask, name="mask"):
  """Raise LRPError unless `relevance` is batched `[batch, ...]` and `mask` (called `name` in the
  message) broadcasts to its shape."""
  if relevance.ndim < 2:
    raise LRPError(f"relevance must be batched [batch, ...], got shape {relevance.shape}")
  try:
    jnp.broadcast_shapes(mask.shape, relevance.shape)
  except ValueError:
    raise LRPError(f"{name} of shape {mask.shape} does not broadcast to the relevance's "
                   f"{relevance.shape}") from None

