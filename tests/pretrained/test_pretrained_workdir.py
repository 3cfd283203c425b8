"""Imported workdirs used as trained ones: export -> import round trip (identical predictions,
checksum guarded), `brainage predict` / `explain` on an imported MRInet, and an ensemble of
imported models with a head fitted on labelled scans.

The weights are written with h5py in the Keras 2 layout of the study's files (no Keras needed);
the reference predictions apply `models.MRInet` to arrays read here with h5py and to cubes that
`brainage prepare` made, reoriented here with numpy (not the importer's code path)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from jax_brainage import models
from jax_brainage.data import simulate
from jax_brainage.errors import DataError
from jax_brainage.pretrained import workdir as pretrained
from jax_brainage.train import artifact

SHAPE = (32, 32, 32)
_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "dense1", "age_head")


def cli(argv: list[str]) -> int:
  from jax_brainage.cli import main

  return main(argv)


def write_study_h5(path: Path, seed: int) -> dict[str, np.ndarray]:
  """An MRInet in the Keras 2 `model.save` layout (xai4mri's files); returns its params."""
  shapes = models.variable_shapes({"model": "mrinet", "model_kwargs": {},
                                   "image_shape": list(SHAPE), "sequences": ["T1w"]})["params"]
  rng = np.random.default_rng(seed)
  params = {}
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights")
    names = ["conv3d", "max_pooling3d", "conv3d_1", "conv3d_2", "conv3d_3", "conv3d_4",
             "flatten", "dropout", "dense", "dense_1"]
    root.attrs["layer_names"] = np.array([n.encode() for n in names])
    ours = dict(zip(["conv3d", "conv3d_1", "conv3d_2", "conv3d_3", "conv3d_4", "dense",
                     "dense_1"], _LAYERS))
    for name in names:
      group = root.create_group(name)
      if name not in ours:
        group.attrs["weight_names"] = np.array([], dtype="S1")
        continue
      layer = ours[name]
      kernel = rng.normal(0, 0.2, shapes[layer]["kernel"].shape).astype(np.float32)
      bias = rng.normal(0.05, 0.02, shapes[layer]["bias"].shape).astype(np.float32)
      if layer == "age_head":
        bias[:] = 50.0
      params[layer] = {"kernel": kernel, "bias": bias}
      group.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(),
                                              f"{name}/bias:0".encode()])
      group.create_dataset(f"{name}/kernel:0", data=kernel)
      group.create_dataset(f"{name}/bias:0", data=bias)
  return params


def reference(params, cubes_uint8: np.ndarray) -> np.ndarray:
  """The study's net on RAS+ uint8 cubes, reoriented to FreeSurfer's LIA with numpy."""
  lia = np.flip(np.transpose(cubes_uint8, (0, 1, 3, 2, 4)), axis=(1, 2))
  net = models.MRInet()
  x = lia.astype(np.float32) / np.float32(255)
  return np.asarray(jax.jit(net.apply)({"params": params}, x))


def test_export_import_round_trip(tmp_path):
  params = write_study_h5(tmp_path / "t1_model.h5", seed=0)
  w = tmp_path / "W"
  pretrained.import_model("mrinet-keras", tmp_path / "t1_model.h5", w, image_shape=SHAPE,
                          voxel_size=4.0)
  x = np.random.default_rng(0).integers(0, 256, (3, *SHAPE, 1), dtype=np.uint8)
  before = artifact.load(w).predict({"model": x}, batch_size=3).ensemble
  np.testing.assert_allclose(before, reference(params, x), rtol=1e-5)
  assert cli(["export", "--workdir", str(w), "--out", str(tmp_path / "out")]) == 0
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert manifest["sub_ensembles"][0]["model_manifest"]["model_kwargs"]["input_orientation"] == (
      "LIA")
  assert manifest["sub_ensembles"][0]["preprocessing"]["voxel_size"] == 4.0
  assert manifest["provenance"]["imported"]["weights"]["file"] == "t1_model.h5"
  assert cli(["import", "--format", "jax-brainage", "--weights", str(tmp_path / "out"),
              "--workdir", str(tmp_path / "W2")]) == 0
  again = artifact.load(tmp_path / "W2")
  np.testing.assert_array_equal(again.predict({"model": x}, batch_size=3).ensemble, before)
  # An altered weights file is refused, naming it; nothing is left behind.
  shutil.copytree(tmp_path / "out", tmp_path / "bad")
  with open(tmp_path / "bad" / "weights.npz", "r+b") as f:
    f.seek(200)
    f.write(b"\x00\x01\x02")
  with pytest.raises(DataError, match=r"bad/weights\.npz: checksum differs"):
    pretrained.import_export(tmp_path / "bad", tmp_path / "W3")


