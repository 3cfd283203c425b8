"""Pruning: crop/pad a canonical volume to a fixed cube centred on the brain, with an exact inverse.

As in the study, the brain's bounding box (nonzero voxels of the reference sequence, or a brain
mask) is centred in a zero cube of fixed side: 198^3 at 1 mm (FreeSurfer space), 98^3 at 2 mm
(MNI). Any cube shape is allowed. Cropping and padding are one integer shift: cube voxel `c` is
canonical-grid voxel `c + offset` (negative offsets pad), so the inverse is exact.

The chain image -> (resample) -> RAS+ canonical -> cube is recorded in a `CubeInverse`, a
JSON-serialisable dataclass. `to_subject_space(cube_array, inverse)` maps any cube array (a
relevance map, a mask, the input itself) back onto the subject's own grid and affine: without
resampling it reproduces the original voxels exactly inside the cube and zeros outside.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from jax_brainage.data import nifti
from jax_brainage.errors import DataError

# The study's cubes: 198^3 voxels in FreeSurfer's conformed 1 mm space, 98^3 in MNI 2 mm.
STUDY_CUBES = {1.0: 198, 2.0: 98}
# Field of view (mm) that a cube must hold at other voxel sizes: the study's 1 mm cube.
CUBE_FIELD_OF_VIEW_MM = 198.0

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def default_cube_shape(voxel_size_mm: float) -> tuple[int, int, int]:
  """The cube side for isotropic voxels of `voxel_size_mm`.

  198^3 at 1 mm and 98^3 at 2 mm (the study's); otherwise the smallest even side that holds a
  198 mm field of view (an adult brain with margin), e.g. 50^3 at 4 mm, 66^3 at 3 mm.
  """
  size = float(voxel_size_mm)
  if size <= 0 or not math.isfinite(size):
    raise ValueError(f"voxel size must be a positive number of mm, got {voxel_size_mm}")
  for study_size, side in STUDY_CUBES.items():
    if abs(size - study_size) < 1e-3:
      return (side,) * 3
  side = math.ceil(CUBE_FIELD_OF_VIEW_MM / size - 1e-6)
  side += side % 2
  return (side,) * 3


def affine_tuple(affine: np.ndarray) -> tuple[tuple[float, ...], ...]:
  """A `[4, 4]` matrix as nested tuples of floats (hashable, exact through JSON)."""
  return tuple(tuple(float(v) for v in row) for row in np.asarray(affine, np.float64))


@dataclasses.dataclass(frozen=True)
class CubeInverse:
  """Everything needed to map a cube array back onto a subject's own voxel grid.

  Attributes:
    original_shape: spatial shape `[3]` of the subject's image as read from file.
    original_affine: its voxel-to-world affine `[4, 4]` (mm).
    orientation: nibabel `ornt` `[3, 2]` taking the voxel grid the cube was cut from, before
      reorientation, to RAS+ (the original grid, or the resampled grid if `resampled`).
    grid_shape: spatial shape `[3]` of the canonical (RAS+) grid the cube was cut from.
    grid_affine: its affine `[4, 4]` (mm).
    cube_shape: the cube's shape `[3]`.
    offset: cube voxel c is grid voxel `c + offset` (per axis; negative = padding).
    brain_box: the brain's bounding box on the canonical grid, `[3]` of (start, stop).
    resampled: whether the grid was resampled from the original (then the inverse interpolates).
    alignment: None, or the world -> world transform `[4, 4]` (mm) that registration to the
      template found (`data.align`): original (scanner) world -> the grid's (template) world;
      the inverse then resamples through it onto the original grid.
  """

  original_shape: tuple[int, int, int]
  original_affine: tuple[tuple[float, ...], ...]
  orientation: tuple[tuple[int, int], ...]
  grid_shape: tuple[int, int, int]
  grid_affine: tuple[tuple[float, ...], ...]
  cube_shape: tuple[int, int, int]
  offset: tuple[int, int, int]
  brain_box: Box
  resampled: bool = False
  alignment: tuple[tuple[float, ...], ...] | None = None

  @property
  def cube_affine(self) -> np.ndarray:
    """Voxel-to-world affine `[4, 4]` (mm) of the cube, to save cube arrays as NIfTI."""
    shift = np.eye(4)
    shift[:3, 3] = self.offset
    return np.asarray(self.grid_affine, np.float64) @ shift

  @property
  def voxel_size(self) -> tuple[float, float, float]:
    """Voxel edge lengths (mm) of the cube."""
    return tuple(float(v) for v in nifti.voxel_size(np.asarray(self.grid_affine)))

  @property
  def brain_fits(self) -> bool:
    """Whether the brain's bounding box lies wholly inside the cube (nothing cropped)."""
    return all(
        o <= lo and hi <= o + s
        for (lo, hi), o, s in zip(self.brain_box, self.offset, self.cube_shape))

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (floats round-trip exactly through JSON)."""
    d = dataclasses.asdict(self)
    if d["alignment"] is None:
      del d["alignment"]  # records without alignment stay as they were
    return {k: _lists(v) for k, v in d.items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CubeInverse":
    """Inverse of `to_dict`; raises `ValueError` if a field is missing or malformed."""
    try:
      return cls(
          original_shape=tuple(int(v) for v in d["original_shape"]),
          original_affine=affine_tuple(np.asarray(d["original_affine"], np.float64)),
          orientation=tuple((int(a), int(f)) for a, f in d["orientation"]),
          grid_shape=tuple(int(v) for v in d["grid_shape"]),
          grid_affine=affine_tuple(np.asarray(d["grid_affine"], np.float64)),
          cube_shape=tuple(int(v) for v in d["cube_shape"]),
          offset=tuple(int(v) for v in d["offset"]),
          brain_box=tuple((int(lo), int(hi)) for lo, hi in d["brain_box"]),
          resampled=bool(d.get("resampled", False)),
          alignment=(None if d.get("alignment") is None
                     else affine_tuple(np.asarray(d["alignment"], np.float64))),
      )
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"malformed CubeInverse record ({type(e).__name__}: {e})") from e


def _lists(v):
  if isinstance(v, (tuple, list)):
    return [_lists(x) for x in v]
  return v


# ---------------------------------------------------------------------------------------------
# Bounding box, offset, crop/pad.


def brain_box(mask: np.ndarray) -> Box:
  """Bounding box of the nonzero voxels of `mask` `[x, y, z]`: (start, stop) per axis."""
  mask = np.asarray(mask)
  if mask.ndim == 4:
    mask = np.any(mask, axis=-1)
  box = []
  for axis in range(3):
    other = tuple(a for a in range(3) if a != axis)
    hits = np.flatnonzero(np.any(mask, axis=other))
    if hits.size == 0:
      raise ValueError("empty brain mask: no nonzero voxel")
    box.append((int(hits[0]), int(hits[-1]) + 1))
  return tuple(box)


def centre_offset(box: Box, cube_shape: Sequence[int]) -> tuple[int, int, int]:
  """Grid index of cube voxel 0 such that `box` is centred in the cube.

  An odd leftover voxel goes after the brain (padding) or is cropped after it (too big a brain).
  """
  offset = []
  for (lo, hi), side in zip(box, cube_shape):
    spare = int(side) - (hi - lo)
    # Floor for padding (odd voxel after), toward zero for cropping (odd voxel cut after).
    offset.append(int(lo - (spare // 2 if spare >= 0 else -((-spare) // 2))))
  return tuple(offset)


def _overlap(offset: int, side: int, extent: int) -> tuple[slice, slice]:
  """Matching slices (cube, grid) of a cube axis at `offset` and a grid axis of `extent`."""
  lo, hi = max(offset, 0), min(offset + side, extent)
  if hi <= lo:
    return slice(0, 0), slice(0, 0)
  return slice(lo - offset, hi - offset), slice(lo, hi)


def crop_or_pad(
    grid: np.ndarray, offset: Sequence[int], cube_shape: Sequence[int]
) -> np.ndarray:
  """Cuts the cube `[*cube_shape(, k)]` out of a grid array `[x, y, z(, k)]`; zero outside."""
  grid = np.asarray(grid)
  cube = np.zeros(tuple(cube_shape) + grid.shape[3:], dtype=grid.dtype)
  pairs = [_overlap(o, s, e) for o, s, e in zip(offset, cube_shape, grid.shape[:3])]
  cube[tuple(p[0] for p in pairs)] = grid[tuple(p[1] for p in pairs)]
  return cube


def place_in_grid(
    cube: np.ndarray, offset: Sequence[int], grid_shape: Sequence[int]
) -> np.ndarray:
  """Inverse of `crop_or_pad`: a cube `[X, Y, Z(, k)]` back in a zero grid `[*grid_shape(, k)]`."""
  cube = np.asarray(cube)
  grid = np.zeros(tuple(grid_shape) + cube.shape[3:], dtype=cube.dtype)
  pairs = [_overlap(o, s, e) for o, s, e in zip(offset, cube.shape[:3], grid_shape)]
  grid[tuple(p[1] for p in pairs)] = cube[tuple(p[0] for p in pairs)]
  return grid


# ---------------------------------------------------------------------------------------------
# The whole chain.


def canonical_grid(
    img: nib.spatialimages.SpatialImage,
    *,
    voxel_size_mm: float | None = None,
    order: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """Resamples (if asked and needed) and reorients an image to its canonical RAS+ grid.

  Returns:
    (data `[x, y, z]` on the canonical grid, its affine `[4, 4]`, the `ornt` applied after any
    resampling, whether it was resampled). Resampling uses the RAS-aligned grid of
    `nifti.isotropic_grid` (as `nibabel.processing.resample_to_output`).
  """
  data = np.asanyarray(img.dataobj)
  affine = np.asarray(img.affine, np.float64)
  resampled = nifti.needs_resampling(affine, voxel_size_mm)
  if resampled:
    shape, target = nifti.isotropic_grid(data.shape, affine, voxel_size_mm)
    data = nifti.resample(data, affine, shape, target, order=order)
    affine = target
  ornt = nifti.canonical_orientation(affine)
  return (nifti.reorient_array(data, ornt), nifti.reorient_affine(affine, data.shape, ornt), ornt,
          resampled)


def make_inverse(
    img: nib.spatialimages.SpatialImage,
    grid_shape: Sequence[int],
    grid_affine: np.ndarray,
    ornt: np.ndarray,
    resampled: bool,
    box: Box,
    cube_shape: Sequence[int],
) -> CubeInverse:
  """Records a cube cut out of the canonical grid of `img` around `box`."""
  return CubeInverse(
      original_shape=tuple(int(s) for s in img.shape[:3]),
      original_affine=affine_tuple(img.affine),
      orientation=tuple((int(a), int(f)) for a, f in np.asarray(ornt)),
      grid_shape=tuple(int(s) for s in grid_shape[:3]),
      grid_affine=affine_tuple(grid_affine),
      cube_shape=tuple(int(s) for s in cube_shape),
      offset=centre_offset(box, cube_shape),
      brain_box=box,
      resampled=bool(resampled),
  )


def to_cube(
    img: nib.spatialimages.SpatialImage,
    cube_shape: Sequence[int] | None = None,
    *,
    mask: np.ndarray | nib.spatialimages.SpatialImage | None = None,
    voxel_size_mm: float | None = None,
    order: int = 1,
) -> tuple[np.ndarray, CubeInverse]:
  """Prunes one 3D image: (resample) -> RAS+ -> cube centred on the brain's bounding box.

  Args:
    img: a 3D image (e.g. from `nifti.load_image`).
    cube_shape: cube shape `[3]`; default `default_cube_shape` of the grid's voxel size.
    mask: brain mask on the image's own grid (array `[x, y, z]` or image); default: nonzero
      voxels of `img`.
    voxel_size_mm: resample to this isotropic voxel size first (None: keep the grid).
    order: interpolation order for resampling (1 for images, 0 for labels).

  Returns:
    (cube `[*cube_shape]` in the image's dtype (float32 if resampled), `CubeInverse`).
  """
  data, affine, ornt, resampled = canonical_grid(img, voxel_size_mm=voxel_size_mm, order=order)
  if mask is None:
    brain = data
  else:
    mask_data = np.asanyarray(getattr(mask, "dataobj", mask))
    if tuple(mask_data.shape[:3]) != tuple(img.shape[:3]):
      raise ValueError(
          f"brain mask shape {tuple(mask_data.shape)} differs from image shape {tuple(img.shape)}")
    brain, _, _, _ = canonical_grid(
        nifti.make_image(mask_data != 0, img.affine),
        voxel_size_mm=voxel_size_mm, order=0)
  try:
    box = brain_box(brain)
  except ValueError:
    where = nifti.describe(img.get_filename() if hasattr(img, "get_filename") else None, None)
    raise DataError(f"{where}: empty brain (no nonzero voxel to centre the cube on)") from None
  if cube_shape is None:
    cube_shape = default_cube_shape(float(np.max(nifti.voxel_size(affine))))
  inverse = make_inverse(img, data.shape, affine, ornt, resampled, box, cube_shape)
  return crop_or_pad(data, inverse.offset, inverse.cube_shape), inverse


def to_subject_space(
    cube: np.ndarray, inverse: CubeInverse, *, order: int = 1
) -> nib.Nifti1Image:
  """Maps a cube array back onto the subject's own grid; returns an image with its affine.

  Args:
    cube: `[X, Y, Z]` or `[X, Y, Z, k]` on the cube (e.g. a relevance map, a mask, the input).
    inverse: the subject's `CubeInverse`.
    order: interpolation order used only if the cube came from a resampled grid (0 for labels
      and masks, 1 for maps); without resampling the inverse is a pure index map.

  Returns:
    `Nifti1Image` `[*original_shape(, k)]` with the original affine. Voxels the cube does not
    cover are 0. Without resampling, the cube of `to_cube(img)` goes back to `img`'s voxels
    exactly (inside the cube). bool becomes uint8 and float16 becomes float32 (NIfTI types).
  """
  cube = np.asarray(cube)
  if tuple(cube.shape[:3]) != tuple(inverse.cube_shape) or cube.ndim not in (3, 4):
    raise ValueError(
        f"cube array of shape {tuple(cube.shape)} does not match cube shape "
        f"{tuple(inverse.cube_shape)} (expected [X, Y, Z] or [X, Y, Z, k])")
  grid = place_in_grid(cube, inverse.offset, inverse.grid_shape)
  original_affine = np.asarray(inverse.original_affine, np.float64)
  if inverse.resampled:
    # Original voxels -> their world -> (aligned scans) the template world the grid lives in.
    seen_from = original_affine if inverse.alignment is None else (
        np.asarray(inverse.alignment, np.float64) @ original_affine)
    data = nifti.resample(
        grid, np.asarray(inverse.grid_affine), inverse.original_shape, seen_from, order=order)
  else:
    data = np.ascontiguousarray(nifti.undo_orientation(grid, np.asarray(inverse.orientation)))
  return nifti.make_image(data, original_affine)


def cube_image(cube: np.ndarray, inverse: CubeInverse) -> nib.Nifti1Image:
  """A cube array `[X, Y, Z(, k)]` as an image in world coordinates (the cube's own affine)."""
  return nifti.make_image(cube, inverse.cube_affine)
