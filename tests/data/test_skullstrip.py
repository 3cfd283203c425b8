"""The brain mask of a scan with a head (`skullstrip.refine_mask`), against the simulator's true
brain mask (Dice) and an analytic ball-shaped head."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from jax_brainage.data import align, simulate, skullstrip
from jax_brainage.data.simulation import acquisition

CONFIG = simulate.CohortConfig(seed=0, n=4, resolution_mm=4, sequences=("T1w",))


def _ball(shape, centre, radius):
  ijk = np.indices(shape) - np.asarray(centre, float)[:, None, None, None]
  return np.sqrt((ijk ** 2).sum(0)) < radius


def test_dice_is_the_overlap_formula():
  a = np.zeros((4, 4, 4), bool)
  b = np.zeros((4, 4, 4), bool)
  a[:2], b[1:3] = True, True
  assert skullstrip.dice(a, b) == pytest.approx(2 * 16 / (32 + 32))
  assert skullstrip.dice(a & False, b & False) == 1.0


def test_refines_a_shifted_coarse_mask_to_the_ball_inside_a_head():
  # A 22 mm-radius brain (2 mm voxels) with the simulator's CSF/bone/scalp shell around it; the
  # "carried" mask is a ball of the wrong size in the wrong place, as after an affine.
  shape, affine = (48, 48, 48), np.diag([2.0, 2.0, 2.0, 1.0])
  brain = _ball(shape, (23.5, 23.5, 23.5), 11)
  rng = np.random.default_rng(0)
  volume = np.where(brain, 800.0 + 30 * rng.standard_normal(shape), 0.0).astype(np.float32)
  head = acquisition.add_head(volume, brain, affine, "T1w", unit=1000.0)
  carried = _ball(shape, (24.5, 22.5, 24.0), 12.5)
  refined = skullstrip.refine_mask(head, carried, (2.0, 2.0, 2.0))
  assert skullstrip.dice(carried, brain) < 0.85
  assert skullstrip.dice(refined, brain) > 0.95, skullstrip.dice(refined, brain)
  # Nothing of the bright scalp (outside 9 mm of the brain) is kept.
  far = ndimage.distance_transform_edt(~brain, sampling=2.0) > 9
  assert not (refined & far).any()


def test_align_keeps_the_carried_mask_where_csf_is_bright():
  assert "swi" not in skullstrip.DARK_CSF and "T1w" in skullstrip.DARK_CSF


@pytest.mark.parametrize("index", [0, 1])
def test_beats_the_carried_template_mask_on_simulated_raw_scans(index):
  """Raw scans (head, pose, scanner grid) aligned by the TRUE transform: the refined mask against
  the simulator's own brain mask carried by the same transform."""
  cohort = simulate.Cohort(CONFIG)
  anatomy = cohort.anatomy
  s = cohort.subject(index, ground_truth=False)
  raw = acquisition.acquire(s.images, s.brain_mask, CONFIG, anatomy, cohort.nuisance(index),
                            acquisition.session_rng(0, index, 0))
  shape, aff = anatomy.shape, np.asarray(anatomy.affine, np.float64)
  image = align.resample_image(raw.images["T1w"], raw.affine, shape, aff, raw.scan_to_template)
  truth = align.carry_mask(raw.brain_mask, raw.affine, shape, aff, raw.scan_to_template)
  carried = anatomy.brain > 0.5
  refined = skullstrip.refine_mask(image, carried, (4.0, 4.0, 4.0))
  before, after = skullstrip.dice(carried, truth), skullstrip.dice(refined, truth)
  assert after > 0.97 and after > before + 0.005, (before, after)
