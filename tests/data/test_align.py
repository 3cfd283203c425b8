"""`--align template`: raw scans become cubes like the template-space cohort's, and cube arrays go
back onto the scan's own grid through the stored transform (checked with nibabel and the
simulator's brain mask on the scan grid)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from jax_brainage.data import align, prune, simulate
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject
from jax_brainage.data.simulation import acquisition

CONFIG = simulate.CohortConfig(seed=0, n=4, resolution_mm=4, sequences=("T1w",))


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("align")
  cohort = simulate.Cohort(CONFIG)
  s = cohort.subject(2, ground_truth=False)
  raw = acquisition.acquire(s.images, s.brain_mask, CONFIG, cohort.anatomy, cohort.nuisance(2),
                            acquisition.session_rng(0, 2, 0))
  raw_path, tpl_path = tmp / "raw_T1w.nii.gz", tmp / "tpl_T1w.nii.gz"
  nib.save(nib.Nifti1Image(raw.images["T1w"].astype(np.int16), raw.affine), raw_path)
  nib.save(nib.Nifti1Image(s.images["T1w"].astype(np.int16), s.affine), tpl_path)
  cube, inverse = preprocess_subject({"T1w": str(raw_path)}, Preprocessing(align="affine"))
  ref_cube, ref_inverse = preprocess_subject({"T1w": str(tpl_path)}, Preprocessing())
  return raw, s, cube, inverse, ref_cube, ref_inverse


@pytest.mark.slow
def test_aligned_raw_scan_gives_the_template_space_cube(aligned):
  raw, s, cube, inverse, ref_cube, ref_inverse = aligned
  assert cube.shape == ref_cube.shape and inverse.cube_shape == ref_inverse.cube_shape
  # The same template grid: cube voxels are comparable once the offsets are undone.
  assert inverse.grid_affine == ref_inverse.grid_affine
  a = prune.place_in_grid(cube[..., 0], inverse.offset, inverse.grid_shape).astype(float)
  b = prune.place_in_grid(ref_cube[..., 0], ref_inverse.offset, ref_inverse.grid_shape)
  r = np.corrcoef(a.ravel(), b.astype(float).ravel())[0, 1]
  # Not 1: the registration normalises head size and pose (the template-space image keeps the
  # subject's own), and the mask is the refined one (Dice ~0.98), not the subject's.
  assert r > 0.8, r
  # The record keeps the scan's own grid and the transform, through JSON.
  assert inverse.original_shape == tuple(raw.brain_mask.shape) and inverse.alignment is not None
  np.testing.assert_allclose(inverse.original_affine, raw.affine, atol=1e-5)
  assert prune.CubeInverse.from_dict(inverse.to_dict()) == inverse
  assert "alignment" not in ref_inverse.to_dict()  # unaligned records unchanged


@pytest.mark.slow
def test_cube_maps_land_on_the_subjects_voxels_in_scan_space(aligned):
  raw, s, cube, inverse, _, _ = aligned
  # The subject's brain (template-space truth) as a cube map, sent to the scan's grid, against
  # the simulator's brain mask on that grid.
  brain_grid = resample_from_to(nib.Nifti1Image(s.brain_mask.astype(np.float32), s.affine),
                                (inverse.grid_shape, np.asarray(inverse.grid_affine)),
                                order=0).get_fdata() > 0.5
  brain_cube = prune.crop_or_pad(brain_grid, inverse.offset, inverse.cube_shape)
  back = prune.to_subject_space(brain_cube.astype(np.uint8), inverse, order=0)
  np.testing.assert_allclose(back.affine, raw.affine, atol=1e-5)
  got, want = np.asarray(back.dataobj) > 0, raw.brain_mask
  dice = 2 * (got & want).sum() / (got.sum() + want.sum())
  assert dice > 0.8, dice


@pytest.mark.slow
def test_map_to_scan_and_back_is_the_map_within_interpolation(aligned):
  _, _, cube, inverse, _, _ = aligned
  smooth = cube[..., 0].astype(np.float32)
  on_scan = prune.to_subject_space(smooth, inverse, order=1)
  # Back to the template grid with nibabel, through the stored transform.
  moved = nib.Nifti1Image(np.asarray(on_scan.dataobj, np.float32),
                          np.asarray(inverse.alignment) @ on_scan.affine)
  grid = resample_from_to(moved, (inverse.grid_shape, np.asarray(inverse.grid_affine)),
                          order=1).get_fdata()
  again = prune.crop_or_pad(grid, inverse.offset, inverse.cube_shape)
  inside = smooth > 0
  r = np.corrcoef(again[inside], smooth[inside])[0, 1]
  assert r > 0.9, r


def test_mask_pattern_names_the_missing_file(tmp_path):
  from jax_brainage.commands import prepare as prepare_command
  from jax_brainage.data import bids
  from jax_brainage.errors import ConfigError

  (tmp_path / "sub-0001_mask.nii.gz").write_bytes(b"")
  dataset = bids.Dataset(root=str(tmp_path), sequences=("T1w",), subjects=(
      bids.Subject("sub-0001", {"T1w": "a.nii.gz"}), bids.Subject("sub-0002", {"T1w": "b.nii.gz"})))
  with pytest.raises(ConfigError, match="sub-0002_mask.nii.gz \\(sub-0002\\)"):
    prepare_command.with_masks(dataset, str(tmp_path / "{subject}_mask.nii.gz"))
  with pytest.raises(ConfigError, match="one file for 2 subjects"):
    prepare_command.with_masks(dataset, str(tmp_path / "sub-0001_mask.nii.gz"))


@pytest.mark.slow
def test_prepare_align_template_with_own_masks(tmp_path):
  """`brainage simulate --acquisition raw` then `prepare --align template --mask PATTERN`: the
  cache's cubes are zero outside the carried mask and every row keeps its transform."""
  from jax_brainage import cli
  from jax_brainage.data.cache import Cache

  data, cache = tmp_path / "raw", tmp_path / "cache"
  assert cli.main(["simulate", "--out", str(data), "--n", "2", "--resolution", "4",
                   "--sequences", "T1w", "--acquisition", "raw", "--workers", "1"]) == 0
  pattern = str(data / "derivatives/simulation/{subject}/anat/{subject}_desc-brain_mask.nii.gz")
  assert cli.main(["prepare", "--data", str(data), "--out", str(cache), "--align", "template",
                   "--mask", pattern, "--workers", "1", "--quiet"]) == 0
  opened = Cache.open(cache)
  assert opened.shape == (50, 50, 50) and opened.preprocessing.align == "affine"
  for i in range(2):
    inverse = opened.inverse(i)
    assert inverse.alignment is not None
    sid = opened.records[i]["subject_id"]
    mask = nib.load(pattern.replace("{subject}", sid))
    # The scan's own mask, carried to the cube by the stored transform (nibabel), bounds the cube.
    moved = nib.Nifti1Image(np.asarray(mask.dataobj, np.float32),
                            np.asarray(inverse.alignment) @ mask.affine)
    carried = resample_from_to(moved, (inverse.grid_shape, np.asarray(inverse.grid_affine)),
                               order=0).get_fdata() > 0.5
    carried = prune.crop_or_pad(carried, inverse.offset, inverse.cube_shape)
    cube = opened.volumes[i][..., 0]
    assert (cube[~carried] > 0).mean() < 0.01


