"""The training loop: `train_and_evaluate(config, workdir)` and the `brainage train` command.

One readable loop in big_vision's sections: workdir / input pipeline / model and optimiser /
sharding / update step / checkpoint / loop. Data parallel over every device of every process
(`jax_brainage.sharding` decides the layouts), one jitted update step with donated state and
explicit output shardings, validation every epoch, early stopping on the validation loss,
latest + best orbax checkpoints from which an interrupted run resumes bit for bit, TensorBoard
scalars and input mid-slices, a tqdm progress bar with ETA.

Workdir layout:
    W/config.json          the experiment (full config + fingerprint); a different one is refused
    W/checkpoints/latest/  to resume;  W/checkpoints/best/  lowest validation loss
    W/tensorboard/         event files;  W/metrics.json  per-epoch history and the final result
    W/split.json           train/val/test rows (and subject ids) of the data it was trained on
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_brainage import fileio, models, sharding
from jax_brainage.errors import BrainAgeError, ConfigError
from jax_brainage.data import splits as splits_lib
from jax_brainage.models import losses
from jax_brainage.train import checkpoint as ckpt_lib
from jax_brainage.train import config as config_lib
from jax_brainage.train import data as data_lib
from jax_brainage.train.summary import SummaryWriter, mid_slices, progress_bar

_NO_BAD_STEP = np.iinfo(np.int32).max


class NonFiniteLossError(BrainAgeError):
  """The training loss became NaN or Inf; training stopped, the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Pieces the loop is built from (also used by tests, the ensemble trainer and inference).
# ---------------------------------------------------------------------------------------------


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate per step: optional linear warm-up from 0, then constant or cosine to 0."""
  lr, warmup = float(opt.learning_rate), int(opt.warmup_steps)
  if opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    main = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(opt: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """optax chain from `config.optimizer` (Adam by default, as in the study)."""
  if opt.name == "adam":
    tx = optax.adam(schedule)
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=float(opt.weight_decay))
  else:
    tx = optax.sgd(schedule, momentum=float(opt.momentum))
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(opt.grad_clip_norm)), tx)
  return tx


def per_example_loss(config: ml_collections.ConfigDict, model, outputs: jax.Array,
                     ages: jax.Array) -> jax.Array:
  """The configured loss per example `[batch]`: squared error (years^2), absolute error
  (years) or KL to Gaussian soft labels (nats)."""
  if config.loss == "soft_label":
    return losses.soft_label_kl_per_example(outputs, ages, model.bins.centers,
                                            config.soft_label_sigma)
  if config.loss == "mae":
    return losses.absolute_error_per_example(outputs, ages)
  return losses.squared_error_per_example(outputs, ages)


def train_age_scale(config: ml_collections.ConfigDict, data: data_lib.TrainingData) -> float:
  """The regression output scale (years): the training split's age standard deviation when
  `config.model.scale_output` is on, else 1.0 (the study's raw-years output)."""
  if not config.model.scale_output:
    return 1.0
  ages = np.asarray(data.source.ages, np.float64)[data.split.train]
  sd = float(np.std(ages))
  if not (math.isfinite(sd) and sd > 0):
    raise ConfigError(f"config.model.scale_output: the training ages of {data.name} have no "
                      f"spread (standard deviation {sd} years)")
  return sd


def model_manifest(config: ml_collections.ConfigDict, data: data_lib.TrainingData,
                   num_params: int) -> dict[str, Any]:
  """What a checkpoint was trained as: enough to rebuild the model and check its input."""
  kwargs = config_lib.model_kwargs(config, data.mean_train_age, train_age_scale(config, data))
  return {"model": config.model.name, "model_kwargs": kwargs,
          "image_shape": list(data.image_shape), "sequences": list(data.sequences),
          "mean_train_age": data.mean_train_age, "num_params": int(num_params),
          "loss": config.loss}


def build_model(manifest: dict[str, Any]):
  """The flax module a manifest describes (for inference from a workdir)."""
  return models.get_model(manifest["model"], **manifest["model_kwargs"])


def init_state(model, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
               channels: int, seed: int) -> dict[str, Any]:
  """Fresh training state: `step`, `params`, `model_state` (BatchNorm statistics or {}),
  `opt_state`, `rng` (raw uint32 [2] key; the step's dropout key is folded from it)."""
  init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = model.init({"params": init_key, "dropout": init_key},
                         jnp.zeros((1, *image_shape, channels), jnp.float32), train=False)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
          "opt_state": tx.init(params), "rng": rng}


