"""`brainage evaluate-explanations` on the tiny trained workdir (tests/explain/conftest.py), checked
against independent replicas: masks read with nibabel and cut into the cube in numpy, mass and
rank accuracy recomputed in numpy from relevance that lrp computes directly."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from jax_brainage.commands import evaluate_explanations
from jax_brainage.explain import evaluate, scoring, truth
from jax_brainage.train import artifact

METHODS = ("epsilon_plus_flat", "gradient")


def read_tsv(path: Path) -> list[dict[str, str]]:
  with open(path, newline="") as fh:
    return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def evaluated(explain_workdir, tmp_path_factory):
  from jax_brainage.cli import main

  out = tmp_path_factory.mktemp("evaluate") / "out"
  argv = ["evaluate-explanations", "--workdir", str(explain_workdir), "--data",
          str(explain_workdir / "data"), "--out", str(out), "--methods", ",".join(METHODS),
          "--n-subjects", "3", "--split", "all", "--steps", "4", "--random-repeats", "2",
          "--patch-mm", "16"]
  try:
    rc = main(argv)
  except SystemExit as e:  # the lead has not registered the sub-command yet
    if e.code != 2:
      raise
    rc = evaluate_explanations.run(evaluate_explanations.add_parser(
        __import__("argparse").ArgumentParser().add_subparsers()).parse_args(argv[1:]))
  assert rc == 0
  return out


def _single_model(workdir: Path):
  """The trained model of a single-model workdir: the loaded ensemble of one, its flax module
  and own (unstacked) variables."""
  ensemble = artifact.load(workdir)
  (sub,) = ensemble.subs
  return SimpleNamespace(ensemble=ensemble, model=sub.model, variables=sub.member_variables(0))


def _cube_mask(path: Path, inverse: dict) -> np.ndarray:
  """numpy replica: reorient (the simulated grid is RAS+ already: identity) and crop/pad."""
  img = nib.load(path)
  data = np.asanyarray(img.dataobj) != 0
  assert inverse["orientation"] == [[0, 1], [1, 1], [2, 1]] and not inverse["resampled"]
  cube = np.zeros(inverse["cube_shape"], bool)
  src, dst = [], []
  for o, s, e in zip(inverse["offset"], inverse["cube_shape"], data.shape):
    lo, hi = max(o, 0), min(o + s, e)
    src.append(slice(lo, hi))
    dst.append(slice(lo - o, hi - o))
  cube[tuple(dst)] = data[tuple(src)]
  return cube


def test_command_writes_tables_json_and_plot(evaluated, explain_workdir):
  result = json.loads((evaluated / "evaluation.json").read_text())
  assert result["subjects"] == ["sub-0001", "sub-0002", "sub-0003"]
  assert set(result["summary"]) == set(METHODS)
  assert result["best_composite"] == "epsilon_plus_flat"  # the only composite evaluated
  assert "mass accuracy" in result["criterion"]
  # the sanity check is off by default on CPU
  assert result["sanity_check"] == {"status": "off"}
  assert not (evaluated / "sanity.tsv").exists()
  masks = result["masks"]
  assert masks[0] == "ageing" and {"ageing_T1w", "lesions", "ventricles", "deep_grey"} <= set(masks)
  png = (evaluated / "evaluation.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  summary = read_tsv(evaluated / "summary.tsv")
  assert [r["method"] for r in summary] == list(METHODS)
  scores = read_tsv(evaluated / "scores.tsv")
  assert len(scores) == len(METHODS) * len(masks) * 3
  # Curves: 5 points (steps 4), start at the model's prediction, random order shared.
  fr = result["curves"]["fractions"]
  assert fr == pytest.approx([0, 0.125, 0.25, 0.375, 0.5])
  for m in METHODS:
    c = result["curves"][m]
    assert c["morf"][0] == pytest.approx(np.mean(result["predicted_ages"]), abs=1e-3)
    assert c["lerf"][0] == pytest.approx(c["morf"][0], abs=1e-4)
    row = result["summary"][m]
    assert row["abpc"] == pytest.approx(np.mean(np.array(c["lerf"]) - np.array(c["morf"])),
                                        abs=1e-3)


def test_scores_against_numpy_replica(evaluated, explain_workdir):
  """Mass/rank accuracy of the ageing and lesion masks recomputed independently."""
  import jax

  import lrp

  result = json.loads((evaluated / "evaluation.json").read_text())
  trained = _single_model(explain_workdir)
  index = json.loads((explain_workdir / "cache" / "index.json").read_text())
  rows = {s["subject_id"]: s for s in index["subjects"]}
  volumes = np.load(explain_workdir / "cache" / "volumes.npy")
  row_of = {s["subject_id"]: i for i, s in enumerate(index["subjects"])}
  scores = read_tsv(evaluated / "scores.tsv")
  gradient = jax.jit(lambda v, u: lrp.attribution.gradient(
      lambda w, z: trained.model.apply(w, z, train=False), v, u))
  deriv = explain_workdir / "data" / "derivatives" / "simulation"
  for i, sid in enumerate(result["subjects"]):
    # the cube the command prepared from the BIDS files equals the training cache's cube
    x = volumes[row_of[sid]:row_of[sid] + 1].astype(np.float32) / 255.0
    rel = np.asarray(gradient(trained.variables, x))[0].sum(-1)
    for mask_name, file in (("ageing_T1w", f"{sid}_T1w_ageingmask.nii.gz"),
                            ("lesions", f"{sid}_lesionmask.nii.gz")):
      m = _cube_mask(deriv / sid / "anat" / file, rows[sid]["inverse"])
      got = next(r for r in scores if r["participant_id"] == sid and r["method"] == "gradient"
                 and r["mask"] == mask_name)
      assert int(got["mask_voxels"]) == m.sum()
      if m.sum() == 0:
        assert got["mass_accuracy"] == "n/a"
        continue
      pos = np.maximum(rel, 0)
      assert float(got["mass_accuracy"]) == pytest.approx(pos[m].sum() / pos.sum(), abs=2e-3)
      k = int(m.sum())
      top = np.argsort(-rel.ravel(), kind="stable")[:k]
      assert float(got["rank_accuracy"]) == pytest.approx(m.ravel()[top].mean(), abs=2e-2)
      assert float(got["mask_share"]) == pytest.approx(m.mean(), abs=1e-6)


def test_subject_structures_follow_the_subject_anatomy(explain_workdir):
  """The warped atlas's ventricles lie on the subject's dark CSF, not the template's place."""
  cohort = truth.open_cohort(explain_workdir / "data")
  names = {v["name"]: k for k, v in cohort.atlas.table.items()}
  t1 = np.asanyarray(nib.load(explain_workdir / "data" / "sub-0002" / "anat" /
                              "sub-0002_T1w.nii.gz").dataobj).astype(np.float64)
  labels = cohort.subject_labels(1)
  assert labels.shape == t1.shape
  assert np.all(labels[t1 == 0] == 0)
  vent = labels == names["lateral_ventricles"]
  wm = labels == names["deep_white_matter"]
  assert vent.sum() > 10 and wm.sum() > 10
  # CSF is dark on T1w: the subject's ventricles are much darker than its white matter
  assert np.median(t1[vent]) < 0.6 * np.median(t1[wm])


