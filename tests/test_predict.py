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

from jax_brainage import demo, integrity, predict
from jax_brainage.errors import BrainAgeError
from jax_brainage.train import artifact

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
  """A single-model T1w workdir with `cache` and `data` beside its checkpoints: the tiny demo's
  when the tiny preset trains one model on T1w, else one epoch of such a model trained on the
  demo's cache (cache and data linked in)."""
  demo_dir = tiny_demo(tmp_path_factory.mktemp("tiny_demo"))
  record = json.loads((demo_dir / "config.json").read_text())["config"]
  if not artifact.is_ensemble_workdir(demo_dir) and tuple(record["data"]["sequences"]) == ("T1w",):
    return demo_dir
  from jax_brainage.train import config_loading
  from jax_brainage.train import trainer

  w = tmp_path_factory.mktemp("single") / "W"
  c = config_loading.load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))
  c.data.simulate.n = int(record["data"]["simulate"]["n"])
  c.data.simulate.out = str(demo_dir / "data")
  c.data.cache = str(demo_dir / "cache")
  c.data.image_shape = (32, 32, 32)
  c.data.sequences = ("T1w",)
  c.ensemble.members = 1
  c.ensemble.sub_ensembles = ()
  c.num_epochs = 1
  c.num_image_summaries = 0
  trainer.train_and_evaluate(c, w, quiet=True)
  (w / "cache").symlink_to(demo_dir / "cache")
  (w / "data").symlink_to(demo_dir / "data")
  return w


def model_channels(workdir: Path) -> list[int]:
  """The cache channels the workdir's model reads."""
  index = json.loads((workdir / "cache" / "index.json").read_text())
  return [index["sequences"].index(q) for q in artifact.load(workdir).subs[0].sequences]


def cli(argv: list[str]) -> int:
  """The `brainage` entry point itself (one-line errors, exit code 2)."""
  from jax_brainage.cli import main

  return main(argv)


def read_tsv(path: Path) -> list[dict[str, str]]:
  with open(path, newline="") as fh:
    return list(csv.DictReader(fh, delimiter="\t"))


