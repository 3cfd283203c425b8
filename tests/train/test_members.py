"""Ensemble members trained at once (stacked state, one vmapped step) against single-model runs.

The reference for member m is an ordinary single-model run with seed + m: same initialisation,
data order, augmentation and dropout, so losses and parameters must agree to float tolerance.
Tiny MRInet on the 16^3 blob cohort, 4 fake CPU devices.
"""

from __future__ import annotations

import collections
import json

import jax
import numpy as np
import pytest

from jax_brainage import sharding
from jax_brainage.errors import ConfigError
from jax_brainage.train import artifact
from jax_brainage.train import checkpoint as ckpt_lib
from jax_brainage.train import config as config_lib
from jax_brainage.train import config_checks
from jax_brainage.train import config_loading
from jax_brainage.train import loop, trainer
from jax_brainage.train import members as members_lib

MEMBERS = 3
EPOCHS = 2  # 32 training subjects / batch 8 = 4 steps per epoch
# Dropout and augmentation on: each member must draw its own.
COMMON = {"num_epochs": EPOCHS, "model.dropout_rate": 0.5, "augment.shift_voxels": 1}
RTOL, ATOL = 2e-5, 2e-6


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, make_config, blob_data):
  config = make_config(**COMMON, **{"ensemble.members": MEMBERS})
  workdir = tmp_path_factory.mktemp("members")
  return config, workdir, trainer.train_and_evaluate(config, workdir, data=blob_data, quiet=True)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, make_config, blob_data):
  """Three ordinary runs with seeds 0, 1, 2 (the reference)."""
  runs = []
  for seed in range(MEMBERS):
    workdir = tmp_path_factory.mktemp(f"seed{seed}")
    result = trainer.train_and_evaluate(make_config(**COMMON, seed=seed), workdir,
                                        data=blob_data, quiet=True)
    runs.append((workdir, result))
  return runs


def test_members_equal_single_runs_with_seeds_s_s1_s2(ensemble_run, single_runs):
  config, workdir, result = ensemble_run
  assert result["step"] == 4 * EPOCHS and result["vmap_width"] == MEMBERS
  assert result["mesh"] == {"ensemble": 1, "data": 4}  # 3 members do not split over 4 devices
  for m, (single_dir, single) in enumerate(single_runs):
    np.testing.assert_allclose([h["members"][m]["val_loss"] for h in result["history"]],
                               [h["val_loss"] for h in single["history"]], rtol=RTOL)
    assert result["members"][m]["best_step"] == single["best_step"]
    np.testing.assert_allclose(result["members"][m]["best_val_mae"], single["best_val_mae"],
                               rtol=RTOL)
  # The members differ from each other (own initialisation, data order, dropout).
  assert len({round(h["val_loss"], 3) for h in result["history"][0]["members"]}) == MEMBERS
  for which in (ckpt_lib.LATEST, ckpt_lib.BEST):
    manifest, stacked, _ = artifact.load_members(workdir, which)
    assert manifest["members"] == MEMBERS
    for m, (single_dir, _) in enumerate(single_runs):
      single_manifest, single_vars, _ = artifact.load_members(single_dir, which)
      assert single_manifest["members"] == 1
      # `best` holds every member at its own best epoch (they differ between members here).
      _close(jax.tree.map(lambda x: x[m], stacked), jax.tree.map(lambda x: x[0], single_vars))
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert [m["best_step"] for m in metrics["members"]] == [r["best_step"] for _, r in single_runs]
  assert len({m["best_step"] for m in metrics["members"]}) > 1, "choose a seed with distinct bests"


def test_2x2_mesh_equals_single_runs(single_runs, make_config, blob_data, tmp_path):
  """Members over 'ensemble' (2) and each member's batch over 'data' (2) == the single-model
  runs (which the trainer tests show equal to one device)."""
  config = make_config(**COMMON, **{"ensemble.members": 2})
  result = trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  assert result["mesh"] == {"ensemble": 2, "data": 2}
  _, stacked, _ = artifact.load_members(tmp_path, "latest")
  for m, (single_dir, single) in enumerate(single_runs[:2]):
    np.testing.assert_allclose([h["members"][m]["val_loss"] for h in result["history"]],
                               [h["val_loss"] for h in single["history"]], rtol=RTOL)
    _close(jax.tree.map(lambda x: x[m], stacked),
           jax.tree.map(lambda x: x[0], artifact.load_members(single_dir, "latest")[1]))


