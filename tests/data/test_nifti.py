"""nifti.py: loading real files, one-line errors, RAS+ reorientation (vs nibabel), resampling."""

from __future__ import annotations

import gzip

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest

from jax_brainage.data import nifti
from jax_brainage.errors import DataError
from tests.data.conftest import (
    MNI_T1, NIBABEL_DATA, all_orientations, blob, oriented_affine, real_image)

# Real 3D images with unusual orientations, voxel sizes and dtypes (LAS int16 big-endian, RAS
# uint8 with 1x3x2 mm voxels, an oblique .mgz, NIfTI-2, the MNI template, a float32 stat map).
REAL_3D = [
    "nibabel:anatomical.nii",
    "nibabel:standard.nii.gz",
    "nibabel:reoriented_anat_moved.nii",
    "nilearn:image_10426.nii.gz",
]


def _first_volume(name: str, tmp_path, ext: str):
  """A real 4D file's first volume, saved in its own format (keeps its affine and dtype)."""
  img = nib.load(f"{NIBABEL_DATA}/{name}")
  data = np.asanyarray(img.dataobj)[..., 0]
  out = tmp_path / f"vol0{ext}"
  nib.save(type(img)(data, img.affine), out)
  return out


def test_loads_real_files_like_nibabel(tmp_path):
  paths = [f"{NIBABEL_DATA}/{n.split(':')[1]}" for n in REAL_3D if n.startswith("nibabel")]
  paths += [str(MNI_T1), _first_volume("test.mgz", tmp_path, ".mgz"),
            _first_volume("example_nifti2.nii.gz", tmp_path, ".nii.gz")]
  for path in paths:
    ref = nib.load(path)
    img = nifti.load_image(path, "sub-01")
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_array_equal(img.affine, ref.affine)
    assert img.dataobj.dtype.isnative
    np.testing.assert_allclose(nifti.voxel_size(img.affine), ref.header.get_zooms()[:3],
                               rtol=1e-6)


def test_mgz_2d_volume_and_nifti2_types(tmp_path):
  mgz = nifti.load_image(_first_volume("test.mgz", tmp_path, ".mgz"))
  assert mgz.shape == (3, 4, 5)
  nii2 = nifti.load_image(_first_volume("example_nifti2.nii.gz", tmp_path, ".nii.gz"))
  assert nii2.shape == (32, 20, 12)


def _error(path, subject="sub-07", **kw) -> str:
  with pytest.raises(DataError) as e:
    nifti.load_image(path, subject, **kw)
  message = str(e.value)
  assert "\n" not in message
  assert str(path) in message and subject in message
  return message


def test_missing_file(tmp_path):
  assert "not found" in _error(tmp_path / "sub-07_T1w.nii.gz")


def test_corrupt_files(tmp_path):
  garbage = tmp_path / "garbage.nii"
  garbage.write_bytes(b"this is not a nifti header" * 20)
  assert "corrupt" in _error(garbage)
  not_gzip = tmp_path / "fake.nii.gz"
  not_gzip.write_bytes(b"\x00" * 400)
  assert "corrupt" in _error(not_gzip)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".mgz"])
def test_truncated_files(tmp_path, ext):
  full = tmp_path / f"full{ext}"
  img = nib.load(f"{NIBABEL_DATA}/anatomical.nii")
  cls = nib.MGHImage if ext == ".mgz" else nib.Nifti1Image
  nib.save(cls(np.asarray(img.dataobj).astype(np.float32), img.affine), full)
  raw = full.read_bytes()
  bad = tmp_path / f"cut{ext}"
  bad.write_bytes(raw[: len(raw) // 2])  # As an interrupted copy leaves it.
  assert "corrupt" in _error(bad)


def test_4d_rejected_but_trailing_singleton_accepted(tmp_path):
  assert "4D" in _error(f"{NIBABEL_DATA}/example4d.nii.gz")
  assert "4D" in _error(f"{NIBABEL_DATA}/test.mgz")
  img = nib.load(f"{NIBABEL_DATA}/anatomical.nii")
  single = tmp_path / "single.nii.gz"
  nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine), single)
  loaded = nifti.load_image(single, "sub-07")
  np.testing.assert_array_equal(np.asarray(loaded.dataobj), np.asarray(img.dataobj))


def test_nan_and_inf_voxels(tmp_path):
  # A real file with NaN voxels (nibabel's resampling test output).
  real = f"{NIBABEL_DATA}/resampled_anat_moved.nii"
  expected = int(np.count_nonzero(~np.isfinite(nib.load(real).get_fdata())))
  assert f"{expected} NaN/Inf" in _error(real)
  data = np.ones((4, 5, 6), np.float32)
  data[1, 2, 3] = np.inf
  data[0, 0, 0] = -np.inf
  path = tmp_path / "inf.nii.gz"
  nib.save(nib.Nifti1Image(data, np.eye(4)), path)
  assert "2 NaN/Inf" in _error(path)


def test_empty_brain(tmp_path):
  path = tmp_path / "zeros.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), path)
  assert "empty brain" in _error(path)
  assert nifti.load_image(path, "sub-07", require_brain=False).shape == (4, 5, 6)