def test_images_are_resampled_by_prefiltered_cubic_splines_and_masks_linearly():
  """`align.resample_image` against scipy.ndimage on the voxel matrix built here by hand, and
  `align.carry_mask` against nibabel's linear resampling thresholded at 0.5."""
  from scipy import ndimage
  from scipy.spatial.transform import Rotation

  rng = np.random.default_rng(0)
  volume = ndimage.gaussian_filter(rng.random((20, 22, 18)), 1.5).astype(np.float32) * 1000
  affine = np.array([[0, 0, -3.2, 30], [4.1, 0, 0, -40], [0, 3.6, 0, -30], [0, 0, 0, 1.0]])
  m = np.eye(4)
  m[:3, :3] = Rotation.from_euler("xyz", [12, -7, 5], degrees=True).as_matrix() * 1.05
  m[:3, 3] = [3, -2, 5]
  shape, target = (24, 24, 24), np.diag([4.0, 4.0, 4.0, 1.0])
  target[:3, 3] = -46
  got = align.resample_image(volume, affine, shape, target, m)
  vox = np.linalg.inv(m @ affine) @ target
  want = ndimage.affine_transform(volume.astype(np.float64), vox[:3, :3], vox[:3, 3],
                                  output_shape=shape, order=3, mode="constant", cval=0.0)
  np.testing.assert_allclose(got, np.clip(want, 0, None), rtol=1e-5, atol=1e-3)
  mask = volume > np.median(volume)
  moved = nib.Nifti1Image(mask.astype(np.float32), m @ affine)
  ref = resample_from_to(moved, (shape, target), order=1).get_fdata() >= 0.5
  np.testing.assert_array_equal(align.carry_mask(mask, affine, shape, target, m), ref)


