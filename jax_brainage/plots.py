"""Small figures of results (matplotlib, Agg backend; written atomically)."""

from __future__ import annotations

import os

import numpy as np

from jax_brainage import fileio


def figure(width: float, height: float):
  """A matplotlib Figure of `width` x `height` inches at 120 dpi, on the Agg backend and without
  pyplot (no global figure state, safe in threads and without a display)."""
  import matplotlib  # optional until a figure is drawn

  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure

  return Figure(figsize=(width, height), dpi=120)


def save_png(fig, path: str | os.PathLike, *, tight: bool = False) -> None:
  """Writes `fig` to `path` as a PNG atomically; `tight` crops to the drawn content (keeps a
  legend placed outside the axes inside the image)."""
  with fileio.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", **({"bbox_inches": "tight"} if tight else {}))


def scatter_predicted_vs_true(path: str | os.PathLike, ages: np.ndarray, predicted: np.ndarray,
                              *, mae: float | None = None, oracle_mae: float | None = None,
                              title: str = "Brain age on the held-out test split") -> None:
  """Predicted vs chronological age (years) with the identity line, as a PNG.

  Args:
    path: PNG to write.
    ages, predicted: `[n]` chronological and predicted ages (years).
    mae: the test MAE (years), shown in the legend.
    oracle_mae: the best achievable MAE on the cohort (years), noted on the plot.
  """
  ages = np.asarray(ages, np.float64)
  predicted = np.asarray(predicted, np.float64)
  fig = figure(5.0, 5.0)
  ax = fig.add_subplot()
  lo = float(min(ages.min(), predicted.min())) - 2.0
  hi = float(max(ages.max(), predicted.max())) + 2.0
  ax.plot([lo, hi], [lo, hi], color="0.4", linestyle="--", linewidth=1, label="identity")
  label = f"test subjects (n={len(ages)})"
  if mae is not None:
    label += f", MAE {mae:.2f} y"
  ax.scatter(ages, predicted, s=14, alpha=0.75, color="tab:blue", label=label)
  if oracle_mae is not None:
    ax.fill_between([lo, hi], [lo - oracle_mae, hi - oracle_mae],
                    [lo + oracle_mae, hi + oracle_mae], color="tab:green", alpha=0.12,
                    label=f"identity +/- oracle MAE {oracle_mae:.2f} y")
  ax.set_xlim(lo, hi)
  ax.set_ylim(lo, hi)
  ax.set_aspect("equal")
  ax.set_xlabel("chronological age (years)")
  ax.set_ylabel("predicted brain age (years)")
  ax.set_title(title, fontsize=10)
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  save_png(fig, path)


def region_bars(path: str | os.PathLike, regions: list[str], positive: np.ndarray,
                positive_sd: np.ndarray, negative: np.ndarray, negative_sd: np.ndarray, *,
                title: str, xlabel: str = "relevance per region (years of predicted age)") -> None:
  """Ranked horizontal bars per region: mean positive relevance (older, red, to the right) and
  mean negative relevance (younger, blue, to the left), whiskers one SD over subjects.

  Args:
    path: PNG to write.
    regions: `[k]` names, the first drawn at the top.
    positive, negative: `[k]` means over subjects (years; negative <= 0).
    positive_sd, negative_sd: `[k]` SDs over subjects (NaN: no whisker, e.g. one subject).
  """
  k = len(regions)
  fig = figure(6.4, 1.3 + 0.26 * max(k, 1))
  ax = fig.add_subplot()
  ys = np.arange(k)[::-1].astype(float)
  sd = lambda v: np.nan_to_num(np.asarray(v, np.float64), nan=0.0)  # noqa: E731
  ax.barh(ys, positive, xerr=sd(positive_sd), color="tab:red", alpha=0.8, height=0.7,
          error_kw={"elinewidth": 0.8, "capsize": 2}, label="positive (evidence for older)")
  ax.barh(ys, negative, xerr=sd(negative_sd), color="tab:blue", alpha=0.8, height=0.7,
          error_kw={"elinewidth": 0.8, "capsize": 2}, label="negative (evidence for younger)")
  ax.axvline(0.0, color="0.3", linewidth=0.8)
  ax.set_yticks(ys, [r.replace("_", " ") for r in regions], fontsize=7)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.legend(loc="lower right", fontsize=7)
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  save_png(fig, path)
