"""OLS of the brain-age gap: hand-computed answers, a textbook replica, CI coverage, coding rules,
missing values, the join and `brainage analyze` end to end."""

from __future__ import annotations

import argparse
import csv
import math

import numpy as np
import pytest
from scipy import stats

from jax_brainage.analyse import gap, regression, tables
from jax_brainage.commands import analyze
from jax_brainage.errors import ConfigError, DataError


def textbook_ols(y, x):
  """beta = (X'X)^-1 X'y, cov = s^2 (X'X)^-1 with s^2 = RSS / (n - k); via lstsq and inv."""
  beta, *_ = np.linalg.lstsq(x, y, rcond=None)
  n, k = x.shape
  resid = y - x @ beta
  s2 = resid @ resid / (n - k)
  cov = s2 * np.linalg.inv(x.T @ x)
  return beta, np.sqrt(np.diag(cov)), n - k


def test_simple_regression_hand_computed():
  # x = 1..5, y = 2,4,5,4,5: slope 0.6, intercept 2.2, RSS 2.4, s^2 0.8, Sxx 10 (by hand).
  table = {"x": [1, 2, 3, 4, 5], "gap": [2, 4, 5, 4, 5]}
  fit = gap.gap_regression(table, "gap", ["x"])
  assert fit.terms == ("intercept", "x")
  assert fit["x"]["estimate"] == pytest.approx(0.6)
  assert fit["intercept"]["estimate"] == pytest.approx(2.2)
  assert fit["x"]["se"] == pytest.approx(math.sqrt(0.8 / 10))
  assert fit["intercept"]["se"] == pytest.approx(math.sqrt(0.8 * (1 / 5 + 9 / 10)))
  t = 0.6 / math.sqrt(0.08)
  assert fit["x"]["t"] == pytest.approx(t)
  assert fit["x"]["p"] == pytest.approx(2 * stats.t.sf(t, 3))
  half = stats.t.ppf(0.975, 3) * math.sqrt(0.08)
  assert (fit["x"]["ci_low"], fit["x"]["ci_high"]) == pytest.approx((0.6 - half, 0.6 + half))
  assert fit.df == 3 and fit.n == 5
  assert fit.r2 == pytest.approx(1 - 2.4 / 6.0)  # TSS = 6
  assert fit.residual_sd == pytest.approx(math.sqrt(0.8))


def test_exact_coefficients_without_noise():
  rng = np.random.default_rng(0)
  x1, x2 = rng.normal(size=20), rng.integers(0, 2, 20)
  y = 1.5 - 2.0 * x1 + 4.0 * x2
  fit = gap.gap_regression({"a": x1, "d": x2, "g": y}, "g", ["a", "d"])
  np.testing.assert_allclose(fit.estimate, [1.5, -2.0, 4.0], atol=1e-10)
  np.testing.assert_allclose(fit.se, 0.0, atol=1e-7)
  import json

  json.dumps(gap.effects_record(fit), allow_nan=False)  # t = inf is not written as Infinity


