"""augment: each transform against an independent float64 reference on the same parameters."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial.transform import Rotation

from jax_brainage.data import augment as aug
from jax_brainage.errors import ConfigError

SHAPE = (14, 16, 18)


def _images(n: int, channels: int = 2, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.random((n,) + SHAPE + (channels,)).astype(np.float32)


def _seeds(n: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 2**32, (n, 2), dtype=np.uint32)


def _params(seeds: np.ndarray, cfg: aug.AugmentConfig) -> list[dict[str, np.ndarray]]:
  out = []
  for s in seeds:
    p = aug.augment_params(s, cfg)
    out.append({k: np.asarray(p[k]) for k in ("flip", "angles", "shift")})
  return out


def test_default_config_is_identity_and_off():
  cfg = aug.AugmentConfig()
  assert not cfg.enabled
  x = _images(3)
  np.testing.assert_array_equal(np.asarray(aug.augment_batch(_seeds(3), x, cfg)), x)


def test_rotation_matrix_matches_scipy_extrinsic_xyz():
  angles = np.array([0.3, -0.2, 0.7])
  ref = Rotation.from_euler("xyz", angles).as_matrix()  # extrinsic x, then y, then z
  np.testing.assert_allclose(np.asarray(aug.rotation_matrix(angles.astype(np.float32))), ref,
                             atol=1e-6)


def test_rotation_shift_flip_match_scipy_affine_transform():
  cfg = aug.AugmentConfig(shift_voxels=3, rotate_degrees=10.0, flip_lr=True)
  x, seeds = _images(6), _seeds(6)
  out = np.asarray(aug.augment_batch(seeds, x, cfg))
  flips = []
  for b, p in enumerate(_params(seeds, cfg)):
    assert np.all(np.abs(np.rad2deg(p["angles"])) <= 10.0) and np.all(np.abs(p["shift"]) <= 3)
    ref = x[b].astype(np.float64)
    if p["flip"]:
      ref = np.flip(ref, axis=0)
    flips.append(bool(p["flip"]))
    r = Rotation.from_euler("xyz", p["angles"].astype(np.float64)).as_matrix()
    c = (np.array(SHAPE) - 1) / 2.0
    # output(o) = input(R^T (o - c - s) + c); jax's "constant" mode is scipy's "grid-constant".
    ref = np.stack([ndi.affine_transform(ref[..., k], r.T, offset=c - r.T @ (c + p["shift"]),
                                         order=1, mode="grid-constant", cval=0.0)
                    for k in range(ref.shape[-1])], axis=-1)
    np.testing.assert_allclose(out[b], ref, atol=2e-5)
  assert any(np.any(p["angles"] != 0) for p in _params(seeds, cfg))


def test_integer_shift_is_exact_zero_filled_roll():
  cfg = aug.AugmentConfig(shift_voxels=2)
  x, seeds = _images(8), _seeds(8, seed=5)
  out = np.asarray(aug.augment_batch(seeds, x, cfg))
  seen = set()
  for b, p in enumerate(_params(seeds, cfg)):
    s = p["shift"]
    seen.update(s.tolist())
    ref = np.roll(x[b], tuple(s), axis=(0, 1, 2))
    for axis, k in enumerate(s):  # zero what np.roll wrapped around
      sl = [slice(None)] * 4
      sl[axis] = slice(0, k) if k > 0 else slice(ref.shape[axis] + k, None)
      ref[tuple(sl)] = 0
    np.testing.assert_array_equal(out[b], ref)
  assert seen == {-2, -1, 0, 1, 2}


def test_flip_is_left_right_with_probability_half():
  cfg = aug.AugmentConfig(flip_lr=True)
  x, seeds = _images(64, channels=1), _seeds(64, seed=7)
  out = np.asarray(aug.augment_batch(seeds, x, cfg))
  n_flipped = 0
  for b, p in enumerate(_params(seeds, cfg)):
    ref = np.flip(x[b], axis=0) if p["flip"] else x[b]
    np.testing.assert_array_equal(out[b], ref)
    n_flipped += bool(p["flip"])
  assert 16 <= n_flipped <= 48  # Binomial(64, 1/2): outside this range has p < 1e-4


def test_noise_is_additive_gaussian_with_configured_std():
  cfg = aug.AugmentConfig(noise_std=0.05)
  x = np.zeros((4, 20, 20, 20, 1), np.float32)
  out = np.asarray(aug.augment_batch(_seeds(4), x, cfg)).astype(np.float64)
  for b in range(4):
    noise = out[b].ravel()
    assert abs(noise.mean()) < 4 * 0.05 / np.sqrt(noise.size)
    assert abs(noise.std() - 0.05) < 0.05 * 0.05
  # Independent draws per example.
  assert abs(np.corrcoef(out[0].ravel(), out[1].ravel())[0, 1]) < 0.05
  # Additive: the same seed on another image adds the same field.
  y = np.random.default_rng(3).random((4, 20, 20, 20, 1)).astype(np.float32)
  out_y = np.asarray(aug.augment_batch(_seeds(4), y, cfg))
  np.testing.assert_allclose(out_y - y, out, atol=1e-6)
  # Same seed, other batch position: same field.
  out_rev = np.asarray(aug.augment_batch(_seeds(4)[::-1], x, cfg))
  np.testing.assert_allclose(out_rev, out[::-1], atol=1e-6)


def test_same_seed_same_result_regardless_of_batch_position():
  # Same config and shapes as the scipy test above: no extra compilation.
  cfg = aug.AugmentConfig(shift_voxels=3, rotate_degrees=10.0, flip_lr=True)
  x, seeds = _images(6), _seeds(6)
  out = np.asarray(aug.augment_batch(seeds, x, cfg))
  perm = np.array([3, 0, 5, 4, 1, 2])
  out_perm = np.asarray(aug.augment_batch(seeds[perm], x[perm], cfg))
  np.testing.assert_allclose(out_perm, out[perm], atol=1e-6)


def test_streams_are_independent_of_other_knobs():
  # Turning rotation on must not change which examples are flipped or the shifts drawn.
  seeds = _seeds(16)
  a = _params(seeds, aug.AugmentConfig(shift_voxels=2, flip_lr=True))
  b = _params(seeds, aug.AugmentConfig(shift_voxels=2, flip_lr=True, rotate_degrees=8.0))
  for pa, pb in zip(a, b):
    assert pa["flip"] == pb["flip"] and np.array_equal(pa["shift"], pb["shift"])


def test_prepare_images_scales_uint8_to_unit_interval():
  u8 = np.arange(256, dtype=np.uint8).reshape(1, 4, 4, 16, 1)
  out = np.asarray(aug.prepare_images(u8, _seeds(1), aug.AugmentConfig()))
  np.testing.assert_allclose(out, u8.astype(np.float64) / 255.0, rtol=1e-7)


def test_prepare_images_keeps_float16_z_scores_and_augments_them_unclipped():
  # A z-scored cache: float16, negative and > 1 inside the brain, 0 (background) outside.
  rng = np.random.default_rng(3)
  z = rng.normal(0.0, 2.0, (3,) + SHAPE + (2,)).astype(np.float16)
  z[:, :3] = 0
  seeds = _seeds(3, seed=4)
  plain = np.asarray(aug.prepare_images(z, seeds, aug.AugmentConfig()))
  assert plain.dtype == np.float32
  np.testing.assert_array_equal(plain, z.astype(np.float32))  # not / 255, not clipped
  # Shifts, rotations and flips: the scipy reference on the z-scores, zero fill outside.
  cfg = aug.AugmentConfig(shift_voxels=2, rotate_degrees=10.0, flip_lr=True)
  out = np.asarray(aug.prepare_images(z, seeds, cfg))
  c = (np.array(SHAPE) - 1) / 2.0
  for b, p in enumerate(_params(seeds, cfg)):
    ref = z[b].astype(np.float64)
    if p["flip"]:
      ref = np.flip(ref, axis=0)
    r = Rotation.from_euler("xyz", p["angles"].astype(np.float64)).as_matrix()
    ref = np.stack([ndi.affine_transform(ref[..., k], r.T, offset=c - r.T @ (c + p["shift"]),
                                         order=1, mode="grid-constant", cval=0.0)
                    for k in range(ref.shape[-1])], axis=-1)
    np.testing.assert_allclose(out[b], ref, atol=1e-4)
  assert out.min() < -2 and out.max() > 2


@pytest.mark.parametrize("kw", [dict(shift_voxels=-1), dict(shift_voxels=1.5),
                                dict(rotate_degrees=90.0), dict(noise_std=-0.1),
                                dict(rotate_degrees=float("nan"))])
def test_bad_config_is_a_config_error(kw):
  with pytest.raises(ConfigError):
    aug.AugmentConfig(**kw)


def test_from_config_rejects_unknown_keys_and_round_trips():
  cfg = aug.AugmentConfig.training_default()
  assert aug.AugmentConfig.from_config(cfg.to_dict()) == cfg
  with pytest.raises(ConfigError, match="rotation"):
    aug.AugmentConfig.from_config({"rotation": 3})
  assert not aug.AugmentConfig.from_config(None).enabled
