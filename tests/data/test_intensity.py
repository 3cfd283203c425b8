"""intensity.py: clip + min-max to uint8, z-scores, channels, to_unit_float (numpy and jax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import scipy.stats

from jax_brainage.data import intensity
from jax_brainage.errors import DataError
from tests.data.conftest import MNI_T1, NIBABEL_DATA


def _replica_minmax(data, brain, q):
  """The study's scaling written out independently (float64, per voxel)."""
  values = np.sort(data[brain].astype(np.float64))
  # Percentile by linear interpolation between order statistics (numpy's default method).
  pos = (len(values) - 1) * q / 100
  ceiling = values[int(np.floor(pos))] + (pos - np.floor(pos)) * (
      values[int(np.ceil(pos))] - values[int(np.floor(pos))])
  floor = min(0.0, values[0])
  out = np.zeros(data.shape, np.uint8)
  for idx in zip(*np.nonzero(brain)):
    x = min(max(float(data[idx]), floor), ceiling)
    out[idx] = int(np.floor(255 * (x - floor) / (ceiling - floor) + 0.5))
  return out


def test_minmax_matches_replica_on_real_image():
  img = nib.load(f"{NIBABEL_DATA}/anatomical.nii")  # int16 with negative values
  data = np.asanyarray(img.dataobj)[::2, ::2, ::2]
  brain = data > 100
  for q in (99.5, 90.0, 100.0):
    ours = intensity.minmax_uint8(data, brain, ceiling_percentile=q)
    ref = _replica_minmax(data, brain, q)
    # Rounding of exact .5 ties may differ by one level (rint is round-half-even).
    assert np.max(np.abs(ours.astype(int) - ref.astype(int))) <= 1
    assert np.mean(ours != ref) < 1e-3
    assert ours.dtype == np.uint8 and ours.max() == 255 and not ours[~brain].any()


def test_minmax_keeps_zero_background_at_zero_and_clips_hot_voxels():
  img = nib.load(MNI_T1)
  data = np.asanyarray(img.dataobj)[::4, ::4, ::4].astype(np.float32)
  data[10, 10, 10] = 10_000  # A hot voxel must not squash the rest of the range.
  brain = data > 0
  out = intensity.minmax_uint8(data, brain, ceiling_percentile=99.5)
  ceiling = np.percentile(data[brain], 99.5)
  assert out[10, 10, 10] == 255
  assert np.sum(out == 255) == np.sum(data[brain] >= ceiling)
  # floor = 0 for non-negative images: intensity v -> round(255 v / ceiling).
  below = brain & (data < ceiling)
  np.testing.assert_array_equal(out[below], np.rint(255 * data[below] / ceiling).astype(np.uint8))


def test_minmax_negative_floor():
  data = np.linspace(-50, 150, 1000).reshape(10, 10, 10)
  out = intensity.minmax_uint8(data, None, ceiling_percentile=100)
  np.testing.assert_array_equal(out, np.rint((data + 50) / 200 * 255).astype(np.uint8))


def test_zscore_matches_scipy():
  rng = np.random.default_rng(0)
  data = rng.gamma(3.0, 40.0, size=(9, 10, 11))
  brain = rng.random(data.shape) > 0.4
  out = intensity.zscore(data, brain)
  assert out.dtype == np.float16
  np.testing.assert_allclose(out[brain], scipy.stats.zscore(data[brain]), rtol=1e-3, atol=2e-3)
  assert not out[~brain].any()


def test_scale_channels_each_sequence_on_its_own():
  rng = np.random.default_rng(1)
  t1 = rng.uniform(0, 100, (6, 7, 8))
  flair = rng.uniform(0, 3, (6, 7, 8))
  brain = t1 > 20
  both = intensity.scale_channels([t1, flair], brain, names=["T1w", "FLAIR"])
  assert both.shape == (6, 7, 8, 2) and both.dtype == np.uint8
  np.testing.assert_array_equal(both[..., 0], intensity.minmax_uint8(t1, brain))
  np.testing.assert_array_equal(both[..., 1], intensity.minmax_uint8(flair, brain))
  z = intensity.scale_channels([t1, flair], brain, scaling="zscore")
  assert z.dtype == np.float16


def test_degenerate_brains_are_data_errors():
  data = np.zeros((4, 4, 4))
  with pytest.raises(DataError, match="sub-01: x.nii .T1w.: empty brain"):
    intensity.minmax_uint8(data, data > 0, where="sub-01: x.nii (T1w)")
  data[1:3, 1:3, 1:3] = 7.0
  with pytest.raises(DataError, match="constant intensity"):
    intensity.zscore(data, data > 0, where="sub-01")
  with pytest.raises(DataError, match="no intensity range"):
    intensity.minmax_uint8(-data, data > 0, where="sub-01")
  with pytest.raises(ValueError, match="unknown intensity scaling"):
    intensity.scale(data, scaling="robust")


