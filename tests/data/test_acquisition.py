"""`simulate --acquisition raw`: scans as acquired, checked against nibabel and the template-space
cohort (the same subjects with the pose undone)."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from jax_brainage.data import simulate
from jax_brainage.data.simulation import acquisition

CONFIG = simulate.CohortConfig(seed=3, n=3, resolution_mm=4, sequences=("T1w", "FLAIR"))


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
  root = tmp_path_factory.mktemp("acq")
  raw = simulate.write_cohort(root / "raw", CONFIG, workers=1, acquisition="raw", sessions=2)
  tpl = simulate.write_cohort(root / "tpl", CONFIG, workers=1)
  return raw, tpl


def _digest(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_raw_leaves_the_template_cohort_and_its_truth_alone(cohorts):
  raw, tpl = cohorts
  # Same people, same ground truth: the acquisition draws from a stream of its own.
  for name in ("participants.tsv", "derivatives/simulation/brain_age.tsv",
               "derivatives/simulation/config.json",
               "derivatives/simulation/sub-0002/anat/sub-0002_FLAIR_ageingmask.nii.gz"):
    assert _digest(raw / name) == _digest(tpl / name), name
  # The template-space images are what the in-memory cohort renders (untouched by raw).
  s = simulate.Cohort(CONFIG).subject(1, ground_truth=False)
  img = nib.load(tpl / "sub-0002/anat/sub-0002_T1w.nii.gz")
  np.testing.assert_array_equal(np.asarray(img.dataobj), s.images["T1w"].astype(np.int16))
  assert not (raw / "sub-0002/anat").exists()
  assert json.loads((raw / "derivatives/simulation/acquisition.json").read_text())["sessions"] == 2


def test_raw_scan_shows_the_subject_where_the_true_transform_says(cohorts):
  raw, _ = cohorts
  cohort = simulate.Cohort(CONFIG)
  anatomy = cohort.anatomy
  for i in range(CONFIG.n):
    sid = simulate.subject_id(i)
    s = cohort.subject(i, ground_truth=False)
    for ses in ("ses-1", "ses-2"):
      img = nib.load(raw / sid / ses / "anat" / f"{sid}_{ses}_T1w.nii.gz")
      xfm = json.loads((raw / "derivatives/simulation" / sid / ses / "anat" /
                        f"{sid}_{ses}_from-scanner_to-template_mode-image_xfm.json").read_text())
      sidecar = json.loads((raw / sid / ses / "anat" / f"{sid}_{ses}_T1w.json").read_text())
      assert sidecar["MagneticFieldStrength"] in (1.5, 3)
      assert "".join(nib.aff2axcodes(img.affine)) == xfm["orientation"]
      # nibabel's resampling of the scan, placed by the true transform, onto the template grid.
      to_subject = np.asarray(xfm["scan_to_subject"]["matrix"])
      moved = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), to_subject @ img.affine)
      back = resample_from_to(moved, (anatomy.shape, anatomy.affine), order=1).get_fdata()
      brain = ndilate_free(s.brain_mask)
      r = np.corrcoef(back[brain], s.images["T1w"][brain])[0, 1]
      assert r > 0.85, (sid, ses, r)
      # A head around the brain: signal outside the brain, none far away.
      skull = back[~s.brain_mask & (back > 0)]
      assert skull.size > 0.3 * s.brain_mask.sum()
      assert back[0, 0, 0] == 0
    ages = (raw / sid / f"{sid}_sessions.tsv").read_text().splitlines()
    assert ages[0] == "session_id\tage" and len(ages) == 3
    assert float(ages[1].split("\t")[1]) == pytest.approx(s.age, abs=1e-3)


def ndilate_free(mask):
  """The brain minus its outer layer (interpolation at the border mixes in the CSF shell)."""
  from scipy import ndimage

  return ndimage.binary_erosion(mask, iterations=1)


def test_orientations_pose_and_grids_vary_and_are_reproducible():
  cohort = simulate.Cohort(CONFIG.replace(n=12, sequences=("T1w",)))
  seen, rotations = set(), []
  for i in range(12):
    s = cohort.subject(i, ground_truth=False)
    a = acquisition.acquire(s.images, s.brain_mask, cohort.config, cohort.anatomy,
                            cohort.nuisance(i), acquisition.session_rng(3, i, 0))
    b = acquisition.acquire(s.images, s.brain_mask, cohort.config, cohort.anatomy,
                            cohort.nuisance(i), acquisition.session_rng(3, i, 0))
    np.testing.assert_array_equal(a.images["T1w"], b.images["T1w"])  # same seed, same scan
    np.testing.assert_array_equal(a.affine, b.affine)
    seen.add(a.orientation)
    pose = np.linalg.inv(a.scan_to_subject)
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-9)  # rigid
    angle = np.degrees(np.arccos(np.clip((np.trace(pose[:3, :3]) - 1) / 2, -1, 1)))
    rotations.append(angle)
    sizes = nib.affines.voxel_sizes(a.affine)
    assert np.all(sizes >= 0.85 * 4 - 1e-6) and np.all(sizes <= 1.3 * 4 + 1e-6)
  assert len(seen) >= 3 and any(o != "RAS" for o in seen)
  assert max(rotations) > 10 and max(rotations) < 35  # up to 20 degrees about each axis


def test_add_head_keeps_the_brain_and_builds_a_layered_shell():
  shape = (40, 40, 40)
  affine = np.diag([2.0, 2.0, 2.0, 1.0])
  ijk = np.indices(shape) - 19.5
  brain = (ijk ** 2).sum(0) < 10 ** 2  # a ball of 20 mm radius
  volume = np.where(brain, 1000.0, 0.0).astype(np.float32)
  out = acquisition.add_head(volume, brain, affine, "T1w", unit=1000.0)
  np.testing.assert_array_equal(out[brain], volume[brain])
  radius_mm = np.sqrt((ijk ** 2).sum(0)) * 2
  scalp = out[(radius_mm > 20 + 11) & (radius_mm < 20 + 14)]
  bone = out[(radius_mm > 20 + 3) & (radius_mm < 20 + 4.2)]
  assert scalp.mean() > 600 and bone.mean() < 200  # bright fat, dark bone on T1w
  assert out[radius_mm > 20 + 20].max() == 0


def test_scanner_sampling_by_splines_keeps_the_texture_a_linear_one_blurs():
  """Raw scans sampled by cubic splines (the default) and brought back by the TRUE pose with
  scipy's spline keep most of the template-space image's fine texture (Laplacian SD inside the
  brain: ~0.8); sampled trilinearly, as before session 11, ~0.6."""
  from scipy import ndimage

  config = CONFIG.replace(sequences=("T1w",))
  cohort = simulate.Cohort(config)
  s = cohort.subject(0, ground_truth=False)
  inner = ndimage.binary_erosion(s.brain_mask, iterations=1)
  texture = ndimage.laplace(s.images["T1w"])[inner].std()
  ratios = {}
  for order in (1, acquisition.ACQUISITION_ORDER):
    raw = acquisition.acquire(s.images, s.brain_mask, config, cohort.anatomy, cohort.nuisance(0),
                              acquisition.session_rng(3, 0, 0), order=order)
    vox = np.linalg.inv(raw.scan_to_subject @ raw.affine) @ s.affine
    back = ndimage.affine_transform(raw.images["T1w"].astype(np.float64), vox[:3, :3],
                                    vox[:3, 3], output_shape=s.brain_mask.shape, order=3)
    ratios[order] = ndimage.laplace(back)[inner].std() / texture
  assert acquisition.ACQUISITION_ORDER == 3
  assert ratios[3] > 0.75 and ratios[1] < 0.65 and ratios[3] > ratios[1] + 0.15, ratios