def test_known_transform_and_refined_mask_without_registration():
  """A raw scan with a head, moved by its TRUE transform: no registration, and without a mask the
  refined mask beats the carried template mask against the simulator's brain (Dice)."""
  from jax_brainage.data import nifti, skullstrip

  cohort = simulate.Cohort(CONFIG)
  s = cohort.subject(1, ground_truth=False)
  raw = acquisition.acquire(s.images, s.brain_mask, CONFIG, cohort.anatomy, cohort.nuisance(1),
                            acquisition.session_rng(0, 1, 0))
  img = [nifti.make_image(raw.images["T1w"], raw.affine)]
  refined = align.to_template(img, ("T1w",), scan_to_template=raw.scan_to_template,
                              transform="affine")
  carried = align.to_template(img, ("T1w",), scan_to_template=raw.scan_to_template,
                              masking="template", transform="affine")
  np.testing.assert_array_equal(refined.scan_to_template, raw.scan_to_template)
  assert not refined.skull_stripped and (refined.masking, carried.masking) == ("refined",
                                                                               "template")
  a = cohort.anatomy
  truth = resample_from_to(
      nib.Nifti1Image(raw.brain_mask.astype(np.float32), raw.scan_to_template @ raw.affine),
      (a.shape, a.affine), order=1).get_fdata() >= 0.5
  d_refined = skullstrip.dice(np.asarray(refined.mask.dataobj) > 0, truth)
  d_carried = skullstrip.dice(np.asarray(carried.mask.dataobj) > 0, truth)
  assert d_refined > 0.97 and d_refined > d_carried, (d_refined, d_carried)
  # Zero outside the mask, the image unchanged inside it.
  inside = np.asarray(refined.mask.dataobj) > 0
  assert np.all(np.asarray(refined.images[0].dataobj)[~inside] == 0)


def test_the_brain_edge_takes_nothing_from_outside_the_brain():
  """A uniform brain (800) wrapped in bright scalp (2000) right at its edge, moved by a rotation:
  on the template grid the brain's outermost voxels read ~800 (as the simulator renders an edge
  voxel: the brain's part only), where plain resampling mixes the scalp in. The splines inside
  still ring a little next to the edge: hence a bound on the mean, not every voxel."""
  from scipy import ndimage
  from scipy.spatial.transform import Rotation

  shape, affine = (30, 30, 30), np.diag([4.0, 4.0, 4.0, 1.0])
  affine[:3, 3] = -58
  ijk = np.indices(shape) - 14.5
  radius = np.sqrt((ijk ** 2).sum(0))
  brain = radius < 9
  volume = np.where(brain, 800.0, np.where(radius < 12, 2000.0, 0.0)).astype(np.float32)
  m = np.eye(4)
  m[:3, :3] = Rotation.from_euler("xyz", [15, -10, 8], degrees=True).as_matrix()
  m[:3, 3] = [2.0, -1.0, 3.0]
  # The brain's own mask on the target grid (linear, >= 0.5, as `carry_mask`).
  target_brain = align.carry_mask(brain, affine, shape, affine, m)
  out, mask = align.brain_resample(volume, affine, target_brain, shape, affine, m)
  assert mask.sum() > 0.9 * brain.sum()
  rim = mask & ~ndimage.binary_erosion(mask)
  assert np.all(out[~mask] == 0)
  plain = align.resample_image(volume, affine, shape, affine, m)
  error, plain_error = np.abs(out[rim] - 800).mean(), np.abs(plain[rim] - 800).mean()
  assert plain_error > 150 and error < 0.35 * plain_error, (error, plain_error)
  np.testing.assert_allclose(np.median(out[rim]), 800.0, rtol=0.01)


def test_rigid_part_is_the_rotation_about_the_template_centre():
  """A similarity (rotation x 1.12, translation) plus a small shear: the rigid part is the
  rotation (polar decomposition, checked against the rotation built here), and the scan point the
  affine sends to the centre still goes there."""
  from scipy.spatial.transform import Rotation

  r = Rotation.from_euler("xyz", [14, -9, 6], degrees=True).as_matrix()
  centre = np.array([1.5, -18.0, 12.0])
  m = np.eye(4)
  m[:3, :3] = r * 1.12
  m[:3, 3] = [7.0, -3.0, 11.0]
  rigid = align.rigid_part(m, centre)
  np.testing.assert_allclose(rigid[:3, :3], r, atol=1e-10)
  origin = np.linalg.solve(m[:3, :3], centre - m[:3, 3])
  np.testing.assert_allclose(rigid[:3, :3] @ origin + rigid[:3, 3], centre, atol=1e-9)
  # Shear and anisotropic scale: still a proper rotation, the same centre.
  shear = m.copy()
  shear[:3, :3] = r @ np.array([[1.05, 0.04, 0.0], [0.0, 0.97, 0.03], [0.0, 0.0, 1.1]])
  rigid = align.rigid_part(shear, centre)
  np.testing.assert_allclose(rigid[:3, :3] @ rigid[:3, :3].T, np.eye(3), atol=1e-10)
  assert np.linalg.det(rigid[:3, :3]) > 0
  origin = np.linalg.solve(shear[:3, :3], centre - shear[:3, 3])
  np.testing.assert_allclose(rigid[:3, :3] @ origin + rigid[:3, 3], centre, atol=1e-9)


