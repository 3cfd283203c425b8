"""Who is simulated: age, sex, risk factors, latent brain age; and the oracle MAE.

Generative model (parameters in `CohortConfig`):
  a ~ U(age_min, age_max)                                    chronological age (years)
  male ~ Bernoulli(1 - p_female)
  diabetes, hypertension, smoking ~ Bernoulli(sigmoid(c0 + c1 (a - 50) / 10 + c2 male))
  log BMI ~ N(log(bmi_median + bmi_per_decade (a - 50) / 10 + bmi_male male), bmi_log_sd)
  R = beta_d diabetes + beta_h hypertension + beta_s smoking + beta_bmi max(BMI - 25, 0)
  b = a + R + N(0, sigma_brain_age)                          latent brain age (years)

Images depend on (b, R, sex, nuisance) only (R through extra frontal atrophy, sex through head
size), and nuisance is independent of everything else. Hence, given
  L = (b, sex, diabetes, hypertension, smoking, BMI),
the images and participants.tsv are conditionally independent of a, and the posterior median of a
given L is the best predictor of a that any model of images and participant table can be (under
absolute error). `oracle_mae` is its expected absolute error, computed by numerical integration
over the age prior and the risk-factor model: a true floor. `oracle_mae(condition_on="brain_age")`
conditions on b alone (the "best predictor from b" figure); image models may beat that one
slightly, because images also show sex (head size) and R (frontal atrophy).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import special, stats

from jax_brainage.data.simulation.config import CohortConfig
from jax_brainage.errors import ConfigError

RISK_FACTORS = ("diabetes", "hypertension", "smoking", "bmi")


@dataclasses.dataclass(frozen=True)
class Participants:
  """Latent and observed variables of several subjects; every array has shape `[n]`."""

  age: np.ndarray  # years
  male: np.ndarray  # bool
  diabetes: np.ndarray  # bool
  hypertension: np.ndarray  # bool
  smoking: np.ndarray  # bool
  bmi: np.ndarray  # kg/m^2
  risk_shift: np.ndarray  # R, years
  brain_age: np.ndarray  # b, years


def prevalence(config: CohortConfig, factor: str, age, male) -> np.ndarray:
  """P(factor | age, sex) for diabetes, hypertension or smoking; broadcasts over age and male."""
  c0, c1, c2 = getattr(config, f"{factor}_logit")
  return special.expit(c0 + c1 * (np.asarray(age) - 50.0) / 10.0 + c2 * np.asarray(male))


def bmi_log_median(config: CohortConfig, age, male) -> np.ndarray:
  """Mean of log BMI given age (years) and sex."""
  med = config.bmi_median + config.bmi_per_decade * (np.asarray(age) - 50.0) / 10.0
  return np.log(med + config.bmi_male * np.asarray(male))


def risk_shift(config: CohortConfig, diabetes, hypertension, smoking, bmi) -> np.ndarray:
  """R: years that the risk factors add to the latent brain age."""
  return (
      config.beta_diabetes * np.asarray(diabetes, np.float64)
      + config.beta_hypertension * np.asarray(hypertension, np.float64)
      + config.beta_smoking * np.asarray(smoking, np.float64)
      + config.beta_bmi * np.maximum(np.asarray(bmi, np.float64) - config.bmi_threshold, 0.0)
  )


def sample_participants(config: CohortConfig, n: int, rng: np.random.Generator) -> Participants:
  """Draws `n` subjects from the generative model with `rng` (fixed order of draws)."""
  age = rng.uniform(config.age_min, config.age_max, size=n)
  male = rng.uniform(size=n) >= config.p_female
  flags = {}
  for factor in ("diabetes", "hypertension", "smoking"):
    flags[factor] = rng.uniform(size=n) < prevalence(config, factor, age, male)
  bmi = np.exp(bmi_log_median(config, age, male) + config.bmi_log_sd * rng.standard_normal(n))
  shift = risk_shift(config, flags["diabetes"], flags["hypertension"], flags["smoking"], bmi)
  brain_age = age + shift + config.sigma_brain_age * rng.standard_normal(n)
  return Participants(age=age, male=male, bmi=bmi, risk_shift=shift, brain_age=brain_age, **flags)


# ------------------------------------------------------------------------------------------------
# Oracle MAE.
# ------------------------------------------------------------------------------------------------


def _latent_configurations(config: CohortConfig, age: np.ndarray, n_bmi: int):
  """Discretised latent covariates X = (sex, diabetes, hypertension, smoking, BMI).

  Returns (weights `[m, n_age]` = p(X | a) dBMI, shifts `[m]` = R(X) in years). BMI <= threshold
  gives R independent of BMI, so that part is integrated exactly (one row per discrete pattern);
  above the threshold BMI is discretised by the midpoint rule in log BMI.
  """
  weights, shifts = [], []
  thr = np.log(config.bmi_threshold)
  hi = thr + 0.0
  for male in (False, True):
    p_sex = (1.0 - config.p_female) if male else config.p_female
    if p_sex == 0:
      continue
    mu = bmi_log_median(config, age, male)
    hi = max(hi, float(mu.max()) + 5.0 * config.bmi_log_sd)
    edges = np.linspace(thr, hi, n_bmi + 1)
    mids = 0.5 * (edges[1:] + edges[:-1])
    p_low = stats.norm.cdf((thr - mu) / config.bmi_log_sd)  # [n_age]
    p_mid = stats.norm.pdf((mids[:, None] - mu[None]) / config.bmi_log_sd) / config.bmi_log_sd
    p_mid = p_mid * np.diff(edges)[:, None]  # [n_bmi, n_age]
    bmi_rows = np.concatenate([p_low[None], p_mid], axis=0)
    bmi_values = np.concatenate([[config.bmi_threshold], np.exp(mids)])
    pd_, ph, ps = (
        prevalence(config, f, age, male) for f in ("diabetes", "hypertension", "smoking")
    )
    for d in (0, 1):
      for h in (0, 1):
        for s in (0, 1):
          p_pattern = (
              p_sex * (pd_ if d else 1 - pd_) * (ph if h else 1 - ph) * (ps if s else 1 - ps)
          )
          weights.append(p_pattern[None] * bmi_rows)
          shifts.append(risk_shift(config, d, h, s, bmi_values))
  return np.concatenate(weights, axis=0), np.concatenate(shifts, axis=0)


def _median_and_mae(joint: np.ndarray, age: np.ndarray) -> np.ndarray:
  """For rows of an unnormalised joint p(a, obs) `[..., n_age]`: sum over rows of the expected
  absolute error of the posterior median, weighted by each row's probability. Returns `[...]`.
  """
  mass = joint.sum(-1, keepdims=True)
  cdf = np.cumsum(joint, axis=-1)
  # Median: the grid point where the cdf crosses half the mass, refined linearly within the cell.
  k = np.clip((cdf < 0.5 * mass).sum(-1, keepdims=True), 0, len(age) - 1)
  below = np.take_along_axis(cdf, np.clip(k - 1, 0, None), -1) * (k > 0)
  cell = np.take_along_axis(joint, k, -1)
  step = age[1] - age[0]
  frac = np.where(cell > 0, (0.5 * mass - below) / np.where(cell > 0, cell, 1.0), 0.5)
  median = age[0] - 0.5 * step + (k + np.clip(frac, 0, 1)) * step
  return (joint * np.abs(age - median)).sum(-1)


def oracle_mae(config: CohortConfig, condition_on: str = "latent", step: float = 0.2) -> float:
  """Expected |a - posterior median of a| (years) under the generative model.

  Args:
    config: the cohort's configuration (population and brain-age parameters).
    condition_on: "latent" conditions on (b, sex, diabetes, hypertension, smoking, BMI), everything
      that images and participant table can reveal about a (a true floor for any predictor);
      "brain_age" conditions on b alone.
    step: integration step (years) for chronological and brain age; the result changes by less
      than 0.001 years between 0.2 and 0.05.
  """
  if condition_on not in ("latent", "brain_age"):
    raise ConfigError(f"condition_on={condition_on!r}; expected 'latent' or 'brain_age'")
  # Only the population model matters: cohorts that differ in seed, size or images share it.
  key = config.replace(seed=0, n=1, resolution_mm=4, sequences=("T1w",))
  return _oracle_mae(key, condition_on, float(step))


@functools.lru_cache(maxsize=32)
def _oracle_mae(config: CohortConfig, condition_on: str, step: float) -> float:
  n_age = max(int(round((config.age_max - config.age_min) / step)), 16)
  step = (config.age_max - config.age_min) / n_age
  age = config.age_min + (np.arange(n_age) + 0.5) * step  # midpoints: the prior's edges are exact
  prior = np.full(n_age, 1.0 / n_age)  # uniform, already times da
  # The latent case costs [configurations x c x a]: fewer BMI cells (error < 0.002 years).
  n_bmi = 24 if condition_on == "latent" else 96
  weights, shifts = _latent_configurations(config, age, n_bmi=n_bmi)
  weights = weights * prior[None]  # [m, n_age]: p(a, X) da dX
  sigma = config.sigma_brain_age
  # The noise kernel on a grid aligned with the age grid, wide enough for 7 sigma.
  half = int(np.ceil(7 * sigma / step))
  offsets = np.arange(-half, half + 1) * step
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel /= kernel.sum()  # p(noise in cell)
  if condition_on == "latent":
    # Given X, c = b - R(X) = a + noise: the posterior depends on c only. c on the age grid
    # extended by the kernel's reach: joint[m, c, a] = p(a, X) p(c | a).
    n_c = n_age + 2 * half
    band = np.zeros((n_c, n_age))
    for j in range(n_age):
      band[j : j + 2 * half + 1, j] = kernel
    total = 0.0
    for chunk in np.array_split(np.arange(len(weights)), max(1, len(weights) // 16)):
      joint = (weights[chunk][:, None, :] * band[None]).astype(np.float32)  # [m, n_c, n_age]
      total += float(_median_and_mae(joint, age).sum())
    return total
  # b alone: p(a, b) = sum_X p(a, X) N(b; a + R(X), sigma). Spread each R(X) linearly onto the
  # grid (density of R given a), then convolve with the noise kernel along b.
  r_pos = (shifts - shifts.min()) / step
  lo = np.floor(r_pos).astype(int)
  frac = r_pos - lo
  n_r = lo.max() + 2
  density = np.zeros((n_age, n_r))  # [a, R bin]
  np.add.at(density.T, lo, weights * (1 - frac)[:, None])
  np.add.at(density.T, lo + 1, weights * frac[:, None])
  smeared = np.stack([np.convolve(row, kernel) for row in density])  # [a, n_r + 2 half]
  # b index (on a grid starting at age[0] + R_min - half step) = a index + R index + offset.
  n_b = n_age + smeared.shape[1]
  joint = np.zeros((n_b, n_age))
  for j in range(n_age):
    joint[j : j + smeared.shape[1], j] = smeared[j]
  return float(_median_and_mae(joint, age).sum())
