"""Affine image registration in JAX: multi-resolution, NCC or Mattes mutual information, vmapped.

`register(moving, moving_affines, fixed, fixed_affine)` finds, for each of a batch of moving
images (e.g. raw scans of several subjects, on any grids), the world -> world transform
`[4, 4]` (mm) that maps the moving image's world onto the fixed image's world (e.g. scanner ->
template). Nothing here knows about brains: images and affines only.

Method (the usual one of ANTs/elastix/FSL FLIRT, written for `jax.jit` + `jax.vmap`):
  - the transform is parameterised about the fixed image's centre of mass c as
    y = A (x - c) + c + t (x fixed world, y moving world), A = R diag(exp(s + s_iso)) (I + H):
    rotation vector (3), translation t (3, mm), isotropic log scale s_iso (1), log scales s (3)
    and upper-triangular shear H (3); a "rigid" stage optimises the first 6, "similarity" 7,
    "affine" all 13 (12 degrees of freedom). A rigid-only schedule suits images of one size
    (a subject to its own image: 0.04 mm from the pose at 2 mm); a head against a template head
    of another size can stop in a wrong optimum (14-22 mm off on 3 of 4 subjects at 4 mm with
    NCC: RESULTS.md, session 12), which is why `align` takes the rigid part of an affine fit;
  - initialised by the centres of mass (t = moving's minus fixed's, in world mm);
  - stages (default: rigid, then affine), each over a pyramid of levels (default 8, 4, 2 mm;
    never finer than the fixed grid): at each level the fixed image is smoothed (Gaussian,
    sigma = level / 2 mm) and sampled on a grid of that spacing, the moving image is smoothed
    alike and resampled on a cube of `MOVING_FOV_MM` at that spacing about its centre of mass
    (one array shape per level for every scan: one compilation, one vmapped call), then
    sampled by trilinear interpolation (`jax.scipy.ndimage.map_coordinates`,
    0 outside its field of view) at the transformed points of the fixed's foreground (dilated);
  - loss (`Schedule.metric`) over those points: "ncc", 1 - normalised cross-correlation; or "mi",
    minus the Mattes mutual information (nats) of fixed and warped values (Mattes et al., IEEE
    TMI 2003; ANTs' and ITK's `MattesMutualInformation`): a joint histogram of `MI_BINS` bins
    per image whose Parzen window is the cubic B-spline on both axes, so it is differentiable in
    the warped values; each image's intensity range (fixed: its sampled values; moving: its
    whole cube, so the range does not move with the transform) spans the bins less
    `MI_PADDING` at each end (ITK's padding: the kernel's support stays inside);
  - minimised by Adam (optax) with a
    cosine-decayed step, all steps of a level in one jitted `lax.scan`, vmapped over subjects;
  - then (`Schedule.polish` > 0) a Levenberg-Marquardt polish of the last stage at the finest
    level: 1 - NCC = |f - w|^2 / 2 for the normalised fixed and warped values f, w, so
    Gauss-Newton on the residuals w - f (Jacobian by forward-mode autodiff, 13 columns), a step
    kept only where it lowers the loss (else the damping grows ten-fold): Adam's last steps
    wander by about their step size, Gauss-Newton lands on the optimum.
Same inputs -> same output (no random sampling; the jitter's offsets come from a fixed seed).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.ndimage import map_coordinates
from scipy import ndimage

from jax_brainage.data import nifti

N_PARAMS = 13
ACTIVE = {"rigid": 6, "similarity": 7, "affine": N_PARAMS}
# Units of one parameter step: rotation 0.05 rad (2.9 degrees), translation 5 mm, log-scale and
# shear 0.05; Adam's step size is then comparable across parameters.
PARAM_SCALE = np.array([0.05] * 3 + [5.0] * 3 + [0.05] * 7, np.float32)
# Each moving image is resampled, per level, on a cube of this side (mm) about its centre of mass.
MOVING_FOV_MM = 288.0
METRICS = ("ncc", "mi")
# Mattes mutual information: bins per image (ANTs' and ITK's default 32), of which MI_PADDING at
# each end stay empty so that the cubic B-spline's support (4 bins) never leaves the histogram.
MI_BINS = 32
MI_PADDING = 2


@dataclasses.dataclass(frozen=True)
class Schedule:
  """What `register` does.

  Attributes:
    stages: transform models in order ("rigid", "similarity", "affine").
    levels_mm: pyramid spacings (mm), coarse to fine; levels finer than the fixed grid are
      replaced by the fixed grid's spacing, and at most len(levels_mm) levels run, the coarsest
      first (4 mm template: 8, 4; 2 mm: 8, 4, 2; 1 mm: 8, 4, 2 too: no 1 mm level).
    steps: Adam steps per level (one per level, or one number for all).
    learning_rates: Adam step (in `PARAM_SCALE` units) per level, decayed to 10% by a cosine.
    polish: Levenberg-Marquardt iterations at the finest level after the last stage (0: none;
      "ncc" only: Gauss-Newton needs the loss as a sum of squares).
    metric: similarity "ncc" (normalised cross-correlation) or "mi" (Mattes mutual
      information, `MI_BINS` bins).
    jitter: each fixed sample point moved by a uniform offset in [-jitter, jitter] level voxels
      per axis (seeded: the same points every call), its value interpolated (trilinear) from
      the smoothed fixed image: points off the grid break the interpolation artefact of mutual
      information (Pluim et al., 2000: with both grids aligned, interpolation blurs nothing and
      the joint histogram is sharpest, so MI peaks at grid-aligned shifts). 0: the level grid.
    sampling: the share of the fixed foreground points used at each level (a seeded random
      subset, as ANTs' "Regular, 0.25" sampling): the cost scales with it. 1: every point.
  """

  stages: tuple[str, ...] = ("rigid", "affine")
  levels_mm: tuple[float, ...] = (8.0, 4.0, 2.0)
  steps: tuple[int, ...] = (120, 60, 30)
  learning_rates: tuple[float, ...] = (0.2, 0.1, 0.05)
  polish: int = 0
  metric: str = "ncc"
  jitter: float = 0.0
  sampling: float = 1.0

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f"unknown similarity metric {self.metric!r}; choose from "
                       f"{', '.join(METRICS)}")
    if not 0.0 < self.sampling <= 1.0:
      raise ValueError(f"sampling {self.sampling} is not a share in (0, 1]")
    if self.metric != "ncc" and self.polish > 0:
      raise ValueError("the Levenberg-Marquardt polish needs metric 'ncc'")
    for s in self.stages:
      if s not in ACTIVE:
        raise ValueError(f"unknown transform model {s!r}; choose from {', '.join(ACTIVE)}")


# For a scan to the template with a head (`align.to_template`): Mattes MI on a jittered random
# quarter of the fixed points, rigid then affine. On raw 2 mm scans (benchmarks/RESULTS.md,
# session 12) it is closer to the true affine than NCC and than ANTsPy's `Affine`, in less CPU
# time than either. `Schedule()`'s own default stays NCC: the conformity gate's tilt check was
# calibrated with it.
TEMPLATE_SCHEDULE = Schedule(metric="mi", jitter=0.5, sampling=0.25)


def _rotation(v: jnp.ndarray) -> jnp.ndarray:
  """Rotation matrix `[3, 3]` of a rotation vector `[3]` (radians), smooth at 0."""
  theta2 = jnp.sum(v * v)
  small = theta2 < 1e-6
  # Series below 1e-3 rad; the other branch sees a safe angle so that its gradient is finite.
  theta = jnp.sqrt(jnp.where(small, 1.0, theta2))
  k = jnp.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
  a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
  b = jnp.where(small, 0.5 - theta2 / 24.0, (1.0 - jnp.cos(theta)) / (theta * theta))
  return jnp.eye(3) + a * k + b * (k @ k)


def linear_part(params: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(A `[3, 3]`, t `[3]` mm) of parameters `[13]` (in `PARAM_SCALE` units)."""
  p = params * PARAM_SCALE
  rot = _rotation(p[0:3])
  scale = jnp.exp(p[6] + p[7:10])
  shear = jnp.eye(3).at[0, 1].set(p[10]).at[0, 2].set(p[11]).at[1, 2].set(p[12])
  return rot @ (scale[:, None] * shear), p[3:6]


def fixed_to_moving(params: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """The world -> world matrix `[4, 4]` (fixed -> moving) of parameters `[13]`."""
  a, t = (np.asarray(v, np.float64) for v in linear_part(jnp.asarray(params, jnp.float32)))
  out = np.eye(4)
  out[:3, :3] = a
  out[:3, 3] = np.asarray(centre, np.float64) - a @ centre + t
  return out


def _warp(params, moving, moving_inv, points, centre):
  """The moving image `[X, Y, Z]` sampled (trilinear, 0 outside) at the fixed points `[n, 3]`
  (world mm) moved by the transform of `params` `[13]`: `[n]`."""
  a, t = linear_part(params)
  world = (points - centre[None, :]) @ a.T + (centre + t)[None, :]
  vox = world @ moving_inv[:3, :3].T + moving_inv[:3, 3][None, :]
  return map_coordinates(moving, [vox[:, 0], vox[:, 1], vox[:, 2]], order=1, mode="constant",
                         cval=0.0)


def _residuals(params, moving, moving_inv, points, fixed_values, centre):
  """w - f `[n]`: the warped moving values and the fixed values, each centred and scaled to unit
  norm (so that 1 - NCC = |w - f|^2 / 2)."""
  warped = _warp(params, moving, moving_inv, points, centre)
  f = fixed_values - jnp.mean(fixed_values)
  w = warped - jnp.mean(warped)
  return w / jnp.sqrt(jnp.sum(w * w) + 1e-12) - f / jnp.sqrt(jnp.sum(f * f) + 1e-12)


def _ncc_loss(params, moving, moving_inv, points, fixed_values, centre):
  """1 - NCC of the fixed values `[n]` and the moving image sampled at the transformed points."""
  r = _residuals(params, moving, moving_inv, points, fixed_values, centre)
  return 0.5 * jnp.sum(r * r)


def cubic_bspline(x: jnp.ndarray) -> jnp.ndarray:
  """The cubic B-spline kernel (support [-2, 2], integral 1, sums to 1 over integer shifts) at
  `x` (any shape, in bins)."""
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 2.0 / 3.0 - a * a + 0.5 * a ** 3,
                   jnp.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def parzen_weights(values: jnp.ndarray, low, high, bins: int = MI_BINS) -> jnp.ndarray:
  """Each value's share in each histogram bin, `[n, bins]` for values `[n]`: the cubic B-spline
  centred on the value's bin coordinate, [low, high] (clipped) mapped onto
  [MI_PADDING, bins - 1 - MI_PADDING] (rows sum to 1)."""
  span = jnp.maximum(high - low, 1e-12)
  u = MI_PADDING + (jnp.clip(values, low, high) - low) / span * (bins - 1 - 2 * MI_PADDING)
  return cubic_bspline(u[:, None] - jnp.arange(bins, dtype=values.dtype)[None, :])


def mutual_information(fixed_values: jnp.ndarray, moving_values: jnp.ndarray, fixed_range,
                       moving_range, bins: int = MI_BINS) -> jnp.ndarray:
  """Mattes mutual information (nats) of paired samples `[n]` and `[n]`: the joint histogram of
  their cubic B-spline Parzen weights (`parzen_weights`, each over its (low, high) range),
  normalised to a probability `p`; MI = sum p log(p / (p_fixed p_moving)). A dense
  `[n, bins]^T @ [n, bins]` product: no loop over samples, jit/vmap/grad-friendly."""
  wf = parzen_weights(fixed_values, *fixed_range, bins=bins)
  wm = parzen_weights(moving_values, *moving_range, bins=bins)
  joint = wf.T @ wm
  p = joint / jnp.sum(joint)
  pf = jnp.sum(p, axis=1, keepdims=True)
  pm = jnp.sum(p, axis=0, keepdims=True)
  # 0 log 0 = 0; the safe arguments keep the gradient finite at empty bins.
  safe = p > 1e-12
  ratio = jnp.where(safe, p, 1.0) / jnp.where(safe, pf * pm, 1.0)
  return jnp.sum(jnp.where(safe, p * jnp.log(ratio), 0.0))


def _mi_loss(params, moving, moving_inv, points, fixed_values, centre):
  """Minus the Mattes MI of the fixed values `[n]` and the moving image `[X, Y, Z]` sampled at
  the transformed points; the moving range is its whole cube's (independent of the transform)."""
  warped = _warp(params, moving, moving_inv, points, centre)
  return -mutual_information(fixed_values, warped,
                             (jnp.min(fixed_values), jnp.max(fixed_values)),
                             (jnp.min(moving), jnp.max(moving)), bins=MI_BINS)


LOSSES = {"ncc": _ncc_loss, "mi": _mi_loss}


@functools.partial(jax.jit, static_argnames=("steps",))
def _polish(params, moving, moving_inv, points, fixed_values, centre, mask, *, steps: int):
  """`steps` Levenberg-Marquardt iterations on every subject (shapes as `_optimise`)."""
  free = mask > 0

  def one(p0, mov, minv):
    def residuals(p):
      return _residuals(p, mov, minv, points, fixed_values, centre)

    def step(carry, _):
      p, damping = carry
      r = residuals(p)
      jac = jax.jacfwd(residuals)(p) * mask[None, :]  # [n, 13]; fixed parameters: 0 columns
      h = jac.T @ jac
      h = h + damping * jnp.diag(jnp.diag(h)) + jnp.diag(jnp.where(free, 1e-9, 1.0))
      trial = p - jnp.linalg.solve(h, jac.T @ r) * mask
      better = jnp.sum(jnp.square(residuals(trial))) < jnp.sum(r * r)
      return (jnp.where(better, trial, p), jnp.where(better, damping * 0.3, damping * 10.0)), None

    (p, _), _ = jax.lax.scan(step, (p0, jnp.float32(1e-3)), None, length=steps)
    return p, _ncc_loss(p, mov, minv, points, fixed_values, centre)

  return jax.vmap(one)(params, moving, moving_inv)


@functools.partial(jax.jit, static_argnames=("steps", "metric"))
def _optimise(params, moving, moving_inv, points, fixed_values, centre, lr, mask, *, steps: int,
              metric: str = "ncc"):
  """`steps` Adam steps on every subject at once: params `[B, 13]`, moving `[B, X, Y, Z]`,
  moving_inv `[B, 4, 4]`, mask `[13]` 1 for the stage's free parameters, metric a key of
  `LOSSES`; returns (params `[B, 13]`, final 1 - NCC `[B]`, whatever the metric)."""
  schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.1)
  opt = optax.adam(schedule)
  grad_fn = jax.value_and_grad(LOSSES[metric])

  def one(p0, mov, minv):
    def step(carry, _):
      p, state = carry
      loss, g = grad_fn(p, mov, minv, points, fixed_values, centre)
      updates, state = opt.update(g * mask, state, p)
      return (optax.apply_updates(p, updates), state), loss

    (p, _), losses = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
    return p, _ncc_loss(p, mov, minv, points, fixed_values, centre)

  return jax.vmap(one)(params, moving, moving_inv)


def _world_points(shape, affine) -> np.ndarray:
  ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
  return ijk @ affine[:3, :3].T + affine[:3, 3]


def centre_of_mass(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Intensity centre of mass (world mm) `[3]` of a non-negative image `[X, Y, Z]`."""
  image = np.clip(np.asarray(image, np.float64), 0, None)
  com = np.asarray(ndimage.center_of_mass(image), np.float64)
  return affine[:3, :3] @ com + affine[:3, 3]


def _level_grid(shape, affine, spacing_mm: float):
  """A grid of `spacing_mm` voxels over the field of view of (shape, affine)."""
  sizes = nifti.voxel_size(affine)
  factor = spacing_mm / sizes
  new_shape = tuple(max(2, int(np.floor((n - 1) / f)) + 1) for n, f in zip(shape, factor))
  new_affine = np.asarray(affine, np.float64).copy()
  new_affine[:3, :3] = affine[:3, :3] * factor[None, :]
  return new_shape, new_affine


def _smooth(image: np.ndarray, affine: np.ndarray, fwhm_mm: float) -> np.ndarray:
  sigma = np.maximum(fwhm_mm / 2.0 / nifti.voxel_size(affine) - 0.5, 0.0)  # minus own blur
  return ndimage.gaussian_filter(np.asarray(image, np.float32), sigma) if sigma.max() > 0 else (
      np.asarray(image, np.float32))


def _moving_level(image: np.ndarray, affine: np.ndarray, centre_mm: np.ndarray, level: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The moving image smoothed to `level` mm and resampled on a cube of `MOVING_FOV_MM` with
  `level` mm voxels, axis-aligned in its own world, centred on `centre_mm`: every scan then has
  the same array shape per level (one compiled function for all). Returns (cube, affine)."""
  side = int(np.ceil(MOVING_FOV_MM / level))
  cube_affine = np.diag([level, level, level, 1.0])
  cube_affine[:3, 3] = np.asarray(centre_mm, np.float64) - level * (side - 1) / 2
  cube = nifti.resample(_smooth(image, affine, level), affine, (side,) * 3, cube_affine)
  return cube, cube_affine


def register(
    moving: np.ndarray | Sequence[np.ndarray],
    moving_affines: np.ndarray | Sequence[np.ndarray],
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    schedule: Schedule = Schedule(),
) -> tuple[np.ndarray, np.ndarray]:
  """Registers each moving image to the fixed image.

  Args:
    moving: B images `[X, Y, Z]` (any shapes: each is resampled onto one cube per level),
      e.g. raw scans.
    moving_affines: `[B, 4, 4]` voxel-to-world (mm) of each moving image.
    fixed: `[X', Y', Z']` the target (e.g. a template with a head), non-negative.
    fixed_affine: `[4, 4]` its voxel-to-world (mm).
    schedule: stages, levels, steps.

  Returns:
    (moving_to_fixed `[B, 4, 4]` world -> world (mm): x_fixed = M @ [x_moving, 1],
     final loss `[B]`: 1 - NCC at the finest level whatever `schedule.metric`, 0 is a perfect
     match).
  """
  moving = [np.asarray(m, np.float32) for m in moving]
  moving_affines = np.asarray(moving_affines, np.float64).reshape(-1, 4, 4)
  if len(moving_affines) != len(moving):
    raise ValueError(f"{len(moving)} moving images but {len(moving_affines)} affines")
  fixed = np.asarray(fixed, np.float32)
  fixed_affine = np.asarray(fixed_affine, np.float64)
  # Intensities to ~[0, 1] (NCC ignores scale; this keeps float32 sums tame).
  moving = [m / max(float(np.percentile(m, 99)), 1e-6) for m in moving]
  fixed = fixed / max(float(np.percentile(fixed, 99)), 1e-6)

  centre = centre_of_mass(fixed, fixed_affine)
  params = np.zeros((len(moving), N_PARAMS), np.float32)
  coms = [centre_of_mass(m, a) for m, a in zip(moving, moving_affines)]
  for b in range(len(moving)):
    params[b, 3:6] = (coms[b] - centre) / PARAM_SCALE[3:6]

  finest = float(np.max(nifti.voxel_size(fixed_affine)))
  levels = [lv for lv in schedule.levels_mm if lv > finest * 1.001] + [finest]
  levels = sorted(set(levels), reverse=True)[:len(schedule.levels_mm)]
  steps = np.broadcast_to(np.asarray(schedule.steps), (len(schedule.levels_mm),))
  rates = np.broadcast_to(np.asarray(schedule.learning_rates), (len(schedule.levels_mm),))
  centre32 = jnp.asarray(centre, jnp.float32)
  loss = np.ones(len(moving), np.float32)
  prepared = []
  for level in levels:
    shape, affine = _level_grid(fixed.shape, fixed_affine, level)
    values = nifti.resample(_smooth(fixed, fixed_affine, level), fixed_affine, shape, affine)
    # The fixed's foreground grown by two voxels: the head's outline counts, empty space not.
    keep = ndimage.binary_dilation(values > 0.02, iterations=2).reshape(-1)
    if schedule.sampling < 1.0:
      keep &= np.random.default_rng(1).random(keep.size) < schedule.sampling
    points = _world_points(shape, affine)[keep]
    sample = values.reshape(-1)[keep]
    if schedule.jitter > 0:  # off the grid: see `Schedule.jitter`
      rng = np.random.default_rng(0)
      ijk = (np.indices(shape).reshape(3, -1).T[keep]
             + rng.uniform(-schedule.jitter, schedule.jitter, (int(keep.sum()), 3)))
      points = ijk @ affine[:3, :3].T + affine[:3, 3]
      vox = (points - fixed_affine[:3, 3]) @ np.linalg.inv(fixed_affine[:3, :3]).T
      sample = ndimage.map_coordinates(_smooth(fixed, fixed_affine, level), vox.T, order=1)
    points = points.astype(np.float32)
    cubes = [_moving_level(m, a, c, level) for m, a, c in zip(moving, moving_affines, coms)]
    inv = np.stack([np.linalg.inv(a) for _, a in cubes]).astype(np.float32)
    prepared.append((jnp.asarray(points), jnp.asarray(sample, jnp.float32),
                     jnp.asarray(np.stack([c for c, _ in cubes])), jnp.asarray(inv)))
  for stage in schedule.stages:
    mask = jnp.asarray(np.arange(N_PARAMS) < ACTIVE[stage], jnp.float32)
    for k, (points, values, mov, inv) in enumerate(prepared):
      params, loss = _optimise(jnp.asarray(params), mov, inv, points, values, centre32,
                               float(rates[k]), mask, steps=int(steps[k]),
                               metric=schedule.metric)
      params = np.asarray(params)
  if schedule.polish > 0:
    points, values, mov, inv = prepared[-1]
    params, loss = _polish(jnp.asarray(params), mov, inv, points, values, centre32, mask,
                           steps=int(schedule.polish))
    params = np.asarray(params)
  out = np.stack([np.linalg.inv(fixed_to_moving(p, centre)) for p in params])
  return out, np.asarray(loss)
