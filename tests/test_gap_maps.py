"""`brainage explain --target gap` on a tiny trained workdir: the maps are the subject's map less
the mean map of its reference training scans (the k most similar age-matched ones by default,
every age-matched one with --reference age), chosen here from volumes.npy and split.json with a
numpy brute force; integrated gradients run from each reference scan (a replica with
lrp.attribution)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import lrp
from jax_brainage import predict
from jax_brainage.data import cache as cache_lib
from jax_brainage.data import intensity
from jax_brainage.explain import maps, reference
from jax_brainage.train import artifact
from test_predict import cli, workdir  # noqa: F401  (the session fixture)


def _reference_rows(w: Path, age: float) -> np.ndarray:
  """Training rows within +-2 years of the whole-year age (at least 5, at most 16: nearest)."""
  index = json.loads((w / "cache" / "index.json").read_text())
  train = set(json.loads((w / "split.json").read_text())["subject_ids"]["train"])
  rows = [i for i, s in enumerate(index["subjects"]) if s["subject_id"] in train]
  ages = np.array([index["subjects"][i]["age"] for i in rows])
  d = np.abs(ages - round(age))
  k = min(max(int(np.sum(d <= 2.0)), 5), 16)
  return np.array(rows)[np.argsort(d, kind="stable")[:k]]


def _nearest_rows(w: Path, age: float, x: np.ndarray, channels, k: int = 8) -> np.ndarray:
  """The k training rows within +-2 years of the whole-year age (at least the k + 1 nearest in
  age) whose block-averaged images (2^3 blocks above 50k voxels) correlate best with x
  (np.corrcoef), the subject itself excluded."""
  index = json.loads((w / "cache" / "index.json").read_text())
  train = set(json.loads((w / "split.json").read_text())["subject_ids"]["train"])
  rows = np.array([i for i, s in enumerate(index["subjects"]) if s["subject_id"] in train])
  ages = np.array([index["subjects"][i]["age"] for i in rows])
  d = np.abs(ages - round(age))
  rows = np.sort(rows[d <= 2.0]) if np.sum(d <= 2.0) >= k + 1 else np.sort(
      rows[np.argsort(d, kind="stable")[:k + 1]])
  volumes = np.load(w / "cache" / "volumes.npy")[rows][..., channels].astype(np.float64)
  pool = 1 if np.prod(x.shape[:3]) <= 50_000 else 2

  def pooled(v):
    X, Y, Z = (s // pool for s in v.shape[:3])
    v = v[:X * pool, :Y * pool, :Z * pool]
    return v.reshape(X, pool, Y, pool, Z, pool, -1).mean(axis=(1, 3, 5)).ravel()

  corr = np.array([np.corrcoef(pooled(x.astype(np.float64)), pooled(v))[0, 1] for v in volumes])
  order = [i for i in np.argsort(-corr, kind="stable") if corr[i] < 1 - 1e-6]
  return rows[order[:k]]


def _explain_gap(w: Path, out: Path, sid: str, composite: str, *extra: str) -> dict:
  assert cli(["explain", "--workdir", str(w), "--data", str(w / "data"), "--out", str(out),
              "--subjects", sid, "--target", "gap", "--composite", composite, *extra,
              "--figures", "0", "--no-glass-brain", "--quiet", "--workers", "1"]) == 0
  return json.loads((out / "explain.json").read_text())


@pytest.mark.parametrize("design", ["nearest", "age"])
def test_gap_maps_are_maps_against_the_reference_scans(workdir, tmp_path, design):  # noqa: F811
  w = workdir
  index = json.loads((w / "cache" / "index.json").read_text())
  subject = index["subjects"][0]
  sid = subject["subject_id"]
  record = _explain_gap(w, tmp_path / "gap", sid, "gradient_x_input", "--reference", design)
  out = tmp_path / "gap"
  assert record["target"] == "gap" and record["reference"] == design
  entry = record["subjects"][0]
  model = artifact.load(w)
  channels = [index["sequences"].index(q) for q in model.subs[0].sequences]
  cache = cache_lib.Cache.open(w / "cache")
  view, _ = predict.preprocessor_for(model.subs[0].sequences, cache, "the model")
  x, inverse = view.preprocess({q: subject_images(w, sid, q) for q in model.subs[0].sequences},
                               subject=sid)
  rows = (_reference_rows(w, float(subject["age"])) if design == "age"
          else _nearest_rows(w, float(subject["age"]), x, channels))
  ref = np.load(w / "cache" / "volumes.npy")[rows]
  ref = ref[..., channels]  # uint8 as cached, as x
  method = maps.get_method("gradient_x_input")
  expected = (maps.relevance(model, x[None], method)[0]
              - maps.relevance(model, ref, method).mean(0))
  written = np.asarray(nib.load(out / entry["maps"][next(iter(entry["maps"]))][0]).dataobj)
  want = np.asarray(maps.to_subject_space(expected[..., 0], inverse).dataobj)
  np.testing.assert_allclose(written, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  # The reference prediction is the model's mean prediction on the reference scans.
  np.testing.assert_allclose(entry["reference_predicted_age"],
                             float(model.predict({model.subs[0].name: ref}).ensemble.mean()),
                             atol=1e-3)
  assert np.abs(expected).sum() > 0


def subject_images(w: Path, sid: str, sequence: str) -> str:
  return str(next((w / "data" / sid / "anat").glob(f"{sid}_*{sequence}.nii.gz")))


def test_gap_target_needs_ages(workdir, tmp_path, capsys):  # noqa: F811
  files = sorted((workdir / "data").glob("sub-*/anat/*_T1w.nii.gz"))[:1]
  assert cli(["explain", "--workdir", str(workdir), "--data", *map(str, files), "--out",
              str(tmp_path / "g"), "--target", "gap", "--quiet", "--figures", "0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "needs the chronological age" in err[-1]


def test_reference_rows_window_and_minimum(workdir):  # noqa: F811
  model = artifact.load(workdir)
  inputs = predict.model_inputs(model)
  refs = reference.References(model, inputs.views, inputs.of_sub, design="age")
  name = model.subs[0].name
  cache = cache_lib.Cache.open(workdir / "cache")
  train = set(json.loads((workdir / "split.json").read_text())["subject_ids"]["train"])
  for age in (30.2, 55.0, 200.0):
    rows = refs.rows_for(name, age)
    assert all(cache.subject_ids[i] in train for i in rows)
    assert 5 <= len(rows) <= 16 or len(rows) == len(train)
    d = np.abs(cache.ages[rows] - round(age))
    outside = np.abs(cache.ages[[cache.subject_ids.index(s) for s in train]] - round(age))
    assert np.max(d) <= max(2.0, np.sort(outside)[min(4, len(outside) - 1)]) + 1e-6


def test_integrated_gradients_run_from_the_reference_scans(workdir, tmp_path):  # noqa: F811
  w = workdir
  index = json.loads((w / "cache" / "index.json").read_text())
  subject = index["subjects"][1]
  sid = subject["subject_id"]
  record = _explain_gap(w, tmp_path / "ig", sid, "integrated_gradients")
  entry = record["subjects"][0]
  model = artifact.load(w)
  sub = model.subs[0]
  channels = [index["sequences"].index(q) for q in sub.sequences]
  cache = cache_lib.Cache.open(w / "cache")
  view, _ = predict.preprocessor_for(sub.sequences, cache, "the model")
  x, inverse = view.preprocess({q: subject_images(w, sid, q) for q in sub.sequences},
                               subject=sid)
  refs = np.load(w / "cache" / "volumes.npy")[
      _nearest_rows(w, float(subject["age"]), x, channels)][..., channels]
  # Replica: lrp's integrated gradients from each reference scan (32 / 8 = 4 steps), averaged.
  variables = jax.tree.map(lambda a: np.asarray(a)[0], sub.variables)  # the one member
  f = maps.regression_apply(sub.model)
  unit = lambda v: jnp.asarray(intensity.to_unit_float(np.asarray(v)))[None]  # noqa: E731
  expected = np.mean([np.asarray(lrp.attribution.integrated_gradients(
      f, variables, unit(x), baseline=unit(r), n_steps=4))[0] for r in refs], axis=0)
  written = np.asarray(nib.load(tmp_path / "ig" / entry["maps"][next(iter(entry["maps"]))][0])
                       .dataobj)
  want = np.asarray(maps.to_subject_space(expected[..., 0], inverse).dataobj)
  np.testing.assert_allclose(written, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(entry["reference_predicted_age"],
                             float(np.mean(np.asarray(f(variables, jnp.concatenate(
                                 [unit(r) for r in refs]))))), atol=1e-3)
