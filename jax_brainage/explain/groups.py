"""Groups of subjects and their mean relevance maps, accumulated in one pass over the subjects.

Groups (`subject_groups`): everyone (group "all"), age bands, sex and participants.tsv columns:
a text column or one of few whole-number codes (e.g. smoking 0/1) is grouped by value; any other
numeric column (BMI, blood pressure) is cut into quantile bins (`QUANTILE_BINS`, fewer when the
subjects are few), never one group per distinct value. A group of fewer than `min_size` subjects
is skipped with a SmallSampleWarning naming it: the mean map of two people is an anecdote. Their
mean maps (`GroupMaps`) lie on the common template grid when every subject's image shares one
grid (registered data, the simulated cohort), else on the cube grid.
"""

from __future__ import annotations

import collections
import math
import re
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage.data import bids, prune
from jax_brainage.errors import ConfigError, SmallSampleWarning
from jax_brainage.explain import maps

MAX_CATEGORIES = 6  # a column of at most this many whole-number codes is grouped by value
QUANTILE_BINS = 3   # bins of a continuous column (tertiles), fewer when subjects are few
MIN_GROUP = 3       # smaller groups are skipped with a warning


def entity(value: Any) -> str:
  """A BIDS entity value: letters and digits only (e.g. "t1_cerebellum" -> "t1cerebellum")."""
  text = re.sub(r"[^A-Za-z0-9]", "", str(value))
  return text or "x"


def _value_label(v: Any) -> str:
  if isinstance(v, (int, float, np.floating, np.integer)):
    f = float(v)
    return str(int(f)) if f.is_integer() else f"{f:g}"
  return str(v)


