"""The training loop shared by one model and by stacked ensemble members.

`run_loop` trains a trainee from a step to the end of training, early stopping or `max_steps`:
one update per batch (metrics stay on device until logged: no host sync per step), validation
and checkpoints at the end of each epoch (latest, and best when validation improved), TensorBoard
scalars and input mid-slices, a tqdm progress bar with ETA. What differs between one model and M
members (one state or member groups; per-member validation and best states) is in the trainee:
`OneModel` or `StackedMembers`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_brainage import fileio, sharding
from jax_brainage.errors import BrainAgeError
from jax_brainage.train import checkpoint as ckpt_lib
from jax_brainage.train import members as members_lib
from jax_brainage.train import steps
from jax_brainage.train.summary import SummaryWriter, mid_slices, progress_bar


class NonFiniteLossError(BrainAgeError):
  """The training loss became NaN or Inf; training stopped, the last good checkpoint is kept."""


class OneModel:
  """What the loop trains for one model: its state, update and validation.

  A trainee (this or `StackedMembers`) has `volumes_per_step` (volumes one step trains on),
  `write_images` (step-0 input summaries), `train(batch, pending)` (one update; its metrics are
  appended to `pending`, still on device), `validate` and `checkpoint_state(which)` (the state
  saved as "latest" or "best").
  """

  def __init__(self, setup: steps.Setup, state: Any, batch_size: int):
    self.setup, self.state = setup, state
    self.volumes_per_step = batch_size

  def write_images(self, writer: SummaryWriter, batch: Any, n: int, dtype: np.dtype) -> None:
    write_input_images(writer, batch, n, dtype)

  def train(self, batch: Any, pending: list[dict[str, jax.Array]]) -> None:
    self.state, metrics = self.setup.train_step(self.state, batch)
    pending.append(metrics)

  def validate(self, val_batches: Any, progress: dict[str, Any],
               step: int) -> tuple[bool, dict[str, Any], dict[str, float], str]:
    """One pass over the validation split: (improved, history entry, scalars, message)."""
    val = steps.evaluate(self.setup.eval_step, self.state, val_batches)
    improved = val["loss"] < progress["best_val_loss"]
    if improved:
      progress.update(best_val_loss=val["loss"], best_val_mae=val["mae"], best_step=step,
                      bad_epochs=0)
    else:
      progress["bad_epochs"] += 1
    entry = {"val_loss": val["loss"], "val_mae": val["mae"], "val_rmse": val["rmse"]}
    scalars = {"val/loss": val["loss"], "val/mae": val["mae"], "val/rmse": val["rmse"],
               "val/best_loss": progress["best_val_loss"]}
    message = (f"val loss {val['loss']:.4g}, val MAE {val['mae']:.2f} years"
               + (" (best)" if improved else ""))
    return bool(improved), entry, scalars, message

  def checkpoint_state(self, which: str) -> Any:
    return self.state  # the best state is the latest one when it is saved as best


class StackedMembers:
  """What the loop trains for M stacked members: group states, their updates, per-member
  validation and best states (selected on device)."""

  def __init__(self, setup: members_lib.MemberSetup, states: list[Any], bests: list[Any],
               batch_size: int, members: int):
    self.setup, self.states, self.bests, self.members = setup, states, bests, members
    self.volumes_per_step = batch_size * members

  def write_images(self, writer: SummaryWriter, group_batches: Any, n: int,
                   dtype: np.dtype) -> None:
    write_input_images(writer, group_batches[0], n, dtype, members=True)

  def train(self, group_batches: Any, pending: list[dict[str, jax.Array]]) -> None:
    for g, train_step in enumerate(self.setup.train_steps):
      self.states[g], metrics = train_step(self.states[g], group_batches[g])
      pending.append(metrics)

  def validate(self, val_batches: Any, progress: dict[str, Any],
               step: int) -> tuple[bool, dict[str, Any], dict[str, float], str]:
    val = members_lib.evaluate_members(self.setup.eval_step, self.states, val_batches,
                                       self.members)
    improved = np.array([v["loss"] < p["best_val_loss"]
                         for v, p in zip(val, progress["members"])])
    for v, p, better in zip(val, progress["members"], improved):
      if better:
        p.update(best_val_loss=v["loss"], best_val_mae=v["mae"], best_step=step, bad_epochs=0)
      else:
        p["bad_epochs"] += 1
    if improved.any():
      # Each member's best is selected on device: no parameters travel to the host.
      self.bests = [self.setup.keep_best(b, s, jnp.asarray(improved[grp]))
                    for b, s, grp in zip(self.bests, self.states, self.setup.groups)]
    mean = {k: float(np.mean([v[k] for v in val])) for k in ("loss", "mae", "rmse")}
    entry = {"val_loss": mean["loss"], "val_mae": mean["mae"], "val_rmse": mean["rmse"],
             "members": [{"val_loss": v["loss"], "val_mae": v["mae"], "val_rmse": v["rmse"]}
                         for v in val]}
    scalars = {"val/loss": mean["loss"], "val/mae": mean["mae"], "val/rmse": mean["rmse"]}
    scalars.update({f"val_members/{m}_mae": v["mae"] for m, v in enumerate(val)})
    message = (f"members' val MAE {mean['mae']:.2f} years (mean; {int(improved.sum())} of "
               f"{self.members} improved)")
    return bool(improved.any()), entry, scalars, message

  def checkpoint_state(self, which: str) -> Any:
    return self.setup.join(self.bests if which == ckpt_lib.BEST else self.states)


def run_loop(config: ml_collections.ConfigDict, workdir: Path, trainee: Any, *, batches: Any,
             val_batches: Any, checkpoints: ckpt_lib.Checkpoints, progress: dict[str, Any],
             manifest: dict[str, Any], schedule: optax.Schedule, step: int, total_steps: int,
             steps_per_epoch: int, quiet: bool, max_steps: int | None,
             data_dtype: np.dtype) -> dict[str, Any]:
  """Trains `trainee` (`OneModel` or `StackedMembers`) from `step` to the end, early
  stopping or `max_steps`; validates, logs and checkpoints on the way, and closes the
  checkpoints, batches, writer and bar whatever happens.

  Returns:
    dict with step, train_seconds (all runs of the experiment) and volumes_per_second
    (training volumes, compilation and validation excluded; every member's batch counts).
  """
  writer = SummaryWriter(workdir / "tensorboard")
  history: list[dict[str, Any]] = progress["history"]
  stop = finished(progress, step, total_steps, config)
  start_time = time.perf_counter()
  train_seconds_before = float(progress["train_seconds"] or 0.0)
  start_step = step
  steps_timed, timed_seconds = 0, 0.0
  bar = progress_bar(total_steps, initial=step, quiet=quiet)
  pending: list[dict[str, jax.Array]] = []  # step metrics not yet fetched (no sync per step)
  last_good = checkpoints.latest_step()
  counted = [0, 0.0]  # timed steps and seconds already added to `progress`

  def save(which: str) -> None:
    nonlocal last_good
    # Never write parameters that came out of a non-finite step.
    check_finite(pending, last_good, workdir)
    progress["train_seconds"] = train_seconds_before + time.perf_counter() - start_time
    progress["timed_steps"] += steps_timed - counted[0]
    progress["timed_seconds"] += timed_seconds - counted[1]
    counted[:] = [steps_timed, timed_seconds]
    checkpoints.save(which, step, trainee.checkpoint_state(which),
                     checkpoint_meta(progress, manifest, batches))
    if which == ckpt_lib.LATEST:
      last_good = step

  interval_start, interval_steps, compiled = time.perf_counter(), 0, False
  try:
    while not stop:
      batch = next(batches)
      if step == 0 and config.num_image_summaries:
        trainee.write_images(writer, batch, int(config.num_image_summaries), data_dtype)
      trainee.train(batch, pending)
      del batch
      step += 1
      bar.update(1)
      if not compiled:
        # The first step of a run compiles; time from its end so volumes/s measure steps.
        jax.block_until_ready(pending[-1])
        compiled = True
        interval_start, interval_steps = time.perf_counter(), 0
      else:
        interval_steps += 1

      end_of_epoch = step % steps_per_epoch == 0
      if step % config.log_every_steps == 0 or end_of_epoch:
        means = check_finite(pending, last_good, workdir)
        pending.clear()
        seconds = time.perf_counter() - interval_start
        steps_timed += interval_steps
        timed_seconds += seconds
        scalars = {"train/loss": means["loss"], "train/mae": means["mae"],
                   "train/grad_norm": means["grad_norm"],
                   "train/learning_rate": float(schedule(step - 1))}
        if interval_steps:
          scalars["train/volumes_per_second"] = (interval_steps * trainee.volumes_per_step
                                                 / max(seconds, 1e-9))
        writer.scalars(step, scalars)
        bar.set_postfix(loss=f"{means['loss']:.3g}", mae=f"{means['mae']:.2f}")
        interval_start, interval_steps = time.perf_counter(), 0

      if end_of_epoch:
        epoch = step // steps_per_epoch
        improved, entry, scalars, message = trainee.validate(val_batches, progress, step)
        progress["epoch"] = epoch
        history.append({"epoch": epoch, "step": step, **entry})
        writer.scalars(step, scalars)
        writer.flush()
        if not quiet and sharding.is_main_process():
          bar.write(f"epoch {epoch}: {message}")
        stop = finished(progress, step, total_steps, config)
        if improved:
          save(ckpt_lib.BEST)
        save(ckpt_lib.LATEST)
        interval_start = time.perf_counter()  # validation is not training throughput
      elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        save(ckpt_lib.LATEST)
      if max_steps is not None and step >= max_steps and not stop:
        progress["stopped"] = "max_steps"
        if last_good != step:
          save(ckpt_lib.LATEST)
        break
  except KeyboardInterrupt:
    # Keep what was trained: the state at the top of the loop is complete and consistent. On
    # several hosts the save is collective and the others may be at another step (or not
    # interrupted at all): the last periodic checkpoint stands there.
    if last_good != step and jax.process_count() == 1:
      save(ckpt_lib.LATEST)
    raise
  finally:
    # Also on errors (a NaN loss): let the last good checkpoint finish writing.
    checkpoints.wait()
    checkpoints.close()
    bar.close()
    writer.close()
    batches.close()

  return {"step": step,
          # A call that found the experiment finished reports the experiment's time.
          "train_seconds": train_seconds_before + (
              time.perf_counter() - start_time if step > start_step else 0.0),
          "volumes_per_second": throughput(progress, steps_timed - counted[0],
                                           timed_seconds - counted[1],
                                           trainee.volumes_per_step)}


# ---------------------------------------------------------------------------------------------
# Helpers of the loop.
# ---------------------------------------------------------------------------------------------


def checkpoint_meta(progress: dict[str, Any], manifest: dict[str, Any],
                    batches: Any) -> dict[str, Any]:
  """What a checkpoint stores beside the state (JSON): the loop's progress (epoch, best
  validation loss and step, early-stopping count, history, timing), the model manifest and the
  batches' position (`batches.get_state()`), from which a run resumes exactly."""
  return fileio.jsonable({"progress": progress, "manifest": manifest,
                          "data_state": batches.get_state()})


