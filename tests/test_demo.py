"""`brainage demo` end to end on the tiny preset (shrunk further for the test budget): summary
values recomputed from the predictions TSV and the simulator's cohort.json, the plot, reuse of
completed stages, and a one-line error for a workdir of another preset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from jax_brainage import demo
from test_predict import TINY_OVERRIDES, cli, read_tsv, tiny_demo


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
  return tiny_demo(tmp_path_factory.mktemp("tiny_demo"))


def test_summary_agrees_with_predictions_and_ground_truth(workdir):
  summary = json.loads((workdir / "summary.json").read_text())
  for key in demo.SUMMARY_KEYS:
    assert key in summary, key
  assert summary["preset"] == "tiny"
  assert summary["data_dir"] == str(workdir / "data")

  rows = read_tsv(workdir / demo.PREDICTIONS)
  ages = np.array([float(r["age"]) for r in rows])
  predicted = np.array([float(r["predicted_age"]) for r in rows])
  np.testing.assert_allclose(summary["mae"], np.mean(np.abs(predicted - ages)), atol=1e-3)
  np.testing.assert_allclose(summary["rmse"], np.sqrt(np.mean((predicted - ages) ** 2)),
                             atol=1e-3)
  if np.std(predicted) > 0:
    np.testing.assert_allclose(summary["r"], scipy.stats.pearsonr(ages, predicted)[0],
                               atol=1e-3)
  else:  # a head that weighs every member 0 predicts its intercept: r is undefined
    assert summary["r"] is None

  # 24 subjects split 80/10/10 by largest remainders: 19 / 3 / 2 (or 20 / 2 / 2).
  n = int(TINY_OVERRIDES[TINY_OVERRIDES.index("--config.data.simulate.n") + 1])
  assert summary["n_train"] + summary["n_val"] + summary["n_test"] == n
  assert summary["n_test"] == len(rows) >= 2
  assert abs(summary["n_train"] - 0.8 * n) < 1 and abs(summary["n_test"] - 0.1 * n) < 1

  # The test subjects are the ones the trainer held out (never trained or validated on).
  split_path = workdir / "split.json"
  if split_path.exists():
    split = json.loads(split_path.read_text())["subject_ids"]
    ids = [r["participant_id"] for r in rows]
    assert sorted(ids) == sorted(split["test"])
    assert not set(ids) & (set(split["train"]) | set(split["val"]))

  # Test subjects are simulated ones, with the simulator's ages; the oracle is the simulator's.
  participants = {p["participant_id"]: float(p["age"])
                  for p in read_tsv(workdir / "data" / "participants.tsv")}
  for r in rows:
    assert float(r["age"]) == pytest.approx(participants[r["participant_id"]], abs=1e-4)
  cohort = json.loads((workdir / "data" / "derivatives" / "simulation" / "cohort.json")
                      .read_text())
  assert summary["oracle_mae"] == pytest.approx(cohort["oracle_mae"])
  assert 0 < summary["oracle_mae"] < 10
  assert summary["train_seconds"] > 0
  assert summary["volumes_per_second"] is None or summary["volumes_per_second"] > 0
  assert all(math.isfinite(v) for v in predicted)
  # Predictions are ages of adults, not a diverged model.
  assert np.all((predicted > 0) & (predicted < 150))


def test_ensemble_summary_agrees_with_member_columns(workdir):
  """The ensemble fields recomputed from the TSV's member, ensemble and corrected columns."""
  summary = json.loads((workdir / "summary.json").read_text())
  rows = read_tsv(workdir / demo.PREDICTIONS)
  ages = np.array([float(r["age"]) for r in rows])
  ensemble = np.array([float(r["predicted_age"]) for r in rows])
  corrected = np.array([float(r["predicted_age_corrected"]) for r in rows])
  members = np.array([[float(r[k]) for k in r if k.startswith("pred_all_m")] for r in rows])
  assert members.shape == (len(rows), 2) == (len(rows), summary["n_members"])
  np.testing.assert_allclose(summary["mae_ensemble"], np.mean(np.abs(ensemble - ages)), atol=1e-3)
  np.testing.assert_allclose(summary["mae_best_member"],
                             np.min(np.mean(np.abs(members - ages[:, None]), axis=0)), atol=1e-3)
  np.testing.assert_allclose(summary["mae_corrected"], np.mean(np.abs(corrected - ages)),
                             atol=1e-3)
  rho = scipy.stats.spearmanr(ensemble - ages, ages)[0]
  if np.isfinite(rho):
    np.testing.assert_allclose(summary["spearman_gap_age"], rho, atol=1e-6)
  # Uncertainty is the members' spread (SD, ddof 1 over the member columns).
  spread = np.array([float(r["uncertainty"]) for r in rows])
  np.testing.assert_allclose(spread, np.std(members, axis=1, ddof=1), atol=1e-3)