def _number(v: Any) -> float | None:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def quantile_groups(numbers: Mapping[str, float], bins: int = QUANTILE_BINS,
                    min_size: int = MIN_GROUP) -> tuple[dict[str, list[str]], dict[str, str]]:
  """Quantile bins of a continuous column: ({"q1".."qB": ids}, {"qK": "[low, high]"}); B is at
  most `bins` and at most n // min_size (0 bins when n < 2 * min_size)."""
  ids = list(numbers)
  values = np.array([numbers[i] for i in ids], np.float64)
  b = min(int(bins), len(values) // max(1, int(min_size)))
  if b < 2:
    return {}, {}
  edges = np.unique(np.quantile(values, np.arange(1, b) / b))
  which = np.searchsorted(edges, values, side="right")  # ties go to the upper bin
  groups, ranges = {}, {}
  for k in range(len(edges) + 1):
    sel = which == k
    if sel.any():
      groups[f"q{k + 1}"] = [i for i, t in zip(ids, sel) if t]
      ranges[f"q{k + 1}"] = f"[{values[sel].min():g}, {values[sel].max():g}]"
  return groups, ranges


def subject_groups(subjects: Sequence[Any], *, age_band: float = 10.0,
                   columns: Sequence[str] | None = None, min_size: int = MIN_GROUP
                   ) -> tuple[dict[tuple[str, str], list[str]], dict[str, Any]]:
  """Groups of subjects for group-average maps and tables.

  Args:
    subjects: `bids.Subject`s (subject_id, age, sex, covariates).
    age_band: width of the age bands (years; bands [k * w, (k + 1) * w)); 0 = none.
    columns: participants.tsv columns to group by (default: sex and every covariate).
    min_size: groups of fewer subjects are left out with a SmallSampleWarning ("all" never).
  Returns:
    ({(group, value): row ids (`bids.row_id`: the participant id, plus `_ses-<label>` for a
    row with a session)}, {group: how it was formed}), "all" first; values are BIDS entity
    values (letters and digits).
  """
  # Row ids: the sessions of one subject are separate members (`sub-01_ses-2`).
  keys = lambda s: bids.row_id(s.subject_id, getattr(s, "session", None))  # noqa: E731
  groups: dict[tuple[str, str], list[str]] = {("all", "all"): [keys(s) for s in subjects]}
  how: dict[str, Any] = {"all": "every subject"}
  if age_band and age_band > 0:
    bands: dict[tuple[float, str], list[str]] = {}
    for s in subjects:
      if s.age is None or not math.isfinite(float(s.age)):
        continue
      lo = math.floor(float(s.age) / age_band) * age_band
      label = f"{_value_label(lo)}to{_value_label(lo + age_band)}"
      bands.setdefault((lo, entity(label)), []).append(keys(s))
    for (_, label), ids in sorted(bands.items()):
      groups[("age", label)] = ids
    how["age"] = f"age bands of {age_band:g} years [lower, upper)"
  table: dict[str, dict[str, Any]] = {}
  for s in subjects:
    row = dict(s.covariates or {})
    if s.sex is not None:
      row["sex"] = s.sex
    table[keys(s)] = row
  available = sorted({c for row in table.values() for c in row})
  if columns is None:
    columns = (["sex"] if "sex" in available else []) + [c for c in available if c != "sex"]
  else:
    unknown = [c for c in columns if c not in available]
    if unknown:
      raise ConfigError(f"--groups: no participants column {unknown[0]!r} (have "
                        f"{', '.join(available) or 'none'})")
  for column in columns:
    values = {sid: row.get(column) for sid, row in table.items()
              if row.get(column) not in (None, "", "n/a")}
    distinct = sorted({_value_label(v) for v in values.values()})
    numbers = {sid: _number(v) for sid, v in values.items()}
    text = any(n is None for n in numbers.values())
    codes = not text and len(distinct) <= MAX_CATEGORIES and all(
        float(n).is_integer() for n in numbers.values())
    if text or codes:
      for value in distinct:
        ids = [sid for sid, v in values.items() if _value_label(v) == value]
        groups[(entity(column), entity(value))] = ids
      how[entity(column)] = "by value"
    else:  # continuous: quantile bins
      bins, ranges = quantile_groups(numbers, QUANTILE_BINS, min_size)
      if not bins:
        warnings.warn(f"group maps: column {column} has {len(numbers)} subjects with a value, "
                      f"too few for quantile bins of at least {min_size}; no groups by it",
                      SmallSampleWarning, stacklevel=2)
      for label, ids in bins.items():
        groups[(entity(column), label)] = ids
      how[entity(column)] = {"split": "quantiles", **ranges}
  small = [f"{g}={v} ({len(ids)})" for (g, v), ids in groups.items()
           if g != "all" and 0 < len(ids) < min_size]
  if small:
    warnings.warn(f"group maps: skipped {len(small)} group(s) of fewer than {min_size} subjects: "
                  f"{', '.join(small[:8])}{' ...' if len(small) > 8 else ''}",
                  SmallSampleWarning, stacklevel=2)
  return {k: v for k, v in groups.items() if k == ("all", "all") or len(v) >= min_size}, how


class GroupMaps:
  """Running sums of the top level's maps per group: on the cube grid always, and on the common
  template grid while every subject shares one image grid."""

  def __init__(self, groups: Mapping[tuple[str, str], Sequence[str]]):
    self.members = {k: set(v) for k, v in groups.items()}
    self.count = collections.Counter()
    self.cube: dict[tuple[str, str], np.ndarray] = {}
    self.anatomy: dict[tuple[str, str], np.ndarray] = {}
    self.template: dict[tuple[str, str], np.ndarray] = {}
    self.template_anatomy: dict[tuple[str, str], np.ndarray] = {}
    self.grid: tuple | None = None
    self.common = True
    self.first_inverse = None

  def add(self, subject_id: str, relevance: np.ndarray, anatomy: np.ndarray, inverse) -> None:
    """relevance `[X, Y, Z, C]`, anatomy `[X, Y, Z]` (the input's first channel)."""
    grid = (tuple(inverse.original_shape), inverse.original_affine)
    if self.first_inverse is None:
      self.first_inverse, self.grid = inverse, grid
    elif grid != self.grid or inverse.resampled:
      self.common = False
    self.common = self.common and not inverse.resampled
    on_grid = on_grid_anat = None
    if self.common:
      on_grid = np.asarray(maps.to_subject_space(relevance, inverse).dataobj, np.float32)
      on_grid_anat = np.asarray(prune.to_subject_space(anatomy.astype(np.float32), inverse,
                                                       order=1).dataobj, np.float32)
    for key, ids in self.members.items():
      if subject_id not in ids:
        continue
      self.count[key] += 1
      _accumulate(self.cube, key, relevance)
      _accumulate(self.anatomy, key, anatomy)
      if self.common:
        _accumulate(self.template, key, on_grid)
        _accumulate(self.template_anatomy, key, on_grid_anat)
    if not self.common:
      self.template.clear()
      self.template_anatomy.clear()

  def means(self):
    """{group: (mean relevance [.., C], mean anatomy, affine, space)} of the non-empty groups."""
    out = {}
    for key, n in self.count.items():
      if self.common:
        out[key] = (self.template[key] / n, self.template_anatomy[key] / n,
                    np.asarray(self.grid[1], np.float64), "template")
      else:
        out[key] = (self.cube[key] / n, self.anatomy[key] / n,
                    self.first_inverse.cube_affine, "cube")
    return out


def _accumulate(store: dict, key, value: np.ndarray) -> None:
  if key in store:
    store[key] += value
  else:
    store[key] = np.array(value, np.float64)
