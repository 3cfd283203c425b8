"""Split-conformal intervals against their analytic coverage on exchangeable synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jax_brainage.ensemble import conformal
from jax_brainage.errors import SmallSampleWarning


@pytest.mark.parametrize("n,level", [(19, 0.9), (45, 0.9), (100, 0.8), (30, 0.95)])
def test_order_statistics_give_the_finite_sample_coverage(n, level):
  k_lo, k_hi = conformal.order_statistics(n, level)
  # Analytic: P(rank of a new residual falls strictly between k_lo and k_hi) = (k_hi-k_lo)/(n+1).
  cov = conformal.expected_coverage(n, level)
  assert cov == pytest.approx((k_hi - k_lo) / (n + 1))
  assert level - 1e-12 <= cov < level + 2 / (n + 1)


def _rows(rng, n, hetero=False):
  """Ages and predictions regressing to the mean, noise growing with age when hetero."""
  age = rng.uniform(20, 80, n)
  sd = 1 + (age - 20) / 10 if hetero else np.full(n, 3.0)
  predicted = 50 + 0.7 * (age - 50) + sd * rng.standard_t(5, n)
  return age, predicted


def test_coverage_over_many_repetitions_matches_the_analytic_value():
  rng = np.random.default_rng(0)
  n, level, reps, m = 45, 0.9, 2000, 50
  covered = np.zeros(reps)
  for r in range(reps):
    age, pred = _rows(rng, n + m)
    cal = conformal.Calibration(tuple(map(str, range(n))), age[:n], pred[:n], pred[:n],
                                np.zeros(n), min_per_bin=n)
    out = cal.intervals(pred[n:], age[n:], pred[n:], np.zeros(m), level)
    covered[r] = conformal.coverage(out["predicted_age_low"], out["predicted_age_high"], age[n:])
  expected = conformal.expected_coverage(n, level)  # 42 / 46
  se = covered.std() / math.sqrt(reps)
  assert abs(covered.mean() - expected) < 4 * se
  assert expected >= level


def test_mondrian_bins_hold_coverage_in_every_age_decile_where_one_bin_does_not():
  rng = np.random.default_rng(1)
  n, m = 1000, 20000
  age, pred = _rows(rng, n + m, hetero=True)
  ids = tuple(map(str, range(n)))
  mondrian = conformal.Calibration(ids, age[:n], pred[:n], pred[:n], np.zeros(n))
  marginal = conformal.Calibration(ids, age[:n], pred[:n], pred[:n], np.zeros(n), max_bins=1)
  for cal, ok in ((mondrian, True), (marginal, False)):
    out = cal.intervals(pred[n:], age[n:], pred[n:], np.zeros(m))
    rows = conformal.coverage_by_bin(out["predicted_age_low"], out["predicted_age_high"],
                                     age[n:], age[n:])
    worst = min(r["coverage"] for r in rows)
    assert (worst > 0.85) == ok, (ok, [round(r["coverage"], 3) for r in rows])
    # The brain-age interval holds the age exactly when the gap interval holds 0.
    held = (age[n:] >= out["predicted_age_low"]) & (age[n:] <= out["predicted_age_high"])
    np.testing.assert_array_equal(held, out["gap_excludes_zero"] == 0)


def test_normalised_scores_widen_where_members_disagree_and_keep_coverage():
  rng = np.random.default_rng(2)
  n, m = 500, 20000
  age = rng.uniform(20, 80, n + m)
  spread = rng.uniform(0.5, 4, n + m)
  pred = age + spread * rng.standard_normal(n + m)  # error proportional to the spread
  cal = conformal.Calibration(tuple(map(str, range(n))), age[:n], pred[:n], pred[:n],
                              spread[:n], normalize=True, max_bins=1)
  out = cal.intervals(pred[n:], age[n:], pred[n:], spread[n:])
  width = out["predicted_age_high"] - out["predicted_age_low"]
  assert np.corrcoef(width, spread[n:])[0, 1] > 0.99
  assert conformal.coverage(out["predicted_age_low"], out["predicted_age_high"],
                            age[n:]) == pytest.approx(0.9, abs=0.015)


def test_unknown_age_uses_predicted_age_bins_and_gives_no_gap_interval():
  rng = np.random.default_rng(3)
  age, pred = _rows(rng, 300)
  cal = conformal.Calibration(tuple(map(str, range(200))), age[:200], pred[:200], pred[:200],
                              np.zeros(200))
  unknown = np.full(100, np.nan)
  out = cal.intervals(pred[200:], unknown, pred[200:], np.zeros(100))
  assert np.all(np.isfinite(out["predicted_age_low"]))
  assert np.all(np.isnan(out["brain_age_gap_low"])) and np.all(np.isnan(out["gap_excludes_zero"]))
  # Same bounds as a replica: order statistics of the residuals in the predicted-age bin.
  edges = np.quantile(pred[:200], [0.25, 0.5, 0.75])
  k = np.searchsorted(edges, pred[200], side="right")
  mine = np.searchsorted(edges, pred[:200], side="right") == k
  r = np.sort((pred[:200] - age[:200])[mine])
  k_lo, k_hi = conformal.order_statistics(len(r), 0.9)
  assert out["predicted_age_low"][0] == pytest.approx(pred[200] - r[k_hi - 1])
  assert out["predicted_age_high"][0] == pytest.approx(pred[200] - r[k_lo - 1])


def test_too_small_bins_warn_and_give_unbounded_intervals():
  rng = np.random.default_rng(4)
  age, pred = _rows(rng, 12)
  with pytest.warns(SmallSampleWarning, match="too few"):
    cal = conformal.calibration_from_rows(tuple(map(str, range(12))), age, pred, pred,
                                          np.zeros(12), source="tiny", normalize=False)
  out = cal.intervals(pred[:2], age[:2], pred[:2], np.zeros(2))
  assert np.all(np.isinf(out["predicted_age_low"]))


def test_record_round_trips():
  rng = np.random.default_rng(5)
  age, pred = _rows(rng, 120)
  cal = conformal.Calibration(tuple(map(str, range(120))), age, pred, pred - 1, np.zeros(120),
                              source="x")
  again = conformal.Calibration.from_dict(cal.to_dict())
  a = cal.intervals(pred, age, pred - 1, np.zeros(120))
  b = again.intervals(pred, age, pred - 1, np.zeros(120))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
