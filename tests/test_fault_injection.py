"""Damaged state, injected by hand: checkpoints and ensemble stores truncated, overwritten inside
(size kept) or with garbled metadata JSON, and a NaN parameter in a stored model.

What must hold: a one-line error naming the damaged file (`brainage predict` exits 2 and writes
nothing), never a decoder traceback nor a silent restore; resuming falls back to the newest intact
checkpoint with one warning line and then ends bit for bit where an undamaged run ends; a NaN
prediction is never written. References are independent: an uninterrupted run, the bytes on disk,
and the validation losses of the reference run's history.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from jax_brainage import integrity, predict, sharding
from jax_brainage.ensemble import model as ensemble_model
from jax_brainage.ensemble import store
from jax_brainage.errors import DataError
from jax_brainage.train import artifact
from jax_brainage.train import checkpoint as ckpt_lib
from jax_brainage.train import data as data_lib
from jax_brainage.train import steps as steps_lib
from jax_brainage.train import trainer
from test_predict import cli, workdir  # noqa: F401 -- `workdir`: the tiny demo's trained model
from tests.ensemble.conftest import random_members, tiny_manifest
from tests.train.conftest import blob_cohort, tiny_config

EPOCHS = 3  # 32 training subjects / batch 8 = 4 steps per epoch: 12 steps
STOP = 9    # the damaged runs stop here: latest 8 (end of epoch 2) and 9 are kept


# ---------------------------------------------------------------------------------------------
# Damage, by hand.


def largest_file(directory: Path) -> Path:
  """The biggest file under `directory` (an array data file of an orbax checkpoint)."""
  files = [p for p in directory.rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def truncate(path: Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def garble(path: Path, seed: int = 0) -> None:
  """4 KiB of random bytes in the middle of the file (all of it if smaller); size kept."""
  data = bytearray(path.read_bytes())
  n = min(4096, len(data))
  start = (len(data) - n) // 2
  data[start:start + n] = np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()
  path.write_bytes(bytes(data))
  assert path.stat().st_size == len(data)


def one_line_error(capsys, argv: list[str], *patterns: str) -> str:
  """`brainage ARGV` exits 2 with one line on stderr holding every pattern."""
  assert cli(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  for pattern in patterns:
    assert pattern in err, err
  return err


def predict_argv(w: Path, tmp_path: Path, *extra: str) -> list[str]:
  return ["predict", "--workdir", str(w), "--data", str(tmp_path), "--out",
          str(tmp_path / "p.tsv"), *extra]


# ---------------------------------------------------------------------------------------------
# Checkpoints of a tiny trained run.


@pytest.fixture(scope="module")
def blob_data():
  images, ages = blob_cohort()
  return data_lib.from_arrays(images, ages, ("T1w",), split_seed=0)


@pytest.fixture(scope="module")
def config():
  return tiny_config(num_epochs=EPOCHS, checkpoint_every_steps=2, num_image_summaries=0)


@pytest.fixture(scope="module")
def reference(config, blob_data, tmp_path_factory):
  """An undamaged, uninterrupted run: (workdir, result)."""
  w = tmp_path_factory.mktemp("reference")
  return w, trainer.train_and_evaluate(config, w, data=blob_data, quiet=True)


@pytest.fixture(scope="module")
def stopped(config, blob_data, tmp_path_factory):
  """A run stopped at step STOP (copied by each test before it damages it)."""
  w = tmp_path_factory.mktemp("stopped")
  trainer.train_and_evaluate(config, w, data=blob_data, quiet=True, max_steps=STOP)
  return w


def copy_of(stopped: Path, tmp_path: Path) -> Path:
  w = tmp_path / "W"
  shutil.copytree(stopped, w)
  return w


def final_state(w: Path, config, blob_data):
  """The latest checkpoint's state as numpy (restored onto the experiment's abstract state)."""
  setup = steps_lib.build_setup(config, blob_data.image_shape, 1, blob_data.mean_train_age,
                                4 * EPOCHS, sharding.make_mesh())
  num_params = sum(int(x.size) for x in jax.tree.leaves(setup.abstract_state["params"]))
  ckpts = ckpt_lib.Checkpoints(w, read_only=True)
  state, _ = ckpts.restore(ckpt_lib.LATEST, setup.abstract_state,
                           artifact.model_manifest(config, blob_data, num_params))
  ckpts.close()
  return jax.device_get(state)


def test_every_step_is_sealed_and_two_latest_are_kept(stopped):
  latest = stopped / "checkpoints" / "latest"
  assert sorted(int(p.name) for p in latest.iterdir()) == [8, STOP]
  for step_dir in [*latest.iterdir(), *(stopped / "checkpoints" / "best").iterdir()]:
    record = json.loads((step_dir / integrity.RECORD).read_text())["files"]
    # Independent check: hashlib over the bytes on disk, every array file listed.
    assert largest_file(step_dir / "state").relative_to(step_dir).as_posix() in record
    for name, entry in record.items():
      data = (step_dir / name).read_bytes()
      assert len(data) == entry["size"]
      assert hashlib.blake2b(data, digest_size=32).hexdigest() == entry["digest"]


@pytest.mark.parametrize("damage", [truncate, garble])
def test_damaged_latest_is_named_and_resume_falls_back_exactly(damage, stopped, reference,
                                                               config, blob_data, tmp_path,
                                                               capsys):
  w = copy_of(stopped, tmp_path)
  bad = largest_file(w / "checkpoints" / "latest" / str(STOP) / "state")
  damage(bad)
  # Inference on the damaged step: one line naming the file.
  one_line_error(capsys, predict_argv(w, tmp_path, "--checkpoint", "latest"), str(bad))
  with pytest.raises(DataError, match="truncated|corrupt"):
    artifact.load(w, "latest")
  # Resuming: verified before training, moved aside, the older step used; never a NaN loss.
  result = trainer.train_and_evaluate(config, w, data=blob_data, quiet=True)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: ") and str(bad) in err[0], err
  assert "latest/8 (step 8, data-iterator step 8)" in err[0]
  assert (w / "checkpoints" / "corrupt" / f"latest-{STOP}").is_dir()
  ref_dir, ref = reference
  assert result["step"] == ref["step"] == 4 * EPOCHS
  assert [h["val_loss"] for h in result["history"]] == [h["val_loss"] for h in ref["history"]]
  for a, b in zip(jax.tree.leaves(final_state(w, config, blob_data)),
                  jax.tree.leaves(final_state(ref_dir, config, blob_data))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_garbled_checkpoint_metadata_json(stopped, tmp_path, capsys):
  w = copy_of(stopped, tmp_path)
  meta = w / "checkpoints" / "latest" / str(STOP) / "meta" / "metadata"
  text = meta.read_text()
  meta.write_text("{garbled" + text[8:])  # same size, no longer JSON
  one_line_error(capsys, predict_argv(w, tmp_path, "--checkpoint", "latest"), str(meta),
                 "checksum")
  # A checkpoint from before checksums (no record): the JSON error itself, still one line.
  (meta.parent.parent / integrity.RECORD).unlink()
  one_line_error(capsys, predict_argv(w, tmp_path, "--checkpoint", "latest"),
                 f"{meta.parent}: unreadable checkpoint metadata")


def test_corrupt_best_refused_by_predict_and_replaced_in_training(stopped, reference, config,
                                                                  blob_data, tmp_path, capsys):
  w = copy_of(stopped, tmp_path)
  best_dir = w / "checkpoints" / "best"
  kept = sorted(int(p.name) for p in best_dir.iterdir())
  bad = largest_file(best_dir / str(kept[-1]) / "state")
  garble(bad)
  one_line_error(capsys, predict_argv(w, tmp_path), str(bad), "corrupt")
  result = trainer.train_and_evaluate(config, w, data=blob_data, quiet=True)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(bad) in err[0], err
  # The reference run's validation losses decide what the best must now be: the older intact
  # best (if one was kept), else none, then epoch 3 if it beats that.
  losses = {h["step"]: h["val_loss"] for h in reference[1]["history"]}
  older = kept[:-1]
  best_step, best_loss = (older[-1], losses[older[-1]]) if older else (-1, np.inf)
  if losses[4 * EPOCHS] < best_loss:
    best_step = 4 * EPOCHS
  assert result["best_step"] == best_step
  assert ckpt_lib.Checkpoints(w, read_only=True).latest_step(ckpt_lib.BEST) == best_step
  assert artifact.load(w).subs[0].step == best_step


def test_every_latest_checkpoint_corrupt_is_one_error(stopped, config, blob_data, tmp_path):
  w = copy_of(stopped, tmp_path)
  for step in (8, STOP):
    truncate(largest_file(w / "checkpoints" / "latest" / str(step) / "state"))
  with pytest.raises(DataError, match="no intact latest checkpoint") as info:
    trainer.train_and_evaluate(config, w, data=blob_data, quiet=True)
  assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The ensemble store.


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
  """A store of one sub-ensemble of 3 random tiny MRInets (mean head, no correction)."""
  manifest = tiny_manifest()
  _, _, stacked = random_members(manifest, 3, seed=5)
  sub = ensemble_model.SubEnsemble("a", ("T1w",), (), manifest, 3, stacked)
  w = tmp_path_factory.mktemp("store") / "W"
  store.save_ensemble(w, ensemble_model.identity(sub))
  return w


def store_manifest(w: Path) -> Path:
  return w / "ensemble" / "manifest" / "metadata"


def garble_json(path: Path) -> None:
  text = path.read_text()
  path.write_text(text[:10] + "#" * 20 + text[30:])


@pytest.mark.parametrize("damage,target,legacy", [
    (truncate, "array", False), (garble, "array", False), (garble_json, "manifest", False),
    (truncate, "array", True), (garble_json, "manifest", True)])
def test_damaged_store_is_one_line_naming_the_file(damage, target, legacy, store_dir, tmp_path,
                                                   capsys):
  w = tmp_path / "W"
  shutil.copytree(store_dir, w)
  store.load_ensemble(w)  # intact, it loads
  path = (largest_file(w / "ensemble" / "variables") if target == "array"
          else store_manifest(w))
  damage(path)
  if legacy:  # a store written before checksums: decoding errors, still one line
    (w / "ensemble" / integrity.RECORD).unlink()
  err = one_line_error(capsys, predict_argv(w, tmp_path),
                       str(path if not legacy or target == "manifest"
                           else w.resolve() / "ensemble" / "variables"))
  assert "Traceback" not in err
  assert not (tmp_path / "p.tsv").exists()


# ---------------------------------------------------------------------------------------------
# Non-finite predictions.


def test_check_finite_names_subject_and_member():
  manifest = tiny_manifest()
  _, _, stacked = random_members(manifest, 3, seed=1)
  model = ensemble_model.identity(ensemble_model.SubEnsemble("a", ("T1w",), (), manifest, 3,
                                                             stacked))
  members = np.arange(12, dtype=np.float64).reshape(4, 3) + 40.0
  subjects = [types.SimpleNamespace(subject_id=f"sub-{c}", session=None, age=50.0)
              for c in "abcd"]
  predict.check_finite(model, subjects, model.combine({"a": members}))
  members[2, 1] = np.nan
  with pytest.raises(DataError) as info:
    predict.check_finite(model, subjects, model.combine({"a": members}))
  assert str(info.value) == ("non-finite predicted age for 1 of 4 subjects (sub-c) from "
                             "sub-ensemble a member 1")
  with pytest.raises(DataError, match=r"for 1 of 4 subjects \(sub-c\)"):
    predict.write_predictions(Path("/nonexistent/never-written.tsv"), model, subjects,
                              model.combine({"a": members}))


def test_nan_parameter_in_store_fails_predict_naming_subjects(workdir, tmp_path,  # noqa: F811
                                                            capsys):
  one = artifact.load_sub_ensemble("all", workdir)
  params = jax.tree.map(np.array, one.variables["params"])
  kernel = params["dense1"]["kernel"]  # [1, ...]: a second member gets a NaN weight
  bad = jax.tree.map(lambda a: a.copy(), params)
  bad["dense1"]["kernel"][0].flat[0] = np.nan
  two = ensemble_model.SubEnsemble(
      "all", one.sequences, (), one.manifest, 2,
      {"params": jax.tree.map(lambda a, b: np.concatenate([a, b]), params, bad)},
      cache_dir=one.cache_dir, preprocessing=one.preprocessing)
  assert np.isfinite(kernel).all()
  w = tmp_path / "W"
  store.save_ensemble(w, ensemble_model.identity(two, workdir=w))
  out = tmp_path / "p.tsv"
  ids = [line.split("\t")[0] for line in
         (workdir / "data" / "participants.tsv").read_text().splitlines()[1:]]
  err = one_line_error(capsys, ["predict", "--workdir", str(w), "--data", str(workdir / "data"),
                                "--out", str(out)],
                       f"non-finite predicted age for {len(ids)} of {len(ids)} subjects",
                       ", ".join(ids[:5]), "sub-ensemble all member 1", f"{out} not written")
  assert "member 0" not in err
  assert not out.exists()


def test_corrupt_best_of_stacked_members_falls_back(blob_data, tmp_path, capsys):
  """Members resume their best states from the best checkpoint: a damaged one is replaced by
  the older intact one (its per-member records adopted), and the run finishes."""
  config = tiny_config(num_epochs=EPOCHS, num_image_summaries=0, **{"ensemble.members": 2})
  w = tmp_path / "W"
  trainer.train_and_evaluate(config, w, data=blob_data, quiet=True, max_steps=STOP)
  best_dir = w / "checkpoints" / "best"
  kept = sorted(int(p.name) for p in best_dir.iterdir())
  bad = largest_file(best_dir / str(kept[-1]) / "state")
  garble(bad)
  older_meta = (json.loads((best_dir / str(kept[-2]) / "meta" / "metadata").read_text())
                if len(kept) > 1 else None)
  result = trainer.train_and_evaluate(config, w, data=blob_data, quiet=True)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(bad) in err[0], err
  assert result["step"] == 4 * EPOCHS and len(result["members"]) == 2
  # Each member's best is now either from the older best checkpoint's record or epoch 3.
  for m, member in enumerate(result["members"]):
    before = (older_meta["progress"]["members"][m]["best_step"] if older_meta else -1)
    assert member["best_step"] in (before, 4 * EPOCHS)
  model = artifact.load(w)
  assert model.subs[0].members == 2
