"""Scoring explanations: against a ground-truth mask, and by perturbing the input.

Generic: nothing here knows about brains. Arrays are batched along axis 0; every other axis is a
feature axis (for a multi-channel input, pool the channels first with `pool_channels` to score
locations, e.g. voxels, rather than voxel x channel elements).

Against ground truth (Arras, Osman & Samek 2022, CLEVR-XAI):
  - relevance mass accuracy = sum of positive relevance inside the mask / total positive
    relevance;
  - relevance rank accuracy = |top-K elements inside the mask| / K with K = mask size (ties at
    the K-th value are split in expectation, so a constant map scores exactly the mask share);
  - `mask_share` = |mask| / |support|: what a map without information scores on both (in
    expectation).

Region perturbation (Samek et al. 2017), in any number of spatial dimensions (channels last):
the input is tiled into non-overlapping patches (cubes in 3D); patches are ranked by their summed
relevance and replaced by a baseline (e.g. a blurred copy of the input) most relevant first
(MoRF), least relevant first (LeRF) or in random order, in `steps` equal steps; the model output
is recorded after every step. AOPC (area over the perturbation curve) = mean over the steps
k = 0..L of f(x_0) - f(x_k), in the output's units; ABPC = mean of f(LeRF_k) - f(MoRF_k).

Model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"; cascading):
the layers are randomised one after another from the output to the input, and after every step
the map of the partly random model is compared with the trained model's map (Spearman rank
correlation of absolute and of signed values, Pearson correlation, overlap of the top elements).
A method whose map stays the same while the model it explains is destroyed fails the check.

All functions are jittable and batched: no Python loop over voxels or patches; the steps of a
curve run in one `lax.map` over model evaluations of the whole batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrp.core import LRPError

__all__ = [
    "relevance_mass_accuracy", "relevance_rank_accuracy", "mask_share", "pool_channels",
    "patch_scores", "perturbation_curve", "random_perturbation_curve", "region_perturbation",
    "aopc", "blur_baseline", "patch_mean_baseline", "PerturbationCurve", "RegionPerturbation",
    "model_parameter_randomisation", "map_similarity", "randomise_layer", "layer_order",
    "ParameterRandomisation", "MapSimilarity",
]


def _flat(a):
  return jnp.reshape(a, (a.shape[0], -1))


def _check_pair(relevance, mask, name="mask"):
  if relevance.ndim < 2:
    raise LRPError(f"relevance must be batched [batch, ...], got shape {relevance.shape}")
  try:
    jnp.broadcast_shapes(mask.shape, relevance.shape)
  except ValueError:
    raise LRPError(f"{name} of shape {mask.shape} does not broadcast to the relevance's "
                   f"{relevance.shape}") from None


def pool_channels(relevance, axis: int = -1):
  """Relevance per location: the sum over the channel axis (`[batch, *spatial, C]` ->
  `[batch, *spatial]`). Summing keeps relevance conservation (a location's relevance is what all
  its channels received)."""
  return jnp.sum(jnp.asarray(relevance), axis=axis)


@jax.jit
def _mass(relevance, mask, support):
  r = jnp.maximum(_flat(relevance).astype(jnp.float32), 0.0) * _flat(support)
  m = _flat(mask).astype(jnp.float32)
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
  _check_pair(relevance, mask)
  support = jnp.ones((), jnp.float32) if support is None else jnp.asarray(support)
  _check_pair(relevance, support, "support")
  shape = relevance.shape
  return _mass(relevance, jnp.broadcast_to(mask, shape),
               jnp.broadcast_to(support, shape).astype(jnp.float32))


@jax.jit
def _rank(relevance, mask, support):
  r = _flat(relevance).astype(jnp.float32)
  s = _flat(support)
  m = _flat(mask) & s
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
  _check_pair(relevance, mask)
  support = jnp.ones((), bool) if support is None else jnp.asarray(support)
  _check_pair(relevance, support, "support")
  shape = relevance.shape
  return _rank(relevance, jnp.broadcast_to(mask, shape).astype(bool),
               jnp.broadcast_to(support, shape).astype(bool))


def mask_share(mask, support=None):
  """|mask inside support| / |support| per sample `[batch]`: the expected mass and rank accuracy
  of a map that carries no information about the mask."""
  mask = jnp.asarray(mask).astype(bool)
  support = jnp.ones(mask.shape, bool) if support is None else jnp.broadcast_to(
      jnp.asarray(support).astype(bool), mask.shape)
  m = jnp.sum(_flat(mask & support), axis=1)
  s = jnp.sum(_flat(support), axis=1)
  return (m / jnp.maximum(s, 1)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Region perturbation.


class PerturbationCurve(NamedTuple):
  """One perturbation curve per sample.

  fractions: `[steps + 1]` share of the eligible patches replaced at each step (0 first).
  outputs: `[batch, steps + 1]` model output after each step (outputs[:, 0] = f(x)).
  aopc: `[batch]` mean over steps of outputs[:, 0] - outputs[:, k] (output units).
  """
  fractions: jax.Array
  outputs: jax.Array
  aopc: jax.Array


class RegionPerturbation(NamedTuple):
  """Most-relevant-first, least-relevant-first and random-order curves of one batch.

  morf, lerf, random: `PerturbationCurve`s (random: the mean over `random_repeats` orders).
  abpc: `[batch]` mean over steps of lerf.outputs - morf.outputs (area between the curves).
  """
  morf: PerturbationCurve
  lerf: PerturbationCurve
  random: PerturbationCurve
  abpc: jax.Array


def _spatial(x, patch_size):
  nd = len(patch_size)
  if x.ndim != nd + 2:
    raise LRPError(f"input must be [batch, *spatial ({nd} axes), channel], got shape {x.shape}")
  return x.shape[1:1 + nd]


def _grid(spatial, patch_size):
  return tuple(-(-s // p) for s, p in zip(spatial, patch_size))


def _tile_sum(a, patch_size):
  """Sum of `a` `[batch, *spatial]` over non-overlapping patches -> `[batch, *grid]` (the last
  patch of an axis may be partial: the array is zero-padded)."""
  spatial = a.shape[1:]
  grid = _grid(spatial, patch_size)
  pad = [(0, 0)] + [(0, g * p - s) for g, p, s in zip(grid, patch_size, spatial)]
  a = jnp.pad(a, pad)
  shape = [a.shape[0]]
  for g, p in zip(grid, patch_size):
    shape += [g, p]
  a = a.reshape(shape)
  return jnp.sum(a, axis=tuple(range(2, 2 * len(grid) + 1, 2)))


def _untile(patch_mask, patch_size, spatial):
  """`[batch, *grid]` -> `[batch, *spatial]`: each patch's value on its voxels."""
  m = patch_mask
  for axis, p in enumerate(patch_size):
    m = jnp.repeat(m, p, axis=axis + 1)
  return m[(slice(None),) + tuple(slice(0, s) for s in spatial)]


