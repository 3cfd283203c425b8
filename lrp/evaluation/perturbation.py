"""Region perturbation (Samek et al. 2017), in any number of spatial dimensions (channels last).

The input is tiled into non-overlapping patches (cubes in 3D); patches are ranked by their summed
relevance and replaced by a baseline (e.g. a blurred copy of the input) most relevant first
(MoRF), least relevant first (LeRF) or in random order, in `steps` equal steps; the model output
is recorded after every step. AOPC (area over the perturbation curve) = mean over the steps
k = 0..L of f(x_0) - f(x_k), in the output's units; ABPC = mean of f(LeRF_k) - f(MoRF_k).

Jittable and batched: no Python loop over voxels or patches; the steps of a curve run in one
`lax.map` over model evaluations of the whole batch.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrp.core import LRPError
from lrp.evaluation.arrays import flat_features


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
  flat_scores = flat_features(scores).astype(jnp.float32)
  flat_ok = flat_features(eligible)
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
