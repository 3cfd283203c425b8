"""nifti.py: loading real files, one-line errors, RAS+ reorientation (vs nibabel), resampling."""

from __future__ import annotations

import gzip
import re

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest

from jax_brainage.data import nifti
from jax_brainage.errors import DataError
from tests.data.conftest import (
    MNI_T1, NIBABEL_DATA, all_orientations, blob, oriented_affine, real_image, with_header)

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
# Header fields: voxel sizes, units, codes, layout, scaling, gzip CRC.

HEADER_AFFINE = np.array([[-4.0, 0, 0, 30], [0, 4, 0, -40], [0, 0, 4, -20], [0, 0, 0, 1]])


def _raw(data=None) -> bytes:
  """A 4 mm int16 brain (zero background) as single-file NIfTI-1 bytes, sform and qform set."""
  img = nib.Nifti1Image(blob((10, 12, 9), seed=5) if data is None else data, HEADER_AFFINE)
  img.set_qform(HEADER_AFFINE, code=1)
  img.set_sform(HEADER_AFFINE, code=1)
  img.header.set_xyzt_units("mm", "sec")
  return img.to_bytes()


def _file(tmp_path, raw: bytes, name="sub-07_T1w.nii", gz_level=None):
  path = tmp_path / (name + (".gz" if gz_level is not None else ""))
  path.write_bytes(raw if gz_level is None else gzip.compress(raw, compresslevel=gz_level))
  return path


@pytest.mark.parametrize("fields", [
    dict(pixdim1=np.nan, sform_code=0), dict(pixdim2=0.0, sform_code=0),
    dict(pixdim3=np.inf, sform_code=0), dict(pixdim1=1e-3, pixdim2=1e-3, pixdim3=1e-3,
                                             sform_code=0),
    dict(pixdim2=25.0, sform_code=0), dict(srow_x=np.array([np.nan, 0, 0, 30], np.float32)),
    dict(srow_y=np.zeros(4, np.float32)), dict(srow_z=np.array([0, 0, 1e-4, -20], np.float32)),
    dict(pixdim1=np.nan),  # pixdim unused (sform), but a non-finite voxel size is corruption
], ids=lambda f: ",".join(f"{k}={v if np.ndim(v) == 0 else 'row'}" for k, v in f.items()))
def test_bad_voxel_sizes_are_refused_from_the_header_alone(tmp_path, fields):
  path = _file(tmp_path, with_header(_raw(), **fields))
  message = _error(path)
  assert "voxel" in message or "affine" in message
  with pytest.raises(DataError) as e:  # What the cache sizes its cube from: no voxel read.
    nifti.read_geometry(path, "sub-07")
  assert str(e.value) == message


def test_plausible_voxel_size_bounds():
  ok = np.diag([nifti.MIN_VOXEL_MM, nifti.MAX_VOXEL_MM, 1.0, 1.0])
  np.testing.assert_array_equal(nifti.check_affine(ok), ok)
  for sizes in ([0.09, 1, 1], [1, 20.5, 1], [1, 1, np.nan]):
    with pytest.raises(DataError, match="implausible voxel size|not a finite"):
      nifti.check_affine(np.diag(sizes + [1.0]), "x.nii")
  with pytest.raises(DataError, match="singular"):
    nifti.check_affine(np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))


def test_negative_pixdim_and_qform_follow_nibabel(tmp_path):
  path = _file(tmp_path, with_header(_raw(), pixdim1=-4.0, sform_code=0))
  img = nifti.load_image(path, "sub-07")
  np.testing.assert_allclose(img.affine, nib.load(path).affine)
  np.testing.assert_allclose(nifti.voxel_size(img.affine), [4, 4, 4])


@pytest.mark.parametrize("code,mm", [(1, 1000.0), (3, 1e-3)], ids=["meter", "micron"])
def test_spatial_units_are_converted_to_mm(tmp_path, code, mm):
  # A 4 mm image stored in metres (0.004) or microns (4000): the same grid in mm.
  affine = HEADER_AFFINE.copy()
  affine[:3] /= mm
  raw = with_header(_raw(), xyzt_units=code, pixdim1=4 / mm, pixdim2=4 / mm, pixdim3=4 / mm,
                    srow_x=affine[0], srow_y=affine[1], srow_z=affine[2], qform_code=0)
  path = _file(tmp_path, raw)
  img = nifti.load_image(path, "sub-07")
  np.testing.assert_allclose(img.affine[:3], nib.load(path).affine[:3] * mm, rtol=1e-6)
  np.testing.assert_allclose(img.affine, HEADER_AFFINE, rtol=1e-5, atol=1e-5)
  # The usual mistake: a mm image labelled micron is a 4-micron voxel, refused in one line.
  message = _error(_file(tmp_path, with_header(_raw(), xyzt_units=3), name="mislabelled.nii"),
                   subject="sub-07")
  assert "implausible voxel size 0.004x0.004x0.004 mm (xyzt_units micron)" in message
  assert "unit code 5" in _error(_file(tmp_path, with_header(_raw(), xyzt_units=5),
                                       name="code5.nii"))