def patch_scores(relevance, patch_size: Sequence[int]):
  """Summed relevance per patch: `[batch, *spatial(, channel)]` -> `[batch, *grid]`, grid =
  ceil(spatial / patch_size). A trailing channel axis (one more axis than `patch_size` has
  entries) is summed too."""
  relevance = jnp.asarray(relevance)
  patch_size = tuple(int(p) for p in patch_size)
  if relevance.ndim == len(patch_size) + 2:
    relevance = jnp.sum(relevance, axis=-1)
  if relevance.ndim != len(patch_size) + 1:
    raise LRPError(f"relevance of shape {relevance.shape} does not match patch size {patch_size}")
  return _tile_sum(relevance.astype(jnp.float32), patch_size)


def _eligible(support, x, patch_size):
  """bool `[batch, *grid]`: patches holding at least one support location."""
  spatial = _spatial(x, patch_size)
  if support is None:
    return jnp.ones((x.shape[0], *_grid(spatial, patch_size)), bool)
  s = jnp.broadcast_to(jnp.asarray(support).astype(jnp.float32),
                       (x.shape[0], *spatial))
  return _tile_sum(s, patch_size) > 0


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("patch_size", "steps", "max_fraction", "with_variables"))
def _curve(model_fn, variables, x, scores, baseline, eligible, tie_key, *, patch_size, steps,
           max_fraction, with_variables):
  n = x.shape[0]
  spatial = x.shape[1:-1]
  flat_scores = _flat(scores).astype(jnp.float32)
  flat_ok = _flat(eligible)
  # Order: eligible patches by decreasing score, ties in random order; ineligible ones last.
  # Drawn flat and reshaped: XLA:CPU compiles a multi-dimensional threefry draw ~10x slower.
  ties = jax.random.uniform(tie_key, (flat_scores.size,)).reshape(flat_scores.shape)
  key1 = jnp.where(flat_ok, -flat_scores, jnp.inf)
  order = jnp.lexsort((ties, key1), axis=1)  # last key is primary
  ranks = jnp.argsort(order, axis=1)  # rank of each patch
  n_ok = jnp.sum(flat_ok, axis=1).astype(jnp.float32)  # [n]
  fractions = jnp.arange(steps + 1, dtype=jnp.float32) / steps * max_fraction
  counts = jnp.round(fractions[:, None] * n_ok[None, :]).astype(jnp.int32)  # [steps+1, n]
  grid = scores.shape[1:]
  baseline = jnp.broadcast_to(baseline, x.shape).astype(x.dtype)

  def one(count):
    off = (ranks < count[:, None]).reshape((n, *grid))
    voxels = _untile(off, patch_size, spatial)[..., None]
    xk = jnp.where(voxels, baseline, x)
    return model_fn(variables, xk) if with_variables else model_fn(xk)

  outputs = jax.lax.map(one, counts).T  # [n, steps + 1]
  outputs = outputs.astype(jnp.float32)
  return PerturbationCurve(fractions, outputs, aopc(outputs))


