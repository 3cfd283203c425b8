"""Oblique affines: detected (`nifti.is_oblique`), resampled onto an axis-aligned world grid by
`preprocess_subject` (checked against nibabel's resampling), mapped back through the same
resampling, or refused in one line when resampling is off."""

from __future__ import annotations

import argparse

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest

from jax_brainage.commands import prepare as prepare_command
from jax_brainage.data import bids, cache, nifti, prune
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject
from jax_brainage.errors import DataError
from tests.data.conftest import NIBABEL_DATA

SHAPE = (22, 26, 20)
BASE = np.array([[-4.0, 0, 0, 40], [0, 4, 0, -50], [0, 0, 4, -36], [0, 0, 0, 1]])


def _rotation(degrees: float, axis: int = 2) -> np.ndarray:
  t = np.radians(degrees)
  a, b = [i for i in range(3) if i != axis]
  r = np.eye(4)
  r[[a, a, b, b], [a, b, a, b]] = [np.cos(t), -np.sin(t), np.sin(t), np.cos(t)]
  return r


LUMP = (7.0, 17.0, 11.0)  # Voxel centre of a bright lump off the brain's centre.


def _brain() -> np.ndarray:
  """A smooth ellipsoid 'brain' with a bright off-centre lump (so a rotation shows), float32."""
  ijk = np.indices(SHAPE).astype(float)
  inside = (((ijk[0] - 11) / 7) ** 2 + ((ijk[1] - 13) / 9) ** 2 + ((ijk[2] - 10) / 6) ** 2) <= 1
  lump = np.exp(-sum((ijk[a] - LUMP[a]) ** 2 for a in range(3)) / 3)
  return np.where(inside, 300 + 3000 * lump + 10 * ijk[2], 0).astype(np.float32)


def test_obliquity_detection():
  assert not nifti.is_oblique(SHAPE, BASE)
  assert not nifti.is_oblique(SHAPE, _rotation(0.01) @ BASE)  # Float noise of a scanner.
  assert nifti.is_oblique(SHAPE, _rotation(30) @ BASE)
  assert nifti.is_oblique(SHAPE, _rotation(5, axis=0) @ BASE)
  assert not nifti.is_oblique(SHAPE, _rotation(90) @ BASE)  # A permutation: reorient exactly.
  assert nifti.obliquity_degrees(_rotation(30) @ BASE) == pytest.approx(30)
  # Half a voxel at the field of view's corner: a rotation by t about z moves a corner r mm
  # from the centre in the xy plane by 2 r sin(t / 2); 4 mm voxels, r ~ 64 mm: ~1.8 degrees.
  edge = np.linalg.norm((np.asarray(SHAPE[:2]) - 1) / 2 * 4.0)
  limit = np.degrees(2 * np.arcsin(nifti.OBLIQUE_TOLERANCE_VOXELS * 4.0 / (2 * edge)))
  assert not nifti.is_oblique(SHAPE, _rotation(0.9 * limit) @ BASE)
  assert nifti.is_oblique(SHAPE, _rotation(1.1 * limit) @ BASE)
  real = nib.load(f"{NIBABEL_DATA}/example4d.nii.gz")  # 9.3 degrees, a real scanner's
  assert nifti.is_oblique(real.shape, real.affine)


def test_aligned_grid_keeps_voxel_sizes_and_covers_the_field_of_view():
  affine = _rotation(30) @ np.diag([2.0, 3.0, 4.0, 1.0])
  shape, grid = nifti.aligned_grid((10, 12, 14), affine)
  np.testing.assert_allclose(grid[:3, :3], np.diag([2.0, 3.0, 4.0]), atol=1e-12)
  corners = nib.affines.apply_affine(
      np.linalg.inv(grid) @ affine, np.array(np.meshgrid(*[(0, s - 1) for s in (10, 12, 14)],
                                                           indexing="ij")).reshape(3, -1).T)
  assert np.all(corners > -0.5) and np.all(corners < np.asarray(shape) - 0.5)