def test_no_orientation_codes_are_refused(tmp_path):
  path = _file(tmp_path, with_header(_raw(), qform_code=0, sform_code=0))
  assert "qform_code and sform_code are 0" in _error(path)
  only_qform = _file(tmp_path, with_header(_raw(), sform_code=0), name="q.nii")
  np.testing.assert_allclose(nifti.load_image(only_qform).affine, nib.load(only_qform).affine)


@pytest.mark.parametrize("offset", [0.0, 100.0, 351.0])
def test_vox_offset_inside_the_header_is_refused(tmp_path, offset):
  for level in (None, 6):
    path = _file(tmp_path, with_header(_raw(), vox_offset=offset), gz_level=level)
    # Ours, or nibabel's own refusal (it accepts only 0), both one line naming the file.
    assert re.search(f"vox_offset {offset:g} lies inside the 352-byte header|vox offset "
                     f"{offset:g} too low", _error(path))


def test_payload_is_checked_before_anything_is_allocated(tmp_path):
  dim = np.array([3, 30000, 30000, 30000, 1, 1, 1, 1], np.int16)
  for level in (None, 1):
    path = _file(tmp_path, with_header(_raw(), dim=dim), gz_level=level)
    assert "truncated or corrupt image (the header promises" in _error(path)


def test_garbled_gzip_stream_is_caught_by_its_crc(tmp_path):
  data = blob((10, 12, 9), seed=5)
  stored = bytearray(gzip.compress(_raw(data), compresslevel=0))  # Deflate "stored" blocks.
  stored[len(stored) // 2] ^= 0xFF  # One voxel byte: still a valid deflate stream.
  path = tmp_path / "garbled.nii.gz"
  path.write_bytes(bytes(stored))
  # nibabel reads only the bytes it needs and returns a wrong voxel without a word...
  silently = np.asanyarray(nib.load(path).dataobj)
  assert np.count_nonzero(silently != data) == 1
  # ...the whole stream, read with its CRC checked, is refused.
  assert "CRC check failed" in _error(path)


@pytest.mark.parametrize("slope,inter,what", [
    (np.nan, 0.0, "scl_slope nan"), (np.inf, 0.0, "scl_slope inf"), (-1.0, 0.0, "scl_slope -1"),
    (1.0, np.nan, "(scl_inter|invalid intercept) nan"),
    (1.0, 1e6, "scl_inter 1e\\+06 turns the zero background"),
    (2.0, -0.5, "scl_inter -0.5 turns the zero background")])
def test_bad_intensity_scaling_is_refused(tmp_path, slope, inter, what):
  path = _file(tmp_path, with_header(_raw(), scl_slope=slope, scl_inter=inter))
  assert re.search(what, _error(path))


@pytest.mark.parametrize("slope,inter", [(0.0, 0.0), (2.5, 0.0), (1e30, 0.0)])
def test_valid_intensity_scaling_is_nibabels(tmp_path, slope, inter):
  path = _file(tmp_path, with_header(_raw(), scl_slope=slope, scl_inter=inter))
  np.testing.assert_array_equal(np.asarray(nifti.load_image(path).dataobj),
                                np.asanyarray(nib.load(path).dataobj))


def test_intercept_that_keeps_a_zero_background_is_accepted(tmp_path):
  # nibabel's own float -> int16 storage: a slope and an intercept under which 0 stays 0.
  data = blob((10, 12, 9), seed=5).astype(np.float32) / 7
  img = nib.Nifti1Image(data, HEADER_AFFINE, dtype=np.int16)
  path = tmp_path / "scaled.nii"
  nib.save(img, path)
  assert np.asanyarray(nib.load(path).dataobj).min() == 0
  np.testing.assert_array_equal(np.asarray(nifti.load_image(path).dataobj),
                                np.asanyarray(nib.load(path).dataobj))


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