def aopc(outputs):
  """Area over the perturbation curve `[batch]`: mean over k = 0..L of outputs[:, 0] -
  outputs[:, k] (Samek et al. 2017), for outputs `[batch, L + 1]`."""
  outputs = jnp.asarray(outputs)
  return jnp.mean(outputs[:, :1] - outputs, axis=1)


def _check_model_output(model_fn, variables, x):
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  out = (jax.eval_shape(model_fn, spec) if variables is None else
         jax.eval_shape(model_fn, variables, spec))
  if out.shape != (x.shape[0],):
    raise LRPError(f"model_fn must return one output per sample [batch] = ({x.shape[0]},), got "
                   f"{out.shape} (select the explained output, e.g. a class logit)")


def perturbation_curve(model_fn: Callable, x, scores, baseline, *, patch_size: Sequence[int],
                       steps: int = 16, max_fraction: float = 1.0, support=None, key=None,
                       variables=None):
  """Region perturbation in the order of decreasing `scores` (pass -scores for LeRF).

  Args:
    model_fn: `f(x [batch, *spatial, C]) -> [batch]`, the explained output (jittable; passed as
      a static argument: reuse the same function object to reuse the compilation).
    x: `[batch, *spatial, C]` inputs.
    scores: `[batch, *grid]` per-patch scores (`patch_scores` of a relevance map).
    baseline: what replaces a patch, broadcastable to x (a value, or e.g. `blur_baseline(x)`).
    patch_size: patch edge per spatial axis (voxels).
    steps: L, number of perturbation steps after the unperturbed input.
    max_fraction: share of the eligible patches replaced at the last step.
    support: optional bool `[batch, *spatial]`: only patches touching it are eligible (e.g. the
      brain: replacing background patches by background tells nothing).
    key: jax.random key breaking ties between equal scores at random (default PRNGKey(0)).
    variables: optional pytree; then the model is called as `model_fn(variables, x)` (pass the
      parameters here rather than closing over them: they stay arguments, not compiled-in
      constants, and one compilation serves any parameters of the same shapes).

  Returns:
    `PerturbationCurve` (fractions `[L+1]`, outputs `[batch, L+1]`, aopc `[batch]`).
  """
  x = jnp.asarray(x)
  patch_size = tuple(int(p) for p in patch_size)
  spatial = _spatial(x, patch_size)
  scores = jnp.asarray(scores)
  if scores.shape != (x.shape[0], *_grid(spatial, patch_size)):
    raise LRPError(f"scores of shape {scores.shape} do not match the patch grid "
                   f"{(x.shape[0], *_grid(spatial, patch_size))}")
  if steps < 1 or not 0 < max_fraction <= 1:
    raise LRPError(f"need steps >= 1 and 0 < max_fraction <= 1, got {steps}, {max_fraction}")
  _check_model_output(model_fn, variables, x)
  key = jax.random.PRNGKey(0) if key is None else key
  return _curve(model_fn, variables, x, scores, jnp.asarray(baseline, x.dtype),
                _eligible(support, x, patch_size), key, patch_size=patch_size, steps=int(steps),
                max_fraction=float(max_fraction), with_variables=variables is not None)