def reference_predictions(workdir: Path, rows: np.ndarray, which: str = "best",
                          transform=None) -> np.ndarray:
  """Predicted ages (years) of cache rows, computed without the project's inference code
  (`transform` changes the parameters first)."""
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
  kwargs["conv_lowering"] = "xla"  # the reference is XLA's convolution, whatever was trained
  model = MRInet(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
  params = jax.tree.map(np.asarray, state["params"])
  if transform is not None:
    params = transform(params)
  volumes = np.load(workdir / "cache" / "volumes.npy")  # [n, X, Y, Z, C] uint8 or float16
  index = json.loads((workdir / "cache" / "index.json").read_text())
  volumes = volumes[..., [index["sequences"].index(q) for q in meta["manifest"]["sequences"]]]
  out = []
  for i in rows:  # one subject at a time, input scaled in numpy
    # minmax caches hold uint8 (network input / 255), zscore caches float16 (used as stored)
    x = volumes[i:i + 1].astype(np.float64)
    x = x / 255.0 if volumes.dtype == np.uint8 else x
    out.append(float(np.asarray(model.apply({"params": params}, x.astype(np.float32),
                                            train=False))[0]))
  return np.array(out)


def test_predict_bids_matches_model_applied_to_cache(workdir, tmp_path):
  out = tmp_path / "preds.tsv"
  data = workdir / "data"
  assert cli(["predict", "--workdir", str(workdir), "--data", str(data), "--out", str(out),
              "--batch-size", "3", "--workers", "2"]) == 0
  lines = out.read_text().splitlines()
  # The last column, qc_flags, is empty for a scan like the training data.
  width = len(lines[0].split("\t"))
  assert all(len(line.split("\t")) == width and "" not in line.split("\t")[:-1]
             for line in lines)
  rows = read_tsv(out)
  participants = read_tsv(data / "participants.tsv")
  assert len(lines) == len(participants) + 1
  assert [r["participant_id"] for r in rows] == [p["participant_id"] for p in participants]
  # A single model's columns; the workdir's split adds `split` (and a calibration its
  # intervals); the conformity gate's `qc_flags` comes last.
  assert list(rows[0])[:5] == ["participant_id", "session", "age", "predicted_age",
                               "brain_age_gap"]
  assert list(rows[0])[-2:] == ["split", "qc_flags"]
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


def test_batches_agree_with_single_subjects(workdir):
  model = artifact.load(workdir)
  volumes = np.load(workdir / "cache" / "volumes.npy")[:7][..., model_channels(workdir)]
  batched = model.predict(volumes, batch_size=4).ensemble  # 4 + 3 (padded)
  np.testing.assert_allclose(batched, reference_predictions(workdir, np.arange(7)), atol=1e-3)
  with pytest.raises(BrainAgeError, match=r"expects \[n, 32, 32, 32, 1\].*got \[2, 16, 16, 16"):
    model.predict(np.zeros((2, 16, 16, 16, 1), np.uint8))


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


def test_conformity_gate(workdir, capsys, tmp_path):
  """A training scan passes; the same scan in other scanner units (x4) is flagged
  intensity_scale: the same predicted age (min-max scaling hides the change from the model),
  a warning, the qc_flags column and the QC table; --strict-qc refuses it, writing nothing."""
  cache = workdir / "cache"
  assert (cache / "conformity.npz").is_file() and (cache / "conformity.json").is_file()
  qc_rows = read_tsv(cache / "qc.tsv")
  index = json.loads((cache / "index.json").read_text())
  assert [r["participant_id"] for r in qc_rows] == [s["subject_id"] for s in index["subjects"]]
  clean_id = next(r["participant_id"] for r in qc_rows if not r["qc_flags"])
  src = nib.load(workdir / "data" / clean_id / "anat" / f"{clean_id}_T1w.nii.gz")
  data = np.asarray(src.dataobj, np.float32)
  root = tmp_path / "new"
  for sid, scale in (("sub-clean", 1.0), ("sub-units", 4.0)):
    (root / sid / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(data * scale, src.affine), root / sid / "anat" / f"{sid}_T1w.nii.gz")
  (root / "participants.tsv").write_text("participant_id\tage\nsub-clean\t50\nsub-units\t50\n")
  out = tmp_path / "preds.tsv"
  assert cli(["predict", "--workdir", str(workdir), "--data", str(root), "--out", str(out),
              "--workers", "1"]) == 0
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "sub-units" in warnings[0] and "raw_intensity" in warnings[0]
  rows = {r["participant_id"]: r for r in read_tsv(out)}
  assert rows["sub-clean"]["qc_flags"] == "" and rows["sub-units"]["qc_flags"] == "intensity_scale"
  assert rows["sub-clean"]["predicted_age"] == rows["sub-units"]["predicted_age"]
  table = {r["participant_id"]: r for r in read_tsv(tmp_path / "preds.qc.tsv")}
  assert float(table["sub-units"]["raw_intensity"]) == pytest.approx(
      4 * float(table["sub-clean"]["raw_intensity"]), rel=1e-4)
  strict = tmp_path / "strict.tsv"
  _one_line_error(capsys, ["predict", "--workdir", str(workdir), "--data", str(root), "--out",
                           str(strict), "--strict-qc", "--workers", "1"], "sub-units")
  assert not strict.exists() and not (tmp_path / "strict.qc.tsv").exists()


# ---------------------------------------------------------------------------------------------
# Ensemble workdirs: sub-ensembles built from the tiny demo's trained model (one sub-ensemble of
# that member, one of it and a perturbed copy), head and correction fit on the non-test rows.


def _perturb(params):
  """A second member: the trained one with its hidden layer reweighted."""
  import jax

  params = jax.tree.map(np.array, params)
  # Not an affine function of the trained member (that would make the head's least squares
  # degenerate): rescale the hidden units unevenly.
  k = params["dense1"]["kernel"]
  params["dense1"]["kernel"] = k * np.random.default_rng(0).uniform(0.5, 1.5, k.shape[-1])
  return params


@pytest.fixture(scope="session")
def ensemble_workdir(workdir, tmp_path_factory):
  import dataclasses

  import jax

  from jax_brainage.data import splits
  from jax_brainage.ensemble import model as ensemble_model
  from jax_brainage.ensemble import store

  one = artifact.load_sub_ensemble("all", workdir)
  two = dataclasses.replace(one, name="t1x2", members=2, variables=jax.tree.map(
      lambda a, b: np.concatenate([a, b]), one.variables,
      {"params": jax.tree.map(lambda a: a[None], _perturb(one.member_variables(0)["params"]))}))
  index = json.loads((workdir / "cache" / "index.json").read_text())
  split = splits.load_split(workdir / "split.json", [s["subject_id"] for s in index["subjects"]])
  rows = np.sort(np.concatenate([split.train, split.val]))
  volumes = np.load(workdir / "cache" / "volumes.npy")[rows][..., model_channels(workdir)]
  ages = np.array([index["subjects"][i]["age"] for i in rows], np.float64)
  ens = ensemble_model.fit_ensemble((one, two), {"all": volumes, "t1x2": volumes}, ages, folds=4,
                           correction="linear", batch_size=4)
  w = tmp_path_factory.mktemp("ensemble") / "W"
  store.save_ensemble(w, ens)
  return w


def test_predict_ensemble_workdir(workdir, ensemble_workdir, tmp_path):
  from jax_brainage.ensemble import store

  out = tmp_path / "ens.tsv"
  data = workdir / "data"
  assert cli(["predict", "--workdir", str(ensemble_workdir), "--data", str(data), "--out",
              str(out), "--batch-size", "5", "--workers", "2"]) == 0
  rows = read_tsv(out)
  assert list(rows[0]) == [
      "participant_id", "session", "age", "predicted_age", "brain_age_gap",
      "predicted_age_corrected", "brain_age_gap_corrected", "uncertainty", "pred_all",
      "pred_t1x2", "pred_all_m0", "pred_t1x2_m0", "pred_t1x2_m1", "qc_flags"]
  participants = read_tsv(data / "participants.tsv")
  assert [r["participant_id"] for r in rows] == [p["participant_id"] for p in participants]
  index = json.loads((workdir / "cache" / "index.json").read_text())
  cache_row = {s["subject_id"]: i for i, s in enumerate(index["subjects"])}
  order = np.array([cache_row[r["participant_id"]] for r in rows])
  trained = reference_predictions(workdir, order)
  perturbed = reference_predictions(workdir, order, transform=_perturb)
  col = lambda name: np.array([float(r[name]) for r in rows])  # noqa: E731
  np.testing.assert_allclose(col("pred_all_m0"), trained, atol=2e-3)
  np.testing.assert_allclose(col("pred_t1x2_m0"), trained, atol=2e-3)
  np.testing.assert_allclose(col("pred_t1x2_m1"), perturbed, atol=2e-3)
  assert np.ptp(perturbed - trained) > 0.1
  # Head and correction as fit (their maths are tested in tests/ensemble): applied to the
  # reference member predictions they give the TSV's ensemble columns.
  ens = store.load_ensemble(ensemble_workdir)
  members = {"all": trained[:, None], "t1x2": np.stack([trained, perturbed], 1)}
  expected = ens.head.apply(members)
  # Member predictions agree to ~2e-3 years; the head's weights scale that.
  tol = 2e-3 * sum(np.abs(w).sum() for w in ens.member_weights().values()) + 1e-4
  np.testing.assert_allclose(col("predicted_age"), expected, atol=tol)
  subs = ens.head.sub_predictions(members)
  np.testing.assert_allclose(col("pred_all"), subs["all"], atol=tol)
  np.testing.assert_allclose(col("pred_t1x2"), subs["t1x2"], atol=tol)
  ages = np.array([float(p["age"]) for p in participants])
  np.testing.assert_allclose(col("brain_age_gap"), expected - ages, atol=tol)
  a, b = ens.correction.coefficients[:2]
  bias = a + b * (ages - ens.correction.center) / ens.correction.scale  # linear in age
  np.testing.assert_allclose(col("predicted_age_corrected"), expected - bias, atol=tol)
  np.testing.assert_allclose(col("brain_age_gap_corrected"), expected - bias - ages, atol=tol)
  assert np.ptp(bias) > 0.1  # the correction does something
  np.testing.assert_allclose(col("uncertainty"),
                             np.std(np.stack([trained, trained, perturbed]), 0, ddof=1),
                             atol=2e-3)


def test_predict_ensemble_errors(workdir, ensemble_workdir, capsys, tmp_path):
  w = tmp_path / "W"
  shutil.copytree(ensemble_workdir, w)
  argv = ["predict", "--workdir", str(w), "--data", str(workdir / "data"), "--out",
          str(tmp_path / "p.tsv")]
  _one_line_error(capsys, argv + ["--checkpoint", "latest"], "best validation epoch only")
  # The training cache was prepared again with another shape since the ensemble was trained.
  meta = w / "ensemble" / "manifest" / "metadata"
  manifest = json.loads(meta.read_text())
  manifest["sub_ensembles"][1]["preprocessing"]["shape"] = [16, 16, 16]
  meta.write_text(json.dumps(manifest))
  # The edit itself fails the store's checksums (naming the manifest); sealed again, it stands
  # for a store whose training cache was prepared again.
  _one_line_error(capsys, argv, f"{meta.resolve()}: ")
  integrity.seal(w / "ensemble")
  err = _one_line_error(capsys, argv, "preprocessing shape is [32, 32, 32] now")
  assert "t1x2" in err
  assert not (tmp_path / "p.tsv").exists()


def test_predict_with_pose_averaging_and_the_calibration_it_was_made_with(workdir, capsys,
                                                                          tmp_path):
  from jax_brainage.data import augment

  data = workdir / "data"
  files = sorted(data.glob("sub-*/anat/*_T1w.nii.gz"))[:3]
  ids = [f.name.split("_")[0] for f in files]
  out = tmp_path / "tta.tsv"
  assert cli(["predict", "--workdir", str(workdir), "--data", *map(str, files), "--out",
              str(out), "--workers", "1", "--tta", "3"]) == 0
  assert "each estimate averaged over 3 poses within 5 degrees" in capsys.readouterr().out
  model = artifact.load(workdir)
  index = json.loads((workdir / "cache" / "index.json").read_text())
  cache_row = {s["subject_id"]: i for i, s in enumerate(index["subjects"])}
  volumes = np.load(workdir / "cache" / "volumes.npy")[[cache_row[i] for i in ids]]
  expected = model.predict(volumes[..., model_channels(workdir)],
                           pose_average=augment.PoseAverage(3)).ensemble
  np.testing.assert_allclose([float(r["predicted_age"]) for r in read_tsv(out)], expected,
                             atol=2e-3)
  # A calibration made without the poses: intervals come with a one-line warning; made with
  # them, none. (A copy of the workdir: the calibration is written into it.)
  w = tmp_path / "W"
  shutil.copytree(workdir, w, symlinks=True)
  argv = ["predict", "--workdir", str(w), "--data", *map(str, files), "--out", str(out),
          "--workers", "1", "--tta", "3"]
  for tta, warned in (("1", True), ("3", False)):
    assert cli(["calibrate", "--workdir", str(w), "--workers", "1", "--tta", tta]) == 0
    capsys.readouterr()
    assert cli(argv) == 0
    err = capsys.readouterr().err
    assert ("was predicted without test-time augmentation, these with test-time augmentation "
            "(3 poses within 5 degrees and 1 voxel (seed 0))" in err) is warned, err
  assert cli(["predict", "--workdir", str(w), "--data", str(files[0]), "--out", str(out),
              "--tta", "0"]) == 2
  assert "--tta 0 --tta-degrees 5 --tta-voxels 1: poses must be a positive integer" in (
      capsys.readouterr().err)
