"""Scans as acquired: a simulated subject with skull and scalp, in a scanner pose, on a scanner grid.

`brainage simulate --acquisition raw` writes these instead of the template-space images. A raw
scan is the subject's template-space image (what `--acquisition template` writes, unchanged)
with a head around the brain (`add_head`), moved by a rigid pose (`random_pose`: up to 20
degrees about each axis and 20 mm along each) and sampled on another voxel grid (`random_grid`:
other voxel sizes, anisotropic, another field of view, an orientation such as LPS or PIR) by
`regrid` (a cubic B-spline, `ACQUISITION_ORDER`: a scanner samples the object itself, and a
trilinear interpolation of the 4 mm render would blur it as no scanner does; the brain mask is
resampled linearly and thresholded at 0.5). Everything is drawn from the subject's own random
stream `STREAM_ACQUISITION` of (seed, index), so the template-space cohort's streams are
untouched and the same seed gives the same scans.

Transforms are 4x4 world -> world matrices in mm on RAS+ world coordinates (each image's own
header affine gives its world): `x_to = M @ [x_from, 1]`. For every raw scan two are known:
  - `scan_to_subject`: scanner world -> the world of the subject's template-space image (the
    inverse of the pose): resampling the raw scan through it gives the template-space scan back
    (up to interpolation and the head);
  - `scan_to_template`: scanner world -> template (MNI) world: the above followed by the
    least-squares affine fit of the subject's own anatomy warp over its brain (head size, the
    simulator's small rotation and translation, and the affine part of its smooth
    deformation). An affine registration of the raw scan to the template estimates this one.

The head is synthetic: nilearn's MNI152 2009 template, which the simulated anatomy comes from,
ships tissue maps, a brain mask and a T1 that are all skull-stripped (checked: 443 of 235,818
voxels of its 2 mm T1 above 5% of the maximum lie outside the brain mask), so the head is a smooth
layered shell built outward from the brain's outline (CSF, inner table, diploe, outer table,
scalp), thicker or thinner per subject.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from jax_brainage import fileio
from jax_brainage.data import nifti
from jax_brainage.data.anatomy import TemplateAnatomy
from jax_brainage.data.simulation import render
from jax_brainage.data.simulation.config import CohortConfig

# A new stream index of SeedSequence([seed, index, stream]) (0 population, 1 nuisance).
STREAM_ACQUISITION = 2
ORIENTATIONS = ("RAS", "LPS", "PIR", "LAS", "ASR", "RPI")
MAX_ROTATION_DEG = 20.0
MAX_TRANSLATION_MM = 20.0
# Head layers outward from the smoothed brain outline: (name, outer edge in mm) and their
# intensity per sequence in units of T1w white matter (T1w: dark bone, bright fat).
HEAD_LAYERS = (("csf", 2.5), ("inner_table", 4.5), ("diploe", 7.5), ("outer_table", 9.0),
               ("scalp", 15.0))
HEAD_CONTRASTS = {
    "T1w": {"csf": 0.18, "inner_table": 0.05, "diploe": 0.55, "outer_table": 0.05, "scalp": 0.85},
    "FLAIR": {"csf": 0.10, "inner_table": 0.05, "diploe": 0.60, "outer_table": 0.05,
              "scalp": 0.75},
    "swi": {"csf": 1.0, "inner_table": 0.05, "diploe": 0.50, "outer_table": 0.05, "scalp": 0.60},
}
ACQUISITION_ORDER = 3  # spline order of the scanner-grid sampling (module docstring)
HEAD_MARGIN_MM = 24.0  # the template grid is padded by this much so that the head fits
SITES = (
    {"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma", "MagneticFieldStrength": 3},
    {"Manufacturer": "GE", "ManufacturersModelName": "Discovery MR750", "MagneticFieldStrength": 3},
    {"Manufacturer": "Philips", "ManufacturersModelName": "Ingenia", "MagneticFieldStrength": 1.5},
)


def add_head(
    volume: np.ndarray, brain: np.ndarray, affine: np.ndarray, sequence: str = "T1w", *,
    unit: float | None = None, thickness: float = 1.0, rng: np.random.Generator | None = None,
    noise_sd: float = 0.0,
) -> np.ndarray:
  """Puts skull and scalp around a skull-stripped image: float32 `[X, Y, Z]`.

  Args:
    volume: skull-stripped image `[X, Y, Z]` (0 outside the brain).
    brain: brain mask `[X, Y, Z]` (bool) on the same grid.
    affine: the grid's voxel-to-world affine `[4, 4]` (mm), for distances in mm.
    sequence: T1w, FLAIR or swi (the layers' contrasts, `HEAD_CONTRASTS`).
    unit: intensity of T1w white matter in `volume`; default: the 95th percentile in the brain.
    thickness: factor on every layer's depth (`HEAD_LAYERS`, mm).
    rng, noise_sd: optional Gaussian noise on the head (sd in units of `unit`).

  Returns:
    The image with the brain unchanged and the head layers outside it; the grid must leave
    `HEAD_LAYERS[-1][1] * thickness` mm around the brain for the whole head to show.
  """
  brain = np.asarray(brain, bool)
  spacing = nifti.voxel_size(affine)
  if unit is None:
    unit = float(np.percentile(volume[brain], 95)) if brain.any() else 1.0
  # A smooth outline: the brain's gyri filled in, so the shell follows the skull, not the sulci.
  sigma = 4.0 / spacing
  outline = ndimage.gaussian_filter(brain.astype(np.float32), sigma) > 0.25
  depth = ndimage.distance_transform_edt(~(outline | brain), sampling=spacing)  # mm outside
  head = np.zeros(volume.shape, np.float32)
  inner = 0.0
  contrast = HEAD_CONTRASTS[sequence]
  for name, edge in HEAD_LAYERS:
    outer = edge * thickness
    # Soft layer edges (logistic, ~1 mm): a shell without staircase steps.
    w = _soft_step(depth - inner) * (1.0 - _soft_step(depth - outer))
    head += np.float32(contrast[name]) * w.astype(np.float32)
    inner = outer
  head[depth > inner + 2.0] = 0.0  # air beyond the scalp (the logistic tail would never end)
  head[outline & ~brain] = contrast["csf"]
  if rng is not None and noise_sd > 0:
    head += np.float32(noise_sd) * rng.standard_normal(head.shape, dtype=np.float32) * (head > 0)
  out = np.asarray(volume, np.float32).copy()
  outside = ~brain
  out[outside] = np.clip(head[outside], 0, None) * np.float32(unit)
  return out


def _soft_step(x: np.ndarray, width_mm: float = 0.6) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.clip(x / width_mm, -50, 50)))


def random_pose(
    rng: np.random.Generator, centre_mm: Sequence[float], *,
    max_rotation_deg: float = MAX_ROTATION_DEG, max_translation_mm: float = MAX_TRANSLATION_MM,
) -> np.ndarray:
  """A rigid pose `[4, 4]` (world -> world, mm): rotation about `centre_mm` by angles uniform in
  +-max_rotation_deg about x, y and z, then a translation uniform in +-max_translation_mm."""
  angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
  shift = rng.uniform(-max_translation_mm, max_translation_mm, 3)
  c = np.asarray(centre_mm, np.float64)
  pose = np.eye(4)
  pose[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
  pose[:3, 3] = c - pose[:3, :3] @ c + shift
  return pose


def grid_affine(orientation: str, voxel_mm: Sequence[float], shape: Sequence[int],
                centre_mm: Sequence[float]) -> np.ndarray:
  """Voxel-to-world `[4, 4]` of a grid whose voxel axes point along `orientation` (axis codes
  such as 'LPS': axis 0 toward Left...), `voxel_mm` `[3]` along those axes, centred on
  `centre_mm`."""
  ornt = nib.orientations.axcodes2ornt(tuple(orientation))
  affine = np.zeros((4, 4))
  affine[3, 3] = 1.0
  for i, (axis, flip) in enumerate(ornt):
    affine[int(axis), i] = float(flip) * float(voxel_mm[i])
  half = (np.asarray(shape, np.float64) - 1) / 2
  affine[:3, 3] = np.asarray(centre_mm, np.float64) - affine[:3, :3] @ half
  return affine


def random_grid(rng: np.random.Generator, resolution_mm: float, centre_mm: Sequence[float]
                ) -> tuple[tuple[int, int, int], np.ndarray, str]:
  """A scanner grid: orientation from `ORIENTATIONS`, in-plane voxels of 0.85-1.15 x and slices
  of 1.0-1.3 x `resolution_mm`, a 224-256 mm field of view per axis centred within 10 mm of
  `centre_mm`. Returns (shape, affine, orientation)."""
  orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
  voxel = resolution_mm * np.array(
      [rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15), rng.uniform(1.0, 1.3)])
  fov = rng.uniform(224, 256, 3)
  shape = tuple(int(np.ceil(f / v)) for f, v in zip(fov, voxel))
  centre = np.asarray(centre_mm, np.float64) + rng.uniform(-10, 10, 3)
  return shape, grid_affine(orientation, voxel, shape, centre), orientation


def regrid(volume: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
           transform: np.ndarray | None = None, *, order: int = 1) -> np.ndarray:
  """Samples `volume` (grid `affine`) on the grid (`shape`, `target_affine`) after moving it by
  `transform` `[4, 4]` (world -> world, mm: the volume's world to the target's world;
  None = identity): `[*shape]` float32 (order > 0: spline of that order, prefiltered) or the
  input dtype (order 0); 0 outside."""
  moved = affine if transform is None else np.asarray(transform, np.float64) @ affine
  return nifti.resample(volume, moved, shape, target_affine, order=order)


def subject_to_template(config: CohortConfig, anatomy: TemplateAnatomy,
                        nuisance: render.Nuisance, brain_mask: np.ndarray) -> np.ndarray:
  """World -> world `[4, 4]` from a template-space subject image to the template: the least-squares
  affine fit, over the subject's brain voxels, of the simulator's whole warp
  (`render.template_coordinates`: rotation, head size, translation and smooth deformation)."""
  coords = render.template_coordinates(config, anatomy, nuisance).reshape(3, -1)
  inside = np.asarray(brain_mask, bool).reshape(-1)
  aff = np.asarray(anatomy.affine, np.float64)
  x = np.argwhere(np.asarray(brain_mask, bool)) @ aff[:3, :3].T + aff[:3, 3]
  y = coords[:, inside].T.astype(np.float64) @ aff[:3, :3].T + aff[:3, 3]
  fit, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)
  out = np.eye(4)
  out[:3, :] = fit.T
  return out


def padded_grid(anatomy: TemplateAnatomy, margin_mm: float = HEAD_MARGIN_MM
                ) -> tuple[tuple[int, int, int], np.ndarray]:
  """The template grid grown by `margin_mm` on every side (room for the head)."""
  r = float(anatomy.resolution_mm)
  pad = int(np.ceil(margin_mm / r))
  affine = np.asarray(anatomy.affine, np.float64).copy()
  affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
  return tuple(int(s) + 2 * pad for s in anatomy.shape), affine


def head_template(anatomy: TemplateAnatomy, sequence: str = "T1w") -> tuple[np.ndarray, np.ndarray]:
  """The simulated template with a head: tissue contrasts of `render.CONTRASTS` at
  `render.SCAN_UNIT` on the padded template grid, plus `add_head`. Returns (image float32
  `[X, Y, Z]`, affine `[4, 4]`): the target that `--align template` registers raw scans to."""
  gm_c, wm_c, csf_c, _ = render.CONTRASTS[sequence]
  brain_img = (gm_c * anatomy.gm + wm_c * anatomy.wm + csf_c * anatomy.csf) * render.SCAN_UNIT
  shape, affine = padded_grid(anatomy)
  image = regrid(brain_img, anatomy.affine, shape, affine)
  brain = regrid(anatomy.brain, anatomy.affine, shape, affine) >= 0.5
  return add_head(image * brain, brain, affine, sequence, unit=render.SCAN_UNIT), affine


@dataclasses.dataclass(frozen=True, eq=False)
class RawScan:
  """One subject's scans as acquired.

  Attributes:
    images: sequence -> float32 `[*shape]` integer-valued image on the scanner grid.
    brain_mask: bool `[*shape]`, the subject's brain on the scanner grid.
    affine: voxel-to-world `[4, 4]` of the scanner grid; orientation: its axis codes ('LPS').
    scan_to_subject, scan_to_template: world -> world `[4, 4]` (see the module docstring).
    sidecar: scanner metadata for the images' JSON sidecars.
  """

  images: dict[str, np.ndarray]
  brain_mask: np.ndarray
  affine: np.ndarray
  orientation: str
  scan_to_subject: np.ndarray
  scan_to_template: np.ndarray
  sidecar: dict


def acquire(
    images: dict[str, np.ndarray], brain_mask: np.ndarray, config: CohortConfig,
    anatomy: TemplateAnatomy, nuisance: render.Nuisance, rng: np.random.Generator, *,
    unit: float = render.SCAN_UNIT, noise_sd: float = 0.03, order: int = ACQUISITION_ORDER,
) -> RawScan:
  """Turns a template-space subject (`images` seq -> `[X, Y, Z]`, `brain_mask`, on the template
  grid) into raw scans, drawing head thickness, site, pose and grid from `rng` in that order;
  `order`: spline order of the images' sampling on the scanner grid (1: trilinear, as before
  session 11)."""
  thickness = float(rng.uniform(0.8, 1.25))
  site = dict(SITES[int(rng.integers(len(SITES)))])
  centre = np.asarray(anatomy.centre_mm, np.float64)
  pose = random_pose(rng, centre)  # subject world -> scanner world
  shape, affine, orientation = random_grid(rng, float(anatomy.resolution_mm), centre)
  noise_seed = int(rng.integers(0, 2**32))
  pad_shape, pad_affine = padded_grid(anatomy)
  brain_pad = regrid(brain_mask.astype(np.uint8), anatomy.affine, pad_shape, pad_affine,
                     order=0).astype(bool)
  out = {}
  for k, (seq, image) in enumerate(images.items()):
    padded = regrid(image, anatomy.affine, pad_shape, pad_affine, order=0)
    noise_rng = np.random.default_rng([noise_seed, k])
    head = add_head(padded, brain_pad, pad_affine, seq, unit=unit, thickness=thickness,
                    rng=noise_rng, noise_sd=noise_sd)
    sampled = regrid(head, pad_affine, shape, affine, pose, order=order)
    out[seq] = np.clip(np.rint(sampled), 0, 32767)
  brain = regrid(brain_pad.astype(np.float32), pad_affine, shape, affine, pose) >= 0.5
  scan_to_subject = np.linalg.inv(pose)
  return RawScan(
      images=out, brain_mask=brain, affine=affine, orientation=orientation,
      scan_to_subject=scan_to_subject,
      scan_to_template=(subject_to_template(config, anatomy, nuisance, brain_mask)
                        @ scan_to_subject),
      sidecar={**site, "AcquisitionOrientation": orientation,
               "VoxelSizeMM": [float(v) for v in nifti.voxel_size(affine)]},
  )


def transform_record(matrix: np.ndarray, source: str, target: str) -> dict:
  """The JSON record of a world -> world transform (written under derivatives/simulation/)."""
  return {
      "matrix": np.asarray(matrix, np.float64).tolist(),
      "from": source, "to": target,
      "convention": "x_to = matrix @ [x_from, 1]; RAS+ world mm as given by each image's header "
                    "affine (scanner world for raw scans, MNI152NLin2009cAsym for the template)",
  }


def mean_displacement_mm(a: np.ndarray, b: np.ndarray, points_mm: np.ndarray) -> float:
  """Mean distance (mm) between where two world -> world transforms `[4, 4]` put the points
  `[n, 3]` (e.g. the template's brain voxels)."""
  p = np.c_[np.asarray(points_mm, np.float64), np.ones(len(points_mm))]
  return float(np.linalg.norm((p @ (np.asarray(a) - np.asarray(b)).T)[:, :3], axis=1).mean())


def session_rng(seed: int, index: int, session: int) -> np.random.Generator:
  """Subject `index`'s acquisition stream for session `session` (0-based): a pure function of
  (seed, index, session), apart from the template-space cohort's streams."""
  return np.random.default_rng(np.random.SeedSequence([seed, index, STREAM_ACQUISITION, session]))


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm")
  img.set_qform(affine, code=1)  # scanner anatomical
  img.set_sform(affine, code=1)
  return img


def write_raw_subject(
    root: Path, derivatives: Path, subject_id: str, images: dict[str, np.ndarray],
    brain_mask: np.ndarray, config: CohortConfig, anatomy: TemplateAnatomy,
    nuisance: render.Nuisance, index: int, sessions: int, age: float,
) -> None:
  """Writes one subject's raw scans (BIDS, one folder per session when `sessions` > 1), their
  JSON sidecars (scanner, field strength), and under `derivatives`: the brain mask on the scan
  grid and the true transforms (`*_xfm.json`); with sessions, sub-X/sub-X_sessions.tsv."""
  for k in range(sessions):
    raw = acquire(images, brain_mask, config, anatomy, nuisance,
                  session_rng(config.seed, index, k))
    ses = f"ses-{k + 1}" if sessions > 1 else ""
    stem = f"{subject_id}_{ses}_" if ses else f"{subject_id}_"
    anat = Path(root, subject_id, ses, "anat")
    deriv = Path(derivatives, subject_id, ses, "anat")
    for seq, image in raw.images.items():
      fileio.save_nifti(_nifti(image.astype(np.int16), raw.affine), anat / f"{stem}{seq}.nii.gz")
      fileio.write_json(anat / f"{stem}{seq}.json", raw.sidecar)
    fileio.save_nifti(_nifti(raw.brain_mask.astype(np.uint8), raw.affine),
                      deriv / f"{stem}desc-brain_mask.nii.gz")
    fileio.write_json(deriv / f"{stem}from-scanner_to-template_mode-image_xfm.json", {
        "scan_to_template": transform_record(raw.scan_to_template, "scanner", "template"),
        "scan_to_subject": transform_record(raw.scan_to_subject, "scanner",
                                            "subject (its template-space image)"),
        "orientation": raw.orientation,
    })
  if sessions > 1:
    rows = "".join(f"ses-{k + 1}\t{age:.4f}\n" for k in range(sessions))
    fileio.write_text(Path(root, subject_id, f"{subject_id}_sessions.tsv"),
                      "session_id\tage\n" + rows)