def random_perturbation_curve(model_fn: Callable, x, baseline, *, key, patch_size: Sequence[int],
                              steps: int = 16, max_fraction: float = 1.0, support=None,
                              repeats: int = 4, variables=None):
  """Region perturbation in random patch order, the mean curve over `repeats` orders (drawn
  from the explicit `key`): the baseline any explanation must beat."""
  x = jnp.asarray(x)
  patch_size = tuple(int(p) for p in patch_size)
  grid = _grid(_spatial(x, patch_size), patch_size)
  curves = []
  for k in jax.random.split(key, repeats):  # a handful of orders, not a loop over voxels
    k_scores, k_ties = jax.random.split(k)
    size = x.shape[0] * int(np.prod(grid))
    scores = jax.random.uniform(k_scores, (size,)).reshape((x.shape[0], *grid))  # flat: faster
    curves.append(perturbation_curve(model_fn, x, scores, baseline, patch_size=patch_size,
                                     steps=steps, max_fraction=max_fraction, support=support,
                                     key=k_ties, variables=variables))
  outputs = jnp.mean(jnp.stack([c.outputs for c in curves]), axis=0)
  return PerturbationCurve(curves[0].fractions, outputs, aopc(outputs))


def region_perturbation(model_fn: Callable, x, relevance, baseline, *, key,
                        patch_size: Sequence[int], steps: int = 16, max_fraction: float = 1.0,
                        support=None, random_repeats: int = 4,
                        random: PerturbationCurve | None = None,
                        variables=None) -> RegionPerturbation:
  """MoRF, LeRF and random-order region perturbation of one relevance map per sample.

  Args:
    relevance: `[batch, *spatial(, C)]` relevance of x (channels are summed per patch).
    random: a precomputed random-order curve of the same x, baseline and settings (share it
      between the explanation methods being compared); computed from `key` when None.
    Others as `perturbation_curve`.
  """
  scores = patch_scores(relevance, patch_size)
  k_morf, k_lerf, k_random = jax.random.split(key, 3)
  kw = dict(patch_size=patch_size, steps=steps, max_fraction=max_fraction, support=support,
            variables=variables)
  morf = perturbation_curve(model_fn, x, scores, baseline, key=k_morf, **kw)
  lerf = perturbation_curve(model_fn, x, -scores, baseline, key=k_lerf, **kw)
  if random is None:
    random = random_perturbation_curve(model_fn, x, baseline, key=k_random,
                                       repeats=random_repeats, **kw)
  abpc = jnp.mean(lerf.outputs - morf.outputs, axis=1)
  return RegionPerturbation(morf, lerf, random, abpc)