def test_sequential_groups_chosen_from_memory_equal_one_vmapped_step(
    ensemble_run, blob_data, tmp_path, monkeypatch):
  """When the compiled step for 3 members does not fit the device memory, members train in
  groups of 1 one after another; the result is the same as all 3 in one step."""
  config, workdir, result = ensemble_run
  monkeypatch.setattr(members_lib, "MEMBER_SETUPS", {})
  monkeypatch.setattr(members_lib, "device_memory_budget", lambda device=None: 1)
  sequential = trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  assert sequential["vmap_width"] == 1 and sequential["groups"] == [[0, 1], [1, 2], [2, 3]]
  # One member's compiled step needs less memory than three members'.
  assert 0 < sequential["memory"]["needed_bytes_per_device"] < \
      result["memory"]["needed_bytes_per_device"]
  for a, b in zip(sequential["history"], result["history"]):
    np.testing.assert_allclose([m["val_loss"] for m in a["members"]],
                               [m["val_loss"] for m in b["members"]], rtol=RTOL)
  for which in ("latest", "best"):
    _close(artifact.load_members(tmp_path, which)[1], artifact.load_members(workdir, which)[1])


def test_resume_of_member_run_is_exact(ensemble_run, blob_data, tmp_path):
  config, full_dir, full = ensemble_run
  first = trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True, max_steps=6)
  assert first["stopped"] == "max_steps" and first["step"] == 6
  second = trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  assert second["step"] == full["step"]
  assert [m["best_step"] for m in second["members"]] == [m["best_step"] for m in full["members"]]
  for a, b in zip(second["history"], full["history"]):
    np.testing.assert_allclose([m["val_loss"] for m in a["members"]],
                               [m["val_loss"] for m in b["members"]], rtol=1e-6)
  for which in ("latest", "best"):
    _close(artifact.load_members(tmp_path, which)[1], artifact.load_members(full_dir, which)[1])
  meta = ckpt_lib.Checkpoints(tmp_path, read_only=True).read_meta()
  full_meta = ckpt_lib.Checkpoints(full_dir, read_only=True).read_meta()
  assert meta["data_state"] == full_meta["data_state"]
  assert [m["seed"] for m in meta["data_state"]["members"]] == [0, 1, 2]


