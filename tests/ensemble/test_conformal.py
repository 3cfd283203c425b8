"""Split-conformal intervals against their analytic coverage on exchangeable synthetic data, and
the "smooth" method against an independent numpy rebuild (tests/conformal_replica.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import conformal_replica
from jax_brainage.ensemble import conformal
from jax_brainage.errors import DataError, SmallSampleWarning


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
                                np.zeros(n), min_per_bin=n, method="mondrian")
    out = cal.intervals(pred[n:], age[n:], pred[n:], np.zeros(m), level)
    covered[r] = conformal.coverage(out["predicted_age_low"], out["predicted_age_high"], age[n:])
  expected = conformal.expected_coverage(n, level)  # 42 / 46
  se = covered.std() / math.sqrt(reps)
  assert abs(covered.mean() - expected) < 4 * se
  assert expected >= level


@pytest.mark.parametrize("n,hetero", [(39, False), (99, True)])
def test_smooth_coverage_over_many_repetitions_is_the_analytic_value_or_a_little_above(n, hetero):
  """Exchangeable scans: with the centre and scale known, |z|_(k) of n scores covers exactly
  k / (n + 1), k = ceil((n + 1) level) (here 0.9 for n = 39 and 99). Cross-fitted m, s make the
  calibration scores out-of-sample, so coverage is not below that, and above it by O(1 / n)
  only (measured over 1000 repetitions: +0.0165, +0.0092; +0.0031 for n = 199)."""
  rng = np.random.default_rng(10)
  level, reps, m = 0.9, 600, 50
  covered = np.zeros(reps)
  for r in range(reps):
    age, pred = _rows(rng, n + m, hetero)
    cal = conformal.Calibration(tuple(map(str, range(n))), age[:n], pred[:n], pred[:n],
                                np.zeros(n))
    out = cal.intervals(pred[n:], age[n:], pred[n:], np.zeros(m), level)
    covered[r] = conformal.coverage(out["predicted_age_low"], out["predicted_age_high"], age[n:])
  expected = math.ceil((n + 1) * level) / (n + 1)
  assert expected == pytest.approx(conformal.expected_symmetric_coverage(n, level))
  se = covered.std() / math.sqrt(reps)
  assert expected - 3 * se <= covered.mean() <= expected + 1.0 / n + 3 * se


def test_smooth_bounds_match_a_numpy_rebuild():
  rng = np.random.default_rng(11)
  age, pred = _rows(rng, 80, hetero=True)
  at = np.array([5.0, 20.0, 33.3, 50.0, 79.0, 95.0])  # outside the range: clipped to it
  for level in (0.8, 0.9):
    mine = conformal.smooth_bounds(age, pred - age, at, level)
    theirs = conformal_replica.smooth_bounds(age, pred - age, at, level)
    np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=1e-9)
  # And through Calibration.intervals: brain-age interval = predicted - (high, low).
  cal = conformal.Calibration(tuple(map(str, range(80))), age, pred, pred - 1.0, np.zeros(80))
  out = cal.intervals(np.full(6, 50.0), at, np.full(6, 49.0), np.zeros(6), 0.9)
  lo, hi = conformal_replica.smooth_bounds(age, pred - age, at, 0.9)
  np.testing.assert_allclose(out["predicted_age_low"], 50.0 - hi, atol=1e-9)
  np.testing.assert_allclose(out["predicted_age_high"], 50.0 - lo, atol=1e-9)
  clo, chi = conformal_replica.smooth_bounds(age, pred - 1.0 - age, at, 0.9)
  np.testing.assert_allclose(out["brain_age_gap_low"], 49.0 - at - chi, atol=1e-9)


@pytest.mark.parametrize("method", ["smooth", "mondrian"])
def test_age_conditional_methods_hold_coverage_in_every_age_decile_where_one_bin_does_not(
    method):
  """Heteroscedastic in age (error SD 1 at 20 to 7 at 80 years) and regressing to the mean: every
  age decile of 20000 new scans is covered near the analytic value (smooth: k / (n + 1) = 0.9005;
  mondrian: bins of 100, 92 / 101 = 0.911), where one pooled quantile is not."""
  rng = np.random.default_rng(1)
  n, m = 1000, 20000
  age, pred = _rows(rng, n + m, hetero=True)
  ids = tuple(map(str, range(n)))
  exact = {"smooth": conformal.expected_symmetric_coverage(n, 0.9),
           "mondrian": conformal.expected_coverage(100, 0.9)}[method]
  conditional = conformal.Calibration(ids, age[:n], pred[:n], pred[:n], np.zeros(n),
                                      method=method)
  marginal = conformal.Calibration(ids, age[:n], pred[:n], pred[:n], np.zeros(n), max_bins=1,
                                   method="mondrian")
  for cal, ok in ((conditional, True), (marginal, False)):
    out = cal.intervals(pred[n:], age[n:], pred[n:], np.zeros(m))
    rows = conformal.coverage_by_bin(out["predicted_age_low"], out["predicted_age_high"],
                                     age[n:], age[n:])
    worst = min(r["coverage"] for r in rows)
    assert (worst > 0.85) == ok, (ok, [round(r["coverage"], 3) for r in rows])
    if ok:  # 2000 scans a decile: SD 0.007; the fitted m, s and bins add a little
      assert all(abs(r["coverage"] - exact) < 0.03 for r in rows), [r["coverage"] for r in rows]
    # The brain-age interval holds the age exactly when the gap interval holds 0.
    held = (age[n:] >= out["predicted_age_low"]) & (age[n:] <= out["predicted_age_high"])
    np.testing.assert_array_equal(held, out["gap_excludes_zero"] == 0)


def test_normalised_scores_widen_where_members_disagree_and_keep_coverage():
  rng = np.random.default_rng(2)
  n, m = 500, 20000
  age = rng.uniform(20, 80, n + m)
  spread = rng.uniform(0.5, 4, n + m)
  pred = age + spread * rng.standard_normal(n + m)  # error proportional to the spread
  for method in ("mondrian", "smooth"):
    cal = conformal.Calibration(tuple(map(str, range(n))), age[:n], pred[:n], pred[:n],
                                spread[:n], normalize=True, max_bins=1, method=method)
    out = cal.intervals(pred[n:], age[n:], pred[n:], spread[n:])
    width = out["predicted_age_high"] - out["predicted_age_low"]
    assert np.corrcoef(width, spread[n:])[0, 1] > (0.99 if method == "mondrian" else 0.95)
    assert conformal.coverage(out["predicted_age_low"], out["predicted_age_high"],
                              age[n:]) == pytest.approx(0.9, abs=0.015)


def test_unknown_age_uses_predicted_age_bins_and_gives_no_gap_interval():
  rng = np.random.default_rng(3)
  age, pred = _rows(rng, 300)
  cal = conformal.Calibration(tuple(map(str, range(200))), age[:200], pred[:200], pred[:200],
                              np.zeros(200), method="mondrian")
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
  # smooth: the same rebuild with the predicted age as the covariate.
  cal = conformal.Calibration(cal.subject_ids, age[:200], pred[:200], pred[:200], np.zeros(200))
  out = cal.intervals(pred[200:], unknown, pred[200:], np.zeros(100))
  lo, hi = conformal_replica.smooth_bounds(pred[:200], pred[:200] - age[:200], pred[200:], 0.9)
  np.testing.assert_allclose(out["predicted_age_low"], pred[200:] - hi, atol=1e-9)
  assert np.all(np.isnan(out["brain_age_gap_low"]))


@pytest.mark.parametrize("method,n", [("mondrian", 12), ("smooth", 8)])
def test_too_small_calibrations_warn_and_give_unbounded_intervals(method, n):
  """mondrian needs 19 scans a bin at 0.9, smooth 9 in all (ceil((n + 1) 0.9) <= n)."""
  rng = np.random.default_rng(4)
  age, pred = _rows(rng, n)
  with pytest.warns(SmallSampleWarning, match="too few"):
    cal = conformal.calibration_from_rows(tuple(map(str, range(n))), age, pred, pred,
                                          np.zeros(n), source="tiny", normalize=False,
                                          method=method)
  out = cal.intervals(pred[:2], age[:2], pred[:2], np.zeros(2))
  assert np.all(np.isinf(out["predicted_age_low"]))


@pytest.mark.parametrize("method", ["smooth", "mondrian"])
def test_record_round_trips(method, tmp_path):
  rng = np.random.default_rng(5)
  age, pred = _rows(rng, 120)
  cal = conformal.Calibration(tuple(map(str, range(120))), age, pred, pred - 1, np.zeros(120),
                              source="x", method=method)
  conformal.save_calibration(tmp_path / "c.json", cal)
  again = conformal.load_calibration(tmp_path / "c.json")
  assert again.method == method
  for level in (0.8, 0.9):  # the level is chosen when predicting
    a = cal.intervals(pred, age, pred - 1, np.zeros(120), level)
    b = again.intervals(pred, age, pred - 1, np.zeros(120), level)
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-12)


def test_records_before_session_11_load_as_mondrian_and_damaged_ones_fail_in_one_line():
  rng = np.random.default_rng(6)
  age, pred = _rows(rng, 120)
  cal = conformal.Calibration(tuple(map(str, range(120))), age, pred, pred, np.zeros(120),
                              method="mondrian")
  old = cal.to_dict()
  for key in ("method", "bandwidth", "folds"):  # format 1 had none of these
    del old[key]
  old["format"] = 1
  loaded = conformal.Calibration.from_dict(old)
  assert loaded.method == "mondrian"
  np.testing.assert_array_equal(
      loaded.intervals(pred, age, pred, np.zeros(120))["predicted_age_low"],
      cal.intervals(pred, age, pred, np.zeros(120))["predicted_age_low"])
  for bad, match in (({**old, "format": 3}, "newer"),
                     ({**old, "method": "bins"}, "unknown interval method"),
                     ({"format": 2}, "not a calibration record")):
    with pytest.raises(DataError, match=match) as e:
      conformal.Calibration.from_dict(bad, "W/calibration.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("W/calibration.json: ")
