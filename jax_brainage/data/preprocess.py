"""Per-subject preprocessing: the `Preprocessing` record and `preprocess_subject`.

`preprocess_subject` is the one place images become the network's cube (used by `brainage
prepare` for every subject of a cache, on simulated subjects in memory, and by `brainage predict`
on new data through `Cache.preprocess`): load and check every sequence (`nifti.load_image`: header,
units, scaling, CRC); bring them onto the reference (first) sequence's grid, resampled to
`voxel_size` mm if asked, and resampled onto an axis-aligned grid in world space if the reference
is oblique (`nifti.is_oblique`; `resample_oblique=False` refuses such images instead); reorient
to RAS+; centre the brain's bounding box (nonzero voxels of the reference, or a brain mask) in the
cube; optionally correct the bias field; scale intensities (clip at a brain percentile + min-max
to uint8, or z-score -> float16); optionally zero everything outside atlas regions. Sequences
become channels.

The cube shape defaults from the voxel size: 98^3 at 2 mm and 198^3 at 1 mm (the study's), else
the smallest even side that holds 198 mm (`prune.default_cube_shape`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import nibabel as nib
import numpy as np

from jax_brainage.data import align, bids, conformity, intensity, nifti, prune, regions
from jax_brainage.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How images become cubes; stored in the cache so new data is prepared identically.

  Attributes:
    sequences: sequence names, in channel order; the first is the reference (grid, brain).
    shape: cube shape `[3]` (voxels); None = `prune.default_cube_shape` of the voxel size.
    voxel_size: resample to this isotropic voxel size (mm); None = keep each image's grid.
    scaling: "minmax" (uint8), "zscore" or "mean" (float16; `intensity`).
    mean_over_voxels: with scaling "mean", the size (voxels) of the image whose mean divides
      each volume (SFCN: 182 * 218 * 182); None = the cube's.
    ceiling_percentile: brain percentile used as the minmax ceiling.
    regions: atlas labels to keep (None = whole brain).
    bias_sigma_mm: > 0: homomorphic bias-field correction of every sequence with a Gaussian
      field of this width (mm) before scaling (`intensity.correct_bias`); 0 = none.
    resample_oblique: resample a reference image whose affine is oblique (voxel axes rotated
      against the world axes beyond `nifti.OBLIQUE_TOLERANCE_VOXELS`) onto an axis-aligned grid
      in world space (linear; masks nearest), so the brain lands in the cube where its world
      coordinates say; False: refuse such images (one-line DataError).
    align: None (images are taken as they are), or "affine" / "rigid": each subject is first
      registered to the template and resampled onto the template grid (`data.align`,
      `prepare --align template`); the transform is kept in its `CubeInverse`.
  """

  sequences: tuple[str, ...] = ("T1w",)
  shape: tuple[int, int, int] | None = None
  voxel_size: float | None = None
  scaling: str = "minmax"
  ceiling_percentile: float = intensity.DEFAULT_CEILING_PERCENTILE
  regions: tuple[int, ...] | None = None
  bias_sigma_mm: float = 0.0
  resample_oblique: bool = True
  align: str | None = None
  mean_over_voxels: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "sequences", bids.parse_sequences(self.sequences))
    if self.scaling not in intensity.SCALINGS:
      raise ConfigError(
          f"unknown scaling {self.scaling!r}; choose {' or '.join(intensity.SCALINGS)}")
    if self.shape is not None:
      shape = tuple(int(s) for s in self.shape)
      if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"cube shape must be 3 positive sizes, got {self.shape}")
      object.__setattr__(self, "shape", shape)
    if self.voxel_size is not None and not 0 < float(self.voxel_size) < 100:
      raise ConfigError(f"voxel size must be a positive number of mm, got {self.voxel_size}")
    if not 0 < float(self.ceiling_percentile) <= 100:
      raise ConfigError(f"ceiling percentile must be in (0, 100], got {self.ceiling_percentile}")
    if self.regions is not None:
      object.__setattr__(self, "regions", tuple(int(r) for r in self.regions))
    if not 0 <= float(self.bias_sigma_mm) < 1000:
      raise ConfigError(f"bias_sigma_mm must be 0 (no correction) or a width in mm, got "
                        f"{self.bias_sigma_mm}")
    object.__setattr__(self, "bias_sigma_mm", float(self.bias_sigma_mm))
    if not isinstance(self.resample_oblique, (bool, np.bool_)):
      raise ConfigError(f"resample_oblique must be true or false, got {self.resample_oblique!r}")
    object.__setattr__(self, "resample_oblique", bool(self.resample_oblique))
    if self.mean_over_voxels is not None:
      if self.scaling != "mean" or int(self.mean_over_voxels) < 1:
        raise ConfigError(f"mean_over_voxels={self.mean_over_voxels!r}: a positive voxel count, "
                          "with scaling 'mean' only")
      object.__setattr__(self, "mean_over_voxels", int(self.mean_over_voxels))
    if self.align is not None and self.align not in align.TRANSFORMS:
      raise ConfigError(f"align must be none or one of {', '.join(align.TRANSFORMS)}, got "
                        f"{self.align!r}")

  @property
  def dtype(self) -> np.dtype:
    return intensity.storage_dtype(self.scaling)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for key in ("align", "mean_over_voxels"):
      if d[key] is None:
        del d[key]  # records of caches without them stay as they were
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields})


