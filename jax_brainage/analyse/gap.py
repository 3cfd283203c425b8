"""`brainage analyze`: the brain-age gap against covariates by ordinary least squares.

    brainage analyze --predictions preds.tsv --participants participants.tsv --out DIR
        [--gap-column brain_age_gap_corrected] [--covariates diabetes,hypertension,...]
        [--truth DATASET_DIR] [--confidence 0.95] [--se classical|hc3]

The predictions TSV (`brainage predict` / the demo) is joined with participants.tsv by
participant_id (one row per prediction row). Several sessions of a person are several rows and
not independent, so the standard errors assume what is not true: the command says so and counts
them (`repeated_participants`); analyse one session (`brainage predict --session`) instead.
The gap (years; by default `brain_age_gap_corrected` when the TSV has it, else `brain_age_gap`)
is regressed on an intercept and the covariates:

    gap_i = b_0 + sum_j b_j x_ij + e_i,   e_i ~ N(0, s^2) independent

and every coefficient gets its standard error, 95% confidence interval and two-sided p-value
from the t distribution with n - k degrees of freedom (k = number of coefficients); `--se hc3`
gives heteroscedasticity-consistent (HC3) standard errors instead of the classical ones. A
coefficient is in years of gap per unit of its covariate: per year of age, per kg/m^2 of BMI, or
between the two levels of a 0/1 or two-level column (`sex=M`: men minus women).

Covariates are participants.tsv (or predictions TSV) columns:
  - numeric columns as they are; 0/1 columns are indicators;
  - a column with exactly two text levels (e.g. sex F/M) becomes the indicator `COLUMN=LEVEL` of
    the later level in sorted order (the earlier one is the reference);
  - `COLUMN_over_T` (e.g. `bmi_over_25`) is the hinge max(COLUMN - T, 0), the form in which the
    simulated cohort's BMI acts on brain age.
Default covariates: every numeric or two-level column of participants.tsv (age, sex and the risk
factors on the simulated cohort). Keep age in the model: with age as a covariate the risk-factor
estimates do not depend on whether the gap was linearly bias-corrected (the age term absorbs it).

Missing values ("n/a", empty) in the gap or a covariate: the row is dropped, and the count and
the subjects with the column that was missing are reported (gap_effects.json, and one line on
the terminal). A value that is neither missing nor usable (e.g. "yes" in a numeric column, a third
level of sex) is a one-line DataError naming the column and subject.

`--truth DATASET_DIR` (a simulated cohort from `brainage simulate`) adds, beside each estimate,
what the pipeline should recover (see `jax_brainage.analyse.truth`): the generative effect of
each factor on latent brain age, the same regression on the true latent gap (brain age minus
age) of the same subjects, and the regression on the gap of two oracle predictors.

Outputs (written atomically): DIR/gap_effects.tsv (one row per term), DIR/gap_effects.json
(terms, fit statistics, dropped rows, truth), DIR/forest.png (estimates with their intervals,
true effects marked).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from scipy import stats

from jax_brainage import fileio
from jax_brainage.errors import ConfigError, DataError

MISSING = frozenset({"", "n/a", "na", "nan", "none"})
ID_COLUMN = "participant_id"
GAP_COLUMNS = ("brain_age_gap_corrected", "brain_age_gap")
# Columns that are never default covariates: identifiers and what the pipeline predicted.
NOT_COVARIATES = frozenset({ID_COLUMN, "session", "predicted_age", "predicted_age_corrected",
                            "brain_age_gap", "brain_age_gap_corrected", "uncertainty"})
SE_KINDS = ("classical", "hc3")
TERM_FIELDS = ("term", "estimate", "se", "ci_low", "ci_high", "t", "p")
INTERCEPT = "intercept"
EFFECTS_TSV = "gap_effects.tsv"
EFFECTS_JSON = "gap_effects.json"
FOREST_PNG = "forest.png"
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
                    f"({', '.join(terms)}); need at least {k + 1}")
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
# Tables and the design matrix.


def _as_rows(table) -> list[Mapping[str, Any]]:
  """Rows (dicts) from a list of dicts or a columnar mapping {column: [n] values}."""
  if isinstance(table, Mapping):
    columns = {k: list(v) for k, v in table.items()}
    n = {len(v) for v in columns.values()}
    if len(n) > 1:
      raise DataError(f"table columns differ in length ({sorted(n)})")
    return [{k: v[i] for k, v in columns.items()} for i in range(n.pop() if n else 0)]
  return [dict(row) for row in table]


def _missing(value: Any) -> bool:
  if value is None:
    return True
  if isinstance(value, (float, np.floating)):
    return not math.isfinite(float(value))
  return isinstance(value, str) and value.strip().lower() in MISSING


def _number(value: Any) -> float | None:
  if isinstance(value, (bool, np.bool_)):
    return float(value)
  try:
    x = float(value)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def _subject(row: Mapping[str, Any], i: int) -> str:
  return str(row.get(ID_COLUMN) or f"row {i + 1}")


@dataclasses.dataclass(frozen=True)
class Covariate:
  """How one covariate enters the design: its term name and value per row (None = missing)."""

  name: str  # as the user gave it
  term: str  # coefficient name: the column, `COLUMN=LEVEL` or `COLUMN_over_T`
  values: tuple[float | None, ...]


def code_covariate(rows: Sequence[Mapping[str, Any]], name: str) -> Covariate:
  """Codes column `name` of `rows` (see the module docstring for the rules).

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
  present = [(i, v) for i, v in enumerate(raw) if not _missing(v)]
  numbers = [_number(v) for _, v in present]
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
                      f"first at subject {_subject(rows[i], i)}")
    raise DataError(f"covariate {name}: value {v!r} of subject {_subject(rows[i], i)} is not a "
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
      levels = {str(r.get(column)).strip() for r in rows if not _missing(r.get(column))}
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
      dropped.append((_subject(row, i), missing[0]))
    else:
      kept.append(i)
  y = np.array([gap.values[i] for i in kept], np.float64)
  x = np.ones((len(kept), 1 + len(coded)), np.float64)
  for j, c in enumerate(coded):
    x[:, j + 1] = [c.values[i] for i in kept]
  terms = (INTERCEPT, *(c.term for c in coded))
  return y, x, terms, kept, dropped


def gap_regression(table, gap_column: str = "brain_age_gap_corrected",
                   covariates: Sequence[str] | None = None, *,
                   confidence: float = 0.95, se: str = "classical") -> GapRegression:
  """OLS of the brain-age gap on covariates, with SE, CI and two-sided p-values.

  Args:
    table: rows (a list of dicts, e.g. predictions joined with participants.tsv) or a columnar
      mapping {column: [n] values}; values are numbers or text ("n/a" = missing).
    gap_column: the response column (years).
    covariates: column names or `COLUMN_over_T` hinges (module docstring); None = every numeric
      or two-level column (`default_covariates`).
    confidence: the interval level.
    se: "classical" or "hc3" standard errors (`ols`).
  Returns:
    a `GapRegression`: iterate for rows {term, estimate, se, ci_low, ci_high, t, p}.
  Raises:
    DataError: one line naming the column (and subject) that cannot be used.
  """
  rows = _as_rows(table)
  if covariates is None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    covariates = [c for c in default_covariates(rows, columns) if c != gap_column]
  y, x, terms, kept, dropped = design_matrix(rows, gap_column, list(covariates))
  fit = ols(y, x, terms, confidence=confidence, response=gap_column, se=se)
  return dataclasses.replace(fit, subjects=tuple(_subject(rows[i], i) for i in kept),
                             dropped=tuple(dropped))


def join_tables(predictions: Sequence[Mapping[str, str]], participants: Sequence[Mapping[str, str]],
                *, where: str = "participants.tsv") -> tuple[list[dict[str, str]], list[str]]:
  """One row per prediction row with its participant's columns (the prediction's own columns
  win where both have one, e.g. age). Returns (rows, prediction rows without a participant).

  Raises:
    DataError: a participant listed twice in `where`.
  """
  by_id: dict[str, Mapping[str, str]] = {}
  for row in participants:
    pid = row[ID_COLUMN]
    if pid in by_id:
      raise DataError(f"{where}: participant {pid} listed twice")
    by_id[pid] = row
  joined, unmatched = [], []
  for row in predictions:
    other = by_id.get(row[ID_COLUMN])
    if other is None:
      unmatched.append(row[ID_COLUMN])
      joined.append(dict(row))
    else:
      joined.append({**other, **{k: v for k, v in row.items() if not (_missing(v) and k in other)}})
  return joined, unmatched


def read_tsv(path: str | os.PathLike,
             what: str = "table") -> tuple[list[str], list[dict[str, str]]]:
  """(columns, rows) of a TSV with a participant_id column (ids normalised to `sub-...`)."""
  from jax_brainage.data import bids

  if not Path(path).is_file():
    raise DataError(f"{path}: {what} not found")
  header, rows = bids.read_participants(path)
  return header, [dict(r.values, **{ID_COLUMN: r.subject_id}) for r in rows]


# ---------------------------------------------------------------------------------------------
# Output.


def _fmt(x: Any, digits: int = 6) -> str:
  if x is None:
    return "n/a"
  if isinstance(x, str):
    return x
  if isinstance(x, (bool, np.bool_)):
    return "true" if x else "false"
  x = float(x)
  return "n/a" if not math.isfinite(x) else f"{x:.{digits}g}"


def effects_table(fit: GapRegression, truth: Mapping[str, Any] | None = None) -> list[dict]:
  """The rows of gap_effects.tsv: `TERM_FIELDS` plus, with truth, the truth columns per term."""
  rows = []
  for row in fit:
    row = dict(row)
    if truth is not None:
      row.update(truth["per_term"].get(row["term"], {}))
    rows.append(row)
  return rows


def effects_tsv(rows: Sequence[Mapping[str, Any]]) -> str:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  lines = ["\t".join(columns)]
  for row in rows:
    lines.append("\t".join(_fmt(row.get(c)) for c in columns))
  return "\n".join(lines) + "\n"


def effects_record(fit: GapRegression, truth: Mapping[str, Any] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The gap_effects.json record: `extra`, the fit statistics, the terms with their truth
  columns, the dropped rows and (with truth) the references' summary."""
  record = {**(extra or {}), **fit.to_dict()}
  record["terms"] = effects_table(fit, truth)
  if truth is not None:
    record["truth"] = {k: v for k, v in truth.items() if k != "per_term"}
  return _json_safe(record)


def _json_safe(x: Any) -> Any:
  """Non-finite floats -> None (JSON has no NaN or Infinity); tuples -> lists; numpy -> Python."""
  if isinstance(x, Mapping):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def write_effects(out: str | os.PathLike, fit: GapRegression,
                  truth: Mapping[str, Any] | None = None, *,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
  """Writes gap_effects.tsv, gap_effects.json and forest.png into `out`; returns their paths."""
  from jax_brainage.analyse import forest

  out = Path(out)
  rows = effects_table(fit, truth)
  paths = {"tsv": out / EFFECTS_TSV, "json": out / EFFECTS_JSON, "forest": out / FOREST_PNG}
  fileio.write_text(paths["tsv"], effects_tsv(rows))
  fileio.write_json(paths["json"], effects_record(fit, truth, extra))
  true = ({t: v.get("true_effect") for t, v in truth["per_term"].items()} if truth else None)
  forest.forest_plot(paths["forest"], fit, true_effects=true,
                     reference=(truth or {}).get("reference_estimates"),
                     title=f"{fit.response} (years) vs covariates, n = {fit.n}")
  return paths


# ---------------------------------------------------------------------------------------------
# Command line.


def analyze(predictions: str | os.PathLike, participants: str | os.PathLike,
            out: str | os.PathLike, *, gap_column: str | None = None,
            covariates: Sequence[str] | None = None, truth: str | os.PathLike | None = None,
            confidence: float = 0.95, se: str = "classical") -> dict[str, Any]:
  """`brainage analyze` as a function; returns the gap_effects.json record."""
  from jax_brainage.analyse import truth as truth_lib

  pred_columns, pred_rows = read_tsv(predictions, "predictions TSV")
  part_columns, part_rows = read_tsv(participants, "participants table")
  if not pred_rows:
    raise DataError(f"{predictions}: no prediction rows")
  if gap_column is None:
    gap_column = next((c for c in GAP_COLUMNS if c in pred_columns), None)
    if gap_column is None:
      raise DataError(f"{predictions}: no {' or '.join(GAP_COLUMNS)} column; give --gap-column")
  elif gap_column not in pred_columns and gap_column not in part_columns:
    raise DataError(f"{predictions}: no column {gap_column!r} (columns: "
                    f"{', '.join(pred_columns)})")
  rows, unmatched = join_tables(pred_rows, part_rows, where=str(participants))
  if len(unmatched) == len(rows):
    raise DataError(f"{participants}: none of the {len(rows)} predicted participants is listed "
                    f"(first: {unmatched[0]})")
  sim = truth_lib.load_truth(truth) if truth is not None else None
  constant: list[str] = []
  if covariates is None:
    # participants.tsv's columns (age as joined: the prediction's where it has one).
    candidates = part_columns + [c for c in ("age",) if c in pred_columns and c not in part_columns]
    covariates = default_covariates(rows, candidates, constant=constant)
    if sim is not None:
      # The generative model's form of BMI (a hinge), so that its true effect is one number.
      covariates = [sim.bmi_term if c == "bmi" else c for c in covariates]
  fit = gap_regression(rows, gap_column, covariates, confidence=confidence, se=se)
  truth_record = None
  if sim is not None:
    truth_record = truth_lib.compare(sim, rows, fit, list(covariates), confidence=confidence,
                                     se=se)
  ids = [row[ID_COLUMN] for row in rows]
  extra = {"predictions": str(predictions), "participants": str(participants),
           "gap_column": gap_column, "covariates": list(covariates),
           "not_in_participants": unmatched, "constant_left_out": constant,
           "repeated_participants": len(ids) - len(set(ids))}
  paths = write_effects(out, fit, truth_record, extra=extra)
  return {**effects_record(fit, truth_record, extra),
          "files": {k: str(v) for k, v in paths.items()}}


def risk_effects(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Per covariate term (not the intercept) of an `analyze` record: {estimated, ci_low, ci_high,
  p, true, latent, oracle} (years per unit; truth entries None without --truth), the
  `risk_effects` entry of the demo's summary.json."""
  out = {}
  for row in record["terms"]:
    if row["term"] == INTERCEPT:
      continue
    out[row["term"]] = {"estimated": row["estimate"], "ci_low": row["ci_low"],
                        "ci_high": row["ci_high"], "p": row["p"],
                        "true": row.get("true_effect"), "latent": row.get("latent_estimate"),
                        "oracle": row.get("oracle_estimate")}
  return out


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage analyze`."""
  p = subparsers.add_parser(
      "analyze", help="brain-age gap vs covariates (risk factors, sex, age): OLS with CIs and "
                      "p-values, TSV + forest plot",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--predictions", required=True, type=Path, metavar="TSV",
                 help="predictions TSV (brainage predict / demo)")
  p.add_argument("--participants", required=True, type=Path, metavar="TSV",
                 help="participants.tsv with the covariates")
  p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
  p.add_argument("--gap-column", default=None,
                 help="gap column of the predictions (default brain_age_gap_corrected, else "
                      "brain_age_gap)")
  p.add_argument("--covariates", default=None,
                 help="comma-separated columns or COLUMN_over_T hinges (default: every numeric "
                      "or two-level participants column)")
  p.add_argument("--truth", type=Path, default=None, metavar="DATASET_DIR",
                 help="simulated dataset (brainage simulate): show the true effects beside the "
                      "estimates")
  p.add_argument("--confidence", type=float, default=0.95, help="interval level (0.95)")
  p.add_argument("--se", choices=SE_KINDS, default="classical",
                 help="standard errors: classical (homoscedastic) or hc3 (robust to a gap "
                      "spread that changes with age or group)")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  covariates = None
  if args.covariates is not None:
    covariates = [c.strip() for c in args.covariates.split(",") if c.strip()]
    if not covariates:
      raise ConfigError("--covariates is empty")
  record = analyze(args.predictions, args.participants, args.out, gap_column=args.gap_column,
                   covariates=covariates, truth=args.truth, confidence=args.confidence,
                   se=args.se)
  if record["repeated_participants"]:
    print(f"warning: {record['repeated_participants']} rows repeat a participant (sessions); "
          "OLS treats them as independent people", file=sys.stderr)
  if record["constant_left_out"]:
    print(f"left out (the same for every subject): {', '.join(record['constant_left_out'])}",
          file=sys.stderr)
  if record["n_dropped"]:
    first = record["dropped"][0]
    print(f"dropped {record['n_dropped']} rows with missing values (first: "
          f"{first[ID_COLUMN]}, {first['missing']})", file=sys.stderr)
  level = round(100 * record["confidence"])
  print(f"{record['gap_column']} on {', '.join(record['covariates'])}: n {record['n']}, "
        f"R^2 {record['r2']:.3f}")
  for row in record["terms"]:
    if row["term"] == INTERCEPT:
      continue
    line = (f"  {row['term']:<22} {row['estimate']:+8.3f} y  [{row['ci_low']:+.3f}, "
            f"{row['ci_high']:+.3f}] {level}% CI  p {row['p']:.3g}")
    true = row.get("true_effect")
    if true is not None:
      line += f"  (true {true:+.3f}"
    if row.get("latent_estimate") is not None:
      line += f"{', ' if true is not None else '  ('}latent gap {row['latent_estimate']:+.3f}"
    if true is not None or row.get("latent_estimate") is not None:
      line += ")"
    print(line)
  print(f"-> {Path(args.out) / EFFECTS_TSV}, {EFFECTS_JSON}, {FOREST_PNG}")
  return 0
