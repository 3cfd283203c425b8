"""Loading, validating, reorienting and resampling structural MR images.

Anything nibabel reads (NIfTI-1/2 `.nii`/`.nii.gz`, FreeSurfer `.mgz`, MINC, ...) comes in as a
3D array plus its voxel-to-world affine (mm, RAS+ world). Every problem a user can cause (a missing,
corrupt or truncated file, a 4D series where a 3D volume is expected, NaN/Inf voxels, an all-zero
brain) becomes a one-line `DataError` that names the subject and the file.

Images are brought to one canonical voxel orientation, RAS+ (first voxel axis runs to the Right,
second to Anterior, third to Superior), with exactly the semantics of
`nibabel.as_closest_canonical`, but the orientation transform is returned so that a map made on the
canonical grid can be put back onto the subject's own voxel order exactly (`undo_orientation`).
"""

from __future__ import annotations

import os
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations, spaces
from scipy import ndimage

from jax_brainage.errors import DataError

# The orientation of a RAS+ canonical grid in nibabel's `ornt` notation ([axis, flip] per axis).
RAS_ORNT = orientations.axcodes2ornt(("R", "A", "S"))


def describe(path: str | os.PathLike | None, subject: str | None) -> str:
  """The `subject: file` prefix of every error about one image."""
  parts = [p for p in (subject, os.fspath(path) if path is not None else None) if p]
  return ": ".join(parts) if parts else "image"


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_image(
    path: str | os.PathLike,
    subject: str | None = None,
    *,
    require_brain: bool = True,
) -> nib.Nifti1Image:
  """Reads one 3D image and checks it; returns an in-memory `Nifti1Image`.

  Args:
    path: any file nibabel reads (.nii, .nii.gz, .mgz, ...).
    subject: the subject id, used only to name the culprit in errors.
    require_brain: raise if every voxel is zero (an empty brain).

  Returns:
    Image with data `[x, y, z]` (the file's own dtype, native byte order, scaling applied by
    nibabel) and the file's voxel-to-world affine (mm). Trailing singleton axes (e.g. a
    `[x, y, z, 1]` series) are dropped.

  Raises:
    DataError: one line naming subject and file, for a missing, unreadable, corrupt or truncated
      file, a non-3D image, NaN/Inf voxels or (with `require_brain`) an all-zero image.
  """
  where = describe(path, subject)
  if not os.path.exists(path):
    raise DataError(f"{where}: file not found")
  if os.path.isdir(path):
    raise DataError(f"{where}: is a directory, expected an image file")
  try:
    img = nib.load(os.fspath(path))
    # Reading the voxels is where truncated or corrupt payloads fail (header reads are lazy).
    data = np.asanyarray(img.dataobj)
    affine = np.asarray(img.affine, dtype=np.float64)
  except MemoryError:
    raise
  except Exception as e:  # nibabel raises many types for bad files; the user needs one line.
    raise DataError(f"{where}: unreadable or corrupt image ({_one_line(e)})") from e
  data = np.asarray(data)
  if data.dtype.byteorder not in ("=", "|"):
    data = data.astype(data.dtype.newbyteorder("="))
  data = check_volume(data, path, subject, require_brain=require_brain)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise DataError(f"{where}: invalid voxel-to-world affine")
  if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise DataError(f"{where}: singular voxel-to-world affine (zero voxel size)")
  return make_image(data, affine)


def check_volume(
    data: np.ndarray,
    path: str | os.PathLike | None = None,
    subject: str | None = None,
    *,
    require_brain: bool = True,
) -> np.ndarray:
  """Checks that `data` is one finite 3D volume; returns it `[x, y, z]`.

  Trailing singleton axes beyond the third are dropped (a one-volume 4D series is a 3D image).
  """
  where = describe(path, subject)
  data = np.asarray(data)
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    if data.ndim > 3:
      raise DataError(
          f"{where}: {data.ndim}D image of shape {tuple(data.shape)} where a 3D volume is expected"
          f" ({int(np.prod(data.shape[3:]))} volumes)")
    raise DataError(f"{where}: {data.ndim}D image of shape {tuple(data.shape)}, expected 3D")
  if min(data.shape) < 1:
    raise DataError(f"{where}: empty image of shape {tuple(data.shape)}")
  if data.dtype.kind not in "biuf":
    raise DataError(f"{where}: unsupported voxel type {data.dtype} (expected integer or real)")
  if data.dtype.kind == "f":
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
      raise DataError(f"{where}: {bad} NaN/Inf voxels")
  if require_brain and not np.any(data):
    raise DataError(f"{where}: empty brain (every voxel is zero)")
  return data


def voxel_size(affine: np.ndarray) -> np.ndarray:
  """Voxel edge lengths `[3]` in mm of a voxel-to-world affine `[4, 4]`."""
  affine = np.asarray(affine, dtype=np.float64)
  return np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))


def make_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
  """An in-memory NIfTI-1 image of `data` `[x, y, z(, k)]` with voxel-to-world `affine` (mm).

  NIfTI has no bool or float16: bool becomes uint8 and float16 float32. 64-bit integers are kept
  (nibabel only wants them stated explicitly).
  """
  data = np.asarray(data)
  if data.dtype == bool:
    data = data.astype(np.uint8)
  elif data.dtype == np.float16:
    data = data.astype(np.float32)
  return nib.Nifti1Image(data, np.asarray(affine, np.float64), dtype=data.dtype)


