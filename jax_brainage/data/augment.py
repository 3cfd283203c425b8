"""One jitted augmentation for brain volumes, shared by the host and the device-resident pipelines.

Each example carries its own `aug_seed` (uint32 [2], a raw threefry key derived from
(seed, epoch, index) by the pipeline), so an example is augmented identically wherever it is
processed: on the host pipeline's device feed, on the device-resident pipeline, under any batch
size or sharding.

Per example, in this order (each step off unless configured):
1. left-right flip (axis x, the L-R axis in RAS+) with probability 1/2;
2. one rigid resampling: rotation about the volume centre by angles drawn uniformly in
   [-rotate_degrees, rotate_degrees] about x, y and z (R = Rz @ Ry @ Rx), then an integer shift
   drawn uniformly in [-shift_voxels, shift_voxels] per axis. Trilinear interpolation, zeros
   outside the volume. Without rotation the shift is an exact zero-filled translation;
3. additive Gaussian noise with standard deviation `noise_std`, in the network input's units
   (of the [0, 1] scaled image for uint8 caches, standard deviations for z-scored ones).

Nothing clips intensities: the same code augments [0, 1] images and z-scores, and every fill
(outside the volume after a shift or rotation) is 0, the background of both scalings.

`PoseAverage` is the test-time counterpart (`brainage predict --tta N`): a prediction averaged
over fixed, seeded rigid poses of the input, through the same `rigid_resample`.

The geometric convention matches `scipy.ndimage.affine_transform`: output voxel o reads the
input at R^T (o - c - s) + c, with c = (shape - 1) / 2 the centre and s the shift, so content
moves by +s (like `np.roll(x, s)` without the wrap-around).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_brainage.data import intensity
from jax_brainage.errors import ConfigError

# Independent random streams per transform: enabling rotation does not change the noise drawn.
_STREAM_FLIP, _STREAM_ROTATE, _STREAM_SHIFT, _STREAM_NOISE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation knobs; the defaults switch everything off (evaluation).

  Attributes:
    shift_voxels: largest random shift per axis, in voxels (integer shifts).
    rotate_degrees: largest random rotation about each axis, in degrees.
    flip_lr: flip left-right (axis x) with probability 1/2.
    noise_std: standard deviation of additive Gaussian noise, in network input units ([0, 1]
      scale of uint8 caches, z-score units of float16 caches).
  """

  shift_voxels: int = 0
  rotate_degrees: float = 0.0
  flip_lr: bool = False
  noise_std: float = 0.0

  def __post_init__(self):
    if int(self.shift_voxels) != self.shift_voxels or self.shift_voxels < 0:
      raise ConfigError(f"augment.shift_voxels must be a non-negative integer, got "
                        f"{self.shift_voxels!r}")
    if not np.isfinite(self.rotate_degrees) or not 0 <= self.rotate_degrees <= 45:
      raise ConfigError(f"augment.rotate_degrees must lie in [0, 45], got {self.rotate_degrees!r}")
    if not np.isfinite(self.noise_std) or self.noise_std < 0:
      raise ConfigError(f"augment.noise_std must be >= 0, got {self.noise_std!r}")
    object.__setattr__(self, "shift_voxels", int(self.shift_voxels))
    object.__setattr__(self, "rotate_degrees", float(self.rotate_degrees))
    object.__setattr__(self, "flip_lr", bool(self.flip_lr))
    object.__setattr__(self, "noise_std", float(self.noise_std))

  @property
  def enabled(self) -> bool:
    return bool(self.shift_voxels or self.rotate_degrees or self.flip_lr or self.noise_std)

  @classmethod
  def training_default(cls) -> AugmentConfig:
    """Mild augmentation in the spirit of the study's code (small shifts/rotations, noise)."""
    return cls(shift_voxels=2, rotate_degrees=5.0, flip_lr=True, noise_std=0.01)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | AugmentConfig | None) -> AugmentConfig:
    """From a mapping / ml_collections ConfigDict; unknown keys are a ConfigError."""
    if cfg is None:
      return cls()
    if isinstance(cfg, AugmentConfig):
      return cfg
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - known)
    if unknown:
      raise ConfigError(f"unknown augment key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return cls(**items)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def rotation_matrix(angles: jax.Array) -> jax.Array:
  """Rotation R = Rz @ Ry @ Rx for angles [3] (radians, about x, y, z) -> [3, 3]."""
  ax, ay, az = angles[0], angles[1], angles[2]
  one, zero = jnp.ones_like(ax), jnp.zeros_like(ax)
  rx = jnp.stack([jnp.stack([one, zero, zero]),
                  jnp.stack([zero, jnp.cos(ax), -jnp.sin(ax)]),
                  jnp.stack([zero, jnp.sin(ax), jnp.cos(ax)])])
  ry = jnp.stack([jnp.stack([jnp.cos(ay), zero, jnp.sin(ay)]),
                  jnp.stack([zero, one, zero]),
                  jnp.stack([-jnp.sin(ay), zero, jnp.cos(ay)])])
  rz = jnp.stack([jnp.stack([jnp.cos(az), -jnp.sin(az), zero]),
                  jnp.stack([jnp.sin(az), jnp.cos(az), zero]),
                  jnp.stack([zero, zero, one])])
  return rz @ ry @ rx


def _key(aug_seed: jax.Array) -> jax.Array:
  """A threefry key from raw uint32 [2] words."""
  return jax.random.wrap_key_data(jnp.asarray(aug_seed, jnp.uint32), impl="threefry2x32")


def augment_params(aug_seed: jax.Array, cfg: AugmentConfig) -> dict[str, jax.Array]:
  """The random parameters of one example's augmentation.

  Args:
    aug_seed: uint32 [2].
    cfg: augmentation config.

  Returns:
    flip: bool []; angles: float32 [3] (radians, about x, y, z); shift: int32 [3] (voxels);
    noise_key: the key that draws the noise field (standard normal, times `noise_std`).
    Disabled transforms give identity parameters.
  """
  key = _key(aug_seed)
  flip = jax.random.bernoulli(jax.random.fold_in(key, _STREAM_FLIP), 0.5)
  flip = jnp.logical_and(flip, cfg.flip_lr)
  max_rad = np.deg2rad(cfg.rotate_degrees).astype(np.float32)
  angles = jnp.zeros(3, jnp.float32)
  if cfg.rotate_degrees:
    angles = jax.random.uniform(jax.random.fold_in(key, _STREAM_ROTATE), (3,), jnp.float32,
                                -max_rad, max_rad)
  shift = jax.random.randint(jax.random.fold_in(key, _STREAM_SHIFT), (3,), -cfg.shift_voxels,
                             cfg.shift_voxels + 1, jnp.int32)
  return dict(flip=flip, angles=angles, shift=shift,
              noise_key=jax.random.fold_in(key, _STREAM_NOISE))


def _shift_exact(image: jax.Array, shift: jax.Array, max_shift: int) -> jax.Array:
  """Zero-filled integer translation of image [X, Y, Z, C] by shift [3] (|shift| <= max_shift)."""
  m = max_shift
  padded = jnp.pad(image, ((m, m), (m, m), (m, m), (0, 0)))
  start = (m - shift[0], m - shift[1], m - shift[2], 0)
  return jax.lax.dynamic_slice(padded, start, image.shape)


def _trilinear(image: jax.Array, coords: jax.Array) -> jax.Array:
  """Samples image [X, Y, Z, C] at coords [3, X', Y', Z'] (voxels), zero outside -> [X', Y', Z', C].

  Outside corners contribute zero, as in scipy's mode="grid-constant" (and jax's
  map_coordinates mode="constant"). One gather of whole channel vectors per corner, with
  indices and weights shared by all channels.
  """
  shape = image.shape[:3]
  flat = image.reshape(-1, image.shape[3])
  lo = jnp.floor(coords)
  frac = coords - lo
  lo = lo.astype(jnp.int32)
  out = jnp.zeros(coords.shape[1:] + image.shape[3:], image.dtype)
  for corner in range(8):
    offs = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1)
    weight = jnp.ones(coords.shape[1:], image.dtype)
    inside = jnp.ones(coords.shape[1:], bool)
    linear = jnp.zeros(coords.shape[1:], jnp.int32)
    for axis in range(3):
      i = lo[axis] + offs[axis]
      weight = weight * (frac[axis] if offs[axis] else 1.0 - frac[axis])
      inside = inside & (i >= 0) & (i < shape[axis])
      linear = linear * shape[axis] + jnp.clip(i, 0, shape[axis] - 1)
    values = jnp.take(flat, linear.reshape(-1), axis=0).reshape(out.shape)
    out = out + jnp.where(inside, weight, 0.0)[..., None] * values
  return out


