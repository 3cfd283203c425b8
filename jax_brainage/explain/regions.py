"""Relevance per atlas region: mean, sum and positive relevance per label, per subject and group.

Any label image works: the simulated cohort's `derivatives/simulation/atlas.nii.gz` (with its
`atlas.tsv`), a FreeSurfer aseg, an MNI atlas. The labels are brought onto each subject's cube
grid nearest-neighbour through the world coordinates of the two affines (`atlas_in_cube`), so
the statistics are taken where the network looked. Everything is one `np.bincount` per statistic
over all subjects and voxels at once (a combined subject x label index), no loop over voxels.

Statistics per (subject, label), relevance in years (it starts from the predicted age):
  voxels             number of voxels of the label inside the cube
  sum                total relevance
  mean               sum / voxels
  positive           sum of the positive relevance (what made the estimate older)
  negative           sum of the negative relevance (what made it younger; <= 0)
  positive_fraction  positive / the subject's whole positive relevance (relevance mass share)
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np

from jax_brainage import fileio
from jax_brainage.data import nifti
from jax_brainage.errors import DataError

STATISTICS = ("voxels", "sum", "mean", "positive", "negative", "positive_fraction")


def atlas_in_cube(atlas, inverse) -> np.ndarray:
  """The atlas' labels on a subject's cube grid, int32 `[X, Y, Z]` (0 outside the atlas).

  Args:
    atlas: `jax_brainage.data.regions.Atlas` (label image on any grid, world mm).
    inverse: the subject's `prune.CubeInverse` (its `cube_affine` places the cube in the world).
  """
  shape, affine = tuple(inverse.cube_shape), inverse.cube_affine
  if nifti.same_grid(atlas.labels.shape, atlas.affine, shape, affine):
    return np.asarray(atlas.labels, np.int32)
  return np.asarray(nifti.resample(atlas.labels, atlas.affine, shape, affine, order=0),
                    np.int32)


def label_ids(atlas_or_labels) -> np.ndarray:
  """The nonzero labels of an atlas or label array, sorted, int64 `[L]`."""
  labels = getattr(atlas_or_labels, "labels", atlas_or_labels)
  ids = np.unique(np.asarray(labels))
  return ids[ids != 0].astype(np.int64)


def region_statistics(relevance: np.ndarray, labels: np.ndarray,
                      ids: Sequence[int]) -> dict[str, np.ndarray]:
  """Per-region statistics of relevance maps.

  Args:
    relevance: `[n, X, Y, Z]` (or one map `[X, Y, Z]`), years per voxel.
    labels: integer labels, `[n, X, Y, Z]` (one label image per subject) or `[X, Y, Z]` (shared).
    ids: the labels to report, `[L]`; other labels (and 0) count only in the subject's totals.
  Returns:
    {statistic: float64 `[n, L]`} for `STATISTICS` (`[L]` for a single map); mean is NaN for a
    label with no voxel, positive_fraction NaN for a subject without positive relevance.
  """
  rel = np.asarray(relevance, np.float64)
  single = rel.ndim == 3
  if single:
    rel = rel[None]
  lab = np.asarray(labels)
  if lab.ndim == 3:
    lab = np.broadcast_to(lab, rel.shape)
  if lab.shape != rel.shape:
    raise DataError(f"labels {lab.shape} do not match relevance maps {rel.shape}")
  ids = np.asarray(ids, np.int64)
  n, k = rel.shape[0], len(ids)
  order = np.argsort(ids)
  sorted_ids = ids[order]
  # Position of each voxel's label in `ids`; k for labels not reported.
  flat = lab.reshape(n, -1).astype(np.int64)
  pos = np.searchsorted(sorted_ids, flat)
  pos_clipped = np.minimum(pos, max(k - 1, 0))
  found = (pos < k) & (sorted_ids[pos_clipped] == flat) if k else np.zeros(flat.shape, bool)
  slot = np.where(found, order[pos_clipped] if k else 0, k)
  index = (np.arange(n)[:, None] * (k + 1) + slot).ravel()
  r = rel.reshape(n, -1).ravel()

  def per_region(weights):
    return np.bincount(index, weights=weights, minlength=n * (k + 1)).reshape(n, k + 1)[:, :k]

  voxels = per_region(None)
  total = per_region(r)
  positive = per_region(np.maximum(r, 0.0))
  negative = per_region(np.minimum(r, 0.0))
  all_positive = np.maximum(rel.reshape(n, -1), 0.0).sum(axis=1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = np.where(voxels > 0, total / np.maximum(voxels, 1), np.nan)
    fraction = np.where(all_positive > 0, positive / np.where(all_positive > 0, all_positive, 1),
                        np.nan)
  out = {"voxels": voxels, "sum": total, "mean": mean, "positive": positive,
         "negative": negative, "positive_fraction": fraction}
  return {key: v[0] for key, v in out.items()} if single else out


# ---------------------------------------------------------------------------------------------
# Tables.


def _fmt(v) -> str:
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    return "n/a" if not math.isfinite(float(v)) else f"{float(v):.6g}"
  return "n/a" if v is None or v == "" else str(v)


def tsv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  """Rows as tab-separated text with a header ("n/a" for missing or non-finite values)."""
  lines = ["\t".join(columns)]
  lines += ["\t".join(_fmt(row.get(c)) for c in columns) for row in rows]
  return "\n".join(lines) + "\n"


SUBJECT_COLUMNS = ("participant_id", "model", "sequence", "label", "region") + STATISTICS
GROUP_COLUMNS = ("group", "value", "n", "model", "sequence", "label", "region") + tuple(
    f"{s}_{agg}" for s in ("sum", "mean", "positive", "negative", "positive_fraction")
    for agg in ("mean", "sd"))


def subject_rows(subject_ids: Sequence[str], stats: Mapping[str, np.ndarray],
                 ids: Sequence[int], names: Mapping[int, str] | None = None, *,
                 model: str = "model", sequence: str = "all") -> list[dict]:
  """One row per (subject, label) of `region_statistics` output `[n, L]` (SUBJECT_COLUMNS)."""
  names = names or {}
  rows = []
  for i, sid in enumerate(subject_ids):
    for j, label in enumerate(ids):
      row = {"participant_id": sid, "model": model, "sequence": sequence, "label": int(label),
             "region": names.get(int(label), str(int(label)))}
      for s in STATISTICS:
        v = stats[s][i, j]
        row[s] = int(v) if s == "voxels" else float(v)
      rows.append(row)
  return rows


def group_rows(rows: Sequence[Mapping], groups: Mapping[tuple[str, str], Sequence[str]]
               ) -> list[dict]:
  """Across-subject mean and SD of each statistic per group, model, sequence and label.

  Args:
    rows: subject rows (`subject_rows`).
    groups: (group, value) -> participant ids, e.g. ("age_band", "60-70") -> [...].
  Returns:
    rows with GROUP_COLUMNS (SD with n - 1 degrees of freedom; NaN for one subject).
  """
  by_key: dict[tuple, dict[str, list]] = {}
  for row in rows:
    key = (row["model"], row["sequence"], row["label"], row["region"])
    by_key.setdefault(key, {})[row["participant_id"]] = row
  out = []
  for (group, value), members in groups.items():
    members = list(members)
    for (model, sequence, label, region), per_subject in by_key.items():
      chosen = [per_subject[m] for m in members if m in per_subject]
      if not chosen:
        continue
      row = {"group": group, "value": value, "n": len(chosen), "model": model,
             "sequence": sequence, "label": label, "region": region}
      for s in ("sum", "mean", "positive", "negative", "positive_fraction"):
        v = np.array([c[s] for c in chosen], np.float64)
        v = v[np.isfinite(v)]
        row[f"{s}_mean"] = float(np.mean(v)) if len(v) else math.nan
        row[f"{s}_sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
      out.append(row)
  return out


def ranked_regions(rows: Sequence[Mapping], *, model: str, sequence: str, group: str = "all",
                   value: str = "all", top: int = 20) -> list[dict]:
  """The regions of one group, model and sequence ranked by their mean total |relevance|.

  Args:
    rows: group rows (`group_rows`, GROUP_COLUMNS).
    model, sequence: which map (e.g. "ensemble", "all" for the channels summed); each region
      appears once (the members' and sub-ensembles' rows are other models).
    group, value: which group ("all", "all": every explained subject).
    top: at most this many regions.
  Returns:
    rows (dicts of GROUP_COLUMNS), the region with the largest positive_mean - negative_mean
    (years) first.
  """
  chosen = [r for r in rows if r["group"] == group and str(r["value"]) == value
            and r["model"] == model and r["sequence"] == sequence]
  chosen.sort(key=lambda r: -(float(r["positive_mean"]) - float(r["negative_mean"])))
  return chosen[:top]


def write_table(path: str | os.PathLike, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
  """Writes rows as a TSV atomically."""
  fileio.write_text(path, tsv_text(rows, columns))