def test_explanations_scores_and_report(workdir):
  """Relevance scores in [0, 1], maps in subject space, and a report whose images exist."""
  import nibabel as nib

  summary = json.loads((workdir / "summary.json").read_text())
  for key in ("relevance_mass_accuracy", "relevance_rank_accuracy",
              "gradient_relevance_mass_accuracy", "gradient_relevance_rank_accuracy"):
    assert summary[key] is None or 0.0 <= summary[key] <= 1.0, key
  assert "risk_effects" in summary and (summary["risk_effects"] or summary["risk_analysis"])
  maps = sorted((workdir / "explain").glob("sub-*/anat/*model-ensemble*_relevance.nii.gz"))
  assert maps, "no subject-space ensemble maps"
  sub = maps[0].name.split("_")[0]
  t1 = nib.load(next((workdir / "data" / sub / "anat").glob("*_T1w.nii.gz")))
  relevance = nib.load(maps[0])
  assert relevance.shape == t1.shape  # the subject's own grid and affine
  np.testing.assert_allclose(relevance.affine, t1.affine, atol=1e-5)
  index = workdir / "report" / "index.html"
  html = index.read_text()
  images = [line.split('src="')[1].split('"')[0] for line in html.split("<img")[1:]]
  assert images and all((index.parent / src).is_file() for src in images)
  assert summary["report"] == "report/index.html"


def test_best_step_is_the_best_checkpoint(workdir):
  """summary best_step (was null for ensembles) names the step of the best checkpoint on disk."""
  summary = json.loads((workdir / "summary.json").read_text())
  best = workdir / "sub" / "all" / "checkpoints" / "best"
  steps = sorted(int(p.name) for p in best.iterdir() if p.name.isdigit())
  assert steps, "no best checkpoint"
  assert summary["best_step"] == steps[-1]
  assert summary["best_steps"] == {"all": steps[-1]}


def test_scatter_plot_is_a_png(workdir):
  import matplotlib.image

  path = workdir / demo.SCATTER
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 300 and image.shape[1] > 300
  assert image.std() > 0.01  # not a blank canvas


def test_rerun_reuses_completed_stages(workdir):
  latest = workdir / "sub" / "all" / "checkpoints" / "latest"  # the ensemble's one sub-ensemble
  checkpoints = sorted(p.name for p in latest.iterdir())
  volumes = workdir / "cache" / "volumes.npy"
  # The tiny preset prepares z-scored cubes (its data.scaling), stored as float16.
  cache_index = json.loads((workdir / "cache" / "index.json").read_text())
  assert cache_index["scaling"] == "zscore" and np.load(volumes, mmap_mode="r").dtype == np.float16
  image = next((workdir / "data").glob("sub-*/anat/*_T1w.nii.gz"))
  before = {p: p.stat().st_mtime_ns for p in (volumes, image)}
  first = json.loads((workdir / "summary.json").read_text())
  summary = demo.run_demo(workdir, "tiny", overrides=TINY_OVERRIDES, quiet=True, workers=2)
  assert {p: p.stat().st_mtime_ns for p in before} == before
  assert sorted(p.name for p in latest.iterdir()) == checkpoints
  assert summary["mae"] == pytest.approx(first["mae"], abs=1e-6)
  assert summary["train_seconds"] == pytest.approx(first["train_seconds"])


def test_workdir_of_another_preset_is_refused(workdir, capsys):
  argv = ["demo", "--workdir", str(workdir), "--preset", "cpu", "--quiet"]
  assert cli(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "'tiny' preset" in err, err


def test_workdir_of_another_training_run_is_refused(tmp_path, capsys):
  # A workdir holding some other training run is not silently taken over by the demo.
  (tmp_path / "config.json").write_text('{"fingerprint": {}, "config": {}}')
  assert cli(["demo", "--workdir", str(tmp_path), "--preset", "tiny", "--quiet"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "not a demo" in err, err


def test_default_preset_follows_the_backend():
  import jax

  assert demo.default_preset() == ("cpu" if jax.default_backend() == "cpu" else "gpu")


def test_summary_interval_coverage_agrees_with_the_predictions_tsv(workdir):
  summary = json.loads((workdir / "summary.json").read_text())
  rows = read_tsv(workdir / demo.PREDICTIONS)
  assert (workdir / "calibration.json").is_file()  # calibrated on the validation split
  ages = np.array([float(r["age"]) for r in rows])
  low = np.array([float(r["predicted_age_low"]) for r in rows])
  high = np.array([float(r["predicted_age_high"]) for r in rows])
  assert summary["interval_coverage"] == pytest.approx(np.mean((ages >= low) & (ages <= high)))
  width = np.mean(high - low)
  assert (summary["interval_width"] is None) == (not math.isfinite(width))
  if math.isfinite(width):
    assert summary["interval_width"] == pytest.approx(width, rel=1e-4)
  assert all(r["split"] == "test" for r in rows)
