"""What the brain-age-gap analysis should recover on a simulated cohort.

The simulator (`jax_brainage.data.simulation.population`) draws latent brain age

    b = a + R + N(0, sigma_b^2),   R = b_d diabetes + b_h hypertension + b_s smoking
                                       + b_bmi max(BMI - 25, 0)

and renders images from b (and R, sex, nuisance), never from a. Three references sit beside the
pipeline's estimates, each a regression on the same covariates and subjects:

  - true_effect: the generative coefficient (config.json): b_d, b_h, b_s, b_bmi for the factor
    and its hinge `bmi_over_25`, 0 for age and sex (b - a depends on neither given the factors);
    none for a term the generative model has no single coefficient for (e.g. raw `bmi`).
  - latent: OLS of the true latent gap b - a (brain_age.tsv). Its estimates differ from the
    true effects by sampling noise only (sigma_b and finite n): what a perfect measurement of
    brain age would show in these subjects. An estimate outside its CI points at the pipeline.
  - oracle: OLS of the gap of the best predictor of chronological age from b alone (the
    posterior median of a given b under the generative model: the `oracle_mae_brain_age_only`
    predictor), linearly bias-corrected in age. It keeps most of each effect; shrinkage toward
    the mean and the ends of the age range (it never predicts beyond age_max, and the factors
    are commoner in the old) attenuate them: e.g. diabetes 4 -> ~3.2 years with the default
    cohort. This is what an ideal image model that reads brain age shows.
  - oracle_full: the same for the posterior median of a given b AND sex and the risk factors
    (the `oracle_mae` predictor). Knowing R, it subtracts it: its gap shows ~no risk effect. An
    image model that learns the factors' own imprint (here, extra frontal atrophy) drifts toward
    this predictor and under-reports risk effects: a known limit of brain-age gaps, visible here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import signal, stats

from jax_brainage.analyse.regression import GapRegression, design_matrix, ols
from jax_brainage.analyse.tables import ID_COLUMN, number, read_tsv, subject_id
from jax_brainage.data import simulate
from jax_brainage.data.simulation import population
from jax_brainage.data.simulation.config import CohortConfig
from jax_brainage.errors import DataError

FACTORS = ("diabetes", "hypertension", "smoking")
_AGE_STEP = 0.1  # years: integration grid of the posterior over chronological age
_R_STEP = 0.05  # years: bins of the risk shift R
_LOG_BMI_CELLS = 400  # midpoint cells of log BMI over +-7 SD


@dataclasses.dataclass(frozen=True)
class SimulatedTruth:
  """The ground truth of a simulated dataset.

  Attributes:
    dataset: the BIDS dataset directory.
    config: the cohort's `CohortConfig`.
    age, brain_age: {participant_id: years} from derivatives/simulation/brain_age.tsv.
  """

  dataset: Path
  config: Any
  age: dict[str, float]
  brain_age: dict[str, float]

  @property
  def bmi_term(self) -> str:
    """The generative model's BMI covariate: the hinge at the threshold, e.g. `bmi_over_25`."""
    return f"bmi_over_{self.config.bmi_threshold:g}"

  def true_effects(self, terms: Sequence[str]) -> dict[str, float | None]:
    """Generative coefficient (years of latent gap per unit) of each term; None if it has none."""
    c = self.config
    known: dict[str, float] = {f: float(getattr(c, f"beta_{f}")) for f in FACTORS}
    known[self.bmi_term] = float(c.beta_bmi)
    known["age"] = 0.0
    known["sex=M"] = 0.0
    return {t: known.get(t) for t in terms}


