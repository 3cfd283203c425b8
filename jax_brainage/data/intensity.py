"""Intensity scaling: the study's clip + min-max to uint8, or z-scores within the brain.

The study stores every volume as uint8 after clipping at a ceiling and min-max scaling, and
feeds the network `uint8 / 255` in [0, 1]. Here (`to_unit_float` is the one conversion from a
stored volume to the network input, used by training, prediction and explanations):

- `minmax_uint8`: ceiling = a high percentile (default 99.5) of the brain's voxels (robust to a
  few hot voxels, e.g. vessels in SWI or a bright FLAIR artefact); floor = min(0, brain minimum),
  so that the background of skull-stripped images (0) maps to 0, like the cube's zero padding;
  values are clipped to [floor, ceiling] and mapped linearly onto 0..255 (rounded). Voxels
  outside the brain mask become 0.
- `zscore`: (x - mean) / std over the brain's voxels, stored as float16; 0 outside the brain.
  The network input is float32 of the stored z-scores (not rescaled, not clipped).
- `mean`: x / the mean of the whole image, background included (`mean_scaled`), float16: SFCN's
  input (Peng et al. 2021 divide each skull-stripped 182 x 218 x 182 MNI volume by its mean,
  then crop to 160 x 192 x 160; `reference_voxels` says over how many voxels the mean is taken).

Either way 0 is the background, so zero padding (cube, shifts, rotations) adds background.

Optional bias-field correction first (`correct_bias`, `brainage prepare --bias-sigma MM`): the
study's T1 inputs were FreeSurfer's intensity-normalised `brain.finalsurfs.mgz`, i.e. already
corrected for the scanner's smooth multiplicative bias field. A bias field scales local contrast:
an 8% field changes a lentiform-to-white-matter SWI contrast as much as ~10 years of iron
deposition do in the simulated cohort. Homomorphic correction divides each sequence by its
low-pass field, the brain-masked Gaussian smoothing of log intensity (normalised convolution, so
the brain's edge does not pull the estimate towards the background). Cheap (tens of milliseconds
per 4 mm cube) and deterministic; the smoothing width must be well above the structures of
interest (the presets use 20 mm).

Several sequences become the channels of one `[x, y, z, channel]` array (`scale_channels`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from jax_brainage.errors import DataError

SCALINGS = ("minmax", "zscore", "mean")
DEFAULT_CEILING_PERCENTILE = 99.5
UINT8_SCALE = np.float32(1.0 / 255.0)
# What a cache may store (one dtype per scaling), and so what the input pipelines accept.
STORED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16))


def storage_dtype(scaling: str) -> np.dtype:
  """The dtype a scaling stores: uint8 for minmax, float16 for zscore and mean."""
  if scaling == "minmax":
    return np.dtype(np.uint8)
  if scaling in ("zscore", "mean"):
    return np.dtype(np.float16)
  raise ValueError(f"unknown intensity scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")


def check_stored_dtype(dtype, where: str = "volumes") -> np.dtype:
  """`dtype` if volumes of it can be fed to the network (uint8: minmax, float16: zscore).

  Raises:
    DataError: one line naming `where` and the dtype, for any other dtype.
  """
  dtype = np.dtype(dtype)
  if dtype not in STORED_DTYPES:
    raise DataError(f"{where}: volumes are {dtype.name}; expected uint8 (minmax scaling) or "
                    "float16 (zscore scaling), as `brainage prepare` stores them")
  return dtype


def _brain_values(data: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
  data = np.asarray(data)
  if brain is None:
    return data.reshape(-1)
  brain = np.asarray(brain, dtype=bool)
  if brain.shape != data.shape:
    raise ValueError(f"brain mask shape {brain.shape} differs from image shape {data.shape}")
  return data[brain]


def minmax_uint8(
    data: np.ndarray,
    brain: np.ndarray | None = None,
    *,
    ceiling_percentile: float = DEFAULT_CEILING_PERCENTILE,
    where: str = "image",
) -> np.ndarray:
  """Clips at a ceiling and min-max scales to uint8 0..255.

  Args:
    data: intensities `[x, y, z]` (any real dtype, arbitrary units).
    brain: boolean brain mask `[x, y, z]`; None = every voxel is brain.
    ceiling_percentile: percentile (0-100] of the brain's intensities used as the ceiling.
    where: names the culprit (`subject: file (sequence)`) in errors.

  Returns:
    uint8 `[x, y, z]`: round(255 * (clip(x, floor, ceiling) - floor) / (ceiling - floor)) inside
    the brain with floor = min(0, brain minimum), 0 outside.

  Raises:
    DataError: if the brain has no voxels or a constant intensity (nothing to scale).
  """
  if not 0 < ceiling_percentile <= 100:
    raise ValueError(f"ceiling percentile must be in (0, 100], got {ceiling_percentile}")
  values = _brain_values(data, brain)
  if values.size == 0:
    raise DataError(f"{where}: empty brain (no voxel inside the brain mask)")
  values = values.astype(np.float64, copy=False)
  ceiling = float(np.percentile(values, ceiling_percentile))
  floor = min(0.0, float(values.min()))
  if not ceiling > floor:
    raise DataError(
        f"{where}: no intensity range inside the brain (ceiling {ceiling:g} <= floor {floor:g})")
  scaled = 255.0 * (np.clip(np.asarray(data, np.float64), floor, ceiling) - floor) / (
      ceiling - floor)
  out = np.rint(scaled).astype(np.uint8)
  if brain is not None:
    out[~np.asarray(brain, bool)] = 0
  return out


def zscore(
    data: np.ndarray, brain: np.ndarray | None = None, *, where: str = "image"
) -> np.ndarray:
  """Z-scores within the brain: float16 `[x, y, z]`, (x - mean) / std inside, 0 outside."""
  values = _brain_values(data, brain).astype(np.float64, copy=False)
  if values.size == 0:
    raise DataError(f"{where}: empty brain (no voxel inside the brain mask)")
  mean, std = float(values.mean()), float(values.std())
  if not std > 0:
    raise DataError(f"{where}: constant intensity inside the brain (standard deviation 0)")
  out = (np.asarray(data, np.float64) - mean) / std
  if brain is not None:
    out[~np.asarray(brain, bool)] = 0.0
  # float16 holds z-scores to ~3 significant digits and saturates only beyond 65504.
  return out.astype(np.float16)


def mean_scaled(
    data: np.ndarray, brain: np.ndarray | None = None, *, reference_voxels: int | None = None,
    where: str = "image"
) -> np.ndarray:
  """x / mean(image): float16 `[x, y, z]`, 0 outside the brain.

  The mean is that of an image of `reference_voxels` voxels whose only non-zero voxels are the
  brain's: sum(brain intensities) / reference_voxels (None: `data.size`). So a cube cut from a
  skull-stripped volume is scaled as the whole volume was (Peng et al.'s SFCN: the mean of the
  182 x 218 x 182 MNI image, before the 160 x 192 x 160 crop).
  """
  values = _brain_values(data, brain).astype(np.float64, copy=False)
  n = int(reference_voxels or np.size(data))
  mean = float(values.sum()) / n if values.size else 0.0
  if not mean > 0:
    raise DataError(f"{where}: brain intensities sum to {mean * n:g}; dividing by the image "
                    "mean needs positive intensities")
  out = np.asarray(data, np.float64) / mean
  if brain is not None:
    out[~np.asarray(brain, bool)] = 0.0
  return out.astype(np.float16)


def correct_bias(
    data: np.ndarray, brain: np.ndarray, sigma_mm: float, voxel_size_mm: Sequence[float], *,
    where: str = "image",
) -> np.ndarray:
  """Divides `data` `[x, y, z]` by its smooth multiplicative field; float32, same shape.

  log field = G_sigma * (mask log x) / G_sigma * mask, re-centred to mean 0 over the brain (the
  brain's mean log intensity is kept, so intensity scaling after this sees the usual range).
  Voxels at or below 1% of the brain's median count as 1% of it inside the log (noise can push
  dark CSF below zero). Outside the brain the data are left as they are.

  Args:
    data: one sequence's volume.
    brain: boolean brain mask, same shape.
    sigma_mm: Gaussian width of the field (mm), > 0.
    voxel_size_mm: the voxel size per axis (mm), to turn sigma into voxels.
  """
  brain = np.asarray(brain, bool)
  values = np.asarray(data, np.float64)
  inside = values[brain]
  if inside.size == 0:
    raise DataError(f"{where}: empty brain (no voxel inside the brain mask)")
  median = float(np.median(inside))
  if not median > 0:
    raise DataError(f"{where}: bias correction needs positive intensities inside the brain "
                    f"(median {median:g})")
  floor = 0.01 * median
  sigma = [float(sigma_mm) / float(v) for v in voxel_size_mm]
  weight = brain.astype(np.float64)
  log = np.where(brain, np.log(np.maximum(values, floor)), 0.0)
  smooth_log = ndimage.gaussian_filter(log, sigma, mode="constant")
  smooth_weight = ndimage.gaussian_filter(weight, sigma, mode="constant")
  field = np.zeros_like(values)
  np.divide(smooth_log, smooth_weight, out=field, where=smooth_weight > 1e-6)
  field -= field[brain].mean()
  out = values.copy()
  out[brain] = values[brain] * np.exp(-field[brain])
  return out.astype(np.float32)


def scale(
    data: np.ndarray,
    brain: np.ndarray | None = None,
    *,
    scaling: str = "minmax",
    ceiling_percentile: float = DEFAULT_CEILING_PERCENTILE,
    reference_voxels: int | None = None,
    where: str = "image",
) -> np.ndarray:
  """Scales one volume `[x, y, z]` with `scaling` ("minmax" -> uint8, "zscore" or "mean" ->
  float16; `reference_voxels`: see `mean_scaled`)."""
  storage_dtype(scaling)  # Validates the name.
  if scaling == "minmax":
    return minmax_uint8(data, brain, ceiling_percentile=ceiling_percentile, where=where)
  if scaling == "mean":
    return mean_scaled(data, brain, reference_voxels=reference_voxels, where=where)
  return zscore(data, brain, where=where)


def scale_channels(
    volumes: Sequence[np.ndarray],
    brain: np.ndarray | None = None,
    *,
    scaling: str = "minmax",
    ceiling_percentile: float = DEFAULT_CEILING_PERCENTILE,
    reference_voxels: int | None = None,
    names: Sequence[str] | None = None,
) -> np.ndarray:
  """Scales each sequence on its own and stacks them as channels: `[x, y, z, channel]`."""
  names = list(names) if names is not None else [f"channel {i}" for i in range(len(volumes))]
  return np.stack([
      scale(v, brain, scaling=scaling, ceiling_percentile=ceiling_percentile,
            reference_voxels=reference_voxels, where=n)
      for v, n in zip(volumes, names)
  ], axis=-1)


def to_unit_float(image):
  """Network input from a stored volume: uint8 (minmax) -> float32 / 255 in [0, 1]; float
  (zscore's float16) -> float32 of the same values, z-scores as they are (not in [0, 1]).

  The one place that decides the conversion: the input pipelines (host and device-resident),
  prediction and explanations all call it. Works on numpy and jax arrays alike (also inside
  `jax.jit`), any shape, e.g. `[batch, x, y, z, channel]`; returns the same array type.
  """
  if image.dtype == np.uint8:
    # Multiplying by the float32 reciprocal gives bit-identical results in numpy and XLA (which
    # rewrites a division by a constant into this product anyway); 255 maps to exactly 1.0.
    return image.astype(np.float32) * UINT8_SCALE
  # kind "f" misses ml_dtypes' bfloat16 (kind "V"), hence the name test.
  if image.dtype.kind == "f" or "float" in image.dtype.name:
    return image.astype(np.float32)
  raise TypeError(f"to_unit_float expects uint8 or floating images, got {image.dtype}")
