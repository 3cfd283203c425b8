"""`brainage explain` end to end on a tiny trained workdir, against independent references: the
cache's volumes (np.load), lrp.relevance on the restored parameters, a world-coordinate replica
of the inverse preprocessing, the atlas read with nibabel, and participants.tsv."""

from __future__ import annotations

import argparse
import csv
import json
import math
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

import lrp
from jax_brainage import predict
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.explain import command, maps


def explain_cli(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  command.add_parser(parser.add_subparsers())
  args = parser.parse_args(["explain", *argv])
  return args.func(args)


def read_tsv(path: Path) -> list[dict[str, str]]:
  with open(path, newline="") as fh:
    return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def explained(explain_workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("explained") / "maps"
  assert explain_cli(["--workdir", str(explain_workdir), "--data",
                      str(explain_workdir / "data"), "--out", str(out), "--batch-size", "4",
                      "--figures", "2", "--workers", "2", "--quiet"]) == 0
  return out, json.loads((out / command.INDEX).read_text())


def _cube_to_subject(cube: np.ndarray, cube_affine: np.ndarray, img) -> np.ndarray:
  """Replica of the inverse preprocessing: each subject voxel takes the cube voxel at its world
  point (0 outside the cube)."""
  ijk = np.indices(img.shape).reshape(3, -1)
  world = img.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
  c = np.rint(np.linalg.inv(cube_affine) @ world)[:3].astype(int)
  inside = np.all((c >= 0) & (c < np.array(cube.shape)[:, None]), axis=0)
  out = np.zeros(ijk.shape[1], np.float32)
  out[inside] = cube[tuple(c[:, inside])]
  return out.reshape(img.shape)


def _cube_affine(inverse: dict) -> np.ndarray:
  """Cube voxel -> world (mm) from a cache index's inverse record: grid affine after the shift."""
  shift = np.eye(4)
  shift[:3, 3] = inverse["offset"]
  return np.asarray(inverse["grid_affine"], np.float64) @ shift


def test_subject_maps_match_lrp_in_the_subject_space(explain_workdir, explained):
  out, index = explained
  data = explain_workdir / "data"
  participants = read_tsv(data / "participants.tsv")
  assert [s["participant_id"] for s in index["subjects"]] == [
      p["participant_id"] for p in participants]
  assert index["method"] == maps.DEFAULT_METHOD and index["model"]["kind"] == "single"
  cache_index = json.loads((explain_workdir / "cache" / "index.json").read_text())
  rows = {s["subject_id"]: (i, s) for i, s in enumerate(cache_index["subjects"])}
  volumes = np.load(explain_workdir / "cache" / "volumes.npy")
  trained = predict.load_trained(explain_workdir)
  chosen = ["sub-0002", "sub-0007"]
  x = jnp.asarray(volumes[[rows[s][0] for s in chosen]].astype(np.float32) / np.float32(255))
  reference = np.asarray(jax.jit(lambda v, x: lrp.relevance(
      lambda v, u: trained.model.apply(v, u, train=False), v, x,
      composite=lrp.composites.EpsilonPlusFlat()))(trained.variables, x))
  forward = np.asarray(trained.model.apply(trained.variables, x, train=False))
  assert np.abs(reference).max() > 0
  for k, sid in enumerate(chosen):
    entry = next(s for s in index["subjects"] if s["participant_id"] == sid)
    (path,) = entry["maps"]["mrinet"]
    assert path == f"{sid}/anat/{sid}_model-mrinet_seq-T1w_relevance.nii.gz"
    written = nib.load(out / path)
    source = nib.load(data / sid / "anat" / f"{sid}_T1w.nii.gz")
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    expected = _cube_to_subject(reference[k, ..., 0], _cube_affine(rows[sid][1]["inverse"]),
                                source)
    np.testing.assert_allclose(np.asarray(written.dataobj), expected, rtol=1e-4, atol=1e-8)
    assert entry["predicted_age"] == pytest.approx(float(forward[k]), abs=2e-3)
    assert entry["relevance_sum"] == pytest.approx(float(reference[k].sum()), rel=1e-4, abs=1e-6)


def test_region_tables_and_group_maps(explain_workdir, explained):
  out, index = explained
  data = explain_workdir / "data"
  atlas = nib.load(data / "derivatives" / "simulation" / "atlas.nii.gz")
  labels = np.asarray(atlas.dataobj).astype(int)
  names = {int(r["index"]): r["name"] for r in read_tsv(
      data / "derivatives" / "simulation" / "atlas.tsv")}
  participants = read_tsv(data / "participants.tsv")
  subject_maps = {}
  for p in participants:
    sid = p["participant_id"]
    img = nib.load(out / sid / "anat" / f"{sid}_model-mrinet_seq-T1w_relevance.nii.gz")
    np.testing.assert_array_equal(img.affine, atlas.affine)  # one template grid: exact labels
    subject_maps[sid] = np.asarray(img.dataobj, np.float64)
  cache_index = json.loads((explain_workdir / "cache" / "index.json").read_text())
  inverses = {s["subject_id"]: s["inverse"] for s in cache_index["subjects"]}
  rows = read_tsv(out / "regions" / "relevance_regions.tsv")
  assert len(rows) == len(participants) * len(names)
  for row in rows[:: 7]:
    sid = row["participant_id"]
    r, label = subject_maps[sid], int(row["label"])
    assert row["region"] == names[label]
    inside = r[labels == label]
    # The 128 mm cube crops the 4 mm template: voxels are counted where the network looked.
    covered = _cube_to_subject(np.ones(inverses[sid]["cube_shape"], np.float32),
                               _cube_affine(inverses[sid]), atlas) > 0
    assert int(row["voxels"]) == np.sum((labels == label) & covered) > 0
    assert float(row["mean"]) == pytest.approx(r[(labels == label) & covered].mean(), rel=1e-4,
                                               abs=1e-10)
    assert float(row["sum"]) == pytest.approx(inside.sum(), rel=1e-4, abs=1e-8)
    assert float(row["positive"]) == pytest.approx(inside[inside > 0].sum(), rel=1e-4, abs=1e-8)
    assert float(row["positive_fraction"]) == pytest.approx(
        inside[inside > 0].sum() / r[r > 0].sum(), rel=1e-4)

  # Group maps on the template grid: the mean of the subjects' maps.
  groups = {(g["group"], g["value"]): g for g in index["groups"]}
  everyone = groups[("all", "all")]
  assert everyone["n"] == len(participants) and everyone["space"] == "template"
  img = nib.load(out / everyone["maps"][0])
  np.testing.assert_array_equal(img.affine, atlas.affine)
  np.testing.assert_allclose(np.asarray(img.dataobj), np.mean(list(subject_maps.values()), 0),
                             rtol=1e-5, atol=1e-9)
  by_band: dict[str, list[str]] = {}
  for p in participants:
    lo = math.floor(float(p["age"]) / 10) * 10
    by_band.setdefault(f"{lo}to{lo + 10}", []).append(p["participant_id"])
  for band, ids in by_band.items():
    g = groups[("age", band)]
    assert g["n"] == len(ids)
    np.testing.assert_allclose(np.asarray(nib.load(out / g["maps"][0]).dataobj),
                               np.mean([subject_maps[i] for i in ids], 0), rtol=1e-5, atol=1e-9)
  smokers = [p["participant_id"] for p in participants if float(p["smoking"]) == 1]
  assert groups[("smoking", "1")]["n"] == len(smokers)
  assert {("bmi", "low"), ("bmi", "high"), ("sex", "F")} <= set(groups)
  group_rows = read_tsv(out / "regions" / "group_regions.tsv")
  g = next(r for r in group_rows if r["group"] == "all" and r["label"] == "1")
  per = [float(r["sum"]) for r in rows if r["label"] == "1"]
  assert float(g["sum_mean"]) == pytest.approx(np.mean(per), rel=1e-4)

  # Figures (subjects, groups, glass brain), TensorBoard, and no temporary left anywhere.
  assert len([s for s in index["subjects"] if s.get("figures")]) == 2
  for f in index["figures"]:
    assert matplotlib.image.imread(out / f).ndim == 3
  assert any(f.endswith("_glassbrain.png") for f in index["figures"])
  assert list((out / "tensorboard").glob("events.out.tfevents.*"))
  assert not [p for p in out.rglob(".*")]
  description = json.loads((out / "dataset_description.json").read_text())
  assert description["DatasetType"] == "derivative"


def test_subject_selection_and_errors(explain_workdir, tmp_path):
  target = command.Target(explain_workdir, "best", maps.get_method("gradient_x_input"),
                          batch_size=4, seed=0, levels=command.LEVELS)
  dataset = predict.read_dataset([explain_workdir / "data"], target.required_sequences)
  index = command.explain_dataset(target, dataset, tmp_path / "two",
                                  subjects=["0003", "sub-0001"], n_figures=0,
                                  glass_brain=False, quiet=True, age_band=0)
  assert [s["participant_id"] for s in index["subjects"]] == ["sub-0003", "sub-0001"]
  assert sorted(p.name for p in (tmp_path / "two").glob("sub-*")) == ["sub-0001", "sub-0003"]
  assert not index["tables"] and not (tmp_path / "two" / "regions").exists()  # no atlas given
  assert not any(g["group"] == "age" for g in index["groups"])
  with pytest.raises(DataError, match="sub-0099"):
    command.explain_dataset(target, dataset, tmp_path / "x", subjects=["sub-0099"], quiet=True)
  with pytest.raises(ConfigError, match="nosuch"):
    command.explain_dataset(target, dataset, tmp_path / "x", group_columns=["nosuch"],
                            quiet=True)
  base = ["--workdir", str(explain_workdir), "--data", str(explain_workdir / "data"), "--out",
          str(tmp_path / "y")]
  with pytest.raises(ConfigError, match="--composite"):
    explain_cli(base + ["--composite", "lrp_magic"])
  with pytest.raises(ConfigError, match="--levels"):
    explain_cli(base + ["--levels", "members"])
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_subject_groups():
  S = types.SimpleNamespace
  subjects = [S(subject_id=f"sub-{i}", age=a, sex=s, covariates={"smoking": k, "bmi": b})
              for i, (a, s, k, b) in enumerate([(41.0, "F", 0.0, 20.0), (49.9, "M", 1.0, 31.0),
                                                (50.0, "F", 0.0, 25.0), (77.0, None, 1.0, 22.0),
                                                (None, "M", 1.0, 40.0), (63.0, "F", 0.0, 35.0),
                                                (64.0, "F", 0.0, 33.0), (65.0, "M", 0.0, 24.0)])]
  groups, how = command.subject_groups(subjects, age_band=10)
  assert list(groups)[0] == ("all", "all") and len(groups[("all", "all")]) == 8
  assert groups[("age", "40to50")] == ["sub-0", "sub-1"]
  assert groups[("age", "50to60")] == ["sub-2"]
  assert groups[("sex", "F")] == ["sub-0", "sub-2", "sub-5", "sub-6"]
  assert groups[("smoking", "1")] == ["sub-1", "sub-3", "sub-4"]
  median = np.median([20.0, 31.0, 25.0, 22.0, 40.0, 35.0, 33.0, 24.0])
  assert set(groups[("bmi", "high")]) == {f"sub-{i}" for i, b in enumerate(
      [20.0, 31.0, 25.0, 22.0, 40.0, 35.0, 33.0, 24.0]) if b > median}
  assert how["bmi"]["split"] == "median"
  only = command.subject_groups(subjects, age_band=5, columns=["smoking"])[0]
  assert ("sex", "F") not in only and ("age", "40to45") in only and ("age", "45to50") in only