def test_not_a_simulated_cohort(explain_workdir, tmp_path):
  from jax_brainage.errors import DataError

  with pytest.raises(DataError, match="no simulation ground truth"):
    truth.open_cohort(tmp_path)


def test_best_composite_criterion():
  kinds = {"a": "lrp", "b": "lrp", "c": "lrp", "g": "baseline"}
  summary = {
      "a": {"ageing_mass_accuracy": 0.5, "ageing_rank_accuracy": 0.4, "abpc": 1.0},
      "b": {"ageing_mass_accuracy": 0.6, "ageing_rank_accuracy": 0.5, "abpc": 0.5},
      "c": {"ageing_mass_accuracy": 0.4, "ageing_rank_accuracy": 0.6, "abpc": 2.0},
      "g": {"ageing_mass_accuracy": 0.9, "ageing_rank_accuracy": 0.9, "abpc": 9.0},
  }
  # rank sums (0 = best): a 1 + 2 + 1 = 4, b 0 + 1 + 2 = 3, c 2 + 0 + 0 = 2 -> c; the baseline,
  # better on everything, is never the default composite
  assert scoring.best_composite(summary, kinds) == "c"
  assert scoring.best_composite({"g": summary["g"]}, kinds) is None
  # a tie in rank sums (x: 0 + 1 + 0.5, y: 1 + 0 + 0.5) goes to the higher mass accuracy
  tie = {"x": {"ageing_mass_accuracy": 0.6, "ageing_rank_accuracy": 0.4, "abpc": 1.0},
         "y": {"ageing_mass_accuracy": 0.4, "ageing_rank_accuracy": 0.6, "abpc": 1.0}}
  assert scoring.best_composite(tie, {"x": "lrp", "y": "lrp"}) == "x"
  assert scoring.best_composite(dict(reversed(tie.items())), {"x": "lrp", "y": "lrp"}) == "x"


