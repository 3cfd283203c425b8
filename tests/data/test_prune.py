"""prune.py: cube crop/pad centred on the brain and its exact inverse, on real and odd images."""

from __future__ import annotations

import json

import hypothesis
import hypothesis.strategies as st
import nibabel as nib
import nibabel.processing
import numpy as np
import pytest

from jax_brainage.data import nifti, prune
from tests.data.conftest import (
    MNI_T1, NIBABEL_DATA, all_orientations, blob, oriented_affine, real_image)


def _check_round_trip(img, cube_shape, mask=None):
  """image -> canonical -> cube -> inverse gives the original voxels inside the cube, 0 outside.

  The references are independent of prune's index arithmetic: nibabel's as_closest_canonical
  for the canonical grid, and world coordinates (the cube's affine vs the original affine) for
  where each cube voxel came from.
  """
  original = np.asanyarray(img.dataobj)
  cube, inverse = prune.to_cube(img, cube_shape, mask=mask)
  assert cube.shape == tuple(cube_shape) and cube.dtype == original.dtype

  # JSON round trip of the record, as the cache stores it.
  inverse = prune.CubeInverse.from_dict(json.loads(json.dumps(inverse.to_dict())))

  back = prune.to_subject_space(cube, inverse)
  np.testing.assert_array_equal(back.affine, img.affine)
  assert back.shape == original.shape
  covered = np.asarray(prune.to_subject_space(np.ones(cube.shape, bool), inverse).dataobj) > 0
  np.testing.assert_array_equal(np.asarray(back.dataobj)[covered], original[covered])
  assert not np.any(np.asarray(back.dataobj)[~covered])

  # Each cube voxel holds the original voxel at the same world position (cube affine).
  vox = np.linalg.inv(np.asarray(img.affine, np.float64)) @ inverse.cube_affine
  cube_ijk = np.argwhere(np.ones(cube.shape, bool))
  if len(cube_ijk) > 50_000:  # Large cubes: a random sample of voxels keeps the test fast.
    cube_ijk = cube_ijk[np.random.default_rng(0).choice(len(cube_ijk), 50_000, replace=False)]
  orig_ijk = nib.affines.apply_affine(vox, cube_ijk)
  np.testing.assert_allclose(orig_ijk, np.round(orig_ijk), atol=1e-6)
  orig_ijk = np.round(orig_ijk).astype(int)
  inside = np.all((orig_ijk >= 0) & (orig_ijk < original.shape), axis=1)
  np.testing.assert_array_equal(cube[tuple(cube_ijk[inside].T)],
                                original[tuple(orig_ijk[inside].T)])
  assert not np.any(cube[tuple(cube_ijk[~inside].T)])
  if len(cube_ijk) == cube.size:
    assert covered.sum() == inside.sum()

  # The canonical grid is nibabel's.
  ref = nib.as_closest_canonical(img)
  np.testing.assert_allclose(inverse.grid_affine, ref.affine, atol=1e-9)
  assert inverse.grid_shape == ref.shape[:3]

  # Centred: the brain's box centre sits at the cube centre (to half a voxel).
  brain = original != 0 if mask is None else np.asarray(mask) != 0
  box = np.argwhere(np.asanyarray(nib.as_closest_canonical(nifti.make_image(brain, img.affine)
                                                           ).dataobj))
  centre = (box.min(0) + box.max(0) + 1) / 2 - np.asarray(inverse.offset)
  assert np.all(np.abs(centre - np.asarray(cube_shape) / 2) <= 0.5)
  return cube, inverse


@pytest.mark.parametrize("name", [
    "nibabel:anatomical.nii",  # LAS, big-endian int16, 2 mm, negative values
    "nibabel:standard.nii.gz",  # RAS uint8, 1 x 3 x 2 mm voxels
    "nibabel:reoriented_anat_moved.nii",  # float32, 4 mm
    "nilearn:image_10426.nii.gz",  # LAS float32 stat map, 3 mm
])
@pytest.mark.parametrize("cube_shape", [(10, 13, 7), (64, 64, 64), (33, 41, 25)])
def test_round_trip_real_files(name, cube_shape):
  _check_round_trip(real_image(name), cube_shape)


