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
from jax_brainage.commands import explain as explain_command
from jax_brainage.data import cache as cache_lib
from jax_brainage.ensemble import correction as correction_lib
from jax_brainage.ensemble import head as head_lib
from jax_brainage.ensemble import store
from jax_brainage.ensemble.model import Ensemble, SubEnsemble
from jax_brainage.errors import ConfigError, DataError, SmallSampleWarning
from jax_brainage.explain import derivative, maps
from jax_brainage.explain.groups import MIN_GROUP, subject_groups
from jax_brainage.train import artifact


def explain_cli(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  explain_command.add_parser(parser.add_subparsers())
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
  return out, json.loads((out / derivative.INDEX).read_text())


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


def _single_model(workdir: Path) -> types.SimpleNamespace:
  """The trained model of a single-model workdir: its flax module, own (unstacked) variables,
  manifest, sequences and training cache."""
  (sub,) = artifact.load(workdir).subs
  return types.SimpleNamespace(model=sub.model, variables=sub.member_variables(0),
                               manifest=sub.manifest, sequences=sub.sequences,
                               cache_dir=sub.cache_dir)


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
  trained = _single_model(explain_workdir)
  chosen = ["sub-0002", "sub-0007"]
  x = jnp.asarray(volumes[[rows[s][0] for s in chosen]].astype(np.float32) / np.float32(255))
  # The default method's composite, built here from lrp directly (not through maps).
  composite = {"epsilon_alpha2_beta1": lrp.composites.EpsilonAlpha2Beta1,
               "epsilon_plus_flat": lrp.composites.EpsilonPlusFlat}[maps.DEFAULT_METHOD]()
  reference = np.asarray(jax.jit(lambda v, x: lrp.relevance(
      lambda v, u: trained.model.apply(v, u, train=False), v, x,
      composite=composite))(trained.variables, x))
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


def test_maps_carry_units_and_a_description_in_their_header(explained):
  """Every written map, read back with nibabel, says what it is (FSLeyes / MRIcroGL show it)."""
  out, index = explained
  written = sorted(out.glob("sub-*/anat/*_relevance.nii.gz")) + sorted(
      out.glob("group/*_relevance.nii.gz"))
  assert len(written) > len(index["subjects"])
  for path in written:
    header = nib.load(path).header
    assert header.get_xyzt_units()[0] == "mm", path.name
    descrip = header["descrip"].item().decode()
    assert descrip.startswith(f"LRP relevance, {index['method']}"), descrip
    assert "positive = older" in descrip and "years" in descrip
    intent, _, name = header.get_intent()
    assert intent == "estimate" and name == "years/voxel", path.name
    assert header.get_data_dtype() == np.float32


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
    if len(ids) < MIN_GROUP:  # too small for a group map: skipped with a warning
      assert ("age", band) not in groups
      continue
    g = groups[("age", band)]
    assert g["n"] == len(ids)
    np.testing.assert_allclose(np.asarray(nib.load(out / g["maps"][0]).dataobj),
                               np.mean([subject_maps[i] for i in ids], 0), rtol=1e-5, atol=1e-9)
  smokers = [p["participant_id"] for p in participants if float(p["smoking"]) == 1]
  assert groups[("smoking", "1")]["n"] == len(smokers)
  # BMI, continuous, in quantile bins (never one group per value).
  assert ("sex", "F") in groups and any(k[0] == "bmi" and k[1].startswith("q") for k in groups)
  group_rows = read_tsv(out / "regions" / "group_regions.tsv")
  g = next(r for r in group_rows if r["group"] == "all" and r["label"] == "1")
  per = [float(r["sum"]) for r in rows if r["label"] == "1"]
  assert float(g["sum_mean"]) == pytest.approx(np.mean(per), rel=1e-4)

  # Figures (subjects, groups, glass brain), TensorBoard, and no temporary left anywhere.
  assert len([s for s in index["subjects"] if s.get("figures")]) == 2
  for f in index["figures"]:
    assert matplotlib.image.imread(out / f).ndim == 3
  assert any(f.endswith("_glassbrain.png") for f in index["figures"])
  # The ranked region chart, and a caption in words (not a file name) for every figure.
  assert "figures/regions_ranked.png" in index["figures"]
  for f in index["figures"]:
    caption = index["captions"][f]
    assert "relevance" in caption.lower() and "_montage" not in caption, caption
  assert "(n = " in index["captions"][next(f for f in index["figures"] if "group-all_" in f)]
  assert list((out / "tensorboard").glob("events.out.tfevents.*"))
  assert not [p for p in out.rglob(".*")]
  description = json.loads((out / "dataset_description.json").read_text())
  assert description["DatasetType"] == "derivative"


def test_subject_selection_and_errors(explain_workdir, explained, tmp_path):
  # The default method and batch size of the `explained` run: its compiled function is reused.
  target = derivative.Target(explain_workdir, "best", maps.get_method(maps.DEFAULT_METHOD),
                             batch_size=4, seed=0, levels=derivative.LEVELS)
  dataset = predict.read_dataset([explain_workdir / "data"], target.required_sequences)
  index = derivative.explain_dataset(target, dataset, tmp_path / "two",
                                     subjects=["0003", "sub-0001"], n_figures=0,
                                     glass_brain=False, quiet=True, age_band=0)
  assert [s["participant_id"] for s in index["subjects"]] == ["sub-0003", "sub-0001"]
  assert sorted(p.name for p in (tmp_path / "two").glob("sub-*")) == ["sub-0001", "sub-0003"]
  assert not index["tables"] and not (tmp_path / "two" / "regions").exists()  # no atlas given
  assert not any(g["group"] == "age" for g in index["groups"])
  with pytest.raises(DataError, match="sub-0099"):
    derivative.explain_dataset(target, dataset, tmp_path / "x", subjects=["sub-0099"], quiet=True)
  with pytest.raises(ConfigError, match="nosuch"):
    derivative.explain_dataset(target, dataset, tmp_path / "x", group_columns=["nosuch"],
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
  groups, how = subject_groups(subjects, age_band=10, min_size=1)
  assert list(groups)[0] == ("all", "all") and len(groups[("all", "all")]) == 8
  assert groups[("age", "40to50")] == ["sub-0", "sub-1"]
  assert groups[("age", "50to60")] == ["sub-2"]
  assert groups[("sex", "F")] == ["sub-0", "sub-2", "sub-5", "sub-6"]
  assert groups[("smoking", "1")] == ["sub-1", "sub-3", "sub-4"]
  # BMI (8 distinct values) in tertiles of numpy's quantiles, never one group per value.
  bmi = np.array([20.0, 31.0, 25.0, 22.0, 40.0, 35.0, 33.0, 24.0])
  edges = np.quantile(bmi, [1 / 3, 2 / 3])
  for k in range(3):
    assert set(groups[("bmi", f"q{k + 1}")]) == {
        f"sub-{i}" for i, b in enumerate(bmi) if np.searchsorted(edges, b, side="right") == k}
  assert how["bmi"]["split"] == "quantiles"
  only = subject_groups(subjects, age_band=5, columns=["smoking"], min_size=1)[0]
  assert ("sex", "F") not in only and ("age", "40to45") in only and ("age", "45to50") in only


def test_subject_groups_keep_sessions_apart():
  """Two sessions of one subject are two members of a group (row ids), never one."""
  S = types.SimpleNamespace
  subjects = [S(subject_id="sub-01", session="1", age=41.0, sex="F", covariates={}),
              S(subject_id="sub-01", session="2", age=45.0, sex="F", covariates={}),
              S(subject_id="sub-02", session=None, age=47.0, sex="M", covariates={})]
  groups, _ = subject_groups(subjects, age_band=10, min_size=1)
  assert groups[("all", "all")] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02"]
  assert groups[("age", "40to50")] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02"]
  assert groups[("sex", "F")] == ["sub-01_ses-1", "sub-01_ses-2"]
  dataset = S(root="ds", subjects=subjects)
  pick = lambda names: [(s.subject_id, s.session)  # noqa: E731
                        for s in derivative.select_subjects(dataset, names)]
  assert pick(["sub-01_ses-2", "02"]) == [("sub-01", "2"), ("sub-02", None)]
  assert pick(["01"]) == [("sub-01", "1"), ("sub-01", "2")]


def test_small_groups_are_skipped_with_a_warning_and_few_values_still_get_quantile_bins():
  S = types.SimpleNamespace
  # Four subjects, four BMIs: once one group per value; now too few for bins of 3.
  subjects = [S(subject_id=f"sub-{i}", age=40.0 + i, sex="F" if i else "M",
                covariates={"bmi": 20.0 + 1.5 * i}) for i in range(4)]
  with pytest.warns(SmallSampleWarning) as record:
    groups, _ = subject_groups(subjects, age_band=10, min_size=3)
  text = " ".join(str(w.message) for w in record)
  assert "column bmi has 4 subjects" in text and "sex=M (1)" in text
  assert set(groups) == {("all", "all"), ("age", "40to50"), ("sex", "F")}
  groups, how = subject_groups(subjects, age_band=0, columns=["bmi"], min_size=2)
  assert groups[("bmi", "q1")] == ["sub-0", "sub-1"] and groups[("bmi", "q2")] == ["sub-2", "sub-3"]


def test_ensemble_workdir_maps_for_members_subs_and_ensemble(explain_workdir, tmp_path):
  """An ensemble store (E2's format) built from the tiny model: sub-ensembles "a" and "b" with two
  members each (the model and rescaled copies); maps against x * grad per member."""
  trained = _single_model(explain_workdir)
  cache = cache_lib.Cache.open(trained.cache_dir)
  second = jax.tree.map(lambda a: a * np.float32(0.8), trained.variables)
  third = jax.tree.map(lambda a: a * np.float32(1.1), trained.variables)
  members = {"a": [trained.variables, second], "b": [second, third]}
  subs = tuple(SubEnsemble(
      name=name, sequences=trained.sequences, regions=(), manifest=trained.manifest,
      members=len(vs), variables=jax.tree.map(lambda *a: np.stack(a), *vs),
      cache_dir=str(trained.cache_dir), preprocessing=cache.preprocessing.to_dict())
      for name, vs in members.items())
  head = head_lib.MultiLevelHead(
      level1={"a": head_lib.LinearHead(np.array([0.6, 0.5]), 1.0),
              "b": head_lib.LinearHead(np.array([1.0, -0.2]), 0.0)},
      level2=head_lib.LinearHead(np.array([0.7, 0.4]), -3.0), names=("a", "b"))
  workdir = tmp_path / "ens"
  store.save_ensemble(workdir, Ensemble(subs=subs, head=head,
                                        correction=correction_lib.Correction()))
  out = tmp_path / "maps"
  chosen = ["sub-0004", "sub-0009"]
  assert explain_cli(["--workdir", str(workdir), "--data", str(explain_workdir / "data"),
                      "--out", str(out), "--composite", "gradient_x_input", "--subjects",
                      *chosen, "--figures", "1", "--no-glass-brain", "--members-per-call", "1",
                      "--quiet"]) == 0
  index = json.loads((out / derivative.INDEX).read_text())
  assert index["model"]["kind"] == "ensemble" and index["levels"] == list(derivative.LEVELS)
  cache_index = json.loads((explain_workdir / "cache" / "index.json").read_text())
  rows = {s["subject_id"]: (i, s) for i, s in enumerate(cache_index["subjects"])}
  volumes = np.load(explain_workdir / "cache" / "volumes.npy")
  x = jnp.asarray(volumes[[rows[s][0] for s in chosen]].astype(np.float32) / np.float32(255))
  grad = jax.jit(jax.grad(lambda v, u: jnp.sum(trained.model.apply(v, u, train=False)),
                          argnums=1))
  forward = jax.jit(lambda v, u: trained.model.apply(v, u, train=False))
  gxi = {n: [np.asarray(x * grad(v, x))[..., 0] for v in vs] for n, vs in members.items()}
  preds = {n: np.stack([np.asarray(forward(v, x)) for v in vs], 1) for n, vs in members.items()}
  expected = {
      "am0": gxi["a"][0], "am1": gxi["a"][1], "bm0": gxi["b"][0], "bm1": gxi["b"][1],
      "a": 0.6 * gxi["a"][0] + 0.5 * gxi["a"][1], "b": gxi["b"][0] - 0.2 * gxi["b"][1],
      "ensemble": (0.7 * (0.6 * gxi["a"][0] + 0.5 * gxi["a"][1])
                   + 0.4 * (gxi["b"][0] - 0.2 * gxi["b"][1]))}
  assert np.abs(expected["ensemble"]).max() > 0
  for k, sid in enumerate(chosen):
    entry = next(s for s in index["subjects"] if s["participant_id"] == sid)
    assert sorted(entry["maps"]) == sorted(expected)
    assert entry["predicted_age"] == pytest.approx(float(head.apply(
        {n: p[k:k + 1] for n, p in preds.items()})[0]), abs=2e-3)
    source = nib.load(explain_workdir / "data" / sid / "anat" / f"{sid}_T1w.nii.gz")
    for level, cube in expected.items():
      (path,) = entry["maps"][level]
      assert path.endswith(f"{sid}_model-{level}_seq-T1w_relevance.nii.gz")
      img = nib.load(out / path)
      np.testing.assert_array_equal(img.affine, source.affine)
      want = _cube_to_subject(cube[k], _cube_affine(rows[sid][1]["inverse"]), source)
      np.testing.assert_allclose(np.asarray(img.dataobj), want, rtol=1e-4, atol=1e-7,
                                 err_msg=level)
  groups = {(g["group"], g["value"]): g for g in index["groups"]}
  assert groups[("all", "all")]["maps"][0].endswith("_model-ensemble_seq-T1w_space-template"
                                                    "_relevance.nii.gz")
  models_in_table = {r["model"] for r in read_tsv(out / "regions" / "relevance_regions.tsv")}
  assert models_in_table == set(expected)


def test_skip_bad_subjects_and_a_user_atlas(explain_workdir, explained, tmp_path):
  import shutil

  data = tmp_path / "data"
  shutil.copytree(explain_workdir / "data", data,
                  ignore=shutil.ignore_patterns("derivatives"))
  (data / "sub-0005" / "anat" / "sub-0005_T1w.nii.gz").write_bytes(b"not a nifti")
  target = derivative.Target(explain_workdir, "best", maps.get_method(maps.DEFAULT_METHOD),
                             batch_size=4, seed=0, levels=derivative.LEVELS)
  dataset = predict.read_dataset([data], target.required_sequences)
  with pytest.raises(DataError, match="sub-0005"):
    derivative.explain_dataset(target, dataset, tmp_path / "strict", quiet=True, n_figures=0,
                               glass_brain=False)
  atlas = explain_workdir / "data" / "derivatives" / "simulation" / "atlas_regions.nii.gz"
  index = derivative.explain_dataset(target, dataset, tmp_path / "lenient", skip_bad=True,
                                     quiet=True, n_figures=0, glass_brain=False, atlas_path=atlas)
  assert [s["participant_id"] for s in index["skipped"]] == ["sub-0005"]
  assert "sub-0005" not in {s["participant_id"] for s in index["subjects"]}
  assert len(index["subjects"]) == 9 and not (tmp_path / "lenient" / "sub-0005").exists()
  rows = read_tsv(tmp_path / "lenient" / "regions" / "relevance_regions.tsv")
  assert {r["region"] for r in rows} == {"cortical", "subcortical", "cerebellum"}
  assert len(rows) == 9 * 3
  written = json.loads((tmp_path / "lenient" / derivative.INDEX).read_text())
  assert written["tables"]["labels"] == {"1": "cortical", "2": "subcortical", "3": "cerebellum"}
  assert written["skipped"][0]["participant_id"] == "sub-0005"