def rigid_resample(image: jax.Array, angles: jax.Array, shift: jax.Array) -> jax.Array:
  """Trilinear resampling of image [X, Y, Z, C] under rotation about the centre, then shift.

  angles: [3] radians about x, y, z; shift: [3] voxels (may be fractional). The identity pose
  returns the image exactly.
  """
  shape = image.shape[:3]
  centre = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
  rot_t = rotation_matrix(angles).T
  grid = jnp.stack(jnp.meshgrid(*(jnp.arange(s, dtype=jnp.float32) for s in shape),
                                indexing="ij"))  # [3, X, Y, Z]
  # input = R^T (o - c - s) + c
  rel = grid - (centre + shift.astype(jnp.float32))[:, None, None, None]
  coords = jnp.einsum("ij,jxyz->ixyz", rot_t, rel) + centre[:, None, None, None]
  return _trilinear(image, coords)


def augment_example(aug_seed: jax.Array, image: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """Augments one image float32 [X, Y, Z, C] with the parameters drawn from aug_seed [2]."""
  if not cfg.enabled:
    return image
  p = augment_params(aug_seed, cfg)
  if cfg.flip_lr:
    image = jnp.where(p["flip"], image[::-1], image)
  if cfg.rotate_degrees:
    image = rigid_resample(image, p["angles"], p["shift"])
  elif cfg.shift_voxels:
    image = _shift_exact(image, p["shift"], cfg.shift_voxels)
  if cfg.noise_std:
    noise = jax.random.normal(p["noise_key"], image.shape, image.dtype)
    image = image + jnp.asarray(cfg.noise_std, image.dtype) * noise
  return image


@functools.partial(jax.jit, static_argnames="cfg")
def augment_batch(aug_seed: jax.Array, images: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """Augments a batch, one independent draw per example.

  Args:
    aug_seed: uint32 [batch, 2], from the pipeline's batch.
    images: float32 [batch, x, y, z, channel], network inputs ([0, 1] or z-scores).
    cfg: AugmentConfig (static; the default config returns `images` unchanged).

  Returns:
    float32 [batch, x, y, z, channel].
  """
  if not cfg.enabled:
    return images
  return jax.vmap(augment_example, in_axes=(0, 0, None))(aug_seed, images, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def prepare_images(image: jax.Array, aug_seed: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """The network input: stored volumes [batch, x, y, z, channel] -> augmented float32.

  uint8 (minmax) becomes x / 255 in [0, 1], float16 (zscore) float32(x)
  (`intensity.to_unit_float`). Used by both pipelines, so host-fed and device-resident batches
  are the same numbers.
  """
  return augment_batch(aug_seed, intensity.to_unit_float(image), cfg)


@dataclasses.dataclass(frozen=True)
class PoseAverage:
  """Test-time augmentation: a prediction averaged over small rigid poses of its input.

  A 4 mm model's estimate moves by about a year when the same brain sits a few degrees or a
  millimetre differently on the voxel grid (benchmarks/RESULTS.md, session 12), which is what
  every registration of a native-space scan leaves. The mean over `poses` resamplings of each
  input (`rigid_resample`: rotation about the volume centre, drawn uniformly within
  +-`rotate_degrees` per axis, then a fractional shift within +-`shift_voxels`) is a smoother
  function of the pose: on the simulated cohort it brings estimates after `--align template`
  within a year of the template-space ones (session 13). The first pose is the identity; the
  others are drawn once from `seed`, so a setting always gives the same numbers.

  Attributes:
    poses: number of poses (1: off, the plain prediction).
    rotate_degrees: largest rotation about each axis, degrees.
    shift_voxels: largest shift along each axis, voxels (fractional shifts interpolate).
    seed: the draw of the poses.
  """

  poses: int = 1
  rotate_degrees: float = 5.0
  shift_voxels: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if int(self.poses) != self.poses or self.poses < 1:
      raise ConfigError(f"test-time augmentation: poses must be a positive integer, got "
                        f"{self.poses!r}")
    if not np.isfinite(self.rotate_degrees) or not 0 <= self.rotate_degrees <= 45:
      raise ConfigError(f"test-time augmentation: rotate_degrees must lie in [0, 45], got "
                        f"{self.rotate_degrees!r}")
    if not np.isfinite(self.shift_voxels) or not 0 <= self.shift_voxels <= 8:
      raise ConfigError(f"test-time augmentation: shift_voxels must lie in [0, 8], got "
                        f"{self.shift_voxels!r}")
    object.__setattr__(self, "poses", int(self.poses))
    object.__setattr__(self, "rotate_degrees", float(self.rotate_degrees))
    object.__setattr__(self, "shift_voxels", float(self.shift_voxels))
    object.__setattr__(self, "seed", int(self.seed))

  @property
  def enabled(self) -> bool:
    return self.poses > 1

  def parameters(self) -> tuple[np.ndarray, np.ndarray]:
    """angles float32 `[poses, 3]` (radians) and shifts float32 `[poses, 3]` (voxels); row 0 is
    the identity."""
    rng = np.random.default_rng(self.seed)
    k = self.poses - 1
    max_rad = np.deg2rad(self.rotate_degrees)
    angles = np.concatenate([np.zeros((1, 3)), rng.uniform(-max_rad, max_rad, (k, 3))])
    shifts = np.concatenate([np.zeros((1, 3)),
                             rng.uniform(-self.shift_voxels, self.shift_voxels, (k, 3))])
    return angles.astype(np.float32), shifts.astype(np.float32)

  def describe(self) -> str:
    """"" when off, else e.g. "16 poses within 5 degrees and 1 voxel (seed 0)"."""
    if not self.enabled:
      return ""
    return (f"{self.poses} poses within {self.rotate_degrees:g} degrees and "
            f"{self.shift_voxels:g} voxel (seed {self.seed})")

  def average(self, predict_fn: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
    """The mean over poses of `predict_fn(posed images)` (traceable: use inside jit).

    Args:
      predict_fn: images float `[n, X, Y, Z, C]` -> any array (e.g. ages `[n, M]`).
      images: float `[n, X, Y, Z, C]`, network inputs.
    Poses run one after another (`jax.lax.map`): memory of one pose, not of all.
    """
    if not self.enabled:
      return predict_fn(images)
    angles, shifts = self.parameters()

    def posed(pose):
      a, s = pose
      return predict_fn(jax.vmap(lambda im: rigid_resample(im, a, s))(images))

    return jnp.mean(jax.lax.map(posed, (jnp.asarray(angles), jnp.asarray(shifts))), axis=0)