def test_to_unit_float_numpy_and_jax():
  x = np.arange(256, dtype=np.uint8).reshape(4, 4, 4, 4, 1)
  ref = x.astype(np.float64) / 255.0
  ours = intensity.to_unit_float(x)
  assert ours.dtype == np.float32 and ours.shape == x.shape
  np.testing.assert_allclose(ours, ref, rtol=2e-7, atol=0)  # within 2 float32 ulps
  assert ours.min() == 0.0 and ours.max() == 1.0
  on_device = intensity.to_unit_float(jnp.asarray(x))
  jitted = jax.jit(intensity.to_unit_float)(jnp.asarray(x))
  assert isinstance(jitted, jax.Array) and jitted.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(on_device), ours)  # Same bits on host and device.
  np.testing.assert_array_equal(np.asarray(jitted), ours)
  f = np.array([0.25, -1.5], np.float16)
  np.testing.assert_array_equal(intensity.to_unit_float(f), np.array([0.25, -1.5], np.float32))
  assert intensity.to_unit_float(jnp.asarray(f)).dtype == jnp.float32
  assert intensity.to_unit_float(jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32
  with pytest.raises(TypeError):
    intensity.to_unit_float(np.arange(3, dtype=np.int32))


def _anatomy(shape=(36, 42, 34), seed=0):
  """A 'brain' of 4 mm voxels (an ellipsoid ~130 mm across) made of 8 mm blocks of three tissues
  (CSF 0.2, GM 0.6, WM 1.0 relative intensity), its mask, and the grid in [-1, 1]^3."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
  brain = (grid**2).sum(0) < 0.8
  blocks = rng.choice([0.2, 0.6, 1.0], size=tuple(-(-n // 2) for n in shape), p=[0.2, 0.4, 0.4])
  tissue = np.kron(blocks, np.ones((2, 2, 2)))[tuple(slice(n) for n in shape)]
  return np.where(brain, tissue, 0.0), brain, grid


def test_correct_bias_removes_a_smooth_multiplicative_field():
  """A +-20% field: log(corrected(field * image) / corrected(image)) inside the brain varies a
  quarter as much as the field itself (what is left sits at the brain's edge, where a Gaussian
  cannot see a ramp's far side)."""
  image, brain, grid = _anatomy()
  field = np.exp(0.2 * grid[0] - 0.1 * grid[1] ** 2)
  clean = intensity.correct_bias(image, brain, 20.0, (4.0, 4.0, 4.0))
  biased = intensity.correct_bias(image * field, brain, 20.0, (4.0, 4.0, 4.0))
  before = np.log(field[brain]).std()
  after = np.log(biased[brain] / clean[brain]).std()
  assert before > 0.08 and after < before / 3.5
  np.testing.assert_array_equal(biased[~brain], (image * field)[~brain].astype(np.float32))


def test_correct_bias_keeps_a_global_scale_and_the_brain_mean_log():
  image, brain, _ = _anatomy(seed=1)
  out = intensity.correct_bias(image, brain, 25.0, (4.0, 4.0, 4.0))
  np.testing.assert_allclose(intensity.correct_bias(3.0 * image, brain, 25.0, (4, 4, 4)),
                             3.0 * out, rtol=1e-5)
  np.testing.assert_allclose(np.log(out[brain]).mean(), np.log(image[brain]).mean(), rtol=1e-5)


def test_correct_bias_bad_input_names_the_image():
  image, brain, _ = _anatomy()
  with pytest.raises(DataError, match="sub-01.*positive"):
    intensity.correct_bias(-image, brain, 30.0, (4, 4, 4), where="sub-01 T1w")
  with pytest.raises(DataError, match="sub-01.*empty brain"):
    intensity.correct_bias(image, np.zeros_like(brain), 30.0, (4, 4, 4), where="sub-01 T1w")


def test_mean_scaling_of_a_cube_equals_peng_et_al_on_the_whole_volume():
  # SFCN's recipe (Peng et al. 2021): a skull-stripped 182 x 218 x 182-like volume divided by
  # its mean (numpy, background included), then cropped. The cube's own scaling, told the
  # whole volume's voxel count, gives the same numbers.
  rng = np.random.default_rng(3)
  full = np.zeros((30, 36, 30))
  brain = np.zeros(full.shape, bool)
  brain[8:22, 9:27, 8:22] = True
  full[brain] = rng.uniform(20.0, 200.0, brain.sum())
  reference = (full / full.mean())[3:27, 4:32, 3:27]
  cube, cube_brain = full[3:27, 4:32, 3:27], brain[3:27, 4:32, 3:27]
  out = intensity.scale(cube, cube_brain, scaling="mean", reference_voxels=full.size)
  assert out.dtype == np.float16
  np.testing.assert_allclose(out.astype(np.float64), reference, rtol=1e-3)
  # Without a reference count the mean is the cube's own.
  own = intensity.mean_scaled(cube, cube_brain)
  np.testing.assert_allclose(own.astype(np.float64), cube / cube.mean(), rtol=1e-3)
  with pytest.raises(DataError, match="sum to 0"):
    intensity.mean_scaled(np.zeros((4, 4, 4)), where="x.nii")