def test_oblique_scan_is_resampled_where_its_world_coordinates_say(tmp_path):
  data = _brain()
  oblique_affine = _rotation(30) @ BASE
  img = nib.Nifti1Image(data, oblique_affine)
  prep = Preprocessing(shape=(40, 40, 40))
  cube, inverse = preprocess_subject({"T1w": img}, prep, subject="sub-01")
  straight, _ = preprocess_subject({"T1w": nib.Nifti1Image(data, BASE)}, prep)
  assert not np.array_equal(cube, straight)  # Before: the same cube as the unrotated scan.
  assert inverse.resampled
  np.testing.assert_allclose(inverse.cube_affine[:3, :3], np.diag([4.0, 4.0, 4.0]), atol=1e-9)

  # Reference: nibabel resamples the scan onto the cube's (axis-aligned) grid, linear; the
  # study's scaling is replicated with numpy (floor 0 for this non-negative image).
  ref = np.asanyarray(nibabel.processing.resample_from_to(
      img, ((40, 40, 40), inverse.cube_affine), order=1, mode="constant", cval=0).dataobj)
  brain = ref != 0
  ceiling = np.percentile(ref[brain], 99.5)
  expected = np.where(brain, np.rint(255 * np.clip(ref, 0, ceiling) / ceiling), 0)
  assert np.abs(cube[..., 0].astype(int) - expected).max() <= 1
  # The lump (the voxels the ceiling saturates) sits where the oblique affine puts it.
  saturated = np.argwhere(cube[..., 0] == 255)
  assert 1 <= len(saturated) < 30
  np.testing.assert_allclose(nib.affines.apply_affine(inverse.cube_affine, saturated).mean(0),
                             nib.affines.apply_affine(oblique_affine, LUMP), atol=2.0)

  # Back to the subject's grid through the same resampling (interpolated, not exact).
  back = prune.to_subject_space(cube[..., 0].astype(np.float32), inverse)
  np.testing.assert_array_equal(back.affine, oblique_affine)
  inside = data > 0
  assert np.corrcoef(np.asarray(back.dataobj)[inside], data[inside])[0, 1] > 0.95
  covered = np.asarray(prune.to_subject_space(np.ones((40, 40, 40), np.uint8), inverse,
                                              order=0).dataobj) > 0
  assert covered[inside].mean() > 0.99


def test_second_sequence_and_mask_follow_the_oblique_reference():
  data = _brain()
  affine = _rotation(20, axis=1) @ BASE
  flair = nib.as_closest_canonical(nib.Nifti1Image(data * 0.5, affine))  # Its own voxel order.
  mask = nib.Nifti1Image((data > 0).astype(np.uint8), affine)
  prep = Preprocessing(sequences=("T1w", "FLAIR"), shape=(40, 40, 40))
  cube, inverse = preprocess_subject({"T1w": nib.Nifti1Image(data, affine),
                                            "FLAIR": flair}, prep, mask=mask)
  assert inverse.resampled
  np.testing.assert_array_equal(cube[..., 0] > 0, cube[..., 1] > 0)
  assert np.abs(cube[..., 0].astype(int) - cube[..., 1]).max() <= 1  # Same image, x 0.5.


def test_oblique_scan_refused_when_resampling_is_off(tmp_path, make_bids):
  affine = _rotation(30) @ BASE
  prep = Preprocessing(shape=(40, 40, 40), resample_oblique=False)
  with pytest.raises(DataError, match="oblique voxel-to-world affine .*30.0 degrees") as e:
    preprocess_subject({"T1w": nib.Nifti1Image(_brain(), affine)}, prep, subject="sub-01")
  assert "\n" not in str(e.value) and "sub-01" in str(e.value)
  root = make_bids({"sub-01": {"age": 30, "T1w": nib.Nifti1Image(_brain(), affine)},
                    "sub-02": {"age": 40, "T1w": nib.Nifti1Image(_brain(), BASE)}})
  parser = argparse.ArgumentParser(prog="brainage")
  prepare_command.add_parser(parser.add_subparsers(dest="command"))
  argv = ["prepare", "--data", str(root), "--out", str(tmp_path / "c"), "--quiet", "--workers",
          "1"]
  args = parser.parse_args(argv + ["--no-resample-oblique"])
  with pytest.raises(DataError, match="sub-01_T1w.nii.gz.*oblique"):
    args.func(args)
  args = parser.parse_args(argv)
  assert args.func(args) == 0
  prepared = cache.Cache.open(tmp_path / "c")
  assert prepared.inverse(0).resampled and not prepared.inverse(1).resampled
  assert prepared.preprocessing.resample_oblique
  assert len(bids.read_bids(root)) == 2
