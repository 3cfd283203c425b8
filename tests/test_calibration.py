"""`brainage calibrate` and predict's intervals and split column on a tiny trained workdir,
against a replica from the predictions TSV (order statistics of the calibration residuals in
numpy) and the workdir's split.json."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

import conformal_replica
from jax_brainage.ensemble import conformal
from test_predict import cli, read_tsv, workdir  # noqa: F401  (the session fixture)


@pytest.fixture()
def own_workdir(workdir, tmp_path):  # noqa: F811
  """A copy of the shared workdir, so that the calibration written here stays here."""
  w = tmp_path / "W"
  shutil.copytree(workdir, w, symlinks=True, ignore=shutil.ignore_patterns("calibration.json"))
  return w


def test_calibrate_on_labelled_data_then_predict_intervals(own_workdir, tmp_path, capsys):
  w, data = own_workdir, own_workdir / "data"
  plain = tmp_path / "plain.tsv"
  assert cli(["predict", "--workdir", str(w), "--data", str(data), "--out", str(plain)]) == 0
  assert not conformal.calibration_path(w).exists()
  rows = read_tsv(plain)
  assert "predicted_age_low" not in rows[0]
  # The split column names every subject's part of W/split.json; a warning names the count.
  parts = json.loads((w / "split.json").read_text())["subject_ids"]
  part_of = {s: name for name in ("train", "val", "test") for s in parts[name]}
  assert [r["split"] for r in rows] == [part_of.get(r["participant_id"], "none") for r in rows]
  err = capsys.readouterr().err
  assert f"{len(parts['train'])} subject(s) of the model's training split" in err

  assert cli(["calibrate", "--workdir", str(w), "--data", str(data)]) == 0
  assert conformal.calibration_path(w).is_file()
  out = tmp_path / "cal.tsv"
  assert cli(["predict", "--workdir", str(w), "--data", str(data), "--out", str(out),
              "--level", "0.9"]) == 0
  rows = read_tsv(out)
  age = np.array([float(r["age"]) for r in rows])
  pred = np.array([float(r["predicted_age"]) for r in rows])
  # Replica of the default ("smooth"): cross-fitted scores of the residuals predicted - age
  # scaled by local-linear fits on age, one order statistic ceil((n+1) 0.9) of |z| (numpy).
  # (The calibration scans' values as stored, in their order: the folds follow it.)
  n = len(rows)
  cal = conformal.load_calibration(conformal.calibration_path(w))
  assert cal.method == "smooth" and cal.n == n
  lo, hi = conformal_replica.smooth_bounds(cal.age, cal.predicted - cal.age, age, 0.9)
  np.testing.assert_allclose([float(x["predicted_age_low"]) for x in rows], pred - hi, atol=2e-4)
  np.testing.assert_allclose([float(x["predicted_age_high"]) for x in rows], pred - lo, atol=2e-4)
  # No correction for a single model: the gap interval is the gap minus the same bounds.
  np.testing.assert_allclose([float(x["brain_age_gap_low"]) for x in rows], pred - age - hi,
                             atol=3e-4)
  excludes = (pred - age - hi > 0) | (pred - age - lo < 0)
  assert [x["gap_excludes_zero"] for x in rows] == ["yes" if e else "no" for e in excludes]
  assert all(x["interval_level"] == "0.9" for x in rows)

  # --method mondrian: one bin here (n < 2 * MIN_PER_BIN), two-tailed order statistics
  # floor((n+1) 0.05) and ceil((n+1) 0.95) of the residuals.
  assert n < 2 * conformal.MIN_PER_BIN
  assert cli(["calibrate", "--workdir", str(w), "--data", str(data), "--method", "mondrian"]) == 0
  cal = conformal.load_calibration(conformal.calibration_path(w))
  assert cal.method == "mondrian"
  r = np.sort(cal.predicted - cal.age)
  k_lo, k_hi = math.floor((n + 1) * 0.05), math.ceil((n + 1) * 0.95)
  bounds = cal.intervals(pred, age, pred, np.zeros(n), 0.9)
  np.testing.assert_allclose(bounds["predicted_age_low"],
                             pred - (r[k_hi - 1] if k_hi <= n else np.inf), atol=2e-4)
  np.testing.assert_allclose(bounds["predicted_age_high"],
                             pred - (r[k_lo - 1] if k_lo >= 1 else -np.inf), atol=2e-4)


def test_predict_calibration_option_and_unknown_ages(own_workdir, tmp_path):
  w, data = own_workdir, own_workdir / "data"
  files = sorted(data.glob("sub-*/anat/*_T1w.nii.gz"))[:2]
  out = tmp_path / "list.tsv"
  assert cli(["predict", "--workdir", str(w), "--data", *map(str, files), "--out", str(out),
              "--calibration", str(data)]) == 0
  assert not conformal.calibration_path(w).exists()  # used, not stored
  rows = read_tsv(out)
  assert all(r["brain_age_gap_low"] == "n/a" and r["gap_excludes_zero"] == "n/a" for r in rows)
  assert all(float(r["predicted_age_low"]) < float(r["predicted_age"])
             < float(r["predicted_age_high"]) for r in rows)


def test_calibration_without_ages_is_one_line_error(own_workdir, tmp_path, capsys):
  w, data = own_workdir, own_workdir / "data"
  files = sorted(data.glob("sub-*/anat/*_T1w.nii.gz"))[:2]
  assert cli(["calibrate", "--workdir", str(w), "--data", *map(str, files)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "needs every subject's age" in err[0]
