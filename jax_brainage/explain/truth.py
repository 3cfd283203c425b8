"""Ground truth of the simulated cohort on the network's grid: where ageing was put, per subject.

The masks a relevance map is scored against (`explain.scoring`), by name:
  - `ageing`: union over the model's sequences of the voxels that ageing changed
    (|image(b) - image(b_ref)| above threshold); `ageing_<seq>` per sequence on disk;
  - narrower effect masks, since the ageing masks cover most of the cortex: `lesions` (the
    white-matter lesion mask), `ventricles` (the subject's lateral ventricles at its brain age,
    dilated by one voxel: enlargement shows at their rim) and `deep_grey` (the lentiform nucleus,
    where iron darkens SWI). Structures are the simulator's atlas carried through the subject's
    own warp (rotation, head size, deformation, ventricle enlargement), re-derived from the
    cohort's seed (`Cohort.subject_labels`): the atlas itself sits in template space, not on the
    subject's anatomy.

Mask and relevance are compared on the same grid: the masks are carried into the network's cube
with the subject's `CubeInverse` (reorientation + crop/pad; nearest neighbour if the cube was
resampled). Every cube voxel counts (relevance outside the brain is relevance outside the mask).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from jax_brainage.data import nifti, prune, simulate
from jax_brainage.errors import DataError

STRUCTURES = {"ventricles": "lateral_ventricles", "deep_grey": "lentiform_nucleus"}
EFFECT_MASKS = ("lesions", "ventricles", "deep_grey")
PRIMARY_MASK = "ageing"


def mask_to_cube(mask: np.ndarray, affine: np.ndarray, inverse) -> np.ndarray:
  """A subject-space mask `[x, y, z]` (on the grid `affine`) carried into the network's cube.

  The forward of `prune.to_subject_space`: when the mask is on the subject's original grid and
  the cube was not resampled, an exact index map (reorientation to RAS+, then the cube's
  crop/pad); otherwise nearest-neighbour resampling through world coordinates (mm).

  Returns:
    bool `[*inverse.cube_shape]`.
  """
  mask = np.asarray(mask) != 0
  if not inverse.resampled and nifti.same_grid(mask.shape, affine, inverse.original_shape,
                                                inverse.original_affine):
    grid = nifti.reorient_array(mask, np.asarray(inverse.orientation))
    return prune.crop_or_pad(grid, inverse.offset, inverse.cube_shape).astype(bool)
  out = nifti.resample(mask.astype(np.uint8), affine, inverse.cube_shape, inverse.cube_affine,
                       order=0)
  return out != 0


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """One subject's masks in cube space (bool `[X, Y, Z]`), by mask name."""

  subject_id: str
  masks: dict[str, np.ndarray]


def _read_mask(path: Path, subject_id: str) -> tuple[np.ndarray, np.ndarray]:
  if not path.is_file():
    raise DataError(f"{path}: {subject_id}: ground-truth mask missing (is --data a simulated "
                    "cohort written by `brainage simulate`?)")
  try:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), np.asarray(img.affine, np.float64)
  except Exception as e:  # noqa: BLE001 - nibabel raises many types for a corrupt file
    raise DataError(f"{path}: {subject_id}: unreadable mask ({type(e).__name__})") from None


def ground_truth(data: Path, cohort, subject_id: str, sequences: Sequence[str],
                 inverse) -> GroundTruth:
  """The masks of one simulated subject, carried into its cube (see the module docstring).

  Args:
    data: the simulated BIDS dataset (with derivatives/simulation/).
    cohort: its `simulate.Cohort` (`open_cohort`).
    sequences: the model's sequences (their ageing masks make `ageing`).
    inverse: the subject's `prune.CubeInverse`.
  """
  anat = simulate.derivatives_dir(data) / subject_id / "anat"
  on_disk = [s for s in simulate.SEQUENCES
             if (anat / f"{subject_id}_{s}_ageingmask.nii.gz").is_file()]
  missing = [s for s in sequences if s not in on_disk]
  if missing:
    _read_mask(anat / f"{subject_id}_{missing[0]}_ageingmask.nii.gz", subject_id)
  masks: dict[str, np.ndarray] = {}
  affine = None
  for s in on_disk:
    m, affine = _read_mask(anat / f"{subject_id}_{s}_ageingmask.nii.gz", subject_id)
    masks[f"ageing_{s}"] = mask_to_cube(m, affine, inverse)
  masks[PRIMARY_MASK] = np.any([masks[f"ageing_{s}"] for s in sequences], axis=0)
  lesion, affine = _read_mask(anat / f"{subject_id}_lesionmask.nii.gz", subject_id)
  masks["lesions"] = mask_to_cube(lesion, affine, inverse)
  labels = cohort.subject_labels(_cohort_index(cohort, subject_id, data))
  names = {v["name"]: k for k, v in cohort.atlas.table.items()}
  ventricles = ndimage.binary_dilation(labels == names[STRUCTURES["ventricles"]]) & (labels > 0)
  masks["ventricles"] = mask_to_cube(ventricles, cohort.affine, inverse)
  masks["deep_grey"] = mask_to_cube(labels == names[STRUCTURES["deep_grey"]], cohort.affine,
                                    inverse)
  return GroundTruth(subject_id, masks)


def stacked_masks(truths: Sequence[GroundTruth]) -> tuple[list[str], dict[str, np.ndarray]]:
  """The masks scored, in report order (`ageing`, `ageing_<seq>`..., the effect masks), and
  each stacked over subjects: {name: bool `[n, X, Y, Z]`}."""
  names = [PRIMARY_MASK] + sorted(k for k in truths[0].masks if k.startswith("ageing_")) + [
      m for m in EFFECT_MASKS]
  return names, {k: np.stack([t.masks[k] for t in truths]) for k in names}


def _cohort_index(cohort, subject_id: str, data: Path) -> int:
  try:
    index = int(subject_id.split("-", 1)[1]) - 1
  except (IndexError, ValueError):
    index = -1
  if not 0 <= index < len(cohort) or simulate.subject_id(index) != subject_id:
    raise DataError(f"{data}: {subject_id} is not a subject of the simulated cohort "
                    f"({len(cohort)} subjects)")
  return index


def open_cohort(data: Path):
  """The simulated cohort (`simulate.Cohort`) behind a dataset written by `brainage simulate`."""
  path = simulate.derivatives_dir(data) / "config.json"
  if not path.is_file():
    raise DataError(f"--data {data}: no simulation ground truth ({path} missing); "
                    "evaluate-explanations needs a cohort written by `brainage simulate`")
  try:
    config = simulate.CohortConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: unreadable cohort configuration ({type(e).__name__})") from None
  return simulate.Cohort(config)
