"""A tiny ensemble experiment end to end: simulated 4 mm cohort (T1w + FLAIR, with its atlas),
a whole-brain and a cerebellum sub-ensemble of 2 stacked members each, interrupted and resumed
through `brainage train`, then the store W/ensemble restored and checked against the trainer's
checkpoints, a plain flax forward pass and the head's weights in numpy."""

from __future__ import annotations

import argparse
import csv
import json

import jax
import nibabel as nib
import numpy as np
import pytest

from jax_brainage import models
from jax_brainage.commands import train as train_command
from jax_brainage.data import cache as cache_lib
from jax_brainage.ensemble import store as store_lib
from jax_brainage.train import artifact
from jax_brainage.train import config_loading
from jax_brainage.train import experiment

CONFIG = "configs/ensemble_tiny.py"


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
  data = tmp_path_factory.mktemp("cohort")
  return ["--config.data.simulate.n", "40", "--config.data.simulate.out", str(data / "sim"),
          "--config.data.cache", str(data / "cache"),
          "--config.ensemble.sub_ensembles", "('t1=T1w', 't1_cereb=T1w@cerebellum')",
          "--config.ensemble.head_folds", "2", "--config.model.conv_features", "(4,4,4,4,4)",
          "--config.num_epochs", "1", "--config.optimizer.warmup_steps", "0",
          "--config.num_image_summaries", "0", "--config.batch_size", "8"]


@pytest.fixture(scope="module")
def trained(overrides, tmp_path_factory):
  """Interrupted inside the first sub-ensemble, then finished by `brainage train`
  (commands.train.run)."""
  config = config_loading.apply_overrides(config_loading.load_config(CONFIG), overrides)
  workdir = tmp_path_factory.mktemp("experiment")
  partial = experiment.train_ensemble(config, workdir, quiet=True, max_steps=3)
  args = argparse.Namespace(config=CONFIG, overrides=overrides, workdir=workdir, quiet=True,
                            max_steps=None)
  assert train_command.run(args) == 0
  return config, workdir, partial


def test_interrupted_experiment_resumes_the_unfinished_sub_ensemble(trained):
  config, workdir, partial = trained
  assert partial["stopped"] == "max_steps" and list(partial["subs"]) == ["t1"]
  assert partial["subs"]["t1"]["step"] == 3 and "ensemble" not in partial
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["stopped"] == "done" and list(metrics["subs"]) == ["t1", "t1_cereb"]
  steps_per_epoch = 32 // config.batch_size  # 40 subjects: 32 train, 4 val, 4 test
  for sub in ("t1", "t1_cereb"):
    assert metrics["subs"][sub]["step"] == steps_per_epoch
    assert len(metrics["subs"][sub]["members"]) == 2
    history = json.loads((workdir / "sub" / sub / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1]
  split = json.loads((workdir / "split.json").read_text())
  for sub in ("t1", "t1_cereb"):
    assert json.loads((workdir / "sub" / sub / "split.json").read_text())["val"] == split["val"]


def test_regional_cache_keeps_only_the_cerebellum(trained):
  config, workdir, _ = trained
  sub_config = json.loads((workdir / "sub" / "t1_cereb" / "config.json").read_text())
  regional = cache_lib.Cache.open(sub_config["config"]["data"]["cache"])
  base = cache_lib.Cache.open(config.data.cache)
  # The label of "cerebellum" in the cohort's atlas table, read independently.
  table = base.index["source"] + "/derivatives/simulation/atlas.tsv"
  with open(table, newline="") as f:
    label = next(int(r["index"]) for r in csv.DictReader(f, delimiter="\t")
                 if r["name"] == "cerebellum")
  assert regional.preprocessing.regions == (label,)
  assert regional.subject_ids == base.subject_ids and regional.shape == base.shape
  t1 = base.sequences.index("T1w")
  inside = np.count_nonzero(regional.volumes[..., t1])
  assert 0 < inside < 0.25 * np.count_nonzero(base.volumes[..., t1])
  # Where the regional cube is non-zero, the whole-brain cube is too.
  assert not np.any((regional.volumes[..., t1] > 0) & (base.volumes[..., t1] == 0))
  # The atlas copied into the regional cache is the cohort's.
  atlas = nib.load(base.index["source"] + "/derivatives/simulation/atlas.nii.gz")
  np.testing.assert_array_equal(np.asarray(nib.load(regional.path / "atlas.nii.gz").dataobj),
                                np.asarray(atlas.dataobj))


def test_store_restores_members_head_and_validation_metrics(trained):
  config, workdir, _ = trained
  assert store_lib.is_ensemble_workdir(workdir)
  ensemble = store_lib.load_ensemble(workdir)
  assert ensemble.names == ("t1", "t1_cereb") and ensemble.n_members == 4
  assert ensemble.sub("t1_cereb").regions == ("cerebellum",)
  assert ensemble.sub("t1").sequences == ("T1w",)
  split = json.loads((workdir / "split.json").read_text())
  val = np.asarray(split["val"])
  predictions, ages = {}, None
  for sub in ensemble.subs:
    # The store holds each member's best checkpoint of its trainer workdir.
    manifest, variables, _ = artifact.load_members(workdir / "sub" / sub.name, "best")
    for a, b in zip(jax.tree.leaves(sub.variables), jax.tree.leaves(variables), strict=True):
      np.testing.assert_array_equal(a, b)
    # Validation predictions by a plain flax forward pass, member by member.
    cfg = json.loads((workdir / "sub" / sub.name / "config.json").read_text())["config"]
    cache = cache_lib.Cache.open(cfg["data"]["cache"])
    channels = [cache.sequences.index(s) for s in sub.sequences]
    x = np.asarray(cache.volumes[val][..., channels], np.float32) / 255.0
    model = models.build_model(manifest)
    predictions[sub.name] = np.stack(
        [np.asarray(model.apply(jax.tree.map(lambda v: v[m], variables), x, train=False))
         for m in range(sub.members)], axis=1)
    ages = cache.ages[val].astype(np.float64)
  # The ensemble prediction is intercept + sum of effective member weights x member predictions.
  weights = ensemble.member_weights()
  ensemble_val = ensemble.head.intercept() + sum(
      predictions[n] @ weights[n] for n in ensemble.names)
  metrics = json.loads((workdir / "metrics.json").read_text())["ensemble"]
  np.testing.assert_allclose(metrics["mae"], np.mean(np.abs(ensemble_val - ages)), rtol=1e-4)
  for name, maes in metrics["mae_members"].items():
    np.testing.assert_allclose(maes, np.mean(np.abs(predictions[name] - ages[:, None]), axis=0),
                               rtol=1e-4)
  assert metrics["n_members"] == 4 and set(metrics["member_weights"]) == {"t1", "t1_cereb"}
  for key in ("mae_corrected", "spearman_gap_age", "spearman_gap_age_corrected"):
    assert key in metrics


def test_sub_ensemble_reading_a_missing_sequence_is_one_config_error(overrides, tmp_path):
  config = config_loading.apply_overrides(config_loading.load_config(CONFIG), overrides + [
      "--config.ensemble.sub_ensembles", "('t1=T1w', 'swi=swi')"])
  with pytest.raises(Exception, match="'swi', which is not in config.data.sequences") as e:
    experiment.train_ensemble(config, tmp_path, quiet=True)
  assert "\n" not in str(e.value)