def patch_mean_baseline(x, patch_size: Sequence[int]):
  """Each patch replaced by its own mean per channel (x `[batch, *spatial, C]`): removes the
  structure inside a patch, keeps its average intensity. Partial border patches average over
  their real voxels."""
  x = jnp.asarray(x)
  patch_size = tuple(int(p) for p in patch_size)
  spatial = _spatial(x, patch_size)
  xc = jnp.moveaxis(x, -1, 1).reshape((-1, *spatial))  # [batch * C, *spatial]
  sums = _tile_sum(xc.astype(jnp.float32), patch_size)
  counts = _tile_sum(jnp.ones((1, *spatial), jnp.float32), patch_size)
  means = _untile(sums / counts, patch_size, spatial)
  return jnp.moveaxis(means.reshape((x.shape[0], x.shape[-1], *spatial)), 1, -1).astype(x.dtype)


def blur_baseline(x, sigma: float, truncate: float = 3.0):
  """Gaussian blur of x `[batch, *spatial, C]` over the spatial axes (sigma in voxels; zero
  padding at the borders): a perturbation that removes local structure but keeps the intensity
  level, unlike replacing by a constant."""
  x = jnp.asarray(x)
  if sigma <= 0:
    return x
  return _blur(x, float(sigma), float(truncate))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _blur(x, sigma, truncate):
  radius = max(1, int(truncate * sigma + 0.5))
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * (t / sigma) ** 2)
  w = (w / jnp.sum(w)).astype(x.dtype)
  out = x
  for axis in range(1, x.ndim - 1):  # separable: one 1D convolution per spatial axis
    moved = jnp.moveaxis(out, axis, -1)
    padded = jnp.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(radius, radius)])
    conv = sum(w[i] * padded[..., i:i + moved.shape[-1]] for i in range(2 * radius + 1))
    out = jnp.moveaxis(conv, -1, axis)
  return out


# ---------------------------------------------------------------------------------------------
# Model-parameter randomisation (sanity check).


class MapSimilarity(NamedTuple):
  """Similarity of two maps per sample, each `[batch]` float32 (NaN where undefined: a constant
  map has no rank or linear correlation; an empty support has no top elements).

  spearman_abs: Spearman rank correlation of the absolute values (ties get their mean rank).
  spearman: Spearman rank correlation of the signed values.
  pearson: Pearson correlation of the signed values.
  top_iou: intersection over union of the `top_fraction` elements of largest absolute value.
  """
  spearman_abs: jax.Array
  spearman: jax.Array
  pearson: jax.Array
  top_iou: jax.Array


class ParameterRandomisation(NamedTuple):
  """Cascading model-parameter randomisation of one batch, L = len(layers) steps.

  layers: the L layer paths ("a/b" for nested sub-trees) in the order they were randomised; at
    step s (1-based) layers[:s] are random (cumulative), the others trained.
  outputs: `[L + 1, batch]` model output of the trained model (row 0) and after each step.
  spearman_abs, spearman, pearson, top_iou: `[L, batch]` similarity between the trained model's
    map and the map after each step (see `MapSimilarity`).
  """
  layers: tuple[str, ...]
  outputs: jax.Array
  spearman_abs: jax.Array
  spearman: jax.Array
  pearson: jax.Array
  top_iou: jax.Array


def _average_ranks(v):
  """1-based ranks along axis 1 of `[batch, n]`, tied values sharing their mean rank (as
  scipy.stats.rankdata's default): an element's rank is the mean of the first and last
  positions its value takes in the sorted row."""
  s = jnp.sort(v, axis=1)
  lo = jax.vmap(functools.partial(jnp.searchsorted, side="left"))(s, v)
  hi = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(s, v)
  return (lo + hi + 1).astype(jnp.float32) / 2.0


