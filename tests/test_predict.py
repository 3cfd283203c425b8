"""`brainage predict` on a tiny trained workdir, against an independent path: the cache's volumes
(np.load), the best checkpoint's parameters (orbax, no project code), and the model applied one
subject at a time with the input scaled in numpy."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jax_brainage import demo, predict
from jax_brainage.errors import BrainAgeError

# A demo small enough for the test budget: 24 subjects at 4 mm, 32^3 cubes, one epoch.
TINY_OVERRIDES = ["--config.data.simulate.n", "24", "--config.num_epochs", "1",
                  "--config.data.image_shape", "(32, 32, 32)", "--config.num_image_summaries", "0"]
_MEMO: dict[str, Path] = {}


def tiny_demo(root: Path) -> Path:
  """Runs the tiny demo once per process (shared with tests/test_demo.py); returns W."""
  if "workdir" not in _MEMO:
    workdir = root / "demo"
    demo.run_demo(workdir, "tiny", overrides=TINY_OVERRIDES, quiet=True, workers=2)
    _MEMO["workdir"] = workdir
  return _MEMO["workdir"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
  return tiny_demo(tmp_path_factory.mktemp("tiny_demo"))


def cli(argv: list[str]) -> int:
  """The `brainage` entry point itself (one-line errors, exit code 2)."""
  from jax_brainage.cli import main

  return main(argv)


def read_tsv(path: Path) -> list[dict[str, str]]:
  with open(path, newline="") as fh:
    return list(csv.DictReader(fh, delimiter="\t"))


def reference_predictions(workdir: Path, rows: np.ndarray, which: str = "best") -> np.ndarray:
  """Predicted ages (years) of cache rows, computed without the project's inference code."""
  import jax
  import orbax.checkpoint as ocp

  from jax_brainage.models import MRInet

  ckpt_root = workdir / "checkpoints" / which
  step = max(int(p.name) for p in ckpt_root.iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore(ckpt_root / str(step) / "state")
  meta = json.loads(next((ckpt_root / str(step) / "meta").glob("*")).read_text())
  kwargs = dict(meta["manifest"]["model_kwargs"])
  assert meta["manifest"]["model"] == "mrinet"
  kwargs.pop("dtype", None)
  model = MRInet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
  params = jax.tree.map(np.asarray, state["params"])
  volumes = np.load(workdir / "cache" / "volumes.npy")  # [n, X, Y, Z, C] uint8
  out = []
  for i in rows:  # one subject at a time, input scaled in numpy
    x = volumes[i:i + 1].astype(np.float64) / 255.0
    out.append(float(np.asarray(model.apply({"params": params}, x.astype(np.float32),
                                            train=False))[0]))
  return np.array(out)


def test_predict_bids_matches_model_applied_to_cache(workdir, tmp_path):
  out = tmp_path / "preds.tsv"
  data = workdir / "data"
  assert cli(["predict", "--workdir", str(workdir), "--data", str(data), "--out", str(out),
              "--batch-size", "3", "--workers", "2"]) == 0
  lines = out.read_text().splitlines()
  assert all(len(line.split("\t")) == 5 and "" not in line.split("\t") for line in lines)
  rows = read_tsv(out)
  participants = read_tsv(data / "participants.tsv")
  assert len(lines) == len(participants) + 1
  assert [r["participant_id"] for r in rows] == [p["participant_id"] for p in participants]
  assert list(rows[0]) == ["participant_id", "session", "age", "predicted_age", "brain_age_gap"]
  index = json.loads((workdir / "cache" / "index.json").read_text())
  cache_row = {s["subject_id"]: i for i, s in enumerate(index["subjects"])}
  expected = reference_predictions(workdir, np.array([cache_row[r["participant_id"]]
                                                      for r in rows]))
  predicted = np.array([float(r["predicted_age"]) for r in rows])
  np.testing.assert_allclose(predicted, expected, atol=2e-3)
  ages = np.array([float(p["age"]) for p in participants])
  np.testing.assert_allclose([float(r["age"]) for r in rows], ages, atol=1e-4)
  np.testing.assert_allclose([float(r["brain_age_gap"]) for r in rows], predicted - ages,
                             atol=2e-4)
  # The model is not constant: a test that a constant predictor would pass proves nothing.
  assert np.ptp(expected) > 1e-3


def test_predict_image_list_and_latest_checkpoint(workdir, tmp_path):
  data = workdir / "data"
  files = sorted(data.glob("sub-*/anat/*_T1w.nii.gz"))[:3]
  out = tmp_path / "list.tsv"
  assert cli(["predict", "--workdir", str(workdir), "--data", *map(str, files), "--out",
              str(out), "--checkpoint", "latest", "--workers", "1"]) == 0
  rows = read_tsv(out)
  ids = [f.name.split("_")[0] for f in files]
  assert [r["participant_id"] for r in rows] == ids
  assert all(r["age"] == "n/a" and r["brain_age_gap"] == "n/a" for r in rows)
  index = json.loads((workdir / "cache" / "index.json").read_text())
  cache_row = {s["subject_id"]: i for i, s in enumerate(index["subjects"])}
  expected = reference_predictions(workdir, np.array([cache_row[i] for i in ids]), "latest")
  np.testing.assert_allclose([float(r["predicted_age"]) for r in rows], expected, atol=2e-3)


def test_predictor_batches_agree_with_single_subjects(workdir):
  trained = predict.load_trained(workdir)
  volumes = np.load(workdir / "cache" / "volumes.npy")[:7]
  batched = predict.Predictor(trained, batch_size=4)(volumes)  # 4 + 3 (padded)
  np.testing.assert_allclose(batched, reference_predictions(workdir, np.arange(7)), atol=1e-3)
  with pytest.raises(BrainAgeError, match=r"\(16, 16, 16\) voxels.*expects \(32, 32, 32\)"):
    predict.Predictor(trained)(np.zeros((2, 16, 16, 16, 1), np.uint8))


def _one_line_error(capsys, argv: list[str], pattern: str) -> str:
  assert cli(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert pattern in err, err
  return err


def test_workdir_without_model(capsys, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  _one_line_error(capsys, ["predict", "--workdir", str(empty), "--data", str(tmp_path),
                           "--out", str(tmp_path / "p.tsv")], "no trained model")
  assert not (tmp_path / "p.tsv").exists()


def test_data_with_other_sequences(workdir, capsys, tmp_path):
  # A BIDS dataset holding FLAIR images only, for a model trained on T1w.
  other = tmp_path / "flair"
  src = workdir / "data"
  (other / "sub-0001" / "anat").mkdir(parents=True)
  shutil.copy(src / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz",
              other / "sub-0001" / "anat" / "sub-0001_FLAIR.nii.gz")
  (other / "participants.tsv").write_text("participant_id\tage\nsub-0001\t50\n")
  out = tmp_path / "p.tsv"
  _one_line_error(capsys, ["predict", "--workdir", str(workdir), "--data", str(other),
                           "--out", str(out)], "sub-0001")
  _one_line_error(capsys, ["predict", "--workdir", str(workdir), "--data", str(other),
                           "--out", str(out), "--sequences", "FLAIR"], "T1w")
  assert not out.exists()


def test_data_with_other_voxel_size(workdir, capsys, tmp_path):
  src = workdir / "data" / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz"
  img = nib.load(src)
  affine = img.affine.copy()
  affine[:3, :3] /= 2  # 2 mm voxels: a cube counted in voxels would cover another brain extent
  path = tmp_path / "sub-x_T1w.nii.gz"
  nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), path)
  _one_line_error(capsys, ["predict", "--workdir", str(workdir), "--data", str(path), "--out",
                           str(tmp_path / "p.tsv")], "voxel size")
