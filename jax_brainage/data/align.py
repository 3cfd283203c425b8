"""`prepare --align template`: native-space scans brought to the template frame, then prepared.

Each subject's reference (first) sequence is registered to the template with a head
(`simulation.acquisition.head_template`: the simulated template's tissue contrasts with a
synthetic skull and scalp, at the cache's voxel size) by `register.register` (rigid, then
affine; Mattes mutual information, `register.TEMPLATE_SCHEDULE`: nearer the true affine than
NCC and a third of ANTs' CPU time, RESULTS.md session 12), or moved by a transform the caller knows (`scan_to_template`). `transform="rigid"`
keeps only the rigid part of that registration (`rigid_part`: its rotation, about the template
brain's centre): the scan's pose and grid are undone, its head size and shape kept. (A rigid-only
NCC registration of a head to a template head of another size stops in a wrong optimum, 14-22 mm
off on 3 of 4 subjects at 4 mm; the rigid part of the affine is 1-2 mm from the rigid part of
the true transform: RESULTS.md, session 12.) Every sequence is then resampled once onto the
template grid, where the template-space cohort's images live, and preprocessing goes on as for
them.

Resampling (`brain_resample`), as the simulator renders a skull-stripped subject on that grid:
inside the brain a cubic B-spline (scipy's prefiltered `order=3`, `IMAGE_ORDER`), clipped at 0;
on the brain's edge band the brain's part of each voxel only (normalised interpolation with the
mask, so skull, CSF shell or background do not bleed in); zero outside. At 4 mm the models'
estimate follows sub-voxel texture and the brain's one-voxel rim closely (benchmarks/RESULTS.md,
session 11: a Gaussian blur of 0.5 voxel moves it by years); plain trilinear resampling of a scan
whose grid is near the template's (0.85-1.3x) blurs (high-frequency energy 0.47x the
template-space image's after acquisition and alignment, 0.81x with cubic splines both ways) and
mixes the head into the rim.

Brain mask: a mask given with the scan (`--mask`) is carried over through the same transform,
linearly, and thresholded at 0.5 (how the simulator makes its masks from the template's
fractional brain; nearest neighbour shifts the edge by up to half a voxel). Without one, a scan
whose aligned signal lies mostly inside the template's brain (dilated by `SKULL_MARGIN_MM`)
counts as skull-stripped and its nonzero voxels are its mask; otherwise the template's brain mask,
carried by the registration, is refined by intensity (`skullstrip.refine_mask`: the dark CSF and
bone between brain and scalp; T1w or FLAIR references only, others keep the carried mask) and
everything outside the mask is zeroed. That mask is still approximate (Dice ~0.97 against the
simulator's true brain at 4 mm, ~0.95 for the carried template mask; the model check after
alignment: 1.15 years with it, 0.72 with the subject's own mask); pass a subject's own mask
where it matters.

The transform is kept in the subject's `CubeInverse` (`alignment`), so that
`prune.to_subject_space` maps cube arrays straight back onto the scan's own grid in one
interpolation.
"""

from __future__ import annotations

import dataclasses
import functools

import nibabel as nib
import numpy as np
from scipy import linalg, ndimage

from jax_brainage.data import nifti, prune, register, skullstrip
from jax_brainage.data.anatomy import RESOLUTIONS_MM, TemplateAnatomy, load_anatomy
from jax_brainage.data.simulation import acquisition
from jax_brainage.errors import DataError