def test_multiple_regression_matches_textbook_replica():
  rng = np.random.default_rng(1)
  n = 40
  age = rng.uniform(18, 82, n)
  sex = rng.choice(["F", "M"], n)
  diabetes = rng.integers(0, 2, n)
  bmi = rng.normal(27, 4, n)
  y = 0.05 * age + 1.0 * (sex == "M") + 3.0 * diabetes + 0.2 * bmi + rng.normal(0, 2, n)
  rows = [{"participant_id": f"sub-{i}", "age": f"{age[i]:.6f}", "sex": sex[i],
           "diabetes": str(diabetes[i]), "bmi": f"{bmi[i]:.6f}", "gap": f"{y[i]:.6f}"}
          for i in range(n)]
  fit = gap.gap_regression(rows, "gap", ["age", "sex", "diabetes", "bmi_over_25"])
  assert fit.terms == ("intercept", "age", "sex=M", "diabetes", "bmi_over_25")
  x = np.stack([np.ones(n), np.round(age, 6), (sex == "M").astype(float), diabetes,
                np.maximum(np.round(bmi, 6) - 25, 0)], 1)
  beta, se, df = textbook_ols(np.round(y, 6), x)
  np.testing.assert_allclose(fit.estimate, beta, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(fit.se, se, rtol=1e-9)
  np.testing.assert_allclose(fit.p, 2 * stats.t.sf(np.abs(beta / se), df), rtol=1e-7)
  np.testing.assert_allclose(fit.ci_high - fit.ci_low, 2 * stats.t.ppf(0.975, df) * se,
                             rtol=1e-9)
  assert [r["term"] for r in fit] == list(fit.terms)


def test_confidence_intervals_cover_at_their_level_and_p_values_are_uniform():
  # 2000 data sets from a known model: each 95% CI covers its true coefficient ~95% of the time
  # (binomial SD 0.5%), and the null coefficient's p < 0.05 ~5% of the time.
  rng = np.random.default_rng(2)
  true = np.array([1.0, 0.5, 0.0])
  covered = np.zeros(3)
  rejected = 0
  reps = 2000
  for _ in range(reps):
    n = 25
    x = np.stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)], 1).astype(float)
    y = x @ true + rng.normal(0, 1.5, n)
    fit = regression.ols(y, x, ("intercept", "x", "flag"))
    covered += (fit.ci_low <= true) & (true <= fit.ci_high)
    rejected += fit.p[2] < 0.05
  np.testing.assert_allclose(covered / reps, 0.95, atol=0.015)
  assert abs(rejected / reps - 0.05) < 0.015
  # A 90% interval covers less.
  fit90 = regression.ols(y, x, ("intercept", "x", "flag"), confidence=0.9)
  assert np.all(fit90.ci_high - fit90.ci_low < fit.ci_high - fit.ci_low)


def test_missing_values_drop_rows_and_say_which():
  rows = [{"participant_id": f"sub-{i}", "age": str(20 + 3 * i), "gap": str((-1) ** i * i)}
          for i in range(8)]
  rows[2]["age"] = "n/a"
  rows[5]["gap"] = ""
  fit = gap.gap_regression(rows, "gap", ["age"])
  assert fit.n == 6
  assert fit.dropped == (("sub-2", "age"), ("sub-5", "gap"))
  assert "sub-2" not in fit.subjects
  keep = [i for i in range(8) if i not in (2, 5)]
  beta, _, _ = textbook_ols(np.array([(-1) ** i * i for i in keep], float),
                            np.stack([np.ones(6), [20 + 3 * i for i in keep]], 1))
  np.testing.assert_allclose(fit.estimate, beta)
  assert fit.to_dict()["n_dropped"] == 2


def test_one_line_errors_name_column_and_subject():
  rows = [{"participant_id": f"sub-{i}", "smoking": "0", "bmi": str(20 + i), "gap": str(i % 3),
           "site": "abc"[i % 3]} for i in range(6)]
  rows[3]["bmi"] = "yes"
  with pytest.raises(DataError, match=r"covariate bmi: value 'yes' of subject sub-3"):
    gap.gap_regression(rows, "gap", ["bmi"])
  with pytest.raises(DataError, match=r"covariate site: 3 levels"):
    gap.gap_regression(rows, "gap", ["site"])
  with pytest.raises(DataError, match=r"covariate smoking is constant \(0\)"):
    gap.gap_regression(rows, "gap", ["smoking"])
  with pytest.raises(DataError, match=r"covariate weight: no such column"):
    gap.gap_regression(rows, "gap", ["weight"])
  with pytest.raises(DataError, match=r"2 usable rows for 2 coefficients"):
    gap.gap_regression(rows[:2], "gap", ["smoking"])
  dup = [dict(r, smoking2=str(2 * i)) for i, r in enumerate(rows)]
  for i, r in enumerate(dup):
    r["smoking"] = str(i)
  with pytest.raises(DataError, match=r"covariate smoking2 is a linear combination"):
    gap.gap_regression(dup, "gap", ["smoking", "smoking2"])
  with pytest.raises(ConfigError):
    gap.gap_regression(dup, "gap", ["smoking", "smoking"])


