"""The brain-age gap against covariates by ordinary least squares (`brainage analyze`).

    analyze(predictions.tsv, participants.tsv, out, [gap_column, covariates, truth, confidence,
            se]) -> the gap_effects.json record

The predictions TSV (`brainage predict` / the demo) is joined with participants.tsv by
participant_id (one row per prediction row). Several sessions of a person are several rows and
not independent, so the standard errors assume what is not true: the record counts them
(`repeated_participants`); analyse one session (`brainage predict --session`) instead.
The gap (years; by default `brain_age_gap_corrected` when the TSV has it, else `brain_age_gap`)
is regressed on an intercept and the covariates:

    gap_i = b_0 + sum_j b_j x_ij + e_i,   e_i ~ N(0, s^2) independent

and every coefficient gets its standard error, 95% confidence interval and two-sided p-value
from the t distribution with n - k degrees of freedom (k = number of coefficients); `se="hc3"`
gives heteroscedasticity-consistent (HC3) standard errors instead of the classical ones. A
coefficient is in years of gap per unit of its covariate: per year of age, per kg/m^2 of BMI, or
between the two levels of a 0/1 or two-level column (`sex=M`: men minus women).

Covariates are participants.tsv (or predictions TSV) columns, coded as `analyse.regression`
says (numeric, 0/1, two text levels -> `COLUMN=LEVEL`, `COLUMN_over_T` hinges). Default
covariates: every numeric or two-level column of participants.tsv (age, sex and the risk factors
on the simulated cohort). Keep age in the model: with age as a covariate the risk-factor
estimates do not depend on whether the gap was linearly bias-corrected (the age term absorbs it).

Missing values ("n/a", empty) in the gap or a covariate: the row is dropped, and the count and
the subjects with the column that was missing are reported (gap_effects.json). A value that is
neither missing nor usable is a one-line DataError naming the column and subject.

`truth=DATASET_DIR` (a simulated cohort from `brainage simulate`) adds, beside each estimate,
what the pipeline should recover (see `jax_brainage.analyse.truth`): the generative effect of
each factor on latent brain age, the same regression on the true latent gap (brain age minus
age) of the same subjects, and the regression on the gap of two oracle predictors.

Outputs (written atomically): DIR/gap_effects.tsv (one row per term), DIR/gap_effects.json
(terms, fit statistics, dropped rows, truth), DIR/forest.png (estimates with their intervals,
true effects marked).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage import fileio
from jax_brainage.analyse import forest
from jax_brainage.analyse import truth as truth_lib
from jax_brainage.analyse.regression import (INTERCEPT, GapRegression, default_covariates,
                                             design_matrix, ols)
from jax_brainage.analyse.tables import ID_COLUMN, as_rows, join_tables, read_tsv, subject_id
from jax_brainage.errors import DataError

GAP_COLUMNS = ("brain_age_gap_corrected", "brain_age_gap")
EFFECTS_TSV = "gap_effects.tsv"
EFFECTS_JSON = "gap_effects.json"
FOREST_PNG = "forest.png"


def gap_regression(table, gap_column: str = "brain_age_gap_corrected",
                   covariates: Sequence[str] | None = None, *,
                   confidence: float = 0.95, se: str = "classical") -> GapRegression:
  """OLS of the brain-age gap on covariates, with SE, CI and two-sided p-values.

  Args:
    table: rows (a list of dicts, e.g. predictions joined with participants.tsv) or a columnar
      mapping {column: [n] values}; values are numbers or text ("n/a" = missing).
    gap_column: the response column (years).
    covariates: column names or `COLUMN_over_T` hinges (coded as `regression` says); None =
      every numeric or two-level column (`default_covariates`).
    confidence: the interval level.
    se: "classical" or "hc3" standard errors (`ols`).
  Returns:
    a `GapRegression`: iterate for rows {term, estimate, se, ci_low, ci_high, t, p}.
  Raises:
    DataError: one line naming the column (and subject) that cannot be used.
  """
  rows = as_rows(table)
  if covariates is None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    covariates = [c for c in default_covariates(rows, columns) if c != gap_column]
  y, x, terms, kept, dropped = design_matrix(rows, gap_column, list(covariates))
  fit = ols(y, x, terms, confidence=confidence, response=gap_column, se=se)
  return dataclasses.replace(fit, subjects=tuple(subject_id(rows[i], i) for i in kept),
                             dropped=tuple(dropped))


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
  return fileio.jsonable(record)



def write_effects(out: str | os.PathLike, fit: GapRegression,
                  truth: Mapping[str, Any] | None = None, *,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
  """Writes gap_effects.tsv, gap_effects.json and forest.png into `out`; returns their paths."""
  out = Path(out)
  rows = effects_table(fit, truth)
  paths = {"tsv": out / EFFECTS_TSV, "json": out / EFFECTS_JSON, "forest": out / FOREST_PNG}
  fileio.write_text(paths["tsv"], effects_tsv(rows))
  fileio.write_json(paths["json"], effects_record(fit, truth, extra))
  true = ({t: v.get("true_effect") for t, v in truth["per_term"].items()} if truth else None)
  forest.forest_plot(paths["forest"], fit, true_effects=true,
                     reference=(truth or {}).get("reference_estimates"),
                     title=f"Effects on the {forest.response_words(fit.response)}, "
                           f"n = {fit.n} subjects")
  return paths


# ---------------------------------------------------------------------------------------------
# The analysis.


def analyze(predictions: str | os.PathLike, participants: str | os.PathLike,
            out: str | os.PathLike, *, gap_column: str | None = None,
            covariates: Sequence[str] | None = None, truth: str | os.PathLike | None = None,
            confidence: float = 0.95, se: str = "classical") -> dict[str, Any]:
  """`brainage analyze` as a function; returns the gap_effects.json record."""
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
