"""explain.regions against explicit numpy replicas (a loop over labels with boolean masks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jax_brainage.data import nifti, prune
from jax_brainage.data.regions import Atlas
from jax_brainage.explain import regions


def _replica(rel, labels, ids):
  """Per-subject, per-label statistics by boolean masks (float64)."""
  out = {s: np.zeros((len(rel), len(ids))) for s in regions.STATISTICS}
  for i in range(len(rel)):
    r = rel[i].astype(np.float64)
    lab = labels[i] if labels.ndim == 4 else labels
    all_pos = r[r > 0].sum()
    for j, label in enumerate(ids):
      m = lab == label
      v = r[m]
      out["voxels"][i, j] = m.sum()
      out["sum"][i, j] = v.sum()
      out["mean"][i, j] = v.mean() if m.any() else math.nan
      out["positive"][i, j] = v[v > 0].sum()
      out["negative"][i, j] = v[v < 0].sum()
      out["positive_fraction"][i, j] = v[v > 0].sum() / all_pos if all_pos > 0 else math.nan
  return out


def test_region_statistics_match_a_mask_replica():
  rng = np.random.default_rng(0)
  rel = rng.normal(size=(3, 7, 6, 5)).astype(np.float32)
  rel[2] = -np.abs(rel[2])  # a subject without positive relevance
  labels = rng.integers(0, 6, size=(3, 7, 6, 5))
  ids = [5, 1, 2, 9]  # unsorted; 9 absent (no voxels); 3 and 4 only count in the totals
  got = regions.region_statistics(rel, labels, ids)
  want = _replica(rel, labels, ids)
  for s in regions.STATISTICS:
    np.testing.assert_allclose(got[s], want[s], rtol=1e-10, atol=1e-12, err_msg=s)
  assert np.all(np.isnan(got["mean"][:, 3])) and np.all(got["voxels"][:, 3] == 0)
  assert np.all(np.isnan(got["positive_fraction"][2]))
  # Shared labels and a single map.
  shared = regions.region_statistics(rel, labels[0], ids)
  want_shared = _replica(rel, labels[0], ids)
  np.testing.assert_allclose(shared["sum"], want_shared["sum"], rtol=1e-10)
  one = regions.region_statistics(rel[1], labels[1], ids)
  np.testing.assert_allclose(one["positive"], want["positive"][1], rtol=1e-10)
  np.testing.assert_array_equal(regions.label_ids(labels), [1, 2, 3, 4, 5])


def test_atlas_in_cube_is_nearest_neighbour_through_world_coordinates():
  # An atlas at 2 mm on its own grid; a subject at 3 mm, stored with flipped axes.
  rng = np.random.default_rng(1)
  atlas_affine = np.diag([2.0, 2.0, 2.0, 1.0])
  atlas_affine[:3, 3] = [-30.3, -40.3, -20.3]
  labels = rng.integers(0, 5, size=(30, 40, 25)).astype(np.int32)
  atlas = Atlas(labels=labels, affine=atlas_affine, names={1: "a"})
  subject_affine = np.array([[-3.0, 0, 0, 25.0], [0, 3.0, 0, -30.0], [0, 0, -3.0, 22.0],
                             [0, 0, 0, 1]])
  data = np.zeros((18, 22, 14), np.float32)
  data[3:15, 4:18, 2:12] = 1.0
  _, inverse = prune.to_cube(nifti.make_image(data, subject_affine), (12, 16, 12))
  got = regions.atlas_in_cube(atlas, inverse)
  assert got.shape == (12, 16, 12) and got.dtype == np.int32
  ijk = np.indices(got.shape).reshape(3, -1)
  world = inverse.cube_affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
  a = np.rint(np.linalg.inv(atlas_affine) @ world)[:3].astype(int)
  inside = np.all((a >= 0) & (a < np.array(labels.shape)[:, None]), axis=0)
  expected = np.zeros(ijk.shape[1], np.int32)
  expected[inside] = labels[tuple(a[:, inside])]
  np.testing.assert_array_equal(got.reshape(-1), expected)
  assert inside.mean() > 0.9


def test_group_rows_mean_and_sd_and_tsv():
  rng = np.random.default_rng(2)
  rel = rng.normal(size=(4, 5, 5, 5))
  labels = rng.integers(0, 3, size=(5, 5, 5))
  ids = [1, 2]
  stats = regions.region_statistics(rel, labels, ids)
  sids = ["sub-1", "sub-2", "sub-3", "sub-4"]
  rows = regions.subject_rows(sids, stats, ids, {1: "frontal"}, model="ens", sequence="T1w")
  assert len(rows) == 8 and rows[0]["region"] == "frontal" and rows[1]["region"] == "2"
  groups = {("all", "all"): sids, ("sex", "F"): ["sub-1", "sub-3"], ("x", "none"): ["sub-9"]}
  grouped = regions.group_rows(rows, groups)
  assert len(grouped) == 4  # the empty group gives no rows
  f = [g for g in grouped if g["value"] == "F" and g["label"] == 2][0]
  assert f["n"] == 2
  assert f["sum_mean"] == pytest.approx(np.mean(stats["sum"][[0, 2], 1]))
  assert f["sum_sd"] == pytest.approx(np.std(stats["sum"][[0, 2], 1], ddof=1))
  assert f["positive_fraction_mean"] == pytest.approx(
      np.mean(stats["positive_fraction"][[0, 2], 1]))
  text = regions.tsv_text(rows, regions.SUBJECT_COLUMNS)
  lines = text.splitlines()
  assert lines[0].split("\t") == list(regions.SUBJECT_COLUMNS)
  first = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
  assert first["participant_id"] == "sub-1" and int(first["voxels"]) == (labels == 1).sum()
  assert float(first["sum"]) == pytest.approx(rel[0][labels == 1].sum(), rel=1e-5)
  assert regions.tsv_text([{"a": math.nan}], ["a"]).splitlines()[1] == "n/a"
