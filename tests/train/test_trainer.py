"""The training loop on a tiny MRInet and a learnable synthetic cohort (16^3, 4 fake devices)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_brainage import models, sharding
from jax_brainage.commands import train as train_command
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.train import artifact
from jax_brainage.train import checkpoint as ckpt_lib
from jax_brainage.train import config as config_lib
from jax_brainage.train import data as data_lib
from jax_brainage.data import splits as splits_lib
from jax_brainage.train import experiment, loop, trainer
from jax_brainage.train import steps as steps_lib

EPOCHS = 6  # 32 training subjects / batch 8 = 4 steps per epoch


def _restore_latest(workdir, config, data):
  """Latest checkpoint's state as numpy, restored onto the experiment's own abstract state."""
  setup = steps_lib.build_setup(config, data.image_shape, 1, data.mean_train_age,
                                4 * config.num_epochs, sharding.make_mesh())
  num_params = sum(int(x.size) for x in jax.tree.leaves(setup.abstract_state["params"]))
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  state, meta = ckpts.restore(ckpt_lib.LATEST, setup.abstract_state,
                              artifact.model_manifest(config, data, num_params))
  ckpts.close()
  return jax.device_get(state), meta


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_config, blob_data):
  """One full run; other tests compare against it (and reuse its compiled steps)."""
  config = make_config(num_epochs=EPOCHS)
  workdir = tmp_path_factory.mktemp("full")
  result = trainer.train_and_evaluate(config, workdir, data=blob_data, quiet=True)
  return config, workdir, result


def test_loss_decreases_and_beats_the_mean_age_predictor(trained, blob_data):
  config, workdir, result = trained
  assert result["stopped"] == "done" and result["step"] == 4 * EPOCHS
  history = result["history"]
  assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
  assert min(h["val_loss"] for h in history[1:]) < 0.4 * history[0]["val_loss"]
  # Independent baseline: always predict the mean training age (numpy).
  ages = blob_data.source.ages
  baseline = np.mean(np.abs(ages[blob_data.split.val] - ages[blob_data.split.train].mean()))
  assert result["best_val_mae"] < 0.6 * baseline
  # The best checkpoint is the epoch with the lowest validation loss.
  best = min(history, key=lambda h: h["val_loss"])
  assert result["best_step"] == best["step"]
  assert ckpt_lib.Checkpoints(workdir, read_only=True).latest_step(ckpt_lib.BEST) == best["step"]
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["best_step"] == best["step"]
  split = json.loads((workdir / "split.json").read_text())
  assert split["test"] == blob_data.split.test.tolist() and split["seed"] == 0


def test_resume_after_interruption_continues_exactly(trained, tmp_path, blob_data):
  config, full_dir, full = trained
  workdir = tmp_path / "resumed"
  # Stop in the middle of an epoch (step 10 of 24), then resume in a fresh call.
  first = trainer.train_and_evaluate(config, workdir, data=blob_data, quiet=True, max_steps=10)
  assert first["stopped"] == "max_steps" and first["step"] == 10
  second = trainer.train_and_evaluate(config, workdir, data=blob_data, quiet=True)
  assert second["step"] == full["step"]
  assert [h["val_loss"] for h in second["history"]] == [h["val_loss"] for h in full["history"]]
  resumed, meta = _restore_latest(workdir, config, blob_data)
  reference, ref_meta = _restore_latest(full_dir, config, blob_data)
  assert meta["data_state"] == ref_meta["data_state"]
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_ctrl_c_keeps_the_interrupted_step_and_resume_finishes_exactly(trained, tmp_path,
                                                                     blob_data, monkeypatch):
  """KeyboardInterrupt in the middle of epoch 2 (after step 7): the latest checkpoint is step
  7, not the end of epoch 1, and resuming ends where the uninterrupted run ends."""
  config, full_dir, full = trained
  real_bar = loop.progress_bar

  def interrupting_bar(*args, **kwargs):
    bar, steps = real_bar(*args, **kwargs), [0]
    update = bar.update

    def update_then_interrupt(n=1):
      update(n)
      steps[0] += n
      if steps[0] == 7:
        raise KeyboardInterrupt
    bar.update = update_then_interrupt
    return bar

  monkeypatch.setattr(loop, "progress_bar", interrupting_bar)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  monkeypatch.undo()
  assert ckpt_lib.Checkpoints(tmp_path, read_only=True).latest_step() == 7
  second = trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  assert second["step"] == full["step"]
  assert [h["val_loss"] for h in second["history"]] == [h["val_loss"] for h in full["history"]]
  resumed, _ = _restore_latest(tmp_path, config, blob_data)
  reference, _ = _restore_latest(full_dir, config, blob_data)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_finished_run_is_not_trained_again(trained, blob_data):
  config, workdir, full = trained
  again = trainer.train_and_evaluate(config, workdir, data=blob_data, quiet=True)
  assert again["step"] == full["step"] and again["history"] == full["history"]
  # Training time and throughput are those of the experiment, not of the idle re-run.
  assert 0 < again["train_seconds"] <= full["train_seconds"]
  assert again["train_seconds"] > 0.5 * full["train_seconds"]
  np.testing.assert_allclose(again["volumes_per_second"], full["volumes_per_second"], rtol=1e-6)


def test_early_stopping_after_patience_epochs_without_improvement(trained, make_config,
                                                                  blob_data, tmp_path):
  _, _, full = trained
  losses = [h["val_loss"] for h in full["history"]]
  # With patience 1, training stops after the first epoch that does not beat the best so far;
  # the runs agree until then (same seed, same data order).
  worse = [e for e in range(1, len(losses)) if losses[e] >= min(losses[:e])]
  assert worse, "the reference run never plateaus; choose another seed"
  stop_epoch = worse[0] + 1
  config = make_config(num_epochs=EPOCHS, patience=1)
  result = trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  assert result["stopped"] == "early_stopping"
  assert result["epoch"] == stop_epoch and result["step"] == 4 * stop_epoch
  assert [h["val_loss"] for h in result["history"]] == losses[:stop_epoch]
  best_epoch = int(np.argmin(losses[:stop_epoch])) + 1
  assert result["best_step"] == 4 * best_epoch
  assert ckpt_lib.Checkpoints(tmp_path, read_only=True).latest_step(ckpt_lib.BEST) == \
      4 * best_epoch


def test_tensorboard_has_scalars_and_input_images(trained):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  config, workdir, _ = trained
  events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"images": 0})
  events.Reload()
  scalars = set(events.Tags()["scalars"])
  assert {"train/loss", "train/mae", "train/learning_rate", "train/volumes_per_second",
          "val/loss", "val/mae"} <= scalars
  lr = [e.value for e in events.Scalars("train/learning_rate")]
  np.testing.assert_allclose(lr, config.optimizer.learning_rate, rtol=1e-6)
  assert [e.step for e in events.Scalars("val/loss")] == [4 * e for e in range(1, EPOCHS + 1)]
  (tag,) = events.Tags()["images"]
  assert tag.startswith("inputs/0_age_")
  image = events.Images(tag)[0]
  assert (image.height, image.width) == (16, 3 * 16)  # sagittal | coronal | axial


def test_data_parallel_step_equals_single_device_step(make_config, blob_data):
  """One update on 4 devices (batch split over 'data') == on 1 device, and == Adam by hand."""
  config = make_config(**{"model.dropout_rate": 0.5})
  model = models.get_model("mrinet", mean_age=50.0, conv_features=(4, 4, 8, 8, 4),
                           dense_features=8, dropout_rate=0.5)
  tx = optax.adam(config.optimizer.learning_rate)
  state = steps_lib.init_state(model, tx, (16, 16, 16), 1, seed=3)
  images = np.asarray(blob_data.source.read(np.arange(8)), np.float32) / 255.0
  host_batch = {"image": images, "age": blob_data.source.ages[:8]}
  step_fn = steps_lib.make_train_step(config, model, tx)

  def run(devices):
    mesh = sharding.make_mesh(devices=devices)
    shardings = sharding.state_shardings(mesh, jax.eval_shape(lambda: state))
    step = jax.jit(step_fn, out_shardings=(shardings, sharding.replicated(mesh)))
    new_state, metrics = step(jax.device_put(state, shardings),
                              sharding.global_batch(mesh, host_batch))
    return jax.device_get(new_state), jax.device_get(metrics)

  one, m1 = run(jax.devices()[:1])
  four, m4 = run(jax.devices())
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(four["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  # Independent reference: the MSE gradient with the same dropout key, then Adam's first step
  # by its formula (m_hat = g, v_hat = g^2): p - lr * g / (|g| + eps).
  key = jax.random.fold_in(state["rng"], 0)

  def mse(params):
    out = model.apply({"params": params}, jnp.asarray(images), train=True, rngs={"dropout": key})
    return jnp.mean((out - host_batch["age"]) ** 2)

  grads = jax.grad(mse)(state["params"])
  lr = config.optimizer.learning_rate
  expected = jax.tree.map(lambda p, g: p - lr * g / (np.abs(g) + 1e-8), state["params"], grads)
  for a, b in zip(jax.tree.leaves(four["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(four["step"]) == 1


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(make_config, blob_data,
                                                                    tmp_path):
  # A learning rate of 1e8 sends the weights to ~1e8 after one step: the second loss is inf.
  config = make_config(**{"optimizer.learning_rate": 1e8, "checkpoint_every_steps": 1})
  with pytest.raises(loop.NonFiniteLossError) as info:
    trainer.train_and_evaluate(config, tmp_path, data=blob_data, quiet=True)
  message = str(info.value)
  assert "\n" not in message and "at step 2" in message
  assert f"{tmp_path / 'checkpoints' / 'latest'}/1" in message
  ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=True)
  assert ckpts.latest_step() == 1  # the last finite state, never the non-finite one
  state, _ = _restore_latest(tmp_path, config, blob_data)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_workdir_of_another_experiment_is_refused(trained, make_config, blob_data):
  _, workdir, _ = trained
  other = make_config(num_epochs=EPOCHS, **{"optimizer.learning_rate": 1e-4})
  with pytest.raises(ConfigError, match=r"holds a different experiment: "
                                        r"config.optimizer.learning_rate is 0.01 there"):
    trainer.train_and_evaluate(other, workdir, data=blob_data, quiet=True)


def test_checkpoint_of_another_architecture_is_refused(trained, make_config, blob_data, tmp_path):
  _, workdir, _ = trained
  wider = make_config(**{"model.dense_features": 32, "init_from": str(workdir)})
  with pytest.raises(ConfigError, match=r"dense1/bias has shape \(16,\) there, \(32,\) here"):
    trainer.train_and_evaluate(wider, tmp_path, data=blob_data, quiet=True)


@pytest.mark.parametrize("key,value,match", [
    ("data.image_shape", (32, 32, 32), r"volumes are \(16, 16, 16\) voxels, the model expects"),
    ("data.sequences", ("FLAIR",), r"data has sequences \['T1w'\], the model expects \['FLAIR'\]"),
])
def test_data_that_does_not_match_the_model_is_refused(make_config, blob_data, tmp_path, key,
                                                       value, match):
  with pytest.raises(DataError, match=match) as info:
    trainer.train_and_evaluate(make_config(**{key: value}), tmp_path, data=blob_data, quiet=True)
  assert "\n" not in str(info.value)


def test_missing_sequence_in_cache_is_refused():
  images = np.zeros((10, 4, 4, 4, 2), np.uint8)
  with pytest.raises(DataError, match="has no sequence 'swi'"):
    data_lib.from_arrays(images, np.linspace(20, 80, 10), ("swi",), available=("T1w", "FLAIR"),
                         name="cache-x")


def test_sequences_are_picked_by_name_in_model_order():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (10, 4, 4, 4, 3)).astype(np.uint8)
  data = data_lib.from_arrays(images, np.linspace(20, 80, 10), ("swi", "T1w"),
                              available=("T1w", "FLAIR", "swi"))
  np.testing.assert_array_equal(data.source.read(np.array([3, 1])), images[[3, 1]][..., [2, 0]])
  assert data.source.volume_shape == (4, 4, 4, 2)


@pytest.mark.parametrize("schedule,warmup", [("constant", 0), ("cosine", 0), ("cosine", 5),
                                             ("constant", 5)])
def test_learning_rate_schedules_follow_their_formulas(make_config, schedule, warmup):
  config = make_config(**{"optimizer.schedule": schedule, "optimizer.warmup_steps": warmup})
  lr, total = config.optimizer.learning_rate, 25
  fn = steps_lib.make_schedule(config.optimizer, total)
  for t in (0, 3, 5, 12, 24):
    if t < warmup:
      expected = lr * t / warmup
    elif schedule == "constant":
      expected = lr
    else:
      expected = lr * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup)))
    np.testing.assert_allclose(float(fn(t)), expected, rtol=1e-5, atol=1e-9)


def test_train_command_collects_config_overrides(tmp_path):
  import argparse

  parser = argparse.ArgumentParser(prog="brainage")
  train_command.add_parser(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
                            "--config.optimizer.learning_rate", "1e-3",
                            "--config.data.sequences=('T1w','FLAIR')", "--quiet"])
  assert args.overrides == ["--config.optimizer.learning_rate", "1e-3",
                            "--config.data.sequences=('T1w','FLAIR')"]
  assert args.quiet and args.func is train_command.run
  with pytest.raises(SystemExit):
    parser.parse_args(["train", "--config", "x.py", "--workdir", "w", "--bogus"])


def test_zscore_data_trains_with_finite_loss(make_config, zscore_blob_data, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  data = zscore_blob_data
  assert data.dtype == np.float16 and np.asarray(data.source.volumes).min() < -0.5
  config = make_config(num_epochs=2, **{"augment.shift_voxels": 1, "augment.noise_std": 0.05})
  result = trainer.train_and_evaluate(config, tmp_path, data=data, quiet=True)
  assert result["stopped"] == "done" and result["step"] == 8
  assert all(np.isfinite(h["val_loss"]) and np.isfinite(h["val_mae"]) for h in result["history"])
  events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
  events.Reload()
  assert all(np.isfinite(e.value) for e in events.Scalars("train/loss"))
  assert len(events.Tags()["images"]) == 1  # input mid-slices of z-scores


def test_zscore_cache_trains_an_ensemble_through_the_command(tmp_path, capsys):
  """simulate -> prepare --scaling zscore -> `brainage train` (2 stacked members, head,
  correction, store): 20 subjects at 4 mm (2 for validation: the linear correction needs
  two ages), 32^3, the tiny preset's MRInet, one epoch."""
  import argparse

  from jax_brainage.data import bids
  from jax_brainage.data import prepare as prepare_lib
  from jax_brainage.data import simulate
  from jax_brainage.data.preprocess import Preprocessing

  data, cache = tmp_path / "data", tmp_path / "cache"
  simulate.write_cohort(data, simulate.CohortConfig(seed=0, n=20, resolution_mm=4,
                                                    sequences=("T1w",)),
                        workers=1, progress=False)
  prep = Preprocessing(sequences=("T1w",), shape=(32, 32, 32), scaling="zscore")
  prepared = prepare_lib.prepare(bids.read_bids(data, ("T1w",)), cache, prep, workers=1,
                                 progress=False)
  assert prepared.volumes.dtype == np.float16 and np.asarray(prepared.volumes).min() < 0
  parser = argparse.ArgumentParser(prog="brainage")
  train_command.add_parser(parser.add_subparsers(dest="command"))
  workdir = tmp_path / "work"
  args = parser.parse_args([
      "train", "--config", "configs/tiny.py", "--workdir", str(workdir), "--quiet",
      "--config.data.cache", str(cache), "--config.data.simulate.out", str(data),
      "--config.data.simulate.n", "20", "--config.data.sequences", "('T1w',)",
      "--config.data.image_shape", "(32, 32, 32)", "--config.num_epochs", "1",
      "--config.ensemble.members", "2", "--config.num_image_summaries", "1"])
  assert args.func(args) == 0
  assert "ensemble of 2 members" in capsys.readouterr().out
  values = list(_numbers(json.loads((workdir / "metrics.json").read_text())))
  assert values and np.all(np.isfinite(values))  # losses, MAEs, head weights: no NaN


