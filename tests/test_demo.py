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
  np.testing.assert_allclose(summary["r"], scipy.stats.pearsonr(ages, predicted)[0], atol=1e-3)

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


def test_scatter_plot_is_a_png(workdir):
  import matplotlib.image

  path = workdir / demo.SCATTER
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 300 and image.shape[1] > 300
  assert image.std() > 0.01  # not a blank canvas


def test_rerun_reuses_completed_stages(workdir):
  checkpoints = sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir())
  volumes = workdir / "cache" / "volumes.npy"
  image = next((workdir / "data").glob("sub-*/anat/*_T1w.nii.gz"))
  before = {p: p.stat().st_mtime_ns for p in (volumes, image)}
  first = json.loads((workdir / "summary.json").read_text())
  summary = demo.run_demo(workdir, "tiny", overrides=TINY_OVERRIDES, quiet=True, workers=2)
  assert {p: p.stat().st_mtime_ns for p in before} == before
  assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()) == checkpoints
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