def throughput(progress: dict[str, Any], n_steps: int, seconds: float, batch_size: int) -> float:
  """Training volumes/s over all runs of the experiment (compilation and validation excluded):
  `n_steps` timed steps in `seconds` in this run, plus those recorded in `progress`."""
  n_steps += int(progress["timed_steps"] or 0)
  seconds += float(progress["timed_seconds"] or 0.0)
  return n_steps * batch_size / seconds if seconds > 0 else math.nan


def finished(progress: dict[str, Any], step: int, total_steps: int,
             config: ml_collections.ConfigDict) -> bool:
  """Whether training ends at `step` (sets progress["stopped"]); with stacked members, early
  stopping waits until every member has gone `patience` epochs without improving."""
  records = progress.get("members") or [progress]
  if config.patience and all(r["bad_epochs"] >= config.patience for r in records):
    progress["stopped"] = "early_stopping"
    return True
  if step >= total_steps:
    progress["stopped"] = "done"
    return True
  progress["stopped"] = ""
  return False


def check_finite(pending: list[dict[str, jax.Array]], last_good_step: int | None,
                 workdir: Path) -> dict[str, float]:
  """Means of the pending step metrics (loss, MAE in years, gradient norm); NonFiniteLossError
  naming the first bad step and the kept checkpoint if any loss was NaN/Inf."""
  if not pending:
    return {}
  fetched = sharding.to_host(pending)
  # Ensemble steps report per member ([w]); the first bad member step counts.
  bad = min(int(np.min(m["bad_step"])) for m in fetched)
  if bad != steps.NO_BAD_STEP:
    loss = next(float(np.ravel(m["loss"])[np.argmin(np.ravel(m["bad_step"]))])
                for m in fetched if int(np.min(m["bad_step"])) == bad)
    kept = (f"kept the last good checkpoint {ckpt_lib.checkpoint_dir(workdir)}/{last_good_step}"
            if last_good_step is not None else "no checkpoint was written yet")
    raise NonFiniteLossError(f"training loss is {loss} at step {bad + 1}; stopped and {kept} "
                             "(try a lower config.optimizer.learning_rate)")
  return {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "mae", "grad_norm")}


def write_input_images(writer: SummaryWriter, batch: dict[str, jax.Array], n: int,
                       stored_dtype: np.dtype, *, members: bool = False) -> None:
  """Mid-slices of the first network inputs (as augmented) with their ages, at step 0 (of the
  first member of this process's shard when `members`). Inputs from uint8 caches are shown on
  [0, 1], z-scores (float16 caches) from each channel's minimum to its maximum."""
  if not writer.enabled:
    return
  # This process's first rows only: nothing is gathered across hosts for a picture.
  images = np.asarray(batch["image"].addressable_shards[0].data)
  ages = np.asarray(batch["age"].addressable_shards[0].data)
  if members:
    images, ages = images[0], ages[0]
  window = (0.0, 1.0) if np.dtype(stored_dtype) == np.uint8 else None
  for i in range(min(n, len(images))):
    writer.image(0, f"inputs/{i}_age_{float(ages[i]):.1f}", mid_slices(images[i], window))
  writer.flush()