def load_truth(dataset: str | os.PathLike) -> SimulatedTruth:
  """Reads config.json and brain_age.tsv of a simulated dataset (`brainage simulate`).

  Raises:
    DataError: one line naming the missing or unreadable file.
  """
  dataset = Path(dataset)
  deriv = simulate.derivatives_dir(dataset)
  config_path, table_path = deriv / "config.json", deriv / "brain_age.tsv"
  for path in (config_path, table_path):
    if not path.is_file():
      raise DataError(f"--truth {dataset}: no {path.relative_to(dataset)} (not a simulated "
                      "dataset from `brainage simulate`?)")
  try:
    config = CohortConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
  except (OSError, ValueError, TypeError) as e:
    raise DataError(f"{config_path}: unreadable cohort config ({e})") from None
  _, rows = read_tsv(table_path)
  age, brain_age = {}, {}
  for row in rows:
    pid = row[ID_COLUMN]
    try:
      age[pid] = float(row["age"])
      brain_age[pid] = float(row["brain_age"])
    except (KeyError, ValueError):
      raise DataError(f"{table_path}: subject {pid}: no numeric age and brain_age") from None
  return SimulatedTruth(dataset, config, age, brain_age)


# ---------------------------------------------------------------------------------------------
# Oracle predictors: posterior medians of chronological age under the generative model.


def _age_grid(config) -> np.ndarray:
  n = max(int(round((config.age_max - config.age_min) / _AGE_STEP)), 16)
  step = (config.age_max - config.age_min) / n
  return config.age_min + (np.arange(n) + 0.5) * step  # midpoints of the uniform prior


def _posterior_median(weights: np.ndarray, age: np.ndarray) -> np.ndarray:
  """Median of unnormalised posteriors `[n, n_age]` on the midpoint grid `age` (linear within
  the cell where the cdf crosses one half)."""
  step = age[1] - age[0]
  mass = weights.sum(-1, keepdims=True)
  if not np.all(mass > 0):
    raise DataError("oracle: a subject's brain age is impossible under the cohort's model")
  cdf = np.cumsum(weights, -1) / mass
  k = np.clip((cdf < 0.5).sum(-1), 0, len(age) - 1)
  below = np.where(k > 0, np.take_along_axis(cdf, np.maximum(k - 1, 0)[:, None], -1)[:, 0], 0.0)
  cell = np.take_along_axis(weights / mass, k[:, None], -1)[:, 0]
  frac = np.clip((0.5 - below) / np.where(cell > 0, cell, 1.0), 0.0, 1.0)
  return age[0] - 0.5 * step + (k + frac) * step