@pytest.mark.parametrize("file,ext", [("test.mgz", ".mgz"), ("example_nifti2.nii.gz", ".nii.gz"),
                                      ("example4d.nii.gz", ".nii.gz")])
def test_round_trip_real_volumes_of_4d_files(tmp_path, file, ext):
  img = nib.load(f"{NIBABEL_DATA}/{file}")
  path = tmp_path / f"vol{ext}"
  nib.save(type(img)(np.asanyarray(img.dataobj)[..., 1], img.affine), path)
  loaded = nifti.load_image(path, "sub-01")  # oblique .mgz affine, NIfTI-2, int16 EPI
  _check_round_trip(loaded, (5, 6, 7))
  _check_round_trip(loaded, (40, 30, 20))


def test_mni_template_in_study_cube():
  img = nib.load(MNI_T1)  # 197 x 233 x 189 at 1 mm: the head is cropped in y, padded in x, z
  cube, inverse = _check_round_trip(img, prune.default_cube_shape(1.0))
  assert cube.shape == (198, 198, 198)
  head = np.argwhere(np.asanyarray(img.dataobj))
  assert inverse.brain_fits == bool(np.all(head.max(0) - head.min(0) + 1 <= 198))
  assert inverse.voxel_size == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "ornt", list(all_orientations()), ids=lambda o: "".join(nib.orientations.ornt2axcodes(o)))
def test_round_trip_every_orientation(ornt):
  data = blob((9, 8, 11), seed=3, dtype=np.float32)
  img = nib.Nifti1Image(data, oriented_affine(ornt))
  _check_round_trip(img, (6, 12, 7))


def test_mask_defines_the_box():
  data = blob((12, 14, 10), seed=4)
  mask = np.zeros(data.shape, bool)
  mask[2:5, 3:9, 4:6] = True  # A box smaller than the nonzero region.
  img = nib.Nifti1Image(data, oriented_affine(np.array([[1, -1], [0, 1], [2, 1]], float)))
  _, inverse = _check_round_trip(img, (8, 8, 8), mask=mask)
  canonical = nib.as_closest_canonical(nifti.make_image(mask, img.affine))
  canonical_mask = np.asanyarray(canonical.dataobj)
  hits = np.argwhere(canonical_mask)
  assert inverse.brain_box == tuple(zip(hits.min(0).tolist(), (hits.max(0) + 1).tolist()))


def test_channels_go_back_together():
  data = blob((9, 8, 11), seed=5)
  img = nib.Nifti1Image(data, oriented_affine(np.array([[2, -1], [0, 1], [1, -1]], float)))
  cube, inverse = prune.to_cube(img, (7, 7, 7))
  stacked = np.stack([cube, 2 * cube, -cube], axis=-1).astype(np.float32)
  back = prune.to_subject_space(stacked, inverse)
  assert back.shape == data.shape + (3,)
  single = np.asarray(prune.to_subject_space(cube, inverse).dataobj)
  for k, factor in enumerate((1, 2, -1)):
    np.testing.assert_array_equal(np.asarray(back.dataobj)[..., k], factor * single)


def test_cube_image_is_in_world_coordinates():
  img = nib.load(f"{NIBABEL_DATA}/anatomical.nii")
  cube, inverse = prune.to_cube(img, (20, 20, 20))
  saved = prune.cube_image(cube, inverse)
  # nibabel's resampling of the cube image onto the original grid gives the original voxels.
  ref = nib.processing.resample_from_to(saved, img, order=0)
  covered = np.asarray(prune.to_subject_space(np.ones(cube.shape, bool), inverse).dataobj) > 0
  np.testing.assert_array_equal(np.asanyarray(ref.dataobj)[covered],
                                np.asanyarray(img.dataobj)[covered])