def _pearson(a, b, w):
  """Pearson correlation along axis 1 over the elements where w; NaN if either is constant."""
  n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1)
  # where, not multiplication: elements outside the support may be +-inf (see _similarity)
  da = jnp.where(w, a - jnp.sum(jnp.where(w, a, 0.0), axis=1, keepdims=True) / n, 0.0)
  db = jnp.where(w, b - jnp.sum(jnp.where(w, b, 0.0), axis=1, keepdims=True) / n, 0.0)
  na = jnp.sqrt(jnp.sum(da * da, axis=1, keepdims=True))
  nb = jnp.sqrt(jnp.sum(db * db, axis=1, keepdims=True))
  ok = (na > 0) & (nb > 0)
  za, zb = da / jnp.where(ok, na, 1.0), db / jnp.where(ok, nb, 1.0)
  # r = 1 - |za - zb|^2 / 2 (= za . zb for unit vectors): exactly 1 for identical maps, which
  # za . zb misses by rounding, and more accurate near 1.
  r = jnp.clip(1.0 - 0.5 * jnp.sum((za - zb) ** 2, axis=1), -1.0, 1.0)
  return jnp.where(ok[:, 0], r, jnp.nan)


def _top(a, w, fraction):
  """bool `[batch, n]`: the round(fraction x |support|) (at least 1) elements of largest value
  inside the support; ties at the boundary go to the earlier element (stable sort)."""
  k = jnp.maximum(jnp.round(fraction * jnp.sum(w, axis=1)), 1).astype(jnp.int32)
  position = jnp.argsort(jnp.argsort(-jnp.where(w, a, -jnp.inf), axis=1, stable=True), axis=1)
  return (position < k[:, None]) & w


@functools.partial(jax.jit, static_argnames=("top_fraction",))
def _similarity(a, b, w, *, top_fraction):
  a = _flat(a).astype(jnp.float32)
  b = _flat(b).astype(jnp.float32)
  w = _flat(w)
  # Outside the support a value of +inf ranks after every real one and leaves their ranks as
  # they are; _pearson then ignores it.
  rank = lambda v: _average_ranks(jnp.where(w, v, jnp.inf))
  spearman_abs = _pearson(rank(jnp.abs(a)), rank(jnp.abs(b)), w)
  spearman = _pearson(rank(a), rank(b), w)
  pearson = _pearson(a, b, w)
  ta, tb = _top(jnp.abs(a), w, top_fraction), _top(jnp.abs(b), w, top_fraction)
  union = jnp.sum(ta | tb, axis=1)
  iou = jnp.where(union > 0, jnp.sum(ta & tb, axis=1) / jnp.maximum(union, 1), jnp.nan)
  return MapSimilarity(spearman_abs, spearman, pearson, iou.astype(jnp.float32))