def test_import_cli_one_line_error_leaves_nothing(tmp_path, capsys):
  (tmp_path / "t1_model.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
  assert cli(["import", "--format", "mrinet-keras", "--weights", str(tmp_path / "t1_model.h5"),
              "--workdir", str(tmp_path / "W")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "t1_model.h5" in err
  assert not (tmp_path / "W").exists()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
  """Eight simulated subjects at 4 mm with T1w and FLAIR (BIDS, ages in participants.tsv)."""
  root = tmp_path_factory.mktemp("cohort") / "data"
  config = simulate.CohortConfig(n=8, resolution_mm=4, sequences=("T1w", "FLAIR"), seed=3)
  simulate.write_cohort(root, config, workers=1)
  return root


def _tsv(path: Path) -> list[dict[str, str]]:
  with open(path, newline="") as fh:
    return list(csv.DictReader(fh, delimiter="\t"))


@pytest.mark.slow
def test_predict_and_explain_on_imported(cohort, tmp_path):
  params = write_study_h5(tmp_path / "t1_model.h5", seed=1)
  w = tmp_path / "W"
  assert cli(["import", "--format", "mrinet-keras", "--weights", str(tmp_path / "t1_model.h5"),
              "--workdir", str(w), "--image-shape", "32,32,32", "--voxel-size", "4"]) == 0
  assert cli(["predict", "--workdir", str(w), "--data", str(cohort), "--out",
              str(tmp_path / "p.tsv"), "--workers", "1"]) == 0
  rows = _tsv(tmp_path / "p.tsv")
  # Reference: the same cubes made by `brainage prepare` with the recorded preprocessing.
  prep = json.loads((w / "import.json").read_text())["preprocessing"]
  assert cli(["prepare", "--data", str(cohort), "--out", str(tmp_path / "cache"),
              "--sequences", "T1w", "--voxel-size", "4", "--shape", "32,32,32",
              "--ceiling-percentile", str(prep["ceiling_percentile"]), "--workers", "1"]) == 0
  index = json.loads((tmp_path / "cache" / "index.json").read_text())
  volumes = np.load(tmp_path / "cache" / "volumes.npy")
  order = [index["subject_ids"].index(r["participant_id"]) if "subject_ids" in index else
           [s["subject_id"] for s in index["subjects"]].index(r["participant_id"]) for r in rows]
  expected = reference(params, volumes[order])
  np.testing.assert_allclose([float(r["predicted_age"]) for r in rows], expected, rtol=1e-4)
  assert cli(["explain", "--workdir", str(w), "--data", str(cohort), "--out",
              str(tmp_path / "maps"), "--subjects", rows[0]["participant_id"], "--figures", "0",
              "--no-glass-brain", "--workers", "1", "--quiet"]) == 0
  assert any((tmp_path / "maps").rglob("*.nii.gz"))


@pytest.mark.slow
def test_ensemble_of_imported_models(cohort, tmp_path):
  members = []
  for seed, sequence in ((2, "T1w"), (3, "FLAIR")):
    write_study_h5(tmp_path / f"{sequence}.h5", seed=seed)
    members.append(tmp_path / sequence)
    pretrained.import_model("mrinet-keras", tmp_path / f"{sequence}.h5", members[-1],
                            sequences=(sequence,), image_shape=SHAPE, voxel_size=4.0)
  w = tmp_path / "E"
  assert cli(["import", "--format", "ensemble", "--members", ",".join(map(str, members)),
              "--calibration-data", str(cohort), "--workdir", str(w), "--folds", "2"]) == 0
  model = artifact.load(w)
  assert [s.name for s in model.subs] == ["T1w", "FLAIR"] and model.n_members == 2
  assert cli(["predict", "--workdir", str(w), "--data", str(cohort), "--out",
              str(tmp_path / "p.tsv"), "--workers", "1"]) == 0
  rows = _tsv(tmp_path / "p.tsv")
  members_pred = np.array([[float(r["pred_T1w_m0"]), float(r["pred_FLAIR_m0"])] for r in rows])
  # The ensemble is the fitted head applied to the members' predictions.
  np.testing.assert_allclose([float(r["predicted_age"]) for r in rows],
                             model.head.apply({"T1w": members_pred[:, :1],
                                               "FLAIR": members_pred[:, 1:]}), atol=2e-3)
