"""Figures of the brain-age-gap analysis and the report (matplotlib Agg; PNGs written atomically).

forest_plot: one row per covariate, the estimate (years of gap per unit) with its confidence
  interval, the true effect marked when known, reference estimates (e.g. the latent gap's) beside.
bias_plot: brain-age gap against chronological age before and after bias correction, with
  least-squares lines and Spearman correlations: the regression-to-the-mean bias made visible.
Tables go into the HTML report as tables (`report`), not pictures.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from jax_brainage import plots
from jax_brainage.analyse.regression import INTERCEPT, GapRegression
from jax_brainage.analyse.tables import number, read_tsv
from jax_brainage.errors import DataError

_REFERENCE_STYLES = (("tab:gray", "s"), ("tab:purple", "^"), ("tab:olive", "v"), ("tab:cyan", "P"))


# Regression columns in words (titles and legends): "brain_age_gap_corrected" is a column name.
RESPONSE_WORDS = {
    "brain_age_gap": "brain-age gap (years)",
    "brain_age_gap_corrected": "bias-corrected brain-age gap (years)",
    "gap": "brain-age gap (years)",
    "gap_corrected": "bias-corrected brain-age gap (years)",
}
# Fewer subjects per estimated coefficient than this and the report and figure warn.
SUBJECTS_PER_TERM = 10


def response_words(column: str) -> str:
  """A regression's response column in words, e.g. "bias-corrected brain-age gap (years)"."""
  return RESPONSE_WORDS.get(column, column.replace("_", " "))


def small_sample_warning(n: int, n_terms: int) -> str:
  """A one-line warning when `n` subjects are few for `n_terms` coefficients (intercept
  included), else "": fewer than SUBJECTS_PER_TERM per coefficient gives wide intervals and
  estimates that move with every subject."""
  if n >= SUBJECTS_PER_TERM * max(1, n_terms):
    return ""
  return (f"only n = {n} subjects for {n_terms} coefficients: intervals are wide and "
          "estimates unstable")


def forest_plot(path: str | os.PathLike, fit: GapRegression, *,
                true_effects: Mapping[str, float | None] | None = None,
                reference: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                terms: Sequence[str] | None = None, title: str | None = None) -> None:
  """Forest plot of a `GapRegression` (the gap's OLS fit) as a PNG.

  Args:
    path: PNG to write.
    fit: the regression (estimates, ci_low, ci_high per term; years per covariate unit).
    true_effects: {term: true coefficient or None}; marked with a red diamond.
    reference: {label: {term: (estimate, ci_low, ci_high)}}: other estimates of the same terms
      (e.g. the true latent gap's), drawn thinner just below each row.
    terms: the terms to show, top to bottom (default: all but the intercept).
    title: the figure title.
  """
  terms = [t for t in (terms or fit.terms) if t != INTERCEPT]
  if not terms:
    terms = list(fit.terms)
  reference = dict(reference or {})
  rows = {t: fit[t] for t in terms}
  n_ref = len(reference)
  fig = plots.figure(6.4, 1.2 + 0.42 * len(terms) * (1 + 0.35 * n_ref))
  ax = fig.add_subplot()
  ys = np.arange(len(terms))[::-1].astype(float)
  spacing = 0.8 / (n_ref + 1)
  level = round(100 * fit.confidence)
  for y, t in zip(ys, terms):
    r = rows[t]
    ax.plot([r["ci_low"], r["ci_high"]], [y, y], color="tab:blue", linewidth=2.2,
            solid_capstyle="butt")
    ax.plot([r["estimate"]], [y], "o", color="tab:blue", markersize=6)
    for k, (label, est) in enumerate(reference.items()):
      if t not in est:
        continue
      e, lo, hi = est[t]
      color, marker = _REFERENCE_STYLES[k % len(_REFERENCE_STYLES)]
      yk = y - spacing * (k + 1)
      ax.plot([lo, hi], [yk, yk], color=color, linewidth=1.0, alpha=0.8)
      ax.plot([e], [yk], marker, color=color, markersize=4)
    true = (true_effects or {}).get(t)
    if true is not None:
      ax.plot([true], [y], "D", color="tab:red", markersize=7, markerfacecolor="none",
              markeredgewidth=1.6)
  ax.axvline(0.0, color="0.4", linestyle="--", linewidth=0.8)
  ax.set_yticks(ys, terms)
  ax.set_ylim(ys.min() - 0.9, ys.max() + 0.5)
  ax.set_xlabel("effect on the brain-age gap (years per unit)")
  from matplotlib.lines import Line2D

  handles = [Line2D([], [], color="tab:blue", marker="o", linewidth=2.2,
                    label=f"estimate, {level}% CI (n={fit.n})")]
  if true_effects and any(v is not None for v in true_effects.values()):
    handles.append(Line2D([], [], color="tab:red", marker="D", linestyle="none",
                          markerfacecolor="none", label="simulated (true) effect"))
  for k, label in enumerate(reference):
    color, marker = _REFERENCE_STYLES[k % len(_REFERENCE_STYLES)]
    handles.append(Line2D([], [], color=color, marker=marker, linewidth=1.0, label=label))
  # Below the axes: inside, it would cover the intervals of some term.
  ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1,
            fontsize=7, frameon=False)
  warning = small_sample_warning(fit.n, len(fit.terms))
  ax.set_title(title or f"Effects on the {response_words(fit.response)} (OLS), n = {fit.n}",
               fontsize=10, pad=16 if warning else 6)
  if warning:  # between the title and the axes
    ax.text(0.5, 1.012, warning, transform=ax.transAxes, ha="center", va="bottom", fontsize=7,
            color="tab:red")
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  # "tight": the legend below the axes stays inside the image.
  plots.save_png(fig, path, tight=True)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan")
  return float(stats.spearmanr(x, y)[0])