def test_bootstrap_rows_are_resamples_of_the_train_split_per_member(blob_data):
  train = blob_data.split.train
  seeds = [5, 6, 7]
  rows = blob_data.member_rows(seeds, bootstrap=True)
  for r in rows:
    assert len(r) == len(train) and set(r) <= set(train.tolist())
    assert len(set(r.tolist())) < len(r)  # with replacement: some subjects drawn twice
  assert len({tuple(r) for r in rows}) == 3  # each member its own resample
  np.testing.assert_array_equal(blob_data.member_rows(seeds, bootstrap=True)[1], rows[1])
  assert all(np.array_equal(r, train) for r in blob_data.member_rows(seeds, bootstrap=False))
  # One epoch of member batches delivers each member's resample exactly (duplicates included),
  # with the images of those subjects.
  mesh = sharding.make_mesh(1)
  groups = members_lib.member_groups(3, 2)
  batches = blob_data.member_batches(mesh, 8, seeds, rows, None, groups, mode="host")
  seen = [collections.Counter() for _ in seeds]
  volumes = blob_data.source.volumes
  for _ in range(len(train) // 8):
    members = [b for group in next(batches) for b in _split_members(group)]
    for m, batch in enumerate(members):
      index = np.asarray(batch["index"])
      seen[m].update(index.tolist())
      np.testing.assert_allclose(np.asarray(batch["image"]), volumes[index] / 255.0, rtol=1e-6)
      np.testing.assert_allclose(np.asarray(batch["age"]), blob_data.source.ages[index])
  batches.close()
  for m, r in enumerate(rows):
    assert seen[m] == collections.Counter(r.tolist())


def _split_members(group):
  host = jax.device_get(group)
  return [{k: v[i] for k, v in host.items()} for i in range(len(host["age"]))]


def test_member_groups_and_mesh_size():
  assert members_lib.member_groups(5, 2) == (slice(0, 2), slice(2, 4), slice(4, 5))
  assert members_lib.member_groups(5, 4) == (slice(0, 3), slice(3, 5))  # balanced
  assert members_lib.member_groups(8, 4, unit=2) == (slice(0, 4), slice(4, 8))
  assert members_lib.member_groups(3, 3) == (slice(0, 3),)
  config = config_lib.base_config()
  config.data.cache = "x"
  config.ensemble.members = 4
  assert members_lib.ensemble_mesh_size(config, 4, (8,)) == 4
  config.ensemble.members = 6  # the 'ensemble' axis must divide the members
  assert members_lib.ensemble_mesh_size(config, 4, (8,)) == 2
  config.ensemble.members = 3
  assert members_lib.ensemble_mesh_size(config, 4, (8,)) == 1
  config.ensemble.members, config.ensemble.mesh_size = 4, 3
  with pytest.raises(ConfigError, match="ensemble.mesh_size"):
    config_checks.validate(config)


def test_early_stopping_waits_for_every_member(make_config):
  config = make_config(patience=2)
  progress = {"members": [{"bad_epochs": 2}, {"bad_epochs": 1}, {"bad_epochs": 3}]}
  assert not loop.finished(progress, 8, 100, config)
  progress["members"][1]["bad_epochs"] = 2
  assert loop.finished(progress, 8, 100, config)
  assert progress["stopped"] == "early_stopping"


@pytest.mark.parametrize("key,value,match", [
    ("ensemble.members", 0, "ensemble.members"),
    ("ensemble.head", "median", "ensemble.head"),
    ("ensemble.correction", "poly2", "ensemble.correction"),
    ("ensemble.bootstrap", True, "ensemble.bootstrap"),
    ("ensemble.head_folds", 1, "ensemble.head_folds"),
    ("ensemble.sub_ensembles", ("t1=T1w", "t1=FLAIR"), "named twice"),
    ("ensemble.sub_ensembles", ("t1:T1w",), "'t1:T1w'"),
    ("ensemble.sub_ensembles", ("c=T1w@",), "no region"),
])
def test_bad_ensemble_keys_are_one_line_config_errors(make_config, key, value, match):
  config = make_config()
  config_loading.set_key(config, key, value)
  with pytest.raises(ConfigError, match=match) as e:
    config_checks.validate(config)
  assert "\n" not in str(e.value)


def test_sub_ensemble_specs():
  config = config_lib.base_config()
  config.data.sequences = ("T1w", "FLAIR")
  (spec,) = config_lib.parse_sub_ensembles(config)
  assert (spec.name, spec.sequences, spec.regions) == ("all", ("T1w", "FLAIR"), ())
  config.ensemble.sub_ensembles = ("t1=T1w", "mix_cereb=T1w+FLAIR@cerebellum+subcortical")
  a, b = config_lib.parse_sub_ensembles(config)
  assert (a.name, a.sequences, a.regions) == ("t1", ("T1w",), ())
  assert (b.sequences, b.regions) == (("T1w", "FLAIR"), ("cerebellum", "subcortical"))
  assert b.spec() == "mix_cereb=T1w+FLAIR@cerebellum+subcortical"


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_device_resident_member_batches_equal_host_batches(blob_data, zscore_blob_data, dtype):
  """The device-resident member pipeline (accelerators' default) delivers the host pipeline's
  batches: same subjects, augmentation, ages, and layout (members over 'ensemble'); for uint8
  and z-scored (float16) caches alike."""
  from jax_brainage.data.augment import AugmentConfig

  blob_data = blob_data if dtype == "uint8" else zscore_blob_data
  assert blob_data.dtype == dtype
  mesh = sharding.make_mesh(2)
  seeds = [3, 4]
  rows = blob_data.member_rows(seeds, bootstrap=True)
  groups = members_lib.member_groups(2, 2, unit=2)
  augment = AugmentConfig(shift_voxels=1)
  host = blob_data.member_batches(mesh, 8, seeds, rows, augment, groups, mode="host")
  device = blob_data.member_batches(mesh, 8, seeds, rows, augment, groups, mode="device")
  for _ in range(5):  # more than an epoch (4 steps)
    for a, b in zip(next(host), next(device), strict=True):
      for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
        assert a[key].sharding.is_equivalent_to(b[key].sharding, a[key].ndim), key
      if dtype == "float16":  # z-scores as they are: negative ones survive (no clip, no / 255)
        assert np.asarray(a["image"]).min() < -0.5
  host.close()
  device.close()