def test_default_covariates_and_join():
  participants = [{"participant_id": f"sub-{i}", "age": "99", "sex": "FM"[i % 2],
                   "diabetes": str(i % 3 == 0), "group": "a", "bmi": str(20 + i)}
                  for i in range(6)]
  predictions = [{"participant_id": f"sub-{i}", "session": "n/a", "age": str(30 + i),
                  "predicted_age": str(31 + i), "brain_age_gap": "1"} for i in range(7)]
  rows, unmatched = tables.join_tables(predictions, participants)
  assert unmatched == ["sub-6"]
  assert rows[0]["age"] == "30"  # the prediction's own age wins
  assert rows[1]["sex"] == "M"
  # group is constant; participant_id and the prediction columns are never covariates.
  constant = []
  assert regression.default_covariates(rows, list(participants[0]), constant=constant) == [
      "age", "sex", "diabetes", "bmi"]
  assert constant == ["group"]
  with pytest.raises(DataError, match="listed twice"):
    tables.join_tables(predictions, participants + participants[:1])


def _write_tsv(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
    w.writeheader()
    w.writerows(rows)


def test_analyze_command_writes_tsv_json_and_forest(tmp_path):
  rng = np.random.default_rng(3)
  n = 50
  age = rng.uniform(20, 80, n)
  diab = rng.integers(0, 2, n)
  corrected = 3.0 * diab + rng.normal(0, 2, n)
  _write_tsv(tmp_path / "participants.tsv",
             [{"participant_id": f"sub-{i:03d}", "age": f"{age[i]:.4f}", "sex": "MF"[i % 2],
               "diabetes": str(diab[i])} for i in range(n)])
  preds = [{"participant_id": f"sub-{i:03d}", "session": "n/a", "age": f"{age[i]:.4f}",
            "predicted_age": f"{age[i] + corrected[i] - 0.2 * (age[i] - 50):.4f}",
            "brain_age_gap": f"{corrected[i] - 0.2 * (age[i] - 50):.4f}",
            "brain_age_gap_corrected": f"{corrected[i]:.4f}"} for i in range(n)]
  preds[7]["brain_age_gap_corrected"] = "n/a"
  _write_tsv(tmp_path / "preds.tsv", preds)
  parser = argparse.ArgumentParser()
  analyze.add_parser(parser.add_subparsers())
  args = parser.parse_args(["analyze", "--predictions", str(tmp_path / "preds.tsv"),
                            "--participants", str(tmp_path / "participants.tsv"),
                            "--out", str(tmp_path / "out")])
  assert args.func(args) == 0
  with open(tmp_path / "out" / gap.EFFECTS_TSV) as f:
    table = list(csv.DictReader(f, delimiter="\t"))
  assert [r["term"] for r in table] == ["intercept", "age", "sex=M", "diabetes"]
  keep = [i for i in range(n) if i != 7]
  x = np.stack([np.ones(n - 1), np.round(age[keep], 4), [(i % 2 == 0) * 1.0 for i in keep],
                diab[keep]], 1)
  beta, se, _ = textbook_ols(np.round(corrected[keep], 4), x)
  np.testing.assert_allclose([float(r["estimate"]) for r in table], beta, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose([float(r["se"]) for r in table], se, rtol=1e-5)
  import json

  record = json.loads((tmp_path / "out" / gap.EFFECTS_JSON).read_text())
  assert record["gap_column"] == "brain_age_gap_corrected"
  assert record["constant_left_out"] == []
  assert record["n"] == n - 1 and record["dropped"] == [{"participant_id": "sub-007",
                                                          "missing": "brain_age_gap_corrected"}]
  import matplotlib.image

  image = matplotlib.image.imread(tmp_path / "out" / gap.FOREST_PNG)
  assert image.ndim == 3 and image.shape[0] > 200 and image[..., :3].std() > 0.05
  # The uncorrected gap with age as a covariate gives the same diabetes effect up to rounding.
  args = parser.parse_args(["analyze", "--predictions", str(tmp_path / "preds.tsv"),
                            "--participants", str(tmp_path / "participants.tsv"),
                            "--out", str(tmp_path / "raw"), "--gap-column", "brain_age_gap",
                            "--covariates", "age,diabetes"])
  assert args.func(args) == 0
  raw = json.loads((tmp_path / "raw" / gap.EFFECTS_JSON).read_text())
  assert raw["n"] == n  # the uncorrected gap is there for sub-007
  assert raw["repeated_participants"] == 0 and raw["covariates"] == ["age", "diabetes"]
  assert gap.risk_effects(raw)["diabetes"]["true"] is None
  with pytest.raises(DataError, match="no column 'nope'"):
    gap.analyze(tmp_path / "preds.tsv", tmp_path / "participants.tsv", tmp_path / "x",
                gap_column="nope")


def test_hc3_standard_errors_match_the_sandwich_and_cover_under_heteroscedasticity():
  rng = np.random.default_rng(6)
  n = 30
  x = np.stack([np.ones(n), rng.uniform(20, 80, n), rng.integers(0, 2, n)], 1)
  y = x @ [1.0, 0.1, 2.0] + rng.normal(0, 1, n) * (x[:, 1] / 30)
  fit = regression.ols(y, x, ("intercept", "age", "flag"), se="hc3")
  # Textbook HC3 (MacKinnon & White 1985), written out with explicit inverses.
  xtx_inv = np.linalg.inv(x.T @ x)
  beta = xtx_inv @ x.T @ y
  e = y - x @ beta
  h = np.einsum("ij,jk,ik->i", x, xtx_inv, x)
  meat = x.T @ np.diag(e ** 2 / (1 - h) ** 2) @ x
  se = np.sqrt(np.diag(xtx_inv @ meat @ xtx_inv))
  np.testing.assert_allclose(fit.estimate, beta, rtol=1e-9)
  np.testing.assert_allclose(fit.se, se, rtol=1e-8)
  np.testing.assert_allclose(fit.p, 2 * stats.t.sf(np.abs(beta / se), n - 3), rtol=1e-7)
  assert fit.se_kind == "hc3" and fit.to_dict()["se_kind"] == "hc3"
  # Noise SD growing 4x over the covariate's range, at n = 60: HC3 intervals cover the slope
  # close to 95%; classical intervals under-cover.
  covered = {"classical": 0, "hc3": 0}
  reps = 1000
  for _ in range(reps):
    n = 60
    a = rng.uniform(0, 1, n)
    xx = np.stack([np.ones(n), a], 1)
    yy = 1.0 + 2.0 * a + rng.normal(0, 1, n) * (0.2 + 3 * a ** 2)
    for kind in covered:
      f = regression.ols(yy, xx, ("intercept", "a"), se=kind)
      covered[kind] += f.ci_low[1] <= 2.0 <= f.ci_high[1]
  assert abs(covered["hc3"] / reps - 0.95) < 0.025
  assert covered["classical"] / reps < covered["hc3"] / reps - 0.02
  with pytest.raises(ConfigError, match="--se 'hc9'"):
    regression.ols(y, x, ("intercept", "age", "flag"), se="hc9")


def test_few_rows_for_the_covariates_warn_and_no_residual_df_is_refused():
  import warnings

  from jax_brainage.errors import SmallSampleWarning

  rng = np.random.default_rng(0)
  x = np.column_stack([np.ones(12), rng.normal(size=12), rng.normal(size=12)])
  y = rng.normal(size=12)
  with pytest.warns(SmallSampleWarning, match="12 rows for 3 coefficients"):
    regression.ols(y, x, ["intercept", "a", "b"], response="gap")
  with warnings.catch_warnings():
    warnings.simplefilter("error", SmallSampleWarning)
    regression.ols(rng.normal(size=30), np.column_stack([np.ones(30), rng.normal(size=30),
                                                         rng.normal(size=30)]),
                   ["intercept", "a", "b"])
  with pytest.raises(DataError, match="no residual degrees of freedom"):
    regression.ols(y[:3], x[:3], ["intercept", "a", "b"], response="gap")
