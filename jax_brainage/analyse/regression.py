"""Ordinary least squares of a response on coded covariates, and the design matrix.

    design_matrix(rows, response, covariates) -> y [n], X [n, k], terms, kept rows, dropped
    ols(y, X, terms) -> GapRegression (estimates, SE, CI, t, two-sided p; classical or HC3)

Covariates are table columns (participants.tsv or a predictions TSV), coded by `code_covariate`:
  - numeric columns as they are; 0/1 columns are indicators;
  - a column with exactly two text levels (e.g. sex F/M) becomes the indicator `COLUMN=LEVEL` of
    the later level in sorted order (the earlier one is the reference);
  - `COLUMN_over_T` (e.g. `bmi_over_25`) is the hinge max(COLUMN - T, 0), the form in which the
    simulated cohort's BMI acts on brain age.
A coefficient is in units of the response (years of gap) per unit of its covariate. Missing values
("n/a", empty) drop the row; a value that is neither missing nor usable (e.g. "yes" in a numeric
column, a third level of sex) is a one-line DataError naming the column and subject.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from scipy import stats

from jax_brainage.analyse.tables import ID_COLUMN, is_missing, number, subject_id
from jax_brainage.errors import ConfigError, DataError, SmallSampleWarning

# Columns that are never default covariates: identifiers and what the pipeline predicted.
NOT_COVARIATES = frozenset({ID_COLUMN, "session", "predicted_age", "predicted_age_corrected",
                            "brain_age_gap", "brain_age_gap_corrected", "uncertainty",
                            "interval_level", "predicted_age_low", "predicted_age_high",
                            "brain_age_gap_low", "brain_age_gap_high", "gap_excludes_zero",
                            "split"})
SE_KINDS = ("classical", "hc3")
ROWS_PER_TERM = 10  # fewer rows per coefficient: a SmallSampleWarning
TERM_FIELDS = ("term", "estimate", "se", "ci_low", "ci_high", "t", "p")
INTERCEPT = "intercept"
_HINGE = re.compile(r"^(?P<column>.+)_over_(?P<threshold>[-+]?\d+(?:\.\d*)?)$")


# ---------------------------------------------------------------------------------------------
# Ordinary least squares.


@dataclasses.dataclass(frozen=True)
class GapRegression:
  """An OLS fit of the brain-age gap; iterating gives one dict per term (`TERM_FIELDS`).

  Attributes:
    response: the regressed column (years).
    terms: coefficient names, the intercept first.
    estimate, se, ci_low, ci_high, t, p: `[k]` per term (years per covariate unit; p two-sided).
    n: rows used; df: residual degrees of freedom n - k; confidence: the CI level.
    r2, adj_r2: coefficient of determination (plain and adjusted).
    residual_sd: sqrt(RSS / df), years.
    covariance: `[k, k]` covariance of the estimates.
    se_kind: "classical" or "hc3" (heteroscedasticity-consistent), see `ols`.
    subjects: `[n]` participant ids of the rows used, in order.
    dropped: (participant id, column that was missing) per dropped row.
  """

  response: str
  terms: tuple[str, ...]
  estimate: np.ndarray
  se: np.ndarray
  ci_low: np.ndarray
  ci_high: np.ndarray
  t: np.ndarray
  p: np.ndarray
  n: int
  df: int
  confidence: float
  r2: float
  adj_r2: float
  residual_sd: float
  covariance: np.ndarray
  subjects: tuple[str, ...] = ()
  dropped: tuple[tuple[str, str], ...] = ()
  se_kind: str = "classical"

  @property
  def rows(self) -> list[dict[str, Any]]:
    return [{"term": term, "estimate": float(self.estimate[i]), "se": float(self.se[i]),
             "ci_low": float(self.ci_low[i]), "ci_high": float(self.ci_high[i]),
             "t": float(self.t[i]), "p": float(self.p[i])} for i, term in enumerate(self.terms)]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return iter(self.rows)

  def __len__(self) -> int:
    return len(self.terms)

  def __getitem__(self, term: str) -> dict[str, Any]:
    """The row of `term`."""
    if term not in self.terms:
      raise KeyError(term)
    return self.rows[self.terms.index(term)]

  def to_dict(self) -> dict[str, Any]:
    return {"response": self.response, "n": self.n, "df": self.df, "confidence": self.confidence,
            "se_kind": self.se_kind,
            "r2": self.r2, "adj_r2": self.adj_r2, "residual_sd": self.residual_sd,
            "n_dropped": len(self.dropped),
            "dropped": [{ID_COLUMN: s, "missing": c} for s, c in self.dropped],
            "terms": self.rows}


def ols(y: np.ndarray, design: np.ndarray, terms: Sequence[str], *, confidence: float = 0.95,
        response: str = "y", se: str = "classical") -> GapRegression:
  """Ordinary least squares with t-based standard errors, intervals and two-sided p-values.

  Args:
    y: `[n]` response (years).
    design: `[n, k]` design matrix, the intercept column included.
    terms: `k` coefficient names (used in errors: a collinear term is named).
    confidence: the level of the intervals, in (0, 1).
    se: "classical" (s^2 (X'X)^-1, homoscedastic errors) or "hc3" (MacKinnon-White sandwich
      (X'X)^-1 X' diag(e_i^2 / (1 - h_i)^2) X (X'X)^-1: valid when the gap's spread changes
      with age or group, as brain-age gaps' often does); t with n - k df either way.
  Raises:
    DataError: fewer rows than coefficients + 1, a non-finite value, or a term that is a linear
      combination of the others (e.g. a covariate constant over the rows used).
  """
  y = np.asarray(y, np.float64)
  x = np.asarray(design, np.float64)
  n, k = x.shape
  if not 0 < confidence < 1:
    raise ConfigError(f"--confidence {confidence}: must lie in (0, 1)")
  if se not in SE_KINDS:
    raise ConfigError(f"--se {se!r}: choose one of {', '.join(SE_KINDS)}")
  se_kind = se
  if n <= k:
    raise DataError(f"{response}: {n} usable rows for {k} coefficients "
                    f"({', '.join(terms)}); no residual degrees of freedom, need at least "
                    f"{k + 1}")
  if n < ROWS_PER_TERM * k:
    warnings.warn(f"{response}: {n} rows for {k} coefficients ({', '.join(terms)}), fewer than "
                  f"{ROWS_PER_TERM} per coefficient; estimates and p-values are unstable",
                  SmallSampleWarning, stacklevel=2)
  if not (np.isfinite(y).all() and np.isfinite(x).all()):
    raise DataError(f"{response}: non-finite value in the regression data")
  # Column scaling keeps the rank test meaningful for covariates of very different units.
  scale = np.sqrt((x ** 2).sum(0))
  scale[scale == 0] = 1.0
  q, r = np.linalg.qr(x / scale)
  diag = np.abs(np.diag(r))
  tol = max(n, k) * np.finfo(np.float64).eps * max(float(diag.max()), 1.0) * 1e3
  for j in range(k):
    if diag[j] <= tol:
      column = x[:, j]
      what = (f"is constant ({column[0]:g}) over the {n} rows used" if np.ptp(column) == 0
              else "is a linear combination of the terms before it")
      raise DataError(f"covariate {terms[j]} {what}; drop it from --covariates")
  r_inv = np.linalg.solve(r, np.eye(k))
  beta = (r_inv @ (q.T @ y)) / scale
  resid = y - x @ beta
  df = n - k
  rss = float(resid @ resid)
  sigma2 = rss / df
  if se_kind == "hc3":
    # With X = Q R: (X'X)^-1 X' = R^-1 Q', leverages h = rowsum(Q^2).
    h = (q ** 2).sum(1)
    if np.any(h > 1 - 1e-10):
      raise DataError(f"{response}: a row has leverage 1 (a level seen once); HC3 standard "
                      "errors are undefined, use --se classical")
    w = (resid / (1.0 - h)) ** 2
    bread = r_inv @ q.T  # [k, n]
    cov = (bread * w[None]) @ bread.T / np.outer(scale, scale)
  else:
    cov = sigma2 * (r_inv @ r_inv.T) / np.outer(scale, scale)
  se = np.sqrt(np.diag(cov))
  with np.errstate(divide="ignore", invalid="ignore"):
    t = np.where(se > 0, beta / se, np.where(beta == 0, 0.0, np.inf * np.sign(beta)))
  p = 2.0 * stats.t.sf(np.abs(t), df)
  half = stats.t.ppf(0.5 + confidence / 2.0, df) * se
  tss = float(((y - y.mean()) ** 2).sum())
  has_intercept = bool(np.any(np.all(x == x[:1], axis=0) & (x[0] != 0)))
  if not has_intercept:
    tss = float((y ** 2).sum())
  r2 = 1.0 - rss / tss if tss > 0 else math.nan
  adj = 1.0 - (1.0 - r2) * (n - int(has_intercept)) / df if tss > 0 else math.nan
  return GapRegression(
      response=response, terms=tuple(terms), estimate=beta, se=se, ci_low=beta - half,
      ci_high=beta + half, t=t, p=p, n=n, df=df, confidence=float(confidence), r2=r2,
      adj_r2=adj, residual_sd=math.sqrt(sigma2), covariance=cov, se_kind=se_kind)


# ---------------------------------------------------------------------------------------------
# The design matrix.


@dataclasses.dataclass(frozen=True)
class Covariate:
  """How one covariate enters the design: its term name and value per row (None = missing)."""

  name: str  # as the user gave it
  term: str  # coefficient name: the column, `COLUMN=LEVEL` or `COLUMN_over_T`
  values: tuple[float | None, ...]


def code_covariate(rows: Sequence[Mapping[str, Any]], name: str) -> Covariate:
  """Codes column `name` of `rows` (the rules of the module docstring).

  Raises:
    DataError: unknown column (naming the columns there are), or a value that is neither
      missing nor usable, naming the column and subject.
  """
  columns = set().union(*(row.keys() for row in rows)) if rows else set()
  hinge = _HINGE.match(name)
  if name not in columns and hinge and hinge.group("column") in columns:
    base = code_covariate(rows, hinge.group("column"))
    if base.term != hinge.group("column"):
      raise DataError(f"covariate {name}: column {base.name} is not numeric")
    threshold = float(hinge.group("threshold"))
    return Covariate(name, name, tuple(None if v is None else max(v - threshold, 0.0)
                                       for v in base.values))
  if name not in columns:
    raise DataError(f"covariate {name}: no such column (columns: "
                    f"{', '.join(sorted(c for c in columns if c != ID_COLUMN))})")
  raw = [row.get(name) for row in rows]
  present = [(i, v) for i, v in enumerate(raw) if not is_missing(v)]
  numbers = [number(v) for _, v in present]
  if all(x is not None for x in numbers):
    values: list[float | None] = [None] * len(rows)
    for (i, _), x in zip(present, numbers):
      values[i] = x
    return Covariate(name, name, tuple(values))
  # Text: a two-level column becomes an indicator of its later level.
  levels = sorted({str(v).strip() for _, v in present})
  if len(levels) != 2 or any(x is not None for x in numbers):
    i, v = next((i, v) for (i, v), x in zip(present, numbers) if x is None)
    if len(levels) > 2 and all(x is None for x in numbers):
      raise DataError(f"covariate {name}: {len(levels)} levels ({', '.join(levels[:5])}"
                      f"{', ...' if len(levels) > 5 else ''}) where two or numbers are needed; "
                      f"first at subject {subject_id(rows[i], i)}")
    raise DataError(f"covariate {name}: value {v!r} of subject {subject_id(rows[i], i)} is not a "
                    "number (and the column is not a two-level one such as sex F/M)")
  level = levels[1]
  values = [None] * len(rows)
  for i, v in present:
    values[i] = float(str(v).strip() == level)
  return Covariate(name, f"{name}={level}", tuple(values))


def default_covariates(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *,
                       constant: list[str] | None = None) -> list[str]:
  """Every column of `columns` (in order) that codes as a numeric or two-level covariate and
  varies over `rows`; identifiers and prediction columns excluded. Usable columns that are
  constant over `rows` (e.g. no smoker among a few test subjects) are appended to `constant`."""
  chosen = []
  for column in columns:
    if column in NOT_COVARIATES or column.startswith("pred_"):
      continue
    try:
      cov = code_covariate(rows, column)
    except DataError:
      # A text column with one level is constant; any other unusable one is no covariate.
      levels = {str(r.get(column)).strip() for r in rows if not is_missing(r.get(column))}
      if len(levels) == 1 and constant is not None:
        constant.append(column)
      continue
    if len({v for v in cov.values if v is not None}) > 1:
      chosen.append(column)
    elif constant is not None:
      constant.append(column)
  return chosen


def design_matrix(rows: Sequence[Mapping[str, Any]], gap_column: str,
                  covariates: Sequence[str]):
  """(y `[n]`, design `[n, k]` with the intercept first, terms, kept row indices, dropped).

  Rows with a missing gap or covariate are dropped; `dropped` lists (subject, column).
  """
  if not rows:
    raise DataError("no rows to analyse")
  if len(set(covariates)) != len(covariates):
    raise ConfigError(f"--covariates {','.join(covariates)} names a covariate twice")
  gap = code_covariate(rows, gap_column)
  if gap.term != gap_column:
    raise DataError(f"gap column {gap_column}: not numeric")
  coded = [code_covariate(rows, c) for c in covariates]
  kept, dropped = [], []
  for i, row in enumerate(rows):
    missing = [c.name for c in (gap, *coded) if c.values[i] is None]
    if missing:
      dropped.append((subject_id(row, i), missing[0]))
    else:
      kept.append(i)
  y = np.array([gap.values[i] for i in kept], np.float64)
  x = np.ones((len(kept), 1 + len(coded)), np.float64)
  for j, c in enumerate(coded):
    x[:, j + 1] = [c.values[i] for i in kept]
  terms = (INTERCEPT, *(c.term for c in coded))
  return y, x, terms, kept, dropped