def _scaled_head(scale=1.1, shift=(6.0, -9.0, 4.0)):
  """The head template, `scale` times larger about its brain centre, rotated and moved by
  `shift` mm, on an LPS grid of 4.4 mm voxels (no deformation: the truth is known exactly).
  Returns (anatomy, [image], brain mask image, template world -> scan world `[4, 4]`, the rigid
  truth scan -> template: the rotation and shift undone about the brain centre, size kept)."""
  from scipy.spatial.transform import Rotation

  from jax_brainage.data import anatomy as anatomy_lib, nifti

  anatomy = anatomy_lib.load_anatomy(4)
  head, head_affine = acquisition.head_template(anatomy)
  centre = np.asarray(anatomy.centre_mm, np.float64)
  r = Rotation.from_euler("xyz", [12, -8, 5], degrees=True).as_matrix()
  place = np.eye(4)
  place[:3, :3] = scale * r
  place[:3, 3] = centre + shift - scale * r @ centre
  shape = (60, 62, 58)
  scan_affine = acquisition.grid_affine("LPS", np.full(3, 4.4), shape, centre)
  scan = acquisition.regrid(head, head_affine, shape, scan_affine, place, order=3)
  brain = acquisition.regrid(anatomy.brain.astype(np.float32), anatomy.affine, shape,
                             scan_affine, place, order=1) >= 0.5
  truth = np.eye(4)
  truth[:3, :3] = r.T
  truth[:3, 3] = centre - r.T @ (centre + shift)
  return (anatomy, [nifti.make_image(np.clip(scan, 0, None), scan_affine)],
          nifti.make_image(brain.astype(np.uint8), scan_affine), place, truth)


def _brain_voxels(aligned) -> int:
  return int((np.asarray(aligned.mask.dataobj) > 0).sum())


def test_rigid_alignment_keeps_a_scaled_heads_size():
  """Given the true affine of a 1.1x scaled, rotated, moved head, "rigid" keeps the rotation and
  position only (exactly the rigid truth) and the size: the carried brain mask holds 1.1^3 times
  the template brain's voxels; "affine" normalises the size (1x)."""
  anatomy, images, mask, place, truth = _scaled_head()
  template_voxels = int((anatomy.brain > 0.5).sum())
  rigid = align.to_template(images, ("T1w",), mask=mask, scan_to_template=np.linalg.inv(place),
                            transform="rigid")
  np.testing.assert_allclose(rigid.scan_to_template, truth, atol=1e-9)
  np.testing.assert_allclose(_brain_voxels(rigid) / template_voxels, 1.1 ** 3, rtol=0.02)
  moved = align.to_template(images, ("T1w",), mask=mask, scan_to_template=np.linalg.inv(place),
                            transform="affine")
  np.testing.assert_allclose(_brain_voxels(moved) / template_voxels, 1.0, rtol=0.02)


@pytest.mark.slow  # one registration, compile included: ~15-45 s on 2 shared cores
def test_rigid_registration_of_a_scaled_head_finds_the_rigid_truth():
  """The same head, registered: the rigid transform is within 0.5 mm (mean over the template's
  brain) of the truth, and the size is kept; without a mask the refined mask, placed by the
  affine, still holds ~1.1^3 times the template's brain (a template mask carried rigidly would
  not fit this head)."""
  anatomy, images, mask, _, truth = _scaled_head()
  template_voxels = int((anatomy.brain > 0.5).sum())
  rigid = align.to_template(images, ("T1w",), mask=mask, transform="rigid")
  points = np.argwhere(anatomy.brain > 0.5) @ anatomy.affine[:3, :3].T + anatomy.affine[:3, 3]
  error = acquisition.mean_displacement_mm(np.linalg.inv(rigid.scan_to_template),
                                           np.linalg.inv(truth), points)
  assert error < 0.5, error
  np.testing.assert_allclose(_brain_voxels(rigid) / template_voxels, 1.1 ** 3, rtol=0.02)
  refined = align.to_template(images, ("T1w",), transform="rigid")
  assert refined.masking == "refined" and not refined.skull_stripped
  # 1.31 here; the template's mask carried rigidly (unfitted), then refined: 1.27.
  np.testing.assert_allclose(_brain_voxels(refined) / template_voxels, 1.1 ** 3, rtol=0.025)
