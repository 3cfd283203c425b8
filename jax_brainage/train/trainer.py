"""Training a brain-age model: `train_and_evaluate(config, workdir)`.

One readable experiment in big_vision's sections: workdir / input pipeline / model and optimiser /
sharding / update step / checkpoint / loop. Data parallel over every device of every process
(`jax_brainage.sharding` decides the layouts), one jitted update step with donated state and
explicit output shardings (`train.steps`), validation every epoch, early stopping on the
validation loss, latest + best orbax checkpoints from which an interrupted run resumes bit for
bit, TensorBoard scalars and input mid-slices, a tqdm progress bar with ETA (`train.loop`). With
`config.ensemble.members = M > 1` the same loop trains M stacked members at once
(`train.members`). `brainage train` (`jax_brainage.commands.train`) runs it through
`ensemble.experiment.train`.

Workdir layout (the contract is `jax_brainage.train.artifact`'s):
    W/config.json          the experiment (full config + fingerprint); a different one is refused
    W/checkpoints/latest/  to resume;  W/checkpoints/best/  lowest validation loss
    W/tensorboard/         event files;  W/metrics.json  per-epoch history and the final result
    W/split.json           train/val/test rows (and subject ids) of the data it was trained on
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_brainage import fileio, sharding
from jax_brainage.data import splits as splits_lib
from jax_brainage.errors import ConfigError
from jax_brainage.train import artifact
from jax_brainage.train import checkpoint as ckpt_lib
from jax_brainage.train import config_checks
from jax_brainage.train import data as data_lib
from jax_brainage.train import finetune
from jax_brainage.train import loop, members as members_lib, steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       data: data_lib.TrainingData | None = None, quiet: bool = False,
                       devices: list[jax.Device] | None = None,
                       max_steps: int | None = None) -> dict[str, Any]:
  """Trains (or resumes training) the configured model; returns the final metrics.

  Args:
    config: a checked config (`config_loading.load_config` / `base_config()` based).
    workdir: where checkpoints, TensorBoard logs, config.json and metrics.json go. If it holds
      a checkpoint of this experiment, training resumes exactly where it stopped: from the
      newest latest checkpoint that verifies against its checksums (a corrupt one is moved to
      W/checkpoints/corrupt/ with a one-line warning, and the next older one is used).
    data: training data; default: opened from `config.data` (cache, or simulated cohort).
    quiet: no progress bar (CI).
    devices: devices to train on (default: all devices of all processes).
    max_steps: stop after this global step (for tests and for splitting long runs into jobs);
      the run is resumable from there.
  Returns:
    dict with step, epoch, best_val_loss, best_val_mae (years), best_step, stopped ("done",
    "early_stopping" or "max_steps"), train_seconds and volumes_per_second.
  Raises:
    ConfigError: the workdir holds another experiment; a checkpoint of another architecture;
      the batch does not split over the devices.
    DataError: the data does not match the model (shape, sequences); every latest
      checkpoint is corrupt (naming the newest's bad file).
    loop.NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
  """
  workdir = Path(workdir)
  config_checks.validate(config)

  # --- Workdir: one experiment per directory. ------------------------------------------------
  artifact.claim_workdir(config, workdir)

  # --- Input pipeline. ---------------------------------------------------------------------------
  data = data_lib.open_training_data(config) if data is None else data
  data.check_against(config.data.sequences, config.data.image_shape)
  if config.ensemble.members > 1:
    return _train_members(config, workdir, data, quiet=quiet, devices=devices,
                          max_steps=max_steps)
  batch_size = int(config.batch_size)
  eval_batch_size = int(config.eval_batch_size or batch_size)
  steps_per_epoch = data.steps_per_epoch(batch_size)
  total_steps = steps_per_epoch * int(config.num_epochs)
  if sharding.is_main_process():
    # The held-out test subjects, for `brainage predict` and the demo's evaluation.
    splits_lib.save_split(workdir / "split.json", data.split,
                          getattr(data.source, "subject_ids", None),
                          seed=int(config.data.split_seed), source=data.name)

  # --- Model and optimiser; sharding; update step (built once per experiment and mesh). ---------
  mesh = sharding.make_mesh(devices=devices)
  sharding.check_batch_size(batch_size, mesh)
  sharding.check_batch_size(eval_batch_size, mesh, key="config.eval_batch_size")
  setup = steps.build_setup(config, data.image_shape, len(data.sequences), data.mean_train_age,
                            total_steps, mesh, age_scale=artifact.train_age_scale(config, data))
  schedule, abstract_state, state_sharding = (setup.schedule, setup.abstract_state,
                                              setup.state_sharding)
  num_params = sum(int(x.size) for x in jax.tree.leaves(abstract_state["params"]))
  manifest = artifact.model_manifest(config, data, num_params)

  # --- Checkpoint: resume, or start (optionally from another run's parameters). --------------
  batches = data.train_batches(mesh, batch_size, int(config.seed), config.augment,
                               mode=config.data.mode, workers=int(config.data.workers))
  val_batches = data.eval_batches(mesh, eval_batch_size, "val", mode=config.data.mode,
                                  workers=int(config.data.workers))
  checkpoints = ckpt_lib.Checkpoints(workdir, keep=int(config.keep_checkpoints))
  progress = {"epoch": 0, "best_val_loss": math.inf, "best_val_mae": math.nan,
              "best_step": -1, "bad_epochs": 0, "history": [], "stopped": "",
              # Summed over all runs of this experiment (resumptions included).
              "train_seconds": 0.0, "timed_steps": 0, "timed_seconds": 0.0}
  try:
    # The newest intact latest step (verified before any training; corrupt ones moved aside).
    resumed = checkpoints.restore_intact(ckpt_lib.LATEST, abstract_state, manifest)
    if resumed is not None:
      state, meta, resumed_step = resumed
      progress.update(meta["progress"])
      progress["best_val_loss"] = _float(progress["best_val_loss"])
      batches.set_state(meta["data_state"])
      had_best = any(s <= resumed_step for s in checkpoints.all_steps(ckpt_lib.BEST))
      best = checkpoints.newest_intact(ckpt_lib.BEST, max_step=resumed_step,
                                       none_left=_BEST_AGAIN)
      _resume_best(progress, None if best is None else best[1], resumed_step,
                   warn_none=not had_best)
    else:
      # Eager init: random initialisers compile once per shape and process, not once per run.
      state = jax.device_put(setup.init(int(config.seed)), state_sharding)
      if config.init_from:
        state = finetune.load_pretrained(config, state, state_sharding)
      checkpoints.save(ckpt_lib.LATEST, 0, state,
                       loop.checkpoint_meta(progress, manifest, batches))
    step = int(sharding.to_host(state["step"]))
    if batches.step != step:
      raise ConfigError(f"checkpoint in {workdir}: data position {batches.step} differs from "
                        f"training step {step}")
  except BaseException:
    checkpoints.close()
    batches.close()
    raise

  # --- Loop. -------------------------------------------------------------------------------------
  run = loop.run_loop(config, workdir, loop.OneModel(setup, state, batch_size), batches=batches,
                      val_batches=val_batches, checkpoints=checkpoints, progress=progress,
                      manifest=manifest, schedule=schedule, step=step,
                      total_steps=total_steps, steps_per_epoch=steps_per_epoch, quiet=quiet,
                      max_steps=max_steps, data_dtype=data.dtype)
  result = {"step": run["step"], "epoch": progress["epoch"],
            "best_val_loss": progress["best_val_loss"], "best_val_mae": progress["best_val_mae"],
            "best_step": progress["best_step"], "stopped": progress["stopped"] or "done",
            "num_params": num_params, "train_seconds": run["train_seconds"],
            "volumes_per_second": run["volumes_per_second"], "history": progress["history"]}
  if sharding.is_main_process():
    fileio.write_json(workdir / "metrics.json", fileio.jsonable(result))
  return result


def _train_members(config: ml_collections.ConfigDict, workdir: Path,
                   data: data_lib.TrainingData, *, quiet: bool,
                   devices: list[jax.Device] | None, max_steps: int | None) -> dict[str, Any]:
  """`train_and_evaluate` for `config.ensemble.members = M > 1` (see there and
  `members.MemberSetup`).

  Same loop as a single model, with M stacked members: one compiled step per member group,
  per-member validation and best state (selected on device at the end of an epoch), early
  stopping once every member has gone `patience` epochs without improving.
  """
  members = int(config.ensemble.members)
  batch_size = int(config.batch_size)
  eval_batch_size = int(config.eval_batch_size or batch_size)
  steps_per_epoch = data.steps_per_epoch(batch_size)
  total_steps = steps_per_epoch * int(config.num_epochs)
  if sharding.is_main_process():
    splits_lib.save_split(workdir / "split.json", data.split,
                          getattr(data.source, "subject_ids", None),
                          seed=int(config.data.split_seed), source=data.name)

  # --- Mesh (members over 'ensemble', batch over 'data'); vmap width; compiled steps. ---------
  devices = list(jax.devices() if devices is None else devices)
  mesh_size = members_lib.ensemble_mesh_size(config, len(devices), (batch_size, eval_batch_size))
  mesh = sharding.make_mesh(mesh_size, devices)
  sharding.check_batch_size(batch_size, mesh)
  sharding.check_batch_size(eval_batch_size, mesh, key="config.eval_batch_size")
  setup = members_lib.build_member_setup(config, data.image_shape, len(data.sequences),
                                         data.mean_train_age, total_steps, mesh,
                                         age_scale=artifact.train_age_scale(config, data))
  groups, schedule = setup.groups, setup.schedule
  num_params = sum(int(x.size) for x in jax.tree.leaves(setup.abstract_state["params"]))
  num_params //= members
  manifest = dict(artifact.model_manifest(config, data, num_params), members=members)

  # --- Data: member m reads the batches of a single run with seed + m. -------------------------
  seeds = members_lib.member_seeds(config)
  rows = data.member_rows(seeds, bool(config.ensemble.bootstrap))
  batches = data.member_batches(mesh, batch_size, seeds, rows, config.augment, groups,
                                mode=config.data.mode, workers=int(config.data.workers))
  val_batches = data.eval_batches(mesh, eval_batch_size, "val", mode=config.data.mode,
                                  workers=int(config.data.workers))
  checkpoints = ckpt_lib.Checkpoints(workdir, keep=int(config.keep_checkpoints))
  progress = {"epoch": 0, "stopped": "", "history": [],
              "members": [{"best_val_loss": math.inf, "best_val_mae": math.nan,
                           "best_step": -1, "bad_epochs": 0} for _ in range(members)],
              "train_seconds": 0.0, "timed_steps": 0, "timed_seconds": 0.0}
  try:
    resumed = checkpoints.restore_intact(ckpt_lib.LATEST, setup.abstract_state, manifest)
    if resumed is not None:
      state, meta, resumed_step = resumed
      progress.update(meta["progress"])
      for m in progress["members"]:
        m["best_val_loss"] = _float(m["best_val_loss"])
      batches.set_state(meta["data_state"])
      # Each member's best state as of the resumed step (a later one is recomputed).
      had_best = any(s <= resumed_step for s in checkpoints.all_steps(ckpt_lib.BEST))
      found = checkpoints.restore_intact(ckpt_lib.BEST, setup.abstract_state, manifest,
                                         max_step=resumed_step, required=False,
                                         none_left=_BEST_AGAIN)
      best = jax.tree.map(jnp.copy, state) if found is None else found[0]
      _resume_best(progress, None if found is None else found[1], resumed_step,
                   warn_none=not had_best)
    else:
      state = jax.device_put(setup.init(seeds), setup.state_sharding)
      if config.init_from:
        state = finetune.load_pretrained(config, state, setup.state_sharding, members)
      best = jax.tree.map(jnp.copy, state)
      checkpoints.save(ckpt_lib.LATEST, 0, state,
                       loop.checkpoint_meta(progress, manifest, batches))
    step = int(sharding.to_host(state["step"]))
    if batches.step != step:
      raise ConfigError(f"checkpoint in {workdir}: data position {batches.step} differs from "
                        f"training step {step}")
    states, bests = setup.split(state), setup.split(best)
    del state, best
  except BaseException:
    checkpoints.close()
    batches.close()
    raise

  # --- Loop. -------------------------------------------------------------------------------------
  run = loop.run_loop(config, workdir,
                      loop.StackedMembers(setup, states, bests, batch_size, members),
                      batches=batches, val_batches=val_batches, checkpoints=checkpoints,
                      progress=progress, manifest=manifest, schedule=schedule, step=step,
                      total_steps=total_steps, steps_per_epoch=steps_per_epoch, quiet=quiet,
                      max_steps=max_steps, data_dtype=data.dtype)
  per_member = [{"best_val_mae": p["best_val_mae"], "best_val_loss": p["best_val_loss"],
                 "best_step": p["best_step"]} for p in progress["members"]]
  result = {"step": run["step"], "epoch": progress["epoch"],
            # The members' means; each member's own numbers are in "members".
            "best_val_loss": float(np.mean([p["best_val_loss"] for p in per_member])),
            "best_val_mae": float(np.mean([_float(p["best_val_mae"]) for p in per_member])),
            "best_step": max(p["best_step"] for p in per_member),
            "members": per_member, "stopped": progress["stopped"] or "done",
            "num_params": num_params, "train_seconds": run["train_seconds"],
            # Member-volumes/s: every member's batch counts.
            "volumes_per_second": run["volumes_per_second"],
            "vmap_width": setup.width, "groups": [[g.start, g.stop] for g in groups],
            "mesh": {k: int(v) for k, v in mesh.shape.items()}, "memory": setup.memory,
            "history": progress["history"]}
  if sharding.is_main_process():
    fileio.write_json(workdir / "metrics.json", fileio.jsonable(result))
  return result


_BEST_AGAIN = ("no intact best checkpoint is left: the best is chosen again from the next "
               "validation")


def _resume_best(progress: dict[str, Any], best_meta: dict[str, Any] | None,
                 resumed_step: int, *, warn_none: bool = True) -> None:
  """Makes the resumed progress agree with the newest intact best checkpoint.

  Normally that checkpoint is the one the progress names (the newest best step) and nothing
  changes. When it was corrupt (moved aside) the progress takes the best loss, MAE and step
  recorded in the older best used instead (per member when stacked), so that the next
  validation saves a new best only if it beats that one; with no intact best at all, the best
  is chosen again from the next validation on (warned here if `warn_none`, i.e. when no bad
  step was already reported).
  """
  records = progress.get("members") or [progress]
  expected = max(int(r["best_step"]) for r in records)
  if best_meta is None:
    if expected >= 0:
      if warn_none:
        ckpt_lib.warn(f"no best checkpoint up to step {resumed_step} (its progress names step "
                      f"{expected}): the best is chosen again from the next validation")
      for r in records:
        r.update(best_val_loss=math.inf, best_val_mae=math.nan, best_step=-1)
    return
  if int(best_meta.get("step", expected)) == expected:
    return
  stored = best_meta.get("progress") or {}
  stored = stored.get("members") or [stored]
  if len(stored) != len(records):
    raise ConfigError(f"best checkpoint of step {best_meta.get('step')}: holds {len(stored)} "
                      f"members' progress, the run has {len(records)}")
  for r, b in zip(records, stored):
    r.update(best_val_loss=_float(b.get("best_val_loss")), best_val_mae=b.get("best_val_mae"),
             best_step=int(b.get("best_step", -1)))


def _float(x: Any) -> float:
  """A progress record's loss: JSON null (an infinite best loss) back to inf."""
  return math.inf if x is None else float(x)
