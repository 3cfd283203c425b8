"""`prepare --align template`: native-space scans brought to the template frame before preprocessing.

Each subject's reference (first) sequence is registered to the template with a head
(`simulation.acquisition.head_template`: the simulated template's tissue contrasts with a
synthetic skull and scalp, at the cache's voxel size) by `register.register` (rigid, then affine
unless `transform="rigid"`). Every sequence is then resampled once (linear) onto the template
grid, where the template-space cohort's images live, and preprocessing goes on as for them.

Brain mask: a mask given with the scan (`--mask-suffix`) is carried over through the same
transform (nearest neighbour). Without one, a scan whose aligned signal lies mostly inside the
template's brain (dilated by `SKULL_MARGIN_MM`) counts as skull-stripped and keeps its own
nonzero voxels; otherwise the template's brain mask is used and everything outside it is zeroed.
That mask is coarse: it is the template's brain, not the subject's (an affine registration does
not follow the individual outline), so a few millimetres of skull or of cortex may be wrong at
the border; pass a subject's own mask where it matters.

The transform is kept in the subject's `CubeInverse` (`alignment`), so that
`prune.to_subject_space` maps cube arrays straight back onto the scan's own grid in one
interpolation.
"""

from __future__ import annotations

import dataclasses
import functools

import nibabel as nib
import numpy as np
from scipy import ndimage

from jax_brainage.data import nifti, prune, register
from jax_brainage.data.anatomy import RESOLUTIONS_MM, TemplateAnatomy, load_anatomy
from jax_brainage.data.simulation import acquisition
from jax_brainage.errors import DataError

TRANSFORMS = ("affine", "rigid")
SKULL_MARGIN_MM = 6.0
# A scan is skull-stripped when at most this fraction of its aligned signal lies outside the
# template's (dilated) brain.
OUTSIDE_SIGNAL_MAX = 0.05


def template_resolution(size_mm: float) -> int:
  """The template grid's voxel size (mm): the one of 1-4 nearest `size_mm` (the cache's voxel
  size, else the scan's coarsest voxel edge)."""
  return int(min(RESOLUTIONS_MM, key=lambda r: abs(r - float(size_mm))))


@functools.lru_cache(maxsize=8)
def _template(resolution_mm: int, sequence: str) -> tuple[TemplateAnatomy, np.ndarray, np.ndarray]:
  anatomy = load_anatomy(resolution_mm)
  image, affine = acquisition.head_template(
      anatomy, sequence if sequence in acquisition.HEAD_CONTRASTS else "T1w")
  return anatomy, image, affine


@dataclasses.dataclass(frozen=True)
class Aligned:
  """A subject on the template grid.

  Attributes:
    images: per sequence, `nib.Nifti1Image` on the template grid (float32).
    mask: brain mask image on that grid, or None (nonzero voxels of the reference).
    scan_to_template: world -> world `[4, 4]` (mm) found by the registration.
    skull_stripped: whether the scan was taken as skull-stripped (no mask given).
    loss: 1 - normalised cross-correlation with the template at the finest level.
  """

  images: list
  mask: nib.Nifti1Image | None
  scan_to_template: np.ndarray
  skull_stripped: bool
  loss: float


def to_template(
    images: list, sequences: tuple[str, ...], *, transform: str = "affine",
    voxel_size_mm: float | None = None, mask: nib.spatialimages.SpatialImage | None = None,
    subject: str | None = None,
) -> Aligned:
  """Registers `images[0]` to the template and resamples every image onto the template grid.

  Args:
    images: loaded `nib` images, one per sequence, `images[0]` the reference.
    sequences: their names (the reference's picks the template contrast).
    transform: "affine" (rigid, then affine: 12 degrees of freedom) or "rigid".
    voxel_size_mm: template grid voxel size; default from the scan (`template_resolution`).
    mask: the scan's own brain mask (any grid), carried over; None: see the module docstring.
    subject: for error messages.
  """
  if transform not in TRANSFORMS:
    raise DataError(f"unknown alignment transform {transform!r}; choose {', '.join(TRANSFORMS)}")
  ref = images[0]
  ref_affine = np.asarray(ref.affine, np.float64)
  anatomy, fixed, fixed_affine = _template(
      template_resolution(voxel_size_mm if voxel_size_mm is not None
                          else float(np.max(nifti.voxel_size(ref_affine)))), sequences[0])
  stages = ("rigid",) if transform == "rigid" else ("rigid", "affine")
  matrices, loss = register.register(
      [np.asarray(ref.dataobj, np.float32)], [ref_affine], fixed, fixed_affine,
      register.Schedule(stages=stages))
  m = matrices[0]
  if not np.all(np.isfinite(m)):
    raise DataError(f"{subject or 'subject'}: registration to the template failed (non-finite "
                    "transform)")
  shape, affine = anatomy.shape, np.asarray(anatomy.affine, np.float64)
  out = [nifti.make_image(acquisition.regrid(np.asarray(img.dataobj, np.float32), img.affine,
                                             shape, affine, m), affine) for img in images]
  brain = anatomy.brain > 0.5
  skull_stripped = True
  if mask is not None:
    carried = acquisition.regrid(np.asarray(mask.dataobj) != 0, mask.affine, shape, affine, m,
                                 order=0)
    mask_img = nifti.make_image(carried.astype(np.uint8), affine)
  else:
    signal = np.clip(np.asarray(out[0].dataobj), 0, None)
    grown = ndimage.binary_dilation(
        brain, iterations=max(1, int(round(SKULL_MARGIN_MM / anatomy.resolution_mm))))
    outside = float(signal[~grown].sum()) / max(float(signal.sum()), 1e-12)
    skull_stripped = outside <= OUTSIDE_SIGNAL_MAX
    mask_img = None
    if not skull_stripped:  # the template's brain, carried back: coarse (module docstring)
      mask_img = nifti.make_image(brain.astype(np.uint8), affine)
      out = [nifti.make_image(np.asarray(img.dataobj) * brain, affine) for img in out]
  return Aligned(images=out, mask=mask_img, scan_to_template=m, skull_stripped=skull_stripped,
                 loss=float(loss[0]))


def scan_inverse(inverse: prune.CubeInverse, scan: nib.spatialimages.SpatialImage,
                 scan_to_template: np.ndarray) -> prune.CubeInverse:
  """The `CubeInverse` of a cube cut from an aligned scan: back to the scan's own grid through
  the registration (`prune.to_subject_space` composes it with the cube's template grid)."""
  return dataclasses.replace(
      inverse, original_shape=tuple(int(s) for s in scan.shape[:3]),
      original_affine=prune.affine_tuple(scan.affine), resampled=True,
      alignment=prune.affine_tuple(scan_to_template))