def oracle_brain_age_only(config, brain_age: np.ndarray, *, chunk: int = 256) -> np.ndarray:
  """Posterior median of chronological age given latent brain age alone (years), `[n]`.

  p(a | b) ~ sum_X p(X | a) N(b; a + R(X), sigma_b) over sex, the three factors and BMI (log BMI
  on a fine midpoint grid), under the uniform age prior; R binned on a 0.05-year grid and the
  noise added by one convolution per age, so the cost is independent of the number of subjects
  beyond a [n, n_age] interpolation.
  """
  age = _age_grid(config)
  sd = config.bmi_log_sd
  # Density of R given a, on R bins: [n_age, n_r].
  shifts, weights = [], []
  for male in (False, True):
    p_sex = (1.0 - config.p_female) if male else config.p_female
    if p_sex == 0:
      continue
    mu = population.bmi_log_median(config, age, male)  # [n_age]
    edges = np.linspace(mu.min() - 7 * sd, mu.max() + 7 * sd, _LOG_BMI_CELLS + 1)
    mids = 0.5 * (edges[1:] + edges[:-1])
    p_bmi = stats.norm.pdf((mids[:, None] - mu[None]) / sd) / sd * np.diff(edges)[:, None]
    p_bmi /= p_bmi.sum(0, keepdims=True)  # [cells, n_age]; the tails beyond 7 SD are nothing
    prev = {f: population.prevalence(config, f, age, male) for f in FACTORS}
    for d in (0, 1):
      for h in (0, 1):
        for s in (0, 1):
          p = p_sex * np.ones_like(age)
          for f, on in zip(FACTORS, (d, h, s)):
            p = p * (prev[f] if on else 1.0 - prev[f])
          weights.append(p[None] * p_bmi)
          shifts.append(population.risk_shift(config, d, h, s, np.exp(mids)))
  weights = np.concatenate(weights, 0)  # [m, n_age]
  shifts = np.concatenate(shifts, 0)  # [m]
  r0 = shifts.min()
  pos = (shifts - r0) / _R_STEP
  lo = np.floor(pos).astype(int)
  frac = pos - lo
  n_r = int(lo.max()) + 2
  density = np.zeros((len(age), n_r))  # p(R in bin | a)
  np.add.at(density.T, lo, weights * (1.0 - frac)[:, None])
  np.add.at(density.T, lo + 1, weights * frac[:, None])
  # p(d = b - a | a) = density (*) N(0, sigma_b): one convolution per age along R, on the grid
  # d_j = r0 + (j - half) step.
  sigma = config.sigma_brain_age
  half = int(np.ceil(7.0 * sigma / _R_STEP))
  kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * _R_STEP / sigma) ** 2)
  like_d = signal.fftconvolve(density, kernel[None], mode="full", axes=1)  # [n_age, n_d]
  like_d = np.clip(like_d, 0.0, None)  # FFT round-off below zero
  b = np.asarray(brain_age, np.float64)
  out = np.empty(len(b))
  rows = np.arange(len(age))[None]
  for start in range(0, len(b), chunk):
    d = b[start:start + chunk, None] - age[None]  # [c, n_age]
    x = (d - r0) / _R_STEP + half
    j = np.floor(x).astype(int)
    f = x - j
    inside = (j >= 0) & (j + 1 < like_d.shape[1])
    j = np.clip(j, 0, like_d.shape[1] - 2)
    like = np.where(inside, like_d[rows, j] * (1.0 - f) + like_d[rows, j + 1] * f, 0.0)
    out[start:start + chunk] = _posterior_median(like, age)
  return out


def oracle_latent(config, brain_age, male, diabetes, hypertension, smoking,
                  bmi) -> np.ndarray:
  """Posterior median of chronological age given b, sex, the three factors and BMI, `[n]`
  (years): p(a | b, X) ~ p(X | a) N(b; a + R(X), sigma_b) under the uniform age prior."""
  age = _age_grid(config)[None]  # [1, n_age]
  col = lambda v: np.asarray(v, np.float64)[:, None]  # noqa: E731
  b, male, bmi = col(brain_age), col(male), col(bmi)
  flags = dict(zip(FACTORS, (col(diabetes), col(hypertension), col(smoking))))
  log_p = np.zeros((len(b), age.shape[1]))
  for f, on in flags.items():
    prev = population.prevalence(config, f, age, male)
    log_p += np.log(np.where(on > 0.5, prev, 1.0 - prev))
  mu = population.bmi_log_median(config, age, male)
  log_p += -0.5 * ((np.log(bmi) - mu) / config.bmi_log_sd) ** 2
  shift = population.risk_shift(config, flags["diabetes"], flags["hypertension"],
                                flags["smoking"], bmi)
  log_p += -0.5 * ((b - shift - age) / config.sigma_brain_age) ** 2
  log_p -= log_p.max(-1, keepdims=True)
  return _posterior_median(np.exp(log_p), age[0])


# ---------------------------------------------------------------------------------------------
# Side by side.


def _linear_correction(gap: np.ndarray, age: np.ndarray) -> np.ndarray:
  """The gap minus its least-squares line in age (the pipeline's `linear` bias correction)."""
  x = np.stack([np.ones_like(age), age], 1)
  coef, *_ = np.linalg.lstsq(x, gap, rcond=None)
  return gap - x @ coef