TRANSFORMS = ("affine", "rigid")
# `--align-transform`'s default. Rigid (head size kept) was tried as the default in session 12
# and is no closer to the template-space estimate than affine (RESULTS.md, session 12).
DEFAULT_TRANSFORM = "affine"
MASKINGS = ("refined", "template")  # without a mask: the refined or the carried template mask
IMAGE_ORDER = 3  # spline order of the images' resampling (module docstring)
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
    mask: brain mask image (uint8) on that grid: the scan's own mask carried over, the refined or
      the template mask (scans with a head), or a skull-stripped scan's nonzero voxels.
    masking: where the mask came from: "own" (given), "refined", "template", or "none"
      (skull-stripped scan: its nonzero voxels).
    scan_to_template: world -> world `[4, 4]` (mm) the images were moved by (found by the
      registration, or known; for "rigid" its rigid part).
    skull_stripped: whether the scan was taken as skull-stripped (no mask given).
    loss: 1 - normalised cross-correlation with the template at the finest level (of the
      affine registration, also for "rigid").
  """

  images: list
  mask: nib.Nifti1Image | None
  scan_to_template: np.ndarray
  skull_stripped: bool
  loss: float
  masking: str = "none"


def rigid_part(scan_to_template: np.ndarray, centre_mm) -> np.ndarray:
  """The rigid transform `[4, 4]` (world -> world, mm) nearest an affine one: the rotation of its
  linear part's polar decomposition (scale and shear dropped), placed so that the scan point the
  affine maps onto `centre_mm` `[3]` (the template brain's centre) still maps there. So the pose
  and position are undone and the head keeps its size and shape about its own centre."""
  m = np.asarray(scan_to_template, np.float64)
  rotation, _ = linalg.polar(m[:3, :3])
  if np.linalg.det(rotation) < 0:
    raise ValueError("the transform mirrors the scan; it has no rigid part")
  centre = np.asarray(centre_mm, np.float64)
  origin = np.linalg.solve(m[:3, :3], centre - m[:3, 3])  # scan point mapped onto the centre
  out = np.eye(4)
  out[:3, :3] = rotation
  out[:3, 3] = centre - rotation @ origin
  return out


def resample_image(volume: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray,
                   scan_to_template: np.ndarray, order: int = IMAGE_ORDER) -> np.ndarray:
  """One image onto the template grid through `scan_to_template` `[4, 4]` (world -> world, mm):
  prefiltered spline of `order` (`scipy.ndimage.affine_transform`), clipped at 0 (a spline
  undershoots next to a dark background): float32 `[*shape]`."""
  out = acquisition.regrid(np.asarray(volume, np.float32), affine, shape, target_affine,
                           scan_to_template, order=order)
  return np.clip(out, 0, None)


def carry_mask(mask: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray,
               scan_to_template: np.ndarray) -> np.ndarray:
  """A brain mask onto the template grid: the mask as 0/1, resampled linearly, >= 0.5 (bool)."""
  moved = acquisition.regrid((np.asarray(mask) != 0).astype(np.float32), affine, shape,
                             target_affine, scan_to_template, order=1)
  return moved >= 0.5


def to_template(
    images: list, sequences: tuple[str, ...], *, transform: str = DEFAULT_TRANSFORM,
    voxel_size_mm: float | None = None, mask: nib.spatialimages.SpatialImage | None = None,
    subject: str | None = None, scan_to_template: np.ndarray | None = None,
    masking: str = "refined", refinement: skullstrip.Refinement = skullstrip.Refinement(),
) -> Aligned:
  """Registers `images[0]` to the template and resamples every image onto the template grid.

  Args:
    images: loaded `nib` images, one per sequence, `images[0]` the reference.
    sequences: their names (the reference's picks the template contrast).
    transform: "affine" (rigid, then affine: 12 degrees of freedom) or "rigid" (6: the rigid
      part of that registration or of a known `scan_to_template`, `rigid_part`; head size and
      shape kept; the template's brain mask, where one is needed, still follows the affine, so
      that it fits the head's size).
    voxel_size_mm: template grid voxel size; default from the scan (`template_resolution`).
    mask: the scan's own brain mask (any grid), carried over; None: see the module docstring.
    subject: for error messages.
    scan_to_template: a known scanner world -> template world affine `[4, 4]` (mm): used
      instead of a registration (e.g. the simulator's true one; with "rigid", its rigid part).
    masking: for a scan with a head and no `mask`: "refined" (`skullstrip.refine_mask`) or
      "template" (the carried template brain mask as it is); `refinement`: its settings.
  """
  if masking not in MASKINGS:
    raise DataError(f"unknown masking {masking!r}; choose {', '.join(MASKINGS)}")
  if transform not in TRANSFORMS:
    raise DataError(f"unknown alignment transform {transform!r}; choose {', '.join(TRANSFORMS)}")
  ref = images[0]
  ref_affine = np.asarray(ref.affine, np.float64)
  anatomy, fixed, fixed_affine = _template(
      template_resolution(voxel_size_mm if voxel_size_mm is not None
                          else float(np.max(nifti.voxel_size(ref_affine)))), sequences[0])
  if scan_to_template is None:
    matrices, loss = register.register(
        [np.asarray(ref.dataobj, np.float32)], [ref_affine], fixed, fixed_affine,
        dataclasses.replace(register.TEMPLATE_SCHEDULE, stages=("rigid", "affine")))
    fit, loss0 = matrices[0], float(loss[0])  # the affine: where the template lies on the scan
  else:
    fit, loss0 = np.asarray(scan_to_template, np.float64), float("nan")
  if not np.all(np.isfinite(fit)):
    raise DataError(f"{subject or 'subject'}: registration to the template failed (non-finite "
                    "transform)")
  m = rigid_part(fit, anatomy.centre_mm) if transform == "rigid" else fit
  shape, affine = anatomy.shape, np.asarray(anatomy.affine, np.float64)
  brain = anatomy.brain > 0.5
  if m is not fit:  # rigid: the template's brain fitted to this head by the affine, then moved
    brain = carry_mask(brain, affine, shape, affine, m @ np.linalg.inv(fit))
  skull_stripped, how = True, "none"
  if mask is not None:
    brain, how = carry_mask(mask.dataobj, mask.affine, shape, affine, m), "own"
  else:
    signal = resample_image(ref.dataobj, ref_affine, shape, affine, m)
    grown = ndimage.binary_dilation(
        brain, iterations=max(1, int(round(SKULL_MARGIN_MM / anatomy.resolution_mm))))
    outside = float(signal[~grown].sum()) / max(float(signal.sum()), 1e-12)
    skull_stripped = outside <= OUTSIDE_SIGNAL_MAX
    if skull_stripped:  # its own nonzero voxels
      brain = carry_mask(np.asarray(ref.dataobj) != 0, ref_affine, shape, affine, m)
    else:  # the template's brain, carried back, refined by intensity where the contrast allows
      how = masking if sequences[0] in skullstrip.DARK_CSF else "template"
      if how == "refined":
        brain = skullstrip.refine_mask(signal, brain, nifti.voxel_size(affine), refinement)
  out, masks = zip(*(brain_resample(np.asarray(img.dataobj, np.float32), img.affine, brain,
                                    shape, affine, m) for img in images))
  return Aligned(images=[nifti.make_image(o, affine) for o in out],
                 mask=nifti.make_image(masks[0].astype(np.uint8), affine), scan_to_template=m,
                 skull_stripped=skull_stripped, loss=loss0, masking=how)


def brain_resample(volume: np.ndarray, affine: np.ndarray, brain: np.ndarray, shape,
                   target_affine: np.ndarray, scan_to_template: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """One image onto the template grid as the simulator renders a skull-stripped subject.

  The simulator gives a voxel on the brain's edge the brain's part of it only (tissue fractions
  divided by their sum: no partial volume with what lies outside) and zero beyond. So: the
  template-grid `brain` `[*shape]` is carried onto the image's grid (linear, >= 0.5: `M`); inside,
  the image is resampled by cubic splines (`resample_image`); on the edge band, where the
  resampled `M` (linear) is in [0.5, 1), by normalised interpolation, linear(image x M) /
  linear(M), which leaves out whatever lies outside the brain (skull, CSF shell, background).

  Returns:
    (image float32 `[*shape]`, 0 outside the mask; mask bool `[*shape]`: linear(M) >= 0.5).
  """
  back = np.linalg.inv(np.asarray(scan_to_template, np.float64))
  on_scan = acquisition.regrid(np.asarray(brain, np.float32), target_affine, volume.shape[:3],
                               affine, back, order=1) >= 0.5
  weight = acquisition.regrid(on_scan.astype(np.float32), affine, shape, target_affine,
                              scan_to_template, order=1)
  inside = resample_image(volume, affine, shape, target_affine, scan_to_template)
  brain_only = acquisition.regrid(volume * on_scan, affine, shape, target_affine,
                                  scan_to_template, order=1) / np.maximum(weight, 1e-3)
  mask = weight >= 0.5
  # The band only: widening it to the splines' support (2 voxels) blurs a 4 mm brain's rim, and
  # the model check gets worse (3.1 instead of 1.4 years; RESULTS.md session 11).
  out = np.where(mask & (weight < 0.999), np.clip(brain_only, 0, None), inside)
  return np.where(mask, out, 0).astype(np.float32), mask


def scan_inverse(inverse: prune.CubeInverse, scan: nib.spatialimages.SpatialImage,
                 scan_to_template: np.ndarray) -> prune.CubeInverse:
  """The `CubeInverse` of a cube cut from an aligned scan: back to the scan's own grid through
  the registration (`prune.to_subject_space` composes it with the cube's template grid)."""
  return dataclasses.replace(
      inverse, original_shape=tuple(int(s) for s in scan.shape[:3]),
      original_affine=prune.affine_tuple(scan.affine), resampled=True,
      alignment=prune.affine_tuple(scan_to_template))
