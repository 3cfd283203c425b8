"""A brain mask for an aligned scan with a head: the template's brain mask refined by intensity.

`--align template` without `--mask` on a scan that is not skull-stripped needs a brain mask. The
template's brain carried by an affine registration is coarse: it is the template's outline, not
the subject's (an affine does not follow individual gyri or head shape), so at its border it
keeps skull and CSF in some places and cuts cortex in others. `refine_mask` corrects it with
what a T1-weighted (or FLAIR) image shows between brain and scalp: the CSF and the inner table of
the skull are dark, grey and white matter bright. Steps, on the template grid:

  1. a search band: the carried mask dilated by `search_mm`; a sure core: it eroded by `core_mm`;
  2. bright voxels: above `threshold` x the core's white-matter level (its 90th percentile) and
     inside the band;
  3. an opening (radius `opening_mm`) cuts the thin bridges that partial volume builds between
     cortex and the bright diploe/scalp; the connected parts of what is left that touch the core
     are kept, then grown back by the opening's radius into bright voxels only (so the cortex
     that the opening shaved comes back, but not the skull beyond the dark gap);
  4. holes (ventricles, deep sulci) filled, a closing of `closing_mm` smooths the outline and takes
     in the sulcal CSF between gyri; the result stays inside the search band.

Cheap (scipy.ndimage morphology: well under a second at 2 and 4 mm) and deterministic, but not a
learned skull-stripper (SynthStrip, HD-BET): it relies on a dark CSF/bone gap of at least about a
voxel, so it is for T1w- and FLAIR-like contrasts (bright brain, dark CSF: `DARK_CSF`); on others
(SWI, where CSF is bright) `data.align` keeps the carried mask. `dice` scores a mask against a reference (the simulator's true mask).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

DARK_CSF = ("T1w", "FLAIR")  # contrasts whose CSF and bone are darker than grey matter


@dataclasses.dataclass(frozen=True)
class Refinement:
  """Settings of `refine_mask` (distances in mm, `threshold` in units of white matter).

  `threshold` 0.6 rather than the midpoint of grey matter and CSF (0.4 on T1w) or the best Dice
  (0.5: 0.980 against 0.974 at 4 mm): a brain rim of partial-volume voxels darkens the 4 mm
  models' input, and with 0.6 the model check after `--align template` is 1.15 years, with 0.5
  2.11 (benchmarks/RESULTS.md, session 11).
  """

  search_mm: float = 8.0
  core_mm: float = 8.0
  threshold: float = 0.60
  opening_mm: float = 4.0
  closing_mm: float = 8.0
  wm_percentile: float = 90.0
  edge_threshold: float = 0.30


def _ball(radius_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
  """A boolean ball structuring element of `radius_mm` on voxels of `spacing_mm` `[3]`."""
  half = [max(int(np.floor(radius_mm / float(s))), 0) for s in spacing_mm]
  grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
  dist2 = sum((g * float(s)) ** 2 for g, s in zip(grid, spacing_mm))
  return np.asarray(dist2 <= radius_mm ** 2 + 1e-6)


def _steps(radius_mm: float, spacing_mm: Sequence[float]) -> int:
  return max(1, int(round(radius_mm / float(min(spacing_mm)))))


def refine_mask(image: np.ndarray, carried: np.ndarray, spacing_mm: Sequence[float],
                settings: Refinement = Refinement()) -> np.ndarray:
  """The brain of `image`, starting from a coarse mask: bool `[X, Y, Z]`.

  Args:
    image: the aligned reference image `[X, Y, Z]` (T1w-like: brain bright, CSF and bone dark).
    carried: bool `[X, Y, Z]`, the template's brain mask on the same grid (carried by the
      registration).
    spacing_mm: voxel size `[3]` (mm).
    settings: distances and the intensity threshold (`Refinement`).
  """
  image = np.asarray(image, np.float32)
  carried = np.asarray(carried, bool)
  spacing = [float(s) for s in spacing_mm]
  band = ndimage.binary_dilation(carried, _ball(settings.search_mm, spacing))
  core = ndimage.binary_erosion(carried, _ball(settings.core_mm, spacing))
  if not core.any():
    return carried
  wm = float(np.percentile(image[core], settings.wm_percentile))
  if not wm > 0:
    return carried
  bright = band & (image > settings.threshold * wm)
  ball = _ball(settings.opening_mm, spacing)
  opened = ndimage.binary_opening(bright, ball)
  labels, _ = ndimage.label(opened | core)
  touching = np.unique(labels[core])
  kept = np.isin(labels, touching[touching > 0])
  # Grow back into bright voxels only, as far as the opening shaved.
  kept = ndimage.binary_dilation(kept, iterations=_steps(settings.opening_mm, spacing),
                                 mask=bright | kept)
  brain = ndimage.binary_fill_holes(kept | core)
  brain = ndimage.binary_closing(brain, _ball(settings.closing_mm, spacing), border_value=0)
  brain = ndimage.binary_fill_holes(brain) & band
  # The brain's edge voxels are part CSF (darker): one step outward into those above
  # `edge_threshold`, the simulator's (and a partial-volume) brain mask keeps them.
  if settings.edge_threshold > 0:
    edge = band & (image > settings.edge_threshold * wm)
    brain = brain | (ndimage.binary_dilation(brain) & edge)
  return brain


def dice(a: np.ndarray, b: np.ndarray) -> float:
  """Dice overlap 2|A & B| / (|A| + |B|) of two boolean masks (1 when both are empty)."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  total = int(a.sum()) + int(b.sum())
  return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total
