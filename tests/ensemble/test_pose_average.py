"""Test-time augmentation (`augment.PoseAverage`): the posed predictions against an independent
replica (scipy's trilinear affine_transform of every volume, then the plain prediction)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial.transform import Rotation

from jax_brainage.commands import predict as predict_command
from jax_brainage.data import augment
from jax_brainage.ensemble import conformal
from jax_brainage.ensemble.model import SubEnsemble, identity
from jax_brainage.errors import ConfigError

from tests.ensemble.conftest import random_members, tiny_manifest, volumes


@pytest.fixture(scope="module")
def sub():
  manifest = tiny_manifest(("T1w", "FLAIR"))
  _, _, stacked = random_members(manifest, 2, seed=3)
  return SubEnsemble("a", ("T1w", "FLAIR"), (), manifest, 2, stacked)


def _posed_replica(x: np.ndarray, angles: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """float `[n, X, Y, Z, C]` resampled by scipy: output(o) = input(R^T (o - c - s) + c),
  trilinear, zero outside."""
  r = Rotation.from_euler("xyz", angles.astype(np.float64)).as_matrix()
  c = (np.array(x.shape[1:4]) - 1) / 2.0
  offset = c - r.T @ (c + shift.astype(np.float64))
  return np.stack([np.stack([ndi.affine_transform(v[..., k], r.T, offset=offset, order=1,
                                                  mode="grid-constant", cval=0.0)
                             for k in range(v.shape[-1])], -1) for v in x]).astype(np.float32)


def test_posed_prediction_is_the_mean_of_plain_predictions_of_scipy_resampled_volumes(sub):
  poses = augment.PoseAverage(poses=4, rotate_degrees=8.0, shift_voxels=1.5, seed=2)
  x = volumes(3, seed=7, channels=2)
  got = sub.predict(x, batch_size=2, pose_average=poses)
  angles, shifts = poses.parameters()
  unit = x.astype(np.float32) / 255.0
  replica = np.mean([sub.predict(_posed_replica(unit, a, s), batch_size=2)
                     for a, s in zip(angles, shifts)], axis=0)
  np.testing.assert_allclose(got, replica, atol=2e-3)
  plain = sub.predict(x, batch_size=2)
  assert np.abs(got - plain).max() > 0.05  # the poses do change these members' estimates


def test_one_pose_is_the_plain_prediction_exactly(sub):
  x = volumes(3, seed=8, channels=2)
  np.testing.assert_array_equal(sub.predict(x, pose_average=augment.PoseAverage(poses=1)),
                                sub.predict(x))
  # The identity pose alone, run through the posed path, is also exact.
  only_identity = augment.PoseAverage(poses=2, rotate_degrees=0.0, shift_voxels=0.0)
  np.testing.assert_allclose(sub.predict(x, pose_average=only_identity), sub.predict(x),
                             atol=1e-4)


def test_ensemble_predict_passes_the_poses_to_every_member(sub):
  ens = identity(sub)
  x = volumes(2, seed=9, channels=2)
  poses = augment.PoseAverage(poses=3, seed=1)
  got = ens.predict(x, pose_average=poses)
  np.testing.assert_allclose(got.members["a"], sub.predict(x, pose_average=poses), rtol=1e-6)
  np.testing.assert_allclose(got.ensemble, sub.predict(x, pose_average=poses).mean(1),
                             rtol=1e-6)


def test_poses_are_seeded_within_their_bounds_and_start_at_the_identity():
  p = augment.PoseAverage(poses=64, rotate_degrees=5.0, shift_voxels=1.0, seed=4)
  angles, shifts = p.parameters()
  assert angles.shape == shifts.shape == (64, 3)
  np.testing.assert_array_equal(angles[0], 0)
  np.testing.assert_array_equal(shifts[0], 0)
  assert np.abs(np.rad2deg(angles)).max() <= 5.0 and np.abs(shifts).max() <= 1.0
  assert np.abs(np.rad2deg(angles)).max() > 4.0  # the range is used, not a corner of it
  a2, s2 = augment.PoseAverage(poses=64, rotate_degrees=5.0, shift_voxels=1.0, seed=4).parameters()
  np.testing.assert_array_equal(angles, a2)
  assert not np.array_equal(angles, augment.PoseAverage(64, 5.0, 1.0, seed=5).parameters()[0])
  assert not augment.PoseAverage().enabled and augment.PoseAverage().describe() == ""
  assert p.describe() == "64 poses within 5 degrees and 1 voxel (seed 4)"


@pytest.mark.parametrize("kwargs", [dict(poses=0), dict(poses=2.5), dict(rotate_degrees=-1.0),
                                    dict(shift_voxels=float("nan"))])
def test_bad_settings_are_one_line_config_errors(kwargs):
  with pytest.raises(ConfigError) as e:
    augment.PoseAverage(**kwargs)
  assert "\n" not in str(e.value)


def test_command_line_names_the_option():
  args = argparse.Namespace(tta=0, tta_degrees=5.0, tta_voxels=1.0)
  with pytest.raises(ConfigError, match=r"^--tta 0 .*positive integer"):
    predict_command.pose_average(args)
  args.tta = 16
  assert predict_command.pose_average(args) == augment.PoseAverage(16, 5.0, 1.0)


def test_calibration_records_the_poses_it_was_predicted_with(tmp_path):
  rng = np.random.default_rng(0)
  age = rng.uniform(20, 80, 60)
  cal = conformal.calibration_from_rows(
      [str(i) for i in range(60)], age, age + rng.normal(0, 2, 60), age, np.zeros(60),
      source="x", normalize=False, pose_average=augment.PoseAverage(16).describe())
  conformal.save_calibration(tmp_path / "c.json", cal)
  assert conformal.load_calibration(tmp_path / "c.json").pose_average == (
      "16 poses within 5 degrees and 1 voxel (seed 0)")