def compare(truth: SimulatedTruth, rows: Sequence[Mapping[str, Any]], fit: GapRegression,
            covariates: Sequence[str], *, confidence: float = 0.95,
            se: str = "classical") -> dict[str, Any]:
  """The references of the module docstring for the subjects and covariates of `fit`.

  Args:
    truth: `load_truth(...)`.
    rows: the joined table `fit` was made from; fit: its `GapRegression`.
    covariates: the covariates as given to `gap_regression`.
  Returns:
    {"per_term": {term: {true_effect, latent_estimate, latent_ci_low, latent_ci_high,
    oracle_estimate, ..., oracle_full_estimate, ...}}, "reference_estimates": {label: {term:
    (estimate, ci_low, ci_high)}}, "true_effects", "generative_model", "dataset", "notes"}.
  Raises:
    DataError: a subject of the fit is missing from brain_age.tsv.
  """
  _, x, terms, kept, _ = design_matrix(rows, fit.response, list(covariates))
  ids = [subject_id(rows[i], i) for i in kept]
  for pid in ids:
    if pid not in truth.brain_age:
      raise DataError(f"--truth {truth.dataset}: subject {pid} is not in "
                      f"{simulate.DERIVATIVES / 'brain_age.tsv'}")
  a = np.array([truth.age[p] for p in ids])
  b = np.array([truth.brain_age[p] for p in ids])
  fits = {"latent": ols(b - a, x, terms, confidence=confidence, se=se, response="latent gap")}
  notes = []
  oracle = oracle_brain_age_only(truth.config, b)
  fits["oracle"] = ols(_linear_correction(oracle - a, a), x, terms, confidence=confidence,
                       se=se, response="oracle gap (brain age only)")
  missing = None
  for c in ("sex", *FACTORS, "bmi"):
    for i in kept:
      value = rows[i].get(c)
      ok = (str(value).strip() in ("F", "M")) if c == "sex" else number(value) is not None
      if not ok:
        missing = missing or c
  if missing:
    notes.append(f"oracle_full skipped: column {missing} is missing or unusable for some subject")
  else:
    get = lambda c: np.array([float(rows[i][c]) for i in kept])  # noqa: E731
    male = np.array([str(rows[i]["sex"]).strip() == "M" for i in kept], np.float64)
    full = oracle_latent(truth.config, b, male, get("diabetes"), get("hypertension"),
                         get("smoking"), get("bmi"))
    fits["oracle_full"] = ols(_linear_correction(full - a, a), x, terms, confidence=confidence,
                              se=se, response="oracle gap (all latent)")
  true = truth.true_effects(terms)
  per_term: dict[str, dict[str, Any]] = {}
  for j, term in enumerate(terms):
    row: dict[str, Any] = {"true_effect": true[term]}
    for name, f in fits.items():
      row[f"{name}_estimate"] = float(f.estimate[j])
      row[f"{name}_ci_low"] = float(f.ci_low[j])
      row[f"{name}_ci_high"] = float(f.ci_high[j])
    if true[term] is not None:
      row["true_in_ci"] = bool(fit.ci_low[j] <= true[term] <= fit.ci_high[j])
    per_term[term] = row
  # Legend words for a reader (the forest plot); the TSV keeps the short names.
  labels = {"latent": "true brain-age gap (a perfect measurement)",
            "oracle": "best possible predictor from brain age alone",
            "oracle_full": "best possible predictor from brain age, sex and risk factors"}
  c = truth.config
  return {
      "dataset": str(truth.dataset),
      "per_term": per_term,
      "true_effects": {t: v for t, v in true.items() if v is not None},
      "reference_estimates": {labels[k]: {t: (float(f.estimate[j]), float(f.ci_low[j]),
                                              float(f.ci_high[j]))
                                          for j, t in enumerate(terms)}
                              for k, f in fits.items()},
      "generative_model": {"beta_diabetes": c.beta_diabetes,
                           "beta_hypertension": c.beta_hypertension,
                           "beta_smoking": c.beta_smoking, "beta_bmi": c.beta_bmi,
                           "bmi_threshold": c.bmi_threshold,
                           "sigma_brain_age": c.sigma_brain_age},
      "oracle_mae": {k: float(np.mean(np.abs(p - a))) for k, p in
                     (("oracle", oracle), *((("oracle_full", full),) if not missing else ()))},
      "notes": notes,
  }