def test_directory_and_gzip_of_garbage(tmp_path):
  assert "directory" in _error(tmp_path)
  path = tmp_path / "bad.nii.gz"
  path.write_bytes(gzip.compress(b"\x01" * 1000))
  assert "corrupt" in _error(path)


# ---------------------------------------------------------------------------------------------
# Orientation: compare with nibabel's as_closest_canonical.


def _check_canonical(img):
  canonical, ornt = nifti.to_canonical(img)
  ref = nib.as_closest_canonical(img)
  np.testing.assert_array_equal(np.asarray(canonical.dataobj), np.asanyarray(ref.dataobj))
  np.testing.assert_allclose(canonical.affine, ref.affine, atol=1e-9)
  assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
  back = nifti.undo_orientation(np.asarray(canonical.dataobj), ornt)
  np.testing.assert_array_equal(back, np.asanyarray(img.dataobj))


@pytest.mark.parametrize("name", REAL_3D)
def test_canonical_matches_nibabel_on_real_files(name):
  _check_canonical(real_image(name))


def test_canonical_matches_nibabel_on_oblique_mgz(tmp_path):
  _check_canonical(nib.load(_first_volume("test.mgz", tmp_path, ".mgz")))


@pytest.mark.parametrize(
    "ornt", list(all_orientations()), ids=lambda o: "".join(nib.orientations.ornt2axcodes(o)))
def test_canonical_every_orientation(ornt):
  data = blob((5, 7, 6), seed=int(abs(ornt).sum()))
  img = nib.Nifti1Image(data, oriented_affine(ornt))
  _check_canonical(img)
  # The world position of every voxel is unchanged by reorientation.
  unique = np.arange(5 * 7 * 6, dtype=np.int32).reshape(5, 7, 6)
  canonical, _ = nifti.to_canonical(nib.Nifti1Image(unique, img.affine))
  for ijk in [(1, 2, 3), (0, 0, 0), (4, 6, 5), (3, 0, 2)]:
    found = np.argwhere(np.asarray(canonical.dataobj) == unique[ijk])
    world = nib.affines.apply_affine(canonical.affine, found[0])
    np.testing.assert_allclose(world, nib.affines.apply_affine(img.affine, ijk))


def test_undo_orientation_on_channels():
  ornt = np.array([[2, -1], [0, 1], [1, -1]], float)
  data = np.random.default_rng(1).normal(size=(4, 5, 6, 3))
  moved = nifti.reorient_array(data, ornt)
  np.testing.assert_array_equal(nifti.undo_orientation(moved, ornt), data)


# ---------------------------------------------------------------------------------------------
# Resampling: compare with nibabel.processing.


def test_resample_matches_nibabel():
  img = nib.load(f"{NIBABEL_DATA}/anatomical.nii")
  data = np.asarray(img.dataobj).astype(np.float32)
  img = nib.Nifti1Image(data, img.affine)
  target_shape = (20, 23, 17)
  rotation = nib.eulerangles.euler2mat(0.2, -0.1, 0.15)
  target = nib.affines.from_matvec(rotation * 2.7, [-30, -35, -20])
  ours = nifti.resample(data, img.affine, target_shape, target, order=1)
  ref = nib.processing.resample_from_to(img, (target_shape, target), order=1)
  np.testing.assert_allclose(ours, ref.get_fdata(), rtol=1e-5, atol=1e-3)
  labels = np.asarray(img.dataobj) > 5000
  near = nifti.resample(labels.astype(np.uint8), img.affine, target_shape, target, order=0)
  ref = nib.processing.resample_from_to(nib.Nifti1Image(labels.astype(np.uint8), img.affine),
                                        (target_shape, target), order=0)
  np.testing.assert_array_equal(near, np.asanyarray(ref.dataobj))


def test_isotropic_grid_matches_resample_to_output():
  img = nib.load(f"{NIBABEL_DATA}/standard.nii.gz")
  img = nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), img.affine)
  shape, affine = nifti.isotropic_grid(img.shape, img.affine, 0.5)
  ref = nib.processing.resample_to_output(img, 0.5, order=1)
  assert shape == ref.shape
  np.testing.assert_allclose(affine, ref.affine)
  ours = nifti.resample(np.asanyarray(img.dataobj), img.affine, shape, affine, order=1)
  np.testing.assert_allclose(ours, ref.get_fdata(), atol=1e-3)


def test_needs_resampling_and_same_grid():
  assert not nifti.needs_resampling(np.diag([2.0, 2.0, 2.0, 1.0]), None)
  assert not nifti.needs_resampling(np.diag([-2.0, 2.0, 2.0, 1.0]), 2.0)
  assert nifti.needs_resampling(np.diag([2.0, 2.0, 2.2, 1.0]), 2.0)
  assert nifti.same_grid((2, 3, 4), np.eye(4), (2, 3, 4, 1), np.eye(4) + 1e-7)
  assert not nifti.same_grid((2, 3, 4), np.eye(4), (2, 3, 5), np.eye(4))
