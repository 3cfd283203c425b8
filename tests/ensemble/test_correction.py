"""Bias correction against np.polyfit (raw ages, no standardisation) and Spearman correlations
against scipy.stats.spearmanr."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from jax_brainage.ensemble import correction as corr
from jax_brainage.errors import ConfigError, DataError


def _regressed(rng, n=80):
  """Predictions that regress to the mean (the usual brain-age bias) with noise."""
  age = rng.uniform(20, 80, n)
  return age, 50 + 0.6 * (age - 50) + 2e-4 * (age - 50) ** 3 + rng.normal(0, 3, n)


@pytest.mark.parametrize("kind,degree", [("linear", 1), ("poly3", 3)])
def test_correction_matches_polyfit_of_gap_on_age(kind, degree):
  rng = np.random.default_rng(0)
  age, pred = _regressed(rng)
  c = corr.fit_correction(kind, age, pred)
  coef = np.polyfit(age, pred - age, degree)
  new_age, new_pred = _regressed(np.random.default_rng(1), 20)
  np.testing.assert_allclose(c.bias(new_age), np.polyval(coef, new_age), atol=1e-8)
  np.testing.assert_allclose(c.apply(new_pred, new_age),
                             new_pred - np.polyval(coef, new_age), atol=1e-8)
  np.testing.assert_allclose(c.corrected_gap(new_pred, new_age),
                             new_pred - new_age - np.polyval(coef, new_age), atol=1e-8)
  # On the fitting data the corrected gap is a least-squares residual: zero mean and no linear
  # correlation with age (nor with age^2, age^3 for poly3).
  gap_c = c.corrected_gap(pred, age)
  assert abs(gap_c.mean()) < 1e-9
  for d in range(1, degree + 1):
    assert abs(np.corrcoef(gap_c, age ** d)[0, 1]) < 1e-9
  again = corr.Correction.from_dict(c.to_dict())
  np.testing.assert_allclose(again.apply(new_pred, new_age), c.apply(new_pred, new_age))


def test_none_correction_is_identity_and_errors():
  c = corr.fit_correction("none", [20.0, 30.0], [25.0, 28.0])
  np.testing.assert_array_equal(c.apply(np.array([25.0, 28.0]), np.array([20.0, 30.0])),
                                [25.0, 28.0])
  with pytest.raises(ConfigError, match="quadratic"):
    corr.fit_correction("quadratic", [1.0], [1.0])
  with pytest.raises(DataError, match="distinct"):
    corr.fit_correction("poly3", [20.0, 30.0, 30.0, 20.0, 40.0], [1.0, 2, 3, 4, 5])
  with pytest.raises(DataError):
    corr.fit_correction("linear", [20.0, 30.0], [1.0])


def test_gap_metrics_against_scipy():
  rng = np.random.default_rng(2)
  age, pred = _regressed(rng, 50)
  age = np.round(age)  # ties in age: average ranks, as scipy
  c = corr.fit_correction("linear", age, pred)
  corrected = c.apply(pred, age)
  m = corr.gap_metrics(age, pred, corrected)
  np.testing.assert_allclose(m["mae"], np.mean(np.abs(pred - age)), rtol=1e-12)
  np.testing.assert_allclose(m["mae_corrected"], np.mean(np.abs(corrected - age)), rtol=1e-12)
  np.testing.assert_allclose(m["spearman_gap_age"], spearmanr(pred - age, age)[0], atol=1e-12)
  np.testing.assert_allclose(m["spearman_gap_age_corrected"],
                             spearmanr(corrected - age, age)[0], atol=1e-12)
  # Regression to the mean: the raw gap falls with age, the corrected one does not.
  assert m["spearman_gap_age"] < -0.5 and abs(m["spearman_gap_age_corrected"]) < 0.2
  assert m["n"] == 50
  assert np.isnan(corr.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_fit_on_few_validation_scans_warns():
  from jax_brainage.errors import SmallSampleWarning

  rng = np.random.default_rng(0)
  age = rng.uniform(20, 80, 29)
  with pytest.warns(SmallSampleWarning, match="29 validation scans"):
    corr.fit_correction("linear", age, age + rng.normal(0, 3, 29))
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("error", SmallSampleWarning)
    age = rng.uniform(20, 80, 30)
    corr.fit_correction("linear", age, age + rng.normal(0, 3, 30))