def map_similarity(a, b, support=None, *, top_fraction: float = 0.05) -> MapSimilarity:
  """Per-sample similarity of two maps `[batch, ...]` (every axis after the first is a feature
  axis): Spearman of |a| and |b|, Spearman and Pearson of a and b, and the IoU of their
  `top_fraction` largest-|value| elements.

  Args:
    a, b: maps of the same shape `[batch, ...]`.
    support: optional bool, broadcastable: only these elements count (e.g. the brain: relevance
      that is exactly zero in the background of both maps would inflate every correlation).
    top_fraction: share of the support's elements in the top set (0 < top_fraction <= 1).

  Returns:
    `MapSimilarity` of `[batch]` float32 arrays.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape:
    raise LRPError(f"maps of shapes {a.shape} and {b.shape} cannot be compared")
  if a.ndim < 2:
    raise LRPError(f"maps must be batched [batch, ...], got shape {a.shape}")
  if not 0 < top_fraction <= 1:
    raise LRPError(f"top_fraction must be in (0, 1], got {top_fraction}")
  support = jnp.ones((), bool) if support is None else jnp.asarray(support)
  _check_pair(a, support, "support")
  return _similarity(a, b, jnp.broadcast_to(support, a.shape).astype(bool),
                     top_fraction=float(top_fraction))


def _path(layer) -> tuple[str, ...]:
  parts = tuple(layer.split("/")) if isinstance(layer, str) else tuple(layer)
  if not parts or not all(isinstance(p, str) and p for p in parts):
    raise LRPError(f"layer {layer!r}: give a parameter sub-tree as 'name' or 'outer/inner'")
  return parts


def _params(variables, params_key):
  if params_key is None:
    return variables
  if not isinstance(variables, Mapping) or params_key not in variables:
    raise LRPError(f"variables have no {params_key!r} collection (pass params_key=None if "
                   "they are the parameter tree itself)")
  return variables[params_key]


def _subtree(params, path: tuple[str, ...]):
  node = params
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      where = "/".join(path[:i]) or "the top level"
      known = ", ".join(map(str, node)) if isinstance(node, Mapping) else "none (a leaf)"
      raise LRPError(f"layer {'/'.join(path)!r}: no parameter key {key!r} under {where} "
                     f"(keys: {known})")
    node = node[key]
  return node


def _replace(tree, path: tuple[str, ...], value):
  """A copy of the nested mapping `tree` with tree[path] = value (the input is not modified:
  parameters are never changed in place); dict order is kept."""
  if not path:
    return value
  items = dict(tree)
  items[path[0]] = _replace(tree[path[0]], path[1:], value)
  return items if isinstance(tree, dict) else type(tree)(items)


def layer_order(model_fn: Callable, variables, x, *,
                params_key: str | None = "params") -> tuple[str, ...]:
  """The default randomisation order: the top-level parameter names from the output to the
  input, i.e. the reverse of the order in which `model_fn(variables, x)` first uses a leaf of
  each (found in its traced program; names it never uses come last).

  For a flax model this is the reverse of its definition order, the order `model.init` stores
  the parameters in. The dict's own order cannot be trusted: every jax tree operation (jit
  outputs, `jax.tree.map`, checkpoint restores) returns it sorted by name.
  """
  from lrp import graph

  params = _params(variables, params_key)
  names = [str(k) for k in params]
  prog = graph.trace(model_fn, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
  # value id i < number of leaves is leaf i of jax.tree.flatten(variables)
  owner = {}
  for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(variables)[0]):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if params_key is not None:
      if not keys or keys[0] != params_key:
        continue
      keys = keys[1:]
    if keys:
      owner[i] = str(keys[0])
  first: dict[str, int] = {}
  for step, eqn in enumerate(prog.eqns):
    for a in eqn.ins:
      if isinstance(a, int) and a in owner:
        first.setdefault(owner[a], step)
  used = sorted(first, key=first.get)
  return tuple(reversed(used)) + tuple(n for n in names if n not in first)


def randomise_layer(variables, layer, key, *, params_key: str | None = "params"):
  """`variables` with one layer's parameters re-drawn at random.

  Every leaf of the sub-tree is replaced by a draw from N(0, sd^2), sd the standard deviation of
  that trained leaf (over all its elements), cast back to its dtype: the scale of the layer is
  kept, what it learned is not. A constant leaf (all elements equal: a bias never moved from its
  initial value, or a single-element leaf such as a regression head's bias) is kept as it is:
  there is no trained spread to draw from, and it shifts the output without shaping a map.
  Other collections (e.g. batch statistics) are not touched.

  Args:
    variables: a pytree whose `params_key` entry (or itself, with params_key=None) is a nested
      mapping of parameters.
    layer: a top-level name ("conv1") or a path into the tree ("block/conv1" or a tuple).
    key: jax.random key; leaf i of the sub-tree draws from fold_in(key, i).
  """
  path = _path(layer)
  params = _params(variables, params_key)
  sub = _subtree(params, path)
  leaves, treedef = jax.tree.flatten(sub)
  new = []
  for i, leaf in enumerate(leaves):
    leaf = jnp.asarray(leaf)
    sd = jnp.std(leaf.astype(jnp.float32))
    # Constant means all elements equal: the sd of a constant is not exactly 0 in float32.
    varies = leaf.size > 0 and jnp.any(leaf != jnp.ravel(leaf)[:1].reshape((1,) * leaf.ndim))
    # Drawn flat and reshaped: XLA:CPU compiles a multi-dimensional threefry draw slower.
    draw = jax.random.normal(jax.random.fold_in(key, i), (leaf.size,)).reshape(leaf.shape)
    new.append(jnp.where(varies, sd * draw, leaf.astype(jnp.float32)).astype(leaf.dtype))
  params = _replace(params, path, jax.tree.unflatten(treedef, new))
  return params if params_key is None else _replace(variables, (params_key,), params)


def model_parameter_randomisation(model_fn: Callable, variables, x, attribute: Callable, *, key,
                                  layers: Sequence[Any] | None = None, support=None,
                                  top_fraction: float = 0.05,
                                  params_key: str | None = "params") -> ParameterRandomisation:
  """Cascading model-parameter randomisation (Adebayo et al. 2018): randomise the layers one
  after another from the output towards the input (cumulatively) and compare, after each step,
  the map of the partly random model with the trained model's map, per sample.

  A map that explains the model must change as the model is destroyed: correlations that stay
  near 1 mean the method shows something other than the model (e.g. the input itself). The
  check says nothing about whether a map is right; report it beside other measures.

  Args:
    model_fn: `f(variables, x) -> [batch]` the explained output (recorded after each step, to
      show that the randomisation changed the model).
    variables: pytree holding the parameter tree at `params_key` (flax: {"params": ...}).
    x: `[batch, ...]` inputs.
    attribute: `attribute(variables, x) -> [batch, ...]` the map to check (an lrp composite,
      a gradient baseline, ...); jitted once here, one compilation serves every step.
    key: jax.random key; layer s (0-based, in `layers` order) is drawn from fold_in(key, s), so
      a fixed key gives the same random models.
    layers: parameter sub-trees from the output to the input ("name", "outer/inner" or tuples);
      default `layer_order(model_fn, variables, x)` (top-level names, last applied first).
    support: optional bool broadcastable to the maps: only these elements are compared.
    top_fraction: share of the elements in the top set of `top_iou`.
    params_key: the parameter collection (None: `variables` is the parameter tree).

  Returns:
    `ParameterRandomisation`: layers, outputs `[L + 1, batch]`, spearman_abs / spearman /
    pearson / top_iou `[L, batch]`.
  """
  x = jnp.asarray(x)
  if layers is None:
    layers = layer_order(model_fn, variables, x, params_key=params_key)
  paths = [_path(layer) for layer in layers]
  if not paths:
    raise LRPError("no layers to randomise")
  params = _params(variables, params_key)
  for p in paths:  # every name checked before any work is done
    _subtree(params, p)
  attribute_jit = jax.jit(attribute)
  model_jit = jax.jit(model_fn)
  original = attribute_jit(variables, x)
  outputs = [model_jit(variables, x)]
  sims = []
  current = variables
  for s, path in enumerate(paths):  # a handful of layers, each one batched attribution
    current = randomise_layer(current, path, jax.random.fold_in(key, s), params_key=params_key)
    outputs.append(model_jit(current, x))
    sims.append(map_similarity(original, attribute_jit(current, x), support,
                               top_fraction=top_fraction))
  stack = lambda field: jnp.stack([getattr(m, field) for m in sims])
  return ParameterRandomisation(
      tuple("/".join(p) for p in paths), jnp.stack(outputs).astype(jnp.float32),
      stack("spearman_abs"), stack("spearman"), stack("pearson"), stack("top_iou"))