def test_sanity_check_against_scipy(explain_workdir, tmp_path):
  """Cascading randomisation from the output layer: rows per method x layer in sanity.tsv, and
  the first step's Spearman correlations of the gradient recomputed with scipy from maps that
  lrp computes directly."""
  import jax
  from scipy import stats

  import lrp
  from lrp import evaluation as ev

  methods = ["gradient", "epsilon_alpha2_beta1"]
  trained = _single_model(explain_workdir)
  result = evaluate.evaluate(trained.ensemble, explain_workdir / "data", methods, subjects=2,
                             split="all", settings=evaluate.Settings(perturb=False, sanity=True,
                                                                     batch_size=2))
  sanity = result["sanity_check"]
  assert sanity["status"] == "done"
  layers = sanity["layers"]
  # output first, input last; every parameterised layer once (MRInet names, DEVELOPERS.md)
  assert layers[0] == "age_head" and layers[1] == "dense1" and layers[-1] == "conv1"
  assert sorted(layers) == sorted(trained.variables["params"])
  assert set(sanity["final_spearman_abs"]) == set(methods)
  paths = scoring.write_outputs(tmp_path, result)
  rows = read_tsv(paths["sanity"])
  assert [(r["method"], r["layer"]) for r in rows] == [(m, l) for m in methods for l in layers]
  assert all(r["n"] == "2" for r in rows)
  assert json.loads(paths["json"].read_text())["sanity_check"]["status"] == "done"

  # scipy replica of step 1 (age_head random) for the gradient, inside the brain
  index = json.loads((explain_workdir / "cache" / "index.json").read_text())
  row_of = {s["subject_id"]: i for i, s in enumerate(index["subjects"])}
  volumes = np.load(explain_workdir / "cache" / "volumes.npy")
  x = np.stack([volumes[row_of[sid]] for sid in result["subjects"]]).astype(np.float32) / 255.0
  # evaluate's key: fold_in(PRNGKey(seed), 3); layer s draws from fold_in(key, s)
  random = ev.randomise_layer(trained.variables, "age_head", jax.random.fold_in(
      jax.random.fold_in(jax.random.PRNGKey(0), 3), 0))
  gradient = jax.jit(lambda v, u: lrp.attribution.gradient(
      lambda w, z: trained.model.apply(w, z, train=False), v, u))
  a = np.asarray(gradient(trained.variables, x)).sum(-1)
  b = np.asarray(gradient(random, x)).sum(-1)
  brain = np.any(x != 0, axis=-1)
  got = result["sanity_check"]["per_subject"]["gradient"]
  for i in range(2):
    ai, bi = a[i][brain[i]], b[i][brain[i]]
    assert got["spearman"][0][i] == pytest.approx(stats.spearmanr(ai, bi).statistic, abs=2e-3)
    assert got["spearman_abs"][0][i] == pytest.approx(
        stats.spearmanr(np.abs(ai), np.abs(bi)).statistic, abs=2e-3)
  # once every layer is random, the gradient no longer resembles the trained model's
  assert np.all(np.abs(np.asarray(got["spearman"][-1])) < 0.9)
