"""Losses against numpy/scipy replicas and PyTorch's KLDivLoss (Peng et al.'s training loss)."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from scipy.special import rel_entr
from scipy.stats import norm

from jax_brainage.models import get_model, training_loss
from jax_brainage.models import losses

RNG = np.random.default_rng(0)
PRED = RNG.uniform(20, 80, 6).astype(np.float32)
AGES = RNG.uniform(20, 80, 6).astype(np.float32)
CENTERS = (15.5 + np.arange(70)).astype(np.float32)  # 1-year bins over 15-85 years


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_mse_and_mae_against_numpy():
  np.testing.assert_allclose(losses.mse(PRED, AGES), np.mean((PRED - AGES) ** 2), rtol=1e-6)
  np.testing.assert_allclose(losses.mae(PRED, AGES), np.mean(np.abs(PRED - AGES)), rtol=1e-6)
  w = RNG.uniform(0, 2, 6).astype(np.float32)
  np.testing.assert_allclose(losses.mse(PRED, AGES, w), np.average((PRED - AGES) ** 2, weights=w),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.mae(PRED, AGES, w), np.average(np.abs(PRED - AGES), weights=w),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.absolute_error_per_example(PRED, AGES), np.abs(PRED - AGES),
                             rtol=1e-6)


def test_mask_ignores_padding():
  # A padded eval batch: 4 real subjects and 2 padding rows with garbage values.
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  pred = PRED.copy()
  pred[4:] = 1e6
  for fn in (losses.mse, losses.mae):
    np.testing.assert_allclose(fn(pred, AGES, mask), fn(PRED[:4], AGES[:4]), rtol=1e-6)
  # Gradients do not reach padding rows.
  grad = jax.grad(losses.mse)(jnp.asarray(pred), AGES, mask)
  np.testing.assert_array_equal(grad[4:], 0.0)
  np.testing.assert_allclose(grad[:4], 2 * (PRED[:4] - AGES[:4]) / 4, rtol=1e-5)


def test_all_padding_batch_gives_zero_not_nan():
  zeros = np.zeros(6, np.float32)
  value, grad = jax.value_and_grad(losses.mse)(jnp.asarray(PRED), AGES, zeros)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
  log_probs = jnp.asarray(np_log_softmax(RNG.normal(size=(6, 70))), jnp.float32)
  assert float(losses.soft_label_kl(log_probs, AGES, CENTERS, weights=zeros)) == 0.0


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="batch"):
    losses.mse(PRED[:, None], AGES)  # [batch, 1] vs [batch] would broadcast to [batch, batch]
  with pytest.raises(ValueError, match="weights"):
    losses.mae(PRED, AGES, np.ones(5, np.float32))
  with pytest.raises(ValueError, match="bins"):
    losses.soft_label_kl(jnp.zeros((6, 69)), AGES, CENTERS)


def test_soft_labels_are_a_normalised_gaussian():
  labels = np.asarray(losses.soft_labels(AGES, CENTERS, sigma=1.0))
  assert labels.shape == (6, 70) and labels.dtype == np.float32
  np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
  expected = norm.pdf(CENTERS[None, :].astype(np.float64), loc=AGES[:, None], scale=1.0)
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(labels, expected, atol=1e-6)
  wide = np.asarray(losses.soft_labels(AGES, CENTERS, sigma=2.5))
  expected = norm.pdf(CENTERS[None, :].astype(np.float64), loc=AGES[:, None], scale=2.5)
  np.testing.assert_allclose(wide, expected / expected.sum(-1, keepdims=True), atol=1e-6)


def test_soft_labels_outside_the_bin_range():
  ages = np.array([14.0, 86.5, -300.0, 1e4], np.float32)
  labels = np.asarray(losses.soft_labels(ages, CENTERS))
  assert np.all(np.isfinite(labels))
  np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
  # Just outside: the renormalised Gaussian tail on the in-range centres.
  for row, age in zip(labels[:2], ages[:2]):
    tail = norm.pdf(CENTERS.astype(np.float64), loc=age, scale=1.0)
    np.testing.assert_allclose(row, tail / tail.sum(), atol=1e-6)
  # Far outside: all mass on the nearest edge bin (no 0 / 0).
  np.testing.assert_allclose(labels[2], np.eye(70)[0], atol=1e-7)
  np.testing.assert_allclose(labels[3], np.eye(70)[-1], atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(st.floats(19.0, 81.0), st.floats(1.0, 3.0))
def test_soft_label_mean_and_variance_inside_the_range(age, sigma):
  # 5 sigma from both edges (15, 85) the truncation is invisible; with sigma >= the bin width
  # the sampled Gaussian keeps mean = age and variance = sigma^2 (Poisson summation: the
  # aliasing error is ~exp(-2 pi^2 sigma^2 / width^2) < 3e-9).
  assume(min(age - 15.0, 85.0 - age) > 5 * sigma)
  labels = np.asarray(losses.soft_labels(np.array([age], np.float32), CENTERS, sigma), np.float64)
  np.testing.assert_allclose(labels @ CENTERS, age, atol=2e-4)
  np.testing.assert_allclose(labels @ (CENTERS - age) ** 2, sigma**2, rtol=1e-4)


def test_kl_against_numpy_and_pytorch():
  log_probs = np_log_softmax(RNG.normal(0, 2, (6, 70))).astype(np.float32)
  target = norm.pdf(CENTERS[None, :].astype(np.float64), loc=AGES[:, None], scale=1.0)
  target /= target.sum(-1, keepdims=True)
  per_example = rel_entr(target, np.exp(log_probs.astype(np.float64))).sum(-1)
  np.testing.assert_allclose(losses.soft_label_kl_per_example(log_probs, AGES, CENTERS),
                             per_example, rtol=1e-5)
  np.testing.assert_allclose(losses.soft_label_kl(log_probs, AGES, CENTERS), per_example.mean(),
                             rtol=1e-5)
  # Peng et al.'s my_KLDivLoss: KLDivLoss(reduction='sum') / batch size.
  torch_kl = torch.nn.KLDivLoss(reduction="sum")(torch.tensor(log_probs, dtype=torch.float64),
                                                 torch.tensor(target)) / 6
  np.testing.assert_allclose(losses.soft_label_kl(log_probs, AGES, CENTERS), torch_kl.item(),
                             rtol=1e-5)
  w = np.array([1, 0, 2, 1, 0, 1], np.float32)
  np.testing.assert_allclose(losses.soft_label_kl(log_probs, AGES, CENTERS, weights=w),
                             np.average(per_example, weights=w), rtol=1e-5)


def test_kl_is_minimal_at_the_soft_labels():
  target = np.asarray(losses.soft_labels(AGES, CENTERS), np.float64)
  # The label itself as prediction (floored where it underflows to 0, as a softmax would).
  log_probs = jnp.asarray(np.log(np.maximum(target, 1e-30)), jnp.float32)
  value, grad = jax.value_and_grad(losses.soft_label_kl)(log_probs, AGES, CENTERS)
  assert abs(float(value)) < 1e-5
  # d KL / d log_probs = -target / batch.
  np.testing.assert_allclose(grad, -target / 6, atol=1e-7)


def test_training_loss_follows_the_model():
  sfcn = get_model("sfcn", age_range=[15, 85])
  log_probs = jnp.asarray(np_log_softmax(RNG.normal(size=(6, 70))), jnp.float32)
  target = norm.pdf(CENTERS[None, :].astype(np.float64), loc=AGES[:, None], scale=1.0)
  target /= target.sum(-1, keepdims=True)
  expected = rel_entr(target, np.exp(np.asarray(log_probs, np.float64))).sum(-1).mean()
  np.testing.assert_allclose(training_loss(sfcn, log_probs, AGES), expected, rtol=1e-5)
  for name in ("mrinet", "sfcn_regression"):
    np.testing.assert_allclose(training_loss(get_model(name), PRED, AGES),
                               np.mean((PRED - AGES) ** 2), rtol=1e-6)
