"""Ground truth beside the gap analysis: oracle predictors against the simulator's own oracle MAE
integration, the latent gap recovering the generative effects, the full oracle explaining them
away, and `brainage analyze --truth` on a dataset in the simulator's layout."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest

from jax_brainage.analyse import gap, tables, truth
from jax_brainage.commands import analyze
from jax_brainage.data.simulation import population
from jax_brainage.data.simulation.config import CohortConfig
from jax_brainage.errors import DataError

CONFIG = CohortConfig(n=1, resolution_mm=4)


@pytest.fixture(scope="module")
def sample():
  return population.sample_participants(CONFIG, 4000, np.random.default_rng(11))


def test_oracle_predictors_reach_the_simulators_oracle_mae(sample):
  # The simulator integrates E|a - median(a | obs)| over the generative model (another route:
  # a grid over c = b - R, or a density of R on a b grid); here the posterior medians of 4000
  # sampled people. Monte Carlo SD of a mean absolute error ~0.02 years.
  p = sample
  only_b = truth.oracle_brain_age_only(CONFIG, p.brain_age)
  assert np.mean(np.abs(only_b - p.age)) == pytest.approx(
      population.oracle_mae(CONFIG, "brain_age"), abs=0.07)
  full = truth.oracle_latent(CONFIG, p.brain_age, p.male, p.diabetes, p.hypertension,
                             p.smoking, p.bmi)
  assert np.mean(np.abs(full - p.age)) == pytest.approx(population.oracle_mae(CONFIG, "latent"),
                                                        abs=0.07)
  # Posterior medians stay in the prior's support and are medians: half the errors each side.
  assert CONFIG.age_min <= only_b.min() and only_b.max() <= CONFIG.age_max
  assert np.mean(full > p.age) == pytest.approx(0.5, abs=0.03)


def test_latent_oracle_is_exact_for_a_single_configuration():
  # With a wide age prior and a subject in its middle, p(a | b, X) ~ p(X | a) N(b - R; a, s):
  # compare with a direct sum on a 0.001-year grid (no binning, no shortcuts).
  b, male, d, h, s, bmi = 52.0, 1.0, 1.0, 0.0, 1.0, 31.0
  got = truth.oracle_latent(CONFIG, [b], [male], [d], [h], [s], [bmi])[0]
  a = np.arange(CONFIG.age_min, CONFIG.age_max, 0.001) + 0.0005
  w = np.ones_like(a)
  for f, on in zip(truth.FACTORS, (d, h, s)):
    prev = population.prevalence(CONFIG, f, a, male)
    w *= prev if on else 1 - prev
  mu = population.bmi_log_median(CONFIG, a, male)
  w *= np.exp(-0.5 * ((np.log(bmi) - mu) / CONFIG.bmi_log_sd) ** 2)
  shift = population.risk_shift(CONFIG, d, h, s, bmi)
  w *= np.exp(-0.5 * ((b - shift - a) / CONFIG.sigma_brain_age) ** 2)
  cdf = np.cumsum(w) / w.sum()
  assert got == pytest.approx(np.interp(0.5, cdf, a), abs=0.01)


def write_dataset(root, p, config=CONFIG):
  """participants.tsv and derivatives/simulation/{config.json, brain_age.tsv} as `brainage
  simulate` writes them (no images: the analysis reads none)."""
  deriv = root / "derivatives" / "simulation"
  deriv.mkdir(parents=True)
  (deriv / "config.json").write_text(json.dumps(config.to_dict()))
  ids = [f"sub-{i + 1:04d}" for i in range(len(p.age))]
  with open(root / "participants.tsv", "w") as f:
    f.write("participant_id\tage\tsex\tdiabetes\thypertension\tsmoking\tbmi\n")
    for i, pid in enumerate(ids):
      f.write(f"{pid}\t{p.age[i]:.4f}\t{'M' if p.male[i] else 'F'}\t{int(p.diabetes[i])}\t"
              f"{int(p.hypertension[i])}\t{int(p.smoking[i])}\t{p.bmi[i]:.4f}\n")
  with open(deriv / "brain_age.tsv", "w") as f:
    f.write("participant_id\tage\tbrain_age\trisk_shift\n")
    for i, pid in enumerate(ids):
      f.write(f"{pid}\t{p.age[i]:.4f}\t{p.brain_age[i]:.4f}\t{p.risk_shift[i]:.4f}\n")
  return ids


def test_analyze_with_truth_recovers_the_generative_effects(tmp_path, sample):
  n = 1500
  p = population.Participants(**{k: v[:n] for k, v in vars(sample).items()})
  ids = write_dataset(tmp_path / "data", p)
  # A predictor that measures brain age with error (SD 2 years) and shrinks toward the mean age.
  rng = np.random.default_rng(5)
  predicted = 50 + 0.9 * (p.brain_age - 50) + rng.normal(0, 2.0, n)
  with open(tmp_path / "preds.tsv", "w") as f:
    f.write("participant_id\tsession\tage\tpredicted_age\tbrain_age_gap\n")
    for i, pid in enumerate(ids):
      f.write(f"{pid}\tn/a\t{p.age[i]:.4f}\t{predicted[i]:.4f}\t{predicted[i] - p.age[i]:.4f}\n")
  parser = argparse.ArgumentParser()
  analyze.add_parser(parser.add_subparsers())
  args = parser.parse_args(["analyze", "--predictions", str(tmp_path / "preds.tsv"),
                            "--participants", str(tmp_path / "data" / "participants.tsv"),
                            "--out", str(tmp_path / "out"), "--truth", str(tmp_path / "data")])
  assert args.func(args) == 0
  record = json.loads((tmp_path / "out" / gap.EFFECTS_JSON).read_text())
  # With truth, BMI enters in the generative model's form (hinge at 25).
  assert record["covariates"] == ["age", "sex", "diabetes", "hypertension", "smoking",
                                  "bmi_over_25"]
  terms = {r["term"]: r for r in record["terms"]}
  beta = {"diabetes": 4.0, "hypertension": 2.0, "smoking": 1.5, "bmi_over_25": 0.3,
          "age": 0.0, "sex=M": 0.0}
  for term, true in beta.items():
    row = terms[term]
    assert row["true_effect"] == true
    # The true latent gap b - a recovers the generative coefficient within sampling error.
    se = (row["latent_ci_high"] - row["latent_ci_low"]) / (2 * 1.96)
    assert abs(row["latent_estimate"] - true) < 4 * se, term
    # The predictor's gap is 0.9 b + error - a + const: risk effects shrink by 0.9 and the gap
    # falls 0.1 year per year of age (regression to the mean, absorbed by the age term).
    expected = -0.1 if term == "age" else 0.9 * true
    se = (row["ci_high"] - row["ci_low"]) / (2 * 1.96)
    assert abs(row["estimate"] - expected) < 4 * se, term
  # The oracle from b alone keeps most of each risk effect (attenuated by the ends of the age
  # range: it never predicts beyond 82, and diabetics are old); the oracle that also knows the
  # factors subtracts them: its gap shows almost none.
  for term in ("diabetes", "hypertension", "smoking", "bmi_over_25"):
    row = terms[term]
    assert 0.6 * beta[term] < row["oracle_estimate"] < row["latent_ci_high"], term
    assert abs(row["oracle_full_estimate"]) < 0.3 * beta[term], term
  assert set(record["truth"]["oracle_mae"]) == {"oracle", "oracle_full"}
  effects = gap.risk_effects(record)
  assert sorted(effects) == sorted(beta)  # every covariate term, no intercept
  assert effects["diabetes"]["true"] == 4.0
  assert effects["diabetes"]["estimated"] == terms["diabetes"]["estimate"]
  assert effects["diabetes"]["latent"] == terms["diabetes"]["latent_estimate"]
  assert record["repeated_participants"] == 0
  with open(tmp_path / "out" / gap.EFFECTS_TSV) as f:
    table = {r["term"]: r for r in csv.DictReader(f, delimiter="\t")}
  assert float(table["diabetes"]["true_effect"]) == 4.0
  assert table["intercept"]["true_effect"] == "n/a"


def test_truth_errors_are_one_line(tmp_path, sample):
  with pytest.raises(DataError, match="not a simulated dataset"):
    truth.load_truth(tmp_path)
  p = population.Participants(**{k: v[:30] for k, v in vars(sample).items()})
  write_dataset(tmp_path / "d", p)
  sim = truth.load_truth(tmp_path / "d")
  rows = [{"participant_id": "sub-9999", "gap": "1", "age": "40"},
          *({"participant_id": f"sub-{i + 1:04d}", "gap": str(i), "age": str(30 + i)}
            for i in range(5))]
  fit = gap.gap_regression(rows, "gap", ["age"])
  with pytest.raises(DataError, match="subject sub-9999 is not in"):
    truth.compare(sim, rows, fit, ["age"])


def test_truth_reads_the_simulators_files(tmp_path):
  # The layout `brainage simulate` writes (two subjects, 4 mm, one sequence).
  from jax_brainage.data import simulate

  config = CohortConfig(n=2, resolution_mm=4, sequences=("T1w",), seed=3)
  simulate.write_cohort(tmp_path, config, workers=1)
  sim = truth.load_truth(tmp_path)
  assert sim.config == config
  _, participants = tables.read_tsv(tmp_path / "participants.tsv")
  assert sorted(sim.age) == sorted(r["participant_id"] for r in participants)
  for r in participants:
    assert sim.age[r["participant_id"]] == pytest.approx(float(r["age"]), abs=1e-3)
    assert {"sex", *truth.FACTORS, "bmi"} <= set(r)
  assert sim.bmi_term == "bmi_over_25"