def _numbers(tree):
  """Every number in a JSON tree."""
  if isinstance(tree, dict):
    tree = list(tree.values())
  if isinstance(tree, list):
    for v in tree:
      yield from _numbers(v)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield float(tree)


@pytest.mark.parametrize("shape", [(0, 0, 0), (44, 52, 44)])
def test_configured_box_shape_is_what_the_simulated_cache_holds(tmp_path, shape):
  """`data.simulate.n > 0` simulates and prepares the cache on first use: with the configured
  box `data.image_shape` (the cpu preset's 40 x 50 x 40 is one), or the default 50^3 cube at
  4 mm. Either way the brain's voxels (nonzero in the T1w file, read with nibabel) are all
  in the volume the trainer sees when the box holds the brain."""
  import nibabel as nib

  config = config_lib.base_config()
  config.data.simulate.n, config.data.simulate.resolution = 3, 4
  config.data.simulate.out = str(tmp_path / "sim")
  config.data.cache = str(tmp_path / "cache")
  config.data.sequences = ("T1w",)
  config.data.image_shape = shape
  config.data.workers = 1
  data = data_lib.open_training_data(config)
  assert data.image_shape == (shape if any(shape) else (50, 50, 50))
  image = nib.load(tmp_path / "sim" / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz")
  brain = np.count_nonzero(np.asarray(image.dataobj))
  volume = np.asarray(data.source.volumes[0], np.float32)
  assert 0.9 * brain <= np.count_nonzero(volume) <= brain


# ---------------------------------------------------------------------------------------------
# What can fail after training is checked before it.


def _split_data(val_ages, n_train=16, n_test=2, side=16):
  """Random volumes with a chosen validation split: `val_ages` (years) are its subjects' ages
  (nothing is trained on them: the checks refuse first)."""
  rng = np.random.default_rng(0)
  n = n_train + len(val_ages) + n_test
  images = rng.integers(0, 255, (n, side, side, side, 1)).astype(np.uint8)
  ages = rng.uniform(20, 80, n).astype(np.float32)
  val = np.arange(n_train, n_train + len(val_ages))
  ages[val] = np.asarray(val_ages, np.float32)
  split = splits_lib.Split(np.arange(n_train), val,
                           np.arange(n_train + len(val_ages), len(ages)))
  return data_lib.from_arrays(images, ages, ("T1w",), split=split)


@pytest.mark.parametrize("overrides,val_ages,match", [
    ({"ensemble.members": 2}, [50.0, 50.0, 50.0],
     r"config.ensemble.correction='linear': a degree-1 fit needs at least 2 distinct "
     r"validation ages, the 3 validation subjects of .* have 1"),
    ({"ensemble.members": 2, "ensemble.correction": "poly3"}, [40.0, 50.0, 60.0, 60.0],
     r"correction='poly3': a degree-3 fit needs at least 4 distinct validation ages"),
    ({"ensemble.sub_ensembles": ("a=T1w", "b=T1w")}, [50.0],
     r"config.ensemble.head='linear': its level-2 cross-validation .* needs at least 2 "
     r"validation subjects"),
    ({}, [], r"the validation split is empty"),
    ({"batch_size": 32}, [40.0, 60.0], r"config.batch_size=32 exceeds the 16 training subjects"),
    ({"init_from": "/no/such/workdir"}, [40.0, 60.0],
     r"config.init_from='/no/such/workdir': no such workdir"),
])
def test_what_would_fail_after_training_is_refused_before_it(make_config, tmp_path, overrides,
                                                            val_ages, match):
  """The issue's case first: a validation split with one distinct age used to train for
  minutes, then fail in the bias correction. Now: a one-line ConfigError, and nothing trained
  (no checkpoint, no compiled step)."""
  config = make_config(**overrides)
  data = _split_data(val_ages)
  with pytest.raises(ConfigError, match=match) as info:
    experiment.train(config, tmp_path, data=data, quiet=True)
  assert "\n" not in str(info.value)
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "sub").exists()
  # The same validation split with enough distinct ages passes the checks (numpy's count).
  if "correction" in match:
    degree = 3 if "poly3" in match else 1
    fine = _split_data(list(np.linspace(30.0, 70.0, degree + 1)))
    assert len(np.unique(fine.source.ages[fine.split.val])) == degree + 1
    experiment.check_before_training(config, fine)