def make_train_step(config: ml_collections.ConfigDict, model,
                    tx: optax.GradientTransformation) -> Callable:
  """(state, batch) -> (state, metrics); not yet jitted (the caller decides shardings)."""

  def train_step(state, batch):
    images = batch["image"]  # float32 in [0, 1], augmented by the input pipeline
    dropout_key = jax.random.fold_in(state["rng"], state["step"])
    mutable = list(state["model_state"])

    def loss_fn(params):
      variables = {"params": params, **state["model_state"]}
      if mutable:
        outputs, new_model_state = model.apply(variables, images, train=True,
                                               rngs={"dropout": dropout_key}, mutable=mutable)
      else:
        outputs = model.apply(variables, images, train=True, rngs={"dropout": dropout_key})
        new_model_state = {}
      loss = jnp.mean(per_example_loss(config, model, outputs, batch["age"]))
      return loss, (outputs, dict(new_model_state))

    (loss, (outputs, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    age = models.predicted_age(model, outputs)
    metrics = {
        "loss": loss,
        "mae": jnp.mean(jnp.abs(age - batch["age"])),
        "grad_norm": optax.tree.norm(grads),
        # The first step whose loss was not finite (max int32 if none): found without a
        # host sync per step.
        "bad_step": jnp.where(jnp.isfinite(loss), _NO_BAD_STEP, state["step"]),
    }
    new_state = {"step": state["step"] + 1, "params": params, "model_state": new_model_state,
                 "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  return train_step


def make_eval_step(config: ml_collections.ConfigDict, model) -> Callable:
  """(state, batch) -> weighted sums {loss, abs_error, squared_error, count} over the batch."""

  def eval_step(state, batch):
    images = batch["image"]
    variables = {"params": state["params"], **state["model_state"]}
    outputs = model.apply(variables, images, train=False)
    age = models.predicted_age(model, outputs)
    w = batch["mask"].astype(jnp.float32)  # padding rows of the last batch count 0
    error = age - batch["age"]
    return {"loss": jnp.sum(w * per_example_loss(config, model, outputs, batch["age"])),
            "abs_error": jnp.sum(w * jnp.abs(error)),
            "squared_error": jnp.sum(w * jnp.square(error)),
            "count": jnp.sum(w)}

  return eval_step


def evaluate(eval_step: Callable, state: Any, pipeline: Any) -> dict[str, float]:
  """Mean loss, MAE and RMSE (years) over one pass of an evaluation pipeline (padding rows
  weigh 0)."""
  total: dict[str, Any] | None = None
  for batch in pipeline:
    sums = eval_step(state, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    # Summing on device keeps the host out of the loop; one fetch at the end.
  total = sharding.to_host(total)
  count = float(total["count"])
  return {"loss": float(total["loss"]) / count, "mae": float(total["abs_error"]) / count,
          "rmse": math.sqrt(float(total["squared_error"]) / count), "n": int(count)}


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything compiled for one experiment on one mesh (see `build_setup`).

  Attributes:
    model: the flax module; tx, schedule: optimiser and learning rate per step.
    init: seed -> fresh training state (host-side, unsharded; see `init_state`).
    abstract_state: shapes, dtypes and shardings of the training state.
    state_sharding: the state's shardings (from `sharding.state_shardings`).
    train_step: jitted (state, batch) -> (state, metrics); the state is donated.
    eval_step: jitted (state, batch) -> weighted sums for `evaluate`.
  """

  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[[int], Any]
  abstract_state: Any
  state_sharding: Any
  train_step: Callable
  eval_step: Callable


_SETUPS: dict[tuple[str, Any], Setup] = {}
_MAX_SETUPS = 4


def build_setup(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                channels: int, mean_age: float, total_steps: int, mesh, *,
                age_scale: float = 1.0) -> Setup:
  """Model, optimiser, shardings and jitted steps for an experiment on `mesh`.

  mean_age and age_scale (years) are the mean and, with `config.model.scale_output`, the standard
  deviation of the training ages (`train_age_scale`).

  Shapes come from `jax.eval_shape`; the update step is jitted with the state donated and
  explicit output shardings. Setups are kept for the few most recent experiments, so a run
  resumed in the same process (or trained again on other data of the same shape) does not
  compile again.
  """
  key = (json.dumps([config_lib.fingerprint(config), list(image_shape), channels, mean_age,
                     age_scale, total_steps], sort_keys=True, default=str), mesh)
  if key in _SETUPS:
    return _SETUPS[key]
  model = models.get_model(config.model.name,
                           **config_lib.model_kwargs(config, mean_age, age_scale))
  schedule = make_schedule(config.optimizer, total_steps)
  tx = make_optimizer(config.optimizer, schedule)
  init = functools.partial(init_state, model, tx, tuple(image_shape), channels)
  state_sharding = sharding.state_shardings(mesh, jax.eval_shape(init, 0))
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init, 0), state_sharding)
  metric_sharding = sharding.replicated(mesh)
  setup = Setup(
      model=model, tx=tx, schedule=schedule, init=init, abstract_state=abstract_state,
      state_sharding=state_sharding,
      train_step=jax.jit(make_train_step(config, model, tx), donate_argnums=(0,),
                         out_shardings=(state_sharding, metric_sharding)),
      eval_step=jax.jit(make_eval_step(config, model), out_shardings=metric_sharding))
  if len(_SETUPS) >= _MAX_SETUPS:
    _SETUPS.pop(next(iter(_SETUPS)))
  _SETUPS[key] = setup
  return setup


# ---------------------------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       data: data_lib.TrainingData | None = None, quiet: bool = False,
                       devices: list[jax.Device] | None = None,
                       max_steps: int | None = None) -> dict[str, Any]:
  """Trains (or resumes training) the configured model; returns the final metrics.

  Args:
    config: a checked config (`config_lib.load_config` / `base_config()` based).
    workdir: where checkpoints, TensorBoard logs, config.json and metrics.json go. If it holds
      a checkpoint of this experiment, training resumes exactly where it stopped.
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
    DataError: the data does not match the model (shape, sequences).
    NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
  """
  workdir = Path(workdir)
  config_lib.validate(config)

  # --- Workdir: one experiment per directory. ------------------------------------------------
  _claim_workdir(config, workdir)

  # --- Input pipeline. ---------------------------------------------------------------------------
  data = data_lib.open_training_data(config) if data is None else data
  data.check_against(config.data.sequences, config.data.image_shape)
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
  setup = build_setup(config, data.image_shape, len(data.sequences), data.mean_train_age,
                      total_steps, mesh, age_scale=train_age_scale(config, data))
  schedule, abstract_state, state_sharding = (setup.schedule, setup.abstract_state,
                                              setup.state_sharding)
  train_step, eval_step = setup.train_step, setup.eval_step
  num_params = sum(int(x.size) for x in jax.tree.leaves(abstract_state["params"]))
  manifest = model_manifest(config, data, num_params)

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
    if checkpoints.latest_step() is not None:
      state, meta = checkpoints.restore(ckpt_lib.LATEST, abstract_state, manifest)
      progress.update(meta["progress"])
      progress["best_val_loss"] = _float(progress["best_val_loss"])
      batches.set_state(meta["data_state"])
    else:
      source = _init_source(config.init_from, manifest) if config.init_from else None
      # Eager init: random initialisers compile once per shape and process, not once per run.
      state = jax.device_put(setup.init(int(config.seed)), state_sharding)
      if source is not None:
        state = _init_from(source, state, abstract_state, manifest)
      checkpoints.save(ckpt_lib.LATEST, 0, state, _meta(progress, manifest, batches))
    step = int(sharding.to_host(state["step"]))
    if batches.step != step:
      raise ConfigError(f"checkpoint in {workdir}: data position {batches.step} differs from "
                        f"training step {step}")
  except BaseException:
    checkpoints.close()
    batches.close()
    raise

  # --- Loop. -------------------------------------------------------------------------------------
  writer = SummaryWriter(workdir / "tensorboard")
  history: list[dict[str, Any]] = progress["history"]
  stop = _finished(progress, step, total_steps, config)
  start_time = time.perf_counter()
  train_seconds_before = float(progress["train_seconds"] or 0.0)
  start_step = step
  steps_timed, timed_seconds = 0, 0.0
  bar = progress_bar(total_steps, initial=step, quiet=quiet)
  pending: list[dict[str, jax.Array]] = []  # step metrics not yet fetched (no sync per step)
  last_good = checkpoints.latest_step()

  def save(which: str) -> None:
    nonlocal last_good
    # Never write parameters that came out of a non-finite step.
    _check_finite(pending, last_good, workdir)
    progress["train_seconds"] = train_seconds_before + time.perf_counter() - start_time
    progress["timed_steps"] += steps_timed - counted[0]
    progress["timed_seconds"] += timed_seconds - counted[1]
    counted[:] = [steps_timed, timed_seconds]
    checkpoints.save(which, step, state, _meta(progress, manifest, batches))
    if which == ckpt_lib.LATEST:
      last_good = step

  interval_start, interval_steps, compiled = time.perf_counter(), 0, False
  counted = [0, 0.0]  # timed steps and seconds already added to `progress`
  try:
    while not stop:
      batch = next(batches)
      if step == 0 and config.num_image_summaries:
        _write_input_images(writer, batch, int(config.num_image_summaries))
      state, metrics = train_step(state, batch)
      step += 1
      pending.append(metrics)
      bar.update(1)
      if not compiled:
        # The first step of a run compiles; time from its end so volumes/s measure steps.
        jax.block_until_ready(metrics)
        compiled = True
        interval_start, interval_steps = time.perf_counter(), 0
      else:
        interval_steps += 1

      end_of_epoch = step % steps_per_epoch == 0
      if step % config.log_every_steps == 0 or end_of_epoch:
        means = _check_finite(pending, last_good, workdir)
        pending.clear()
        seconds = time.perf_counter() - interval_start
        steps_timed += interval_steps
        timed_seconds += seconds
        scalars = {"train/loss": means["loss"], "train/mae": means["mae"],
                   "train/grad_norm": means["grad_norm"],
                   "train/learning_rate": float(schedule(step - 1))}
        if interval_steps:
          scalars["train/volumes_per_second"] = interval_steps * batch_size / max(seconds, 1e-9)
        writer.scalars(step, scalars)
        bar.set_postfix(loss=f"{means['loss']:.3g}", mae=f"{means['mae']:.2f}")
        interval_start, interval_steps = time.perf_counter(), 0

      if end_of_epoch:
        epoch = step // steps_per_epoch
        val = evaluate(eval_step, state, val_batches)
        improved = val["loss"] < progress["best_val_loss"]
        progress["epoch"] = epoch
        if improved:
          progress.update(best_val_loss=val["loss"], best_val_mae=val["mae"], best_step=step,
                          bad_epochs=0)
        else:
          progress["bad_epochs"] += 1
        history.append({"epoch": epoch, "step": step, "val_loss": val["loss"],
                        "val_mae": val["mae"], "val_rmse": val["rmse"]})
        writer.scalars(step, {"val/loss": val["loss"], "val/mae": val["mae"],
                              "val/rmse": val["rmse"], "val/best_loss": progress["best_val_loss"]})
        writer.flush()
        if not quiet and sharding.is_main_process():
          bar.write(f"epoch {epoch}: val loss {val['loss']:.4g}, val MAE {val['mae']:.2f} years"
                    + (" (best)" if improved else ""))
        stop = _finished(progress, step, total_steps, config)
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
    # Keep what was trained: the state at the top of the loop is complete and consistent.
    if last_good != step:
      save(ckpt_lib.LATEST)
    raise
  finally:
    # Also on errors (a NaN loss): let the last good checkpoint finish writing.
    checkpoints.wait()
    checkpoints.close()
    bar.close()
    writer.close()
    batches.close()

  result = {"step": step, "epoch": progress["epoch"], "best_val_loss": progress["best_val_loss"],
            "best_val_mae": progress["best_val_mae"], "best_step": progress["best_step"],
            "stopped": progress["stopped"] or "done", "num_params": num_params,
            # A call that found the experiment finished reports the experiment's time.
            "train_seconds": train_seconds_before + (
                time.perf_counter() - start_time if step > start_step else 0.0),
            "volumes_per_second": _throughput(progress, steps_timed - counted[0],
                                              timed_seconds - counted[1], batch_size),
            "history": history}
  if sharding.is_main_process():
    fileio.write_json(workdir / "metrics.json", _jsonable(result))
  return result


# ---------------------------------------------------------------------------------------------
# Helpers of the loop.
# ---------------------------------------------------------------------------------------------


def _claim_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Stores the experiment in W/config.json, or refuses a workdir holding a different one."""
  path = workdir / "config.json"
  current = config_lib.fingerprint(config)
  if path.exists():
    try:
      stored = json.loads(path.read_text())["fingerprint"]
    except (ValueError, KeyError) as e:
      raise ConfigError(f"{path}: unreadable experiment record ({e})") from e
    difference = config_lib.fingerprint_difference(stored, current)
    if difference:
      raise ConfigError(f"workdir {workdir} holds a different experiment: {difference}")
  if sharding.is_main_process():
    fileio.write_json(path, {"fingerprint": current, "config": _jsonable(config.to_dict())})


def _meta(progress: dict[str, Any], manifest: dict[str, Any], batches: Any) -> dict[str, Any]:
  return _jsonable({"progress": progress, "manifest": manifest,
                    "data_state": batches.get_state()})


def _throughput(progress: dict[str, Any], steps: int, seconds: float, batch_size: int) -> float:
  """Training volumes/s over all runs of the experiment (compilation and validation excluded)."""
  steps += int(progress["timed_steps"] or 0)
  seconds += float(progress["timed_seconds"] or 0.0)
  return steps * batch_size / seconds if seconds > 0 else math.nan


def _float(x: Any) -> float:
  return math.inf if x is None else float(x)


def _finished(progress: dict[str, Any], step: int, total_steps: int,
              config: ml_collections.ConfigDict) -> bool:
  if config.patience and progress["bad_epochs"] >= config.patience:
    progress["stopped"] = "early_stopping"
    return True
  if step >= total_steps:
    progress["stopped"] = "done"
    return True
  progress["stopped"] = ""
  return False


def _check_finite(pending: list[dict[str, jax.Array]], last_good_step: int | None,
                  workdir: Path) -> dict[str, float]:
  """Means of the pending step metrics; NonFiniteLossError if any loss was NaN/Inf."""
  if not pending:
    return {}
  fetched = sharding.to_host(pending)
  bad = min(int(m["bad_step"]) for m in fetched)
  if bad != _NO_BAD_STEP:
    loss = next(float(m["loss"]) for m in fetched if int(m["bad_step"]) == bad)
    kept = (f"kept the last good checkpoint {ckpt_lib.checkpoint_dir(workdir)}/{last_good_step}"
            if last_good_step is not None else "no checkpoint was written yet")
    raise NonFiniteLossError(f"training loss is {loss} at step {bad + 1}; stopped and {kept} "
                             "(try a lower config.optimizer.learning_rate)")
  return {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "mae", "grad_norm")}


def _init_source(source: str, manifest: dict[str, Any]) -> tuple[ckpt_lib.Checkpoints, str]:
  """Opens another workdir's checkpoints (best, else latest) and checks they fit this model."""
  other = ckpt_lib.Checkpoints(source, read_only=True)
  which = ckpt_lib.BEST if other.latest_step(ckpt_lib.BEST) is not None else ckpt_lib.LATEST
  step = other.latest_step(which)
  if step is None:
    raise ConfigError(f"config.init_from={source!r}: no checkpoint there")
  ckpt_lib.check_manifest(other.read_meta(which, step).get("manifest", {}), manifest,
                          ckpt_lib.checkpoint_dir(source, which) / str(step))
  return other, which


def _init_from(source: tuple[ckpt_lib.Checkpoints, str], state: Any, abstract_state: Any,
               manifest: dict[str, Any]) -> Any:
  """Parameters (and BatchNorm statistics) from another workdir; optimiser and step fresh."""
  other, which = source
  restored, _ = other.restore(which, abstract_state, manifest)
  other.close()
  return dict(state, params=restored["params"], model_state=restored["model_state"])


def _write_input_images(writer: SummaryWriter, batch: dict[str, jax.Array], n: int) -> None:
  """Mid-slices of the first network inputs (as augmented) with their ages, at step 0."""
  if not writer.enabled:
    return
  # This process's first rows only: nothing is gathered across hosts for a picture.
  images = np.asarray(batch["image"].addressable_shards[0].data)
  ages = np.asarray(batch["age"].addressable_shards[0].data)
  for i in range(min(n, len(images))):
    writer.image(0, f"inputs/{i}_age_{float(ages[i]):.1f}", mid_slices(images[i]))
  writer.flush()


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return float(x) if math.isfinite(float(x)) else None
  if isinstance(x, (np.integer,)):
    return int(x)
  return x


# ---------------------------------------------------------------------------------------------
# Command line: brainage train --config FILE[:arg] --workdir W [--config.key value ...]
# ---------------------------------------------------------------------------------------------


class _TrainParser(argparse.ArgumentParser):
  """Collects big_vision-style `--config.KEY VALUE` overrides into `args.overrides`."""

  def parse_known_args(self, args=None, namespace=None):
    namespace, extras = super().parse_known_args(args, namespace)
    overrides, rest, i = [], [], 0
    while i < len(extras):
      if extras[i].startswith("--config."):
        take = 1 if "=" in extras[i] else 2
        overrides.extend(extras[i:i + take])
        i += take
      else:
        rest.append(extras[i])
        i += 1
    namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
    return namespace, rest


def add_parser(subparsers: argparse._SubParsersAction) -> None:
  parser = subparsers.add_parser(
      "train", help="train a brain-age model from a config (resumes an interrupted run)",
      description="Train a brain-age model. Override any config key with --config.KEY VALUE, "
                  "e.g. --config.optimizer.learning_rate 1e-3 --config.batch_size 4.")
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="config file exposing get_config(arg=None), e.g. configs/cpu.py")
  parser.add_argument("--workdir", required=True, type=Path,
                      help="experiment directory (checkpoints, TensorBoard logs, metrics)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.add_argument("--max-steps", type=int, default=None,
                      help="stop (resumably) after this global step")
  parser.set_defaults(func=run, overrides=[])
  # The sub-parser is made by the shared `brainage` parser; give it the override collection.
  parser.__class__ = _TrainParser


def run(args: argparse.Namespace) -> int:
  config = config_lib.load_config(args.config)
  config = config_lib.apply_overrides(config, getattr(args, "overrides", []) or [])
  result = train_and_evaluate(config, args.workdir, quiet=args.quiet, max_steps=args.max_steps)
  if sharding.is_main_process():
    print(f"brainage train: {result['stopped']} at step {result['step']} (epoch "
          f"{result['epoch']}); best validation MAE {result['best_val_mae']:.2f} years at step "
          f"{result['best_step']}; workdir {args.workdir}")
  return 0