def test_resampled_inverse_is_close_and_marked():
  # A smooth field at 1 x 3 x 2 mm resampled to 2 mm isotropic and back (linear interpolation).
  shape = (30, 12, 16)
  affine = oriented_affine(np.array([[0, -1], [1, 1], [2, 1]], float), zooms=(1.0, 3.0, 2.0))
  ijk = np.indices(shape).reshape(3, -1).T
  world = nib.affines.apply_affine(affine, ijk).reshape(*shape, 3)
  data = (100 + world @ np.array([1.0, 0.5, -0.7])).astype(np.float32)
  img = nib.Nifti1Image(data, affine)
  cube, inverse = prune.to_cube(img, (24, 24, 24), voxel_size_mm=2.0)
  assert inverse.resampled and inverse.voxel_size == (2.0, 2.0, 2.0)
  back = np.asarray(prune.to_subject_space(cube, inverse).dataobj)
  interior = np.zeros(shape, bool)
  interior[3:-3, 2:-2, 2:-2] = True  # Away from the field-of-view edge (zero padding).
  np.testing.assert_allclose(back[interior], data[interior], rtol=1e-4, atol=1e-3)


def test_brain_larger_than_cube_is_cropped_symmetrically():
  box = ((2, 13), (0, 10), (5, 6))
  offset = prune.centre_offset(box, (10, 10, 10))
  assert offset == (2, 0, 1)  # 11 in 10: one voxel cut after; 10 in 10: exact; 1 in 10: padded
  grid = np.arange(20 * 12 * 8, dtype=np.int32).reshape(20, 12, 8)
  cube = prune.crop_or_pad(grid, offset, (10, 10, 10))
  np.testing.assert_array_equal(cube[:, :, :7], grid[2:12, 0:10, 1:8])
  assert not np.any(cube[:, :, 7:])
  back = prune.place_in_grid(cube, offset, grid.shape)
  np.testing.assert_array_equal(back[2:12, 0:10, 1:8], grid[2:12, 0:10, 1:8])
  assert back.sum() == grid[2:12, 0:10, 1:8].sum()


def test_default_cube_shapes():
  assert prune.default_cube_shape(1.0) == (198, 198, 198)
  assert prune.default_cube_shape(2.0) == (98, 98, 98)
  assert prune.default_cube_shape(4.0) == (50, 50, 50)
  assert prune.default_cube_shape(3.0) == (66, 66, 66)
  for size in (0.7, 1.5, 2.5, 5.0):
    side = prune.default_cube_shape(size)[0]
    assert side % 2 == 0 and side * size >= 198 and (side - 2) * size < 198


def test_wrong_cube_array_shape_is_an_error():
  img = nib.load(f"{NIBABEL_DATA}/standard.nii.gz")
  _, inverse = prune.to_cube(img, (8, 8, 8))
  with pytest.raises(ValueError, match="does not match cube shape"):
    prune.to_subject_space(np.zeros((8, 8, 9)), inverse)


def test_malformed_record():
  with pytest.raises(ValueError, match="malformed CubeInverse"):
    prune.CubeInverse.from_dict({"original_shape": [1, 2, 3]})


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    grid_shape=st.tuples(*[st.integers(1, 9)] * 3),
    cube_shape=st.tuples(*[st.integers(1, 9)] * 3),
    offset=st.tuples(*[st.integers(-10, 10)] * 3),
    channels=st.sampled_from([None, 2]))
def test_crop_or_pad_matches_numpy_pad(grid_shape, cube_shape, offset, channels):
  extra = () if channels is None else (channels,)
  size = int(np.prod(grid_shape + extra))
  grid = np.arange(1, size + 1, dtype=np.int32).reshape(grid_shape + extra)
  # Reference: pad the grid with zeros by 20 on every side, then slice the cube out.
  padded = np.pad(grid, [(20, 20)] * 3 + [(0, 0)] * len(extra))
  ref = padded[tuple(slice(o + 20, o + 20 + s) for o, s in zip(offset, cube_shape))]
  cube = prune.crop_or_pad(grid, offset, cube_shape)
  np.testing.assert_array_equal(cube, ref)
  back = prune.place_in_grid(cube, offset, grid_shape)
  kept = np.isin(grid, cube)  # values are unique: the voxels the cube covers
  np.testing.assert_array_equal(back, np.where(kept, grid, 0))