# ---------------------------------------------------------------------------------------------
# Orientation.


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
  """The transform `[3, 2]` (nibabel `ornt`) that brings voxel axes to RAS+.

  Row i says where original voxel axis i goes (canonical axis) and whether it flips (-1). This is
  `nib.io_orientation(affine)`, the transform that `nib.as_closest_canonical` applies.
  """
  return orientations.io_orientation(np.asarray(affine, dtype=np.float64))


def invert_orientation(ornt: np.ndarray) -> np.ndarray:
  """The `ornt` that undoes `ornt` (canonical voxel order -> original voxel order)."""
  ornt = np.asarray(ornt, dtype=np.float64)
  inverse = np.empty_like(ornt)
  for axis, (target, flip) in enumerate(ornt):
    inverse[int(target)] = (axis, flip)
  return inverse


def reorient_array(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
  """Applies `ornt` to the three spatial axes of `[x, y, z]` or `[x, y, z, k]` (a view)."""
  return orientations.apply_orientation(data, np.asarray(ornt))


def reorient_affine(affine: np.ndarray, shape: Sequence[int], ornt: np.ndarray) -> np.ndarray:
  """The affine `[4, 4]` of an image with spatial `shape` after `reorient_array(., ornt)`."""
  return np.asarray(affine, np.float64) @ orientations.inv_ornt_aff(np.asarray(ornt), shape[:3])


def to_canonical(img: nib.spatialimages.SpatialImage) -> tuple[nib.Nifti1Image, np.ndarray]:
  """Brings an image to RAS+ voxel order; returns `(canonical image, ornt)`.

  The data is only transposed/flipped (no interpolation), so `undo_orientation(canonical data,
  ornt)` gives back the original array exactly. Matches `nib.as_closest_canonical`.
  """
  affine = np.asarray(img.affine, dtype=np.float64)
  ornt = canonical_orientation(affine)
  data = np.asanyarray(img.dataobj)
  canonical = reorient_array(data, ornt)
  return make_image(canonical, reorient_affine(affine, data.shape, ornt)), ornt


def undo_orientation(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
  """Puts a canonical `[x, y, z]` or `[x, y, z, k]` array back into the original voxel order."""
  return reorient_array(data, invert_orientation(ornt))


# ---------------------------------------------------------------------------------------------
# Resampling.


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    target_affine: np.ndarray,
    *,
    order: int = 1,
) -> np.ndarray:
  """Resamples `data` on grid `affine` onto the grid (`shape`, `target_affine`) (world mm).

  Args:
    data: `[x, y, z]` or `[x, y, z, k]` (each of the k channels resampled alike).
    affine: voxel-to-world `[4, 4]` of `data`.
    shape: spatial shape `[3]` of the target grid.
    target_affine: voxel-to-world `[4, 4]` of the target grid.
    order: spline order, 0 = nearest neighbour (labels, masks), 1 = trilinear (images, maps).

  Returns:
    float32 (order > 0) or `data.dtype` (order 0) array `[*shape]` or `[*shape, k]`; points
    outside `data`'s field of view are 0. Same result as `nibabel.processing.resample_from_to`.
  """
  data = np.asarray(data)
  vox = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)
  out_dtype = data.dtype if order == 0 else np.float32
  shape = tuple(int(s) for s in shape[:3])

  def one(volume: np.ndarray) -> np.ndarray:
    volume = volume if order == 0 else volume.astype(np.float64, copy=False)
    if volume.dtype == bool:
      volume = volume.astype(np.uint8)
    out = ndimage.affine_transform(
        volume, vox[:3, :3], vox[:3, 3], output_shape=shape, order=order, mode="constant",
        cval=0.0)
    return out.astype(out_dtype, copy=False)

  if data.ndim == 3:
    return one(data)
  return np.stack([one(data[..., c]) for c in range(data.shape[-1])], axis=-1)


def isotropic_grid(
    shape: Sequence[int], affine: np.ndarray, size_mm: float
) -> tuple[tuple[int, int, int], np.ndarray]:
  """A RAS+ grid of `size_mm` isotropic voxels that covers the field of view of (shape, affine).

  Same grid as `nibabel.processing.resample_to_output(img, size_mm)` builds: axis-aligned in
  world space, its first voxel at the lowest corner of the input's voxel-centre bounding box.
  """
  out_shape, out_affine = spaces.vox2out_vox(
      (tuple(int(s) for s in shape[:3]), np.asarray(affine, np.float64)), (size_mm,) * 3)
  return tuple(out_shape), np.asarray(out_affine, np.float64)


def needs_resampling(affine: np.ndarray, size_mm: float | None, tol: float = 1e-3) -> bool:
  """Whether an image on `affine` must be resampled to reach `size_mm` isotropic voxels."""
  if size_mm is None:
    return False
  return bool(np.any(np.abs(voxel_size(affine) - size_mm) > tol * size_mm))


def same_grid(shape_a, affine_a, shape_b, affine_b, tol: float = 1e-4) -> bool:
  """Whether two images share a voxel grid (shape and affine up to `tol` mm)."""
  return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(
      np.asarray(affine_a, np.float64), np.asarray(affine_b, np.float64), atol=tol, rtol=0)