def _as_image(image, subject: str | None, *, require_brain: bool = True) -> nib.Nifti1Image:
  """A checked in-memory image from a path or a nibabel image."""
  if isinstance(image, (str, os.PathLike)):
    return nifti.load_image(image, subject, require_brain=require_brain)
  filename = getattr(image, "get_filename", lambda: None)()
  data = nifti.check_volume(
      np.asanyarray(image.dataobj), filename, subject, require_brain=require_brain)
  return nifti.make_image(data, nifti.check_affine(image.affine, nifti.describe(filename, subject)))


def preprocess_subject(
    images: Mapping[str, Any],
    prep: Preprocessing,
    *,
    subject: str | None = None,
    mask=None,
    atlas: regions.Atlas | None = None,
    measures: dict[str, float] | None = None,
) -> tuple[np.ndarray, prune.CubeInverse]:
  """One subject's images -> the cube the network sees, plus its exact inverse.

  Args:
    images: sequence name -> image path or nibabel image, for every `prep.sequences` entry.
    prep: the preprocessing settings.
    subject: subject id, to name the culprit in errors.
    mask: brain mask (path or image, any grid); default: nonzero voxels of the reference.
    atlas: the region atlas, required when `prep.regions` is set.
    measures: when a dict, filled with the scan's conformity measures
      (`conformity.scan_measures`: native voxel size, brain volume, raw intensity, field of view).

  Returns:
    (cube `[X, Y, Z, C]` uint8 (minmax) or float16 (zscore), `CubeInverse` of the reference).

  Raises:
    DataError: one line naming subject and file (missing/corrupt file, 4D, NaN/Inf, empty brain,
      nothing left inside the regions).
  """
  missing = [s for s in prep.sequences if s not in images]
  if missing:
    raise DataError(f"{subject or 'subject'}: no {missing[0]} image given")
  loaded = [_as_image(images[s], subject) for s in prep.sequences]
  names = [nifti.describe(images[s] if isinstance(images[s], (str, os.PathLike)) else None,
                          subject) + f" ({s})" for s in prep.sequences]
  scan, aligned = loaded[0], None
  if prep.align is not None:
    mask_img = _as_image(mask, subject) if mask is not None else None
    aligned = align.to_template(loaded, prep.sequences, transform=prep.align,
                                voxel_size_mm=prep.voxel_size, mask=mask_img, subject=subject)
    loaded, mask = aligned.images, aligned.mask
  ref = loaded[0]
  ref_affine = np.asarray(ref.affine, np.float64)

  # Target grid: the reference's own, its isotropic resampling, or (oblique reference) its
  # axis-aligned resampling; either resampled grid is axis-aligned in world space.
  oblique = nifti.is_oblique(ref.shape, ref_affine)
  if oblique and not prep.resample_oblique:
    raise DataError(
        f"{names[0]}: oblique voxel-to-world affine (voxel axes up to "
        f"{nifti.obliquity_degrees(ref_affine):.1f} degrees off the world axes) and resampling "
        "of oblique images is off (--no-resample-oblique)")
  resampled = oblique or nifti.needs_resampling(ref_affine, prep.voxel_size)
  if resampled and prep.voxel_size is not None:
    grid_shape, grid_affine = nifti.isotropic_grid(ref.shape, ref_affine, prep.voxel_size)
  elif resampled:
    grid_shape, grid_affine = nifti.aligned_grid(ref.shape, ref_affine)
  else:
    grid_shape, grid_affine = tuple(ref.shape[:3]), ref_affine

  def on_grid(img: nib.Nifti1Image, order: int) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    if nifti.same_grid(img.shape, img.affine, grid_shape, grid_affine):
      return data
    return nifti.resample(data, img.affine, grid_shape, grid_affine, order=order)

  ornt = nifti.canonical_orientation(grid_affine)
  canonical_affine = nifti.reorient_affine(grid_affine, grid_shape, ornt)
  volumes = [nifti.reorient_array(on_grid(img, 1), ornt) for img in loaded]
  canonical_shape = volumes[0].shape

  if mask is not None:
    mask_img = _as_image(mask, subject)
    brain = nifti.reorient_array(on_grid(mask_img, 0) != 0, ornt)
    where_mask = nifti.describe(mask if isinstance(mask, (str, os.PathLike)) else None, subject)
  else:
    brain = volumes[0] != 0
    where_mask = names[0]
  try:
    box = prune.brain_box(brain)
  except ValueError:
    raise DataError(f"{where_mask}: empty brain (no nonzero voxel on the "
                    f"{'resampled ' if resampled else ''}grid)") from None

  if measures is not None:
    measures.update(conformity.scan_measures(volumes[0], brain, canonical_affine, ref_affine))
  cube_shape = prep.shape or prune.default_cube_shape(
      prep.voxel_size or float(np.max(nifti.voxel_size(grid_affine))))
  inverse = prune.make_inverse(ref, canonical_shape, canonical_affine, ornt, resampled, box,
                               cube_shape)
  # Scale on the cube: its statistics are those of what the network sees, at a fraction of the
  # cost of the whole field of view.
  brain_cube = prune.crop_or_pad(brain, inverse.offset, cube_shape)
  cubes = [prune.crop_or_pad(v, inverse.offset, cube_shape) for v in volumes]
  if prep.bias_sigma_mm > 0:
    spacing = nifti.voxel_size(canonical_affine)
    cubes = [intensity.correct_bias(c, brain_cube, prep.bias_sigma_mm, spacing, where=n)
             for c, n in zip(cubes, names)]
  cube = intensity.scale_channels(
      cubes, brain_cube,
      scaling=prep.scaling, ceiling_percentile=prep.ceiling_percentile,
      reference_voxels=prep.mean_over_voxels, names=names)

  if prep.regions is not None:
    if atlas is None:
      raise ConfigError("region masking needs an atlas (--atlas FILE)")
    keep = regions.region_mask(atlas, prep.regions, cube_shape, inverse.cube_affine)
    if not np.any(keep & brain_cube):
      raise DataError(f"{names[0]}: no brain voxel inside atlas regions "
                      f"{','.join(map(str, prep.regions))}")
    cube = regions.apply_mask(cube, keep)
  if aligned is not None:
    inverse = align.scan_inverse(inverse, scan, aligned.scan_to_template)
  return cube, inverse