def bias_plot(path: str | os.PathLike, age: np.ndarray, gap: np.ndarray,
              corrected: np.ndarray | None = None, *, title: str | None = None) -> None:
  """Brain-age gap (years) against chronological age (years), before and after correction.

  Args:
    path: PNG to write.
    age: `[n]` chronological ages; gap: `[n]` predicted - chronological age.
    corrected: `[n]` bias-corrected gap, or None to show the uncorrected gap only.
    title: the figure title.
  """
  age = np.asarray(age, np.float64)
  series = [("uncorrected", np.asarray(gap, np.float64), "tab:orange")]
  if corrected is not None:
    series.append(("bias-corrected", np.asarray(corrected, np.float64), "tab:blue"))
  fig = plots.figure(6.0, 4.2)
  ax = fig.add_subplot()
  grid = np.linspace(age.min(), age.max(), 2)
  for label, g, color in series:
    slope, intercept = np.polyfit(age, g, 1) if len(age) > 1 else (0.0, float(g.mean()))
    rho = _spearman(age, g)
    ax.scatter(age, g, s=12, alpha=0.6, color=color,
               label=f"{label}: slope {slope:+.3f} y/y, Spearman {rho:+.2f}")
    ax.plot(grid, intercept + slope * grid, color=color, linewidth=1.5)
  ax.axhline(0.0, color="0.4", linestyle="--", linewidth=0.8)
  ax.set_xlabel("chronological age (years)")
  ax.set_ylabel("brain-age gap (years)")
  ax.set_title(title or "Brain-age gap vs age (regression to the mean)", fontsize=10)
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  plots.save_png(fig, path, tight=True)


def bias_plot_from_predictions(path: str | os.PathLike, predictions: str | os.PathLike, *,
                               title: str | None = None) -> dict[str, float]:
  """`bias_plot` of a predictions TSV (`brainage predict`): age, brain_age_gap and, when there,
  brain_age_gap_corrected; rows with an unknown age or gap are left out.

  Returns:
    {"n", "spearman_gap_age", "spearman_gap_age_corrected" (None without the corrected gap)}.
  Raises:
    DataError: fewer than 3 rows with a known age and gap, naming the file.
  """
  columns, rows = read_tsv(predictions, "predictions TSV")
  has_corrected = "brain_age_gap_corrected" in columns
  wanted = ("age", "brain_age_gap") + (("brain_age_gap_corrected",) if has_corrected else ())
  values = [[number(row.get(c)) for c in wanted] for row in rows]
  values = np.array([v for v in values if all(x is not None for x in v)], np.float64)
  if len(values) < 3:
    raise DataError(f"{predictions}: {len(values)} rows with a known age and gap; the bias "
                    "plot needs at least 3")
  corrected = values[:, 2] if has_corrected else None
  bias_plot(path, values[:, 0], values[:, 1], corrected, title=title)
  return {"n": int(len(values)), "spearman_gap_age": _spearman(values[:, 0], values[:, 1]),
          "spearman_gap_age_corrected": (_spearman(values[:, 0], corrected)
                                         if has_corrected else None)}
