"""Scoring a map against a ground-truth mask (Arras, Osman & Samek 2022, CLEVR-XAI).

  - relevance mass accuracy = sum of positive relevance inside the mask / total positive
    relevance;
  - relevance rank accuracy = |top-K elements inside the mask| / K with K = mask size (ties at
    the K-th value are split in expectation, so a constant map scores exactly the mask share);
  - `mask_share` = |mask| / |support|: what a map without information scores on both (in
    expectation).

For a multi-channel input, pool the channels first with `pool_channels` to score locations
(e.g. voxels) rather than voxel x channel elements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrp.evaluation.arrays import check_pair, flat_features


def pool_channels(relevance, axis: int = -1):
  """Relevance per location: the sum over the channel axis (`[batch, *spatial, C]` ->
  `[batch, *spatial]`). Summing keeps relevance conservation (a location's relevance is what all
  its channels received)."""
  return jnp.sum(jnp.asarray(relevance), axis=axis)


@jax.jit
def _mass(relevance, mask, support):
  r = jnp.maximum(flat_features(relevance).astype(jnp.float32), 0.0) * flat_features(support)
  m = flat_features(mask).astype(jnp.float32)
  total = jnp.sum(r, axis=1)
  inside = jnp.sum(r * m, axis=1)
  return jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), jnp.nan)


def relevance_mass_accuracy(relevance, mask, support=None):
  """Share of the positive relevance that lies inside the mask, per sample.

  Args:
    relevance: `[batch, ...]` any real relevance.
    mask: bool `[batch, ...]` (or broadcastable), the ground truth.
    support: optional bool, broadcastable: only these elements count (relevance elsewhere is
      ignored), e.g. the brain inside a padded cube.

  Returns:
    float32 `[batch]` in [0, 1]; NaN for a sample without positive relevance (undefined).
  """
  relevance = jnp.asarray(relevance)
  mask = jnp.asarray(mask)
  check_pair(relevance, mask)
  support = jnp.ones((), jnp.float32) if support is None else jnp.asarray(support)
  check_pair(relevance, support, "support")
  shape = relevance.shape
  return _mass(relevance, jnp.broadcast_to(mask, shape),
               jnp.broadcast_to(support, shape).astype(jnp.float32))


@jax.jit
def _rank(relevance, mask, support):
  r = flat_features(relevance).astype(jnp.float32)
  s = flat_features(support)
  m = flat_features(mask) & s
  # Elements outside the support can never be among the top K.
  r = jnp.where(s, r, -jnp.inf)
  k = jnp.sum(m, axis=1)  # [batch] K = mask size inside the support
  ordered = -jnp.sort(-r, axis=1)  # descending
  kth = jnp.take_along_axis(ordered, jnp.maximum(k - 1, 0)[:, None], axis=1)  # [batch, 1]
  above = (r > kth) & s
  tied = (r == kth) & s
  n_above = jnp.sum(above, axis=1)
  hits_above = jnp.sum(above & m, axis=1)
  n_tied = jnp.sum(tied, axis=1)
  hits_tied = jnp.sum(tied & m, axis=1)
  # The K - n_above remaining top-K places go to tied elements, each equally likely.
  expected = hits_above + (k - n_above) * hits_tied / jnp.maximum(n_tied, 1)
  return jnp.where(k > 0, expected / jnp.maximum(k, 1), jnp.nan).astype(jnp.float32)


def relevance_rank_accuracy(relevance, mask, support=None):
  """Share of the K most relevant elements inside the mask, K = mask size, per sample.

  Ties at the K-th largest value are resolved in expectation (each tied element equally likely
  to take the remaining places), so the score does not depend on element order.

  Args:
    relevance: `[batch, ...]`; mask: bool, broadcastable; support: optional bool, broadcastable
      (elements outside never rank, and the mask counts only inside it).

  Returns:
    float32 `[batch]` in [0, 1]; NaN for an empty mask.
  """
  relevance = jnp.asarray(relevance)
  mask = jnp.asarray(mask)
  check_pair(relevance, mask)
  support = jnp.ones((), bool) if support is None else jnp.asarray(support)
  check_pair(relevance, support, "support")
  shape = relevance.shape
  return _rank(relevance, jnp.broadcast_to(mask, shape).astype(bool),
               jnp.broadcast_to(support, shape).astype(bool))


def mask_share(mask, support=None):
  """|mask inside support| / |support| per sample `[batch]`: the expected mass and rank accuracy
  of a map that carries no information about the mask."""
  mask = jnp.asarray(mask).astype(bool)
  support = jnp.ones(mask.shape, bool) if support is None else jnp.broadcast_to(
      jnp.asarray(support).astype(bool), mask.shape)
  m = jnp.sum(flat_features(mask & support), axis=1)
  s = jnp.sum(flat_features(support), axis=1)
  return (m / jnp.maximum(s, 1)).astype(jnp.float32)
