"""The training loop: `train_and_evaluate(config, workdir)` and the `brainage train` command.

One readable loop in big_vision's sections: workdir / input pipeline / model and optimiser /
sharding / update step / checkpoint / loop. Data parallel over every device of every process
(`jax_brainage.sharding` decides the layouts), one jitted update step with donated state and
explicit output shardings, validation every epoch, early stopping on the validation loss,
latest + best orbax checkpoints from which an interrupted run resumes bit for bit, TensorBoard
scalars and input mid-slices, a tqdm progress bar with ETA. The loop (`_run_loop`) is the same
for one model and for M stacked ensemble members; what differs (one state or member groups,
per-member validation and best states) is in `_OneModel` and `_StackedMembers`.

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
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

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
  """The flax module a manifest describes (for inference from a workdir).

  With XLA's convolution, whatever lowering it was trained with: this is the module users
  explain (one lrp rule site per conv); batched prediction switches to im2col on CPU with
  `models.lowering.for_inference`.
  """
  return models.get_model(manifest["model"],
                          **{**manifest["model_kwargs"], "conv_lowering": "xla"})


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
  # The seed only enters through `init(seed)` and the data: runs with other seeds share a setup.
  experiment = {k: v for k, v in config_lib.fingerprint(config).items() if k != "seed"}
  # The conv lowering is resumable (not in the fingerprint) but compiles another program.
  key = (json.dumps([experiment, str(config.model.conv_lowering), list(image_shape), channels,
                     mean_age, age_scale, total_steps], sort_keys=True, default=str), mesh)
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
# Ensemble members: M models trained at once (stacked parameters, one vmapped, jitted step).
# ---------------------------------------------------------------------------------------------

# vmap axes of a training state whose leaves (but the step counter) lead with a member axis.
MEMBER_AXES = {"step": None, "params": 0, "model_state": 0, "opt_state": 0, "rng": 0}


def member_seeds(config: ml_collections.ConfigDict) -> list[int]:
  """Member m of an ensemble is the model of a single run with seed `config.seed + m`."""
  return [int(config.seed) + m for m in range(int(config.ensemble.members))]


def stack_states(states: list[Any]) -> Any:
  """Single-model states -> one state with a leading member axis (the step stays a scalar)."""
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[{k: v for k, v in s.items() if k != "step"} for s in states])
  return dict(stacked, step=states[0]["step"])


def member_state(state: Any, m: int) -> Any:
  """Member m of a stacked state, as a single-model state."""
  return {k: (v if k == "step" else jax.tree.map(lambda x: x[m], v)) for k, v in state.items()}


def make_member_train_step(config: ml_collections.ConfigDict, model,
                           tx: optax.GradientTransformation) -> Callable:
  """(state [w, ...], batch [w, B, ...]) -> (state, metrics [w]): `make_train_step` vmapped
  over members; every member sees its own batch, dropout key and optimiser state."""
  return jax.vmap(make_train_step(config, model, tx), in_axes=(MEMBER_AXES, 0),
                  out_axes=(MEMBER_AXES, 0))


def make_member_eval_step(config: ml_collections.ConfigDict, model) -> Callable:
  """(state [w, ...], batch [B, ...]) -> weighted sums [w]: every member on the same batch."""
  return jax.vmap(make_eval_step(config, model), in_axes=(MEMBER_AXES, None))


def _over_ensemble_axis(fn: Callable, mesh, *, batch_members: bool, out_members: Any) -> Callable:
  """`fn(state, batch)` with the member axis mapped manually over the mesh's 'ensemble' axis
  (each device group runs its own members; 'data' stays automatic). With an 'ensemble' axis of
  size 1, `fn` itself.

  Why manual: XLA's SPMD partitioner miscompiles the vmapped (grouped) 1x1x1 convolution when
  the member axis is sharded (MRInet's conv5; CPU, jax 0.10.2: outputs off by ~1e-3 relative,
  gradients far more); under shard_map every device sees whole members and plain convolutions.
  """
  if mesh.shape[sharding.ENSEMBLE_AXIS] == 1:
    return fn
  member, whole = P(sharding.ENSEMBLE_AXIS), P()

  def specs(tree_axes: Any) -> Any:
    return {k: (whole if axis is None else member) for k, axis in tree_axes.items()}

  out = jax.tree.map(lambda m: member if m else whole, out_members)
  if isinstance(out_members, tuple):  # (state, metrics)
    out = (specs(MEMBER_AXES), out[1])
  return jax.shard_map(fn, mesh=mesh, in_specs=(specs(MEMBER_AXES),
                                                member if batch_members else whole),
                       out_specs=out, axis_names={sharding.ENSEMBLE_AXIS})


def _keep_best(best: Any, state: Any, improved: jax.Array) -> Any:
  """Per member: the current state where `improved` [w], else the kept best (on device)."""
  def pick(b, s):
    if b.ndim == 0:
      return jnp.copy(s)  # a buffer of its own: the state's is donated by the next step
    return jnp.where(improved.reshape((-1,) + (1,) * (b.ndim - 1)), s, b)
  return jax.tree.map(pick, best, state)


def member_groups(members: int, width: int, unit: int = 1) -> tuple[slice, ...]:
  """Members split into consecutive groups of at most `width` (trained one after another),
  sizes balanced and multiples of `unit` (the mesh's 'ensemble' axis)."""
  units, per_group = members // unit, max(width // unit, 1)
  n = -(-units // per_group)
  sizes = [(units // n + (1 if g < units % n else 0)) * unit for g in range(n)]
  starts = np.cumsum([0] + sizes)
  return tuple(slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:]))


def ensemble_mesh_size(config: ml_collections.ConfigDict, num_devices: int,
                       batch_sizes: tuple[int, ...]) -> int:
  """Size of the mesh's 'ensemble' axis: `config.ensemble.mesh_size`, or (auto) the largest
  divisor of the device count that divides the members (and the vmap width) and leaves a
  'data' axis the batches split over: members on their own devices need no gradient
  all-reduce, so they are spread first."""
  e = config.ensemble
  if e.mesh_size:
    if num_devices % e.mesh_size:
      raise ConfigError(f"config.ensemble.mesh_size={e.mesh_size} does not divide the "
                        f"{num_devices} devices")
    return int(e.mesh_size)
  per_process = num_devices // jax.process_count()
  for size in range(num_devices, 0, -1):
    data = num_devices // size
    # Multi-host: members stay within a process (see sharding.make_mesh).
    if (num_devices % size == 0 and per_process % size == 0 and e.members % size == 0
        and (e.vmap_width == 0 or e.vmap_width % size == 0)
        and all(b % data == 0 for b in batch_sizes)):
      return size
  return 1


def device_memory_budget(device: jax.Device | None = None) -> int | None:
  """Bytes one device may still use: `memory_stats()` (limit - in use) on accelerators; on CPU
  the host's available memory shared by its local devices. None if unknown."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    available = info["MemAvailable"]
  except (OSError, KeyError, ValueError, IndexError):
    try:
      available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
  return available // max(len(jax.local_devices()), 1)


def compiled_bytes(compiled: Any) -> int | None:
  """Peak bytes per device of a compiled step (arguments + outputs - donated + temporaries)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- backends without memory analysis
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + getattr(m, "generated_code_size_in_bytes", 0))


@dataclasses.dataclass(frozen=True)
class MemberSetup:
  """Everything compiled for an ensemble experiment on one mesh (see `build_member_setup`).

  Attributes:
    model, tx, schedule: as in `Setup`.
    init: seeds [M] -> fresh stacked state `[M, ...]` (host-side; member m =
      `init_state(seeds[m])`).
    abstract_state, state_sharding: the full stacked state, members over 'ensemble'.
    groups: member slices trained one after another (one group = all members at once).
    width: members per jitted step (the widest group).
    group_shardings: the state shardings of each group.
    train_steps: per group, the compiled (state [w], batches [w, B]) -> (state, metrics [w]);
      the state is donated.
    eval_step: jitted (group state, batch) -> weighted sums [w].
    keep_best: jitted (best, state, improved [w]) -> best (donated).
    memory: bytes per device: needed by the chosen width and available (None if unknown).
  """

  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[[Any], Any]
  abstract_state: Any
  state_sharding: Any
  groups: tuple[slice, ...]
  width: int
  group_shardings: tuple[Any, ...]
  train_steps: tuple[Callable, ...]
  eval_step: Callable
  keep_best: Callable
  memory: dict[str, Any]

  def split(self, state: Any) -> list[Any]:
    """Full stacked state -> one state per group, each on its group's shardings."""
    if len(self.groups) == 1:
      return [jax.device_put(state, self.group_shardings[0])]
    # Every group gets its own buffers (the step counter too): each group's step donates them.
    return [jax.device_put(jax.tree.map(lambda x: jnp.copy(x) if np.ndim(x) == 0 else x[g],
                                        state), s)
            for g, s in zip(self.groups, self.group_shardings)]

  def join(self, states: list[Any]) -> Any:
    """Group states -> the full stacked state (members in order)."""
    if len(states) == 1:
      return states[0]
    full = jax.tree.map(lambda *xs: xs[0] if np.ndim(xs[0]) == 0 else jnp.concatenate(xs),
                        *states)
    return jax.device_put(full, self.state_sharding)


_MEMBER_SETUPS: dict[tuple[str, Any], MemberSetup] = {}


def build_member_setup(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                       channels: int, mean_age: float, total_steps: int, mesh, *,
                       age_scale: float = 1.0) -> MemberSetup:
  """Model, optimiser, shardings and compiled member steps for an ensemble experiment.

  The vmap width is `config.ensemble.vmap_width`, or (0) the widest that fits: the step is
  compiled for all members and its compiled memory analysis (per device) plus the states of the
  members it does not hold and every member's best copy is compared with the device's free
  memory (`device_memory_budget`, 90%); if it does not fit, the per-member cost measured from a
  second compilation at the narrowest width gives the width to try next, shrinking until one
  fits. Groups of that width train one after another within each step.
  """
  members = int(config.ensemble.members)
  # What the compiled program depends on: not the seed, the data's whereabouts (shape, channels
  # and ages are keyed explicitly) or the ensemble's head; sub-ensembles share a setup.
  experiment = {k: v for k, v in config_lib.fingerprint(config).items()
                if k != "seed" and not k.startswith("data.") and k not in (
                    "ensemble.sub_ensembles", "ensemble.head", "ensemble.head_folds",
                    "ensemble.correction")}
  key = (json.dumps([experiment, int(config.ensemble.vmap_width), str(config.model.conv_lowering),
                     list(image_shape), channels, mean_age, age_scale, total_steps],
                    sort_keys=True, default=str), mesh)
  if key in _MEMBER_SETUPS:
    return _MEMBER_SETUPS[key]
  model = models.get_model(config.model.name,
                           **config_lib.model_kwargs(config, mean_age, age_scale))
  schedule = make_schedule(config.optimizer, total_steps)
  tx = make_optimizer(config.optimizer, schedule)
  single = functools.partial(init_state, model, tx, tuple(image_shape), channels)
  # All members initialised by one compiled, vmapped call (the same numbers as `single(seed)`).
  batched_init = jax.jit(jax.vmap(
      lambda seed: {k: v for k, v in single(seed).items() if k != "step"}))

  def init(seeds):
    return dict(batched_init(np.asarray(seeds, np.uint32)), step=jnp.zeros((), jnp.int32))

  unit = mesh.shape[sharding.ENSEMBLE_AXIS]
  replicated = sharding.replicated(mesh)
  member_step = _over_ensemble_axis(make_member_train_step(config, model, tx), mesh,
                                    batch_members=True, out_members=(True, True))
  member_eval = _over_ensemble_axis(make_member_eval_step(config, model), mesh,
                                    batch_members=False, out_members=True)
  batch_size = int(config.batch_size)
  one = jax.eval_shape(single, 0)

  def abstract(width: int) -> tuple[Any, Any]:
    shapes = {k: (v if k == "step" else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((width, *x.shape), x.dtype), v)) for k, v in one.items()}
    shardings = sharding.state_shardings(mesh, shapes, members=True)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings), shardings

  def batch_spec(width: int) -> dict[str, jax.ShapeDtypeStruct]:
    s = sharding.batch_sharding(mesh, members=True)
    lead = (width, batch_size)
    return {"image": jax.ShapeDtypeStruct(lead + tuple(image_shape) + (channels,), jnp.float32,
                                          sharding=s),
            "age": jax.ShapeDtypeStruct(lead, jnp.float32, sharding=s),
            "index": jax.ShapeDtypeStruct(lead, jnp.int32, sharding=s),
            "aug_seed": jax.ShapeDtypeStruct(lead + (2,), jnp.uint32, sharding=s),
            "mask": jax.ShapeDtypeStruct(lead, jnp.bool_, sharding=s)}

  compiled: dict[int, Any] = {}

  def compile_width(width: int):
    if width not in compiled:
      state_spec, state_shardings = abstract(width)
      jitted = jax.jit(member_step, donate_argnums=(0,),
                       out_shardings=(state_shardings, replicated))
      compiled[width] = jitted.lower(state_spec, batch_spec(width)).compile()
    return compiled[width]

  # Per device, besides the step: the states of the members outside the group and every
  # member's best copy (both resident for the whole run).
  member_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(one))
  budget = device_memory_budget(mesh.devices.flat[0])

  def needed(width: int) -> int | None:
    step_bytes = compiled_bytes(compile_width(width))
    if step_bytes is None:
      return None
    return step_bytes + member_bytes * (2 * members - width) // unit

  def fits(width: int) -> bool:
    need = needed(width)
    return budget is None or need is None or need <= 0.9 * budget

  if config.ensemble.vmap_width:
    width = min(int(config.ensemble.vmap_width), members)
  else:
    width = members
    if not fits(width) and members > unit:
      low = needed(unit)
      per_unit = max((needed(members) - low) // (members // unit - 1), 1)
      width = int(np.clip((0.9 * budget - low) // per_unit + 1, 1, members // unit - 1)) * unit
      while width > unit and not fits(width):
        width -= unit
  groups = member_groups(members, width, unit)
  widths = sorted({g.stop - g.start for g in groups})
  steps = {w: compile_width(w) for w in widths}
  full_abstract, full_sharding = abstract(members)
  group_shardings = tuple(abstract(g.stop - g.start)[1] for g in groups)
  setup = MemberSetup(
      model=model, tx=tx, schedule=schedule, init=init,
      abstract_state=full_abstract, state_sharding=full_sharding, groups=groups,
      width=max(widths), group_shardings=group_shardings,
      train_steps=tuple(steps[g.stop - g.start] for g in groups),
      eval_step=jax.jit(member_eval, out_shardings=replicated),
      keep_best=jax.jit(_keep_best, donate_argnums=(0,)),
      memory={"needed_bytes_per_device": needed(max(widths)), "budget_bytes_per_device": budget,
              "state_bytes_per_member": member_bytes})
  if len(_MEMBER_SETUPS) >= _MAX_SETUPS:
    _MEMBER_SETUPS.pop(next(iter(_MEMBER_SETUPS)))
  _MEMBER_SETUPS[key] = setup
  return setup


def evaluate_members(eval_step: Callable, states: list[Any], pipeline: Any,
                     members: int) -> list[dict[str, float]]:
  """Per member: mean loss, MAE and RMSE (years) over one pass of an evaluation pipeline
  (each batch is read once and evaluated by every group of members)."""
  totals: list[Any] = [None] * len(states)
  for batch in pipeline:
    for g, state in enumerate(states):
      sums = eval_step(state, batch)
      totals[g] = sums if totals[g] is None else jax.tree.map(jnp.add, totals[g], sums)
  host = sharding.to_host(totals)
  joined = {k: np.concatenate([np.atleast_1d(t[k]) for t in host]) for k in host[0]}
  out = []
  for m in range(members):
    count = float(joined["count"][m])
    out.append({"loss": float(joined["loss"][m]) / count,
                "mae": float(joined["abs_error"][m]) / count,
                "rmse": math.sqrt(float(joined["squared_error"][m]) / count), "n": int(count)})
  return out


def load_members(workdir: str | Path, which: str = ckpt_lib.BEST) -> tuple[dict[str, Any], Any,
                                                                            int]:
  """(manifest, variables, step) of a trained workdir's `which` checkpoint, as host numpy.

  `variables` is {"params": ..., **model_state} with a leading member axis `[M, ...]` on every
  leaf (M = manifest["members"]; a single-model workdir gets M = 1), ready for a vmapped apply.
  """
  checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    state, meta = checkpoints.restore_stored(which)
  finally:
    checkpoints.close()
  manifest = dict(meta.get("manifest") or {})
  if not manifest:
    raise ConfigError(f"{ckpt_lib.checkpoint_dir(workdir, which)}: checkpoint has no manifest")
  variables = {"params": state["params"], **dict(state.get("model_state") or {})}
  variables = jax.tree.map(np.asarray, variables)
  if int(manifest.get("members", 1)) == 1 and "members" not in manifest:
    variables = jax.tree.map(lambda x: x[None], variables)
  manifest.setdefault("members", 1)
  return manifest, variables, int(meta.get("step", -1))


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
  setup = build_setup(config, data.image_shape, len(data.sequences), data.mean_train_age,
                      total_steps, mesh, age_scale=train_age_scale(config, data))
  schedule, abstract_state, state_sharding = (setup.schedule, setup.abstract_state,
                                              setup.state_sharding)
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
  run = _run_loop(config, workdir, _OneModel(setup, state, batch_size), batches=batches,
                  val_batches=val_batches, checkpoints=checkpoints, progress=progress,
                  manifest=manifest, schedule=schedule, step=step, total_steps=total_steps,
                  steps_per_epoch=steps_per_epoch, quiet=quiet, max_steps=max_steps,
                  data_dtype=data.dtype)
  result = {"step": run["step"], "epoch": progress["epoch"],
            "best_val_loss": progress["best_val_loss"], "best_val_mae": progress["best_val_mae"],
            "best_step": progress["best_step"], "stopped": progress["stopped"] or "done",
            "num_params": num_params, "train_seconds": run["train_seconds"],
            "volumes_per_second": run["volumes_per_second"], "history": progress["history"]}
  if sharding.is_main_process():
    fileio.write_json(workdir / "metrics.json", _jsonable(result))
  return result


def _train_members(config: ml_collections.ConfigDict, workdir: Path,
                   data: data_lib.TrainingData, *, quiet: bool,
                   devices: list[jax.Device] | None, max_steps: int | None) -> dict[str, Any]:
  """`train_and_evaluate` for `config.ensemble.members = M > 1` (see there and `MemberSetup`).

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
  mesh = sharding.make_mesh(ensemble_mesh_size(config, len(devices),
                                               (batch_size, eval_batch_size)), devices)
  sharding.check_batch_size(batch_size, mesh)
  sharding.check_batch_size(eval_batch_size, mesh, key="config.eval_batch_size")
  setup = build_member_setup(config, data.image_shape, len(data.sequences), data.mean_train_age,
                             total_steps, mesh, age_scale=train_age_scale(config, data))
  groups, schedule = setup.groups, setup.schedule
  num_params = sum(int(x.size) for x in jax.tree.leaves(setup.abstract_state["params"]))
  num_params //= members
  manifest = dict(model_manifest(config, data, num_params), members=members)

  # --- Data: member m reads the batches of a single run with seed + m. -------------------------
  seeds = member_seeds(config)
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
    if checkpoints.latest_step() is not None:
      state, meta = checkpoints.restore(ckpt_lib.LATEST, setup.abstract_state, manifest)
      progress.update(meta["progress"])
      for m in progress["members"]:
        m["best_val_loss"] = _float(m["best_val_loss"])
      batches.set_state(meta["data_state"])
      best = (checkpoints.restore(ckpt_lib.BEST, setup.abstract_state, manifest)[0]
              if checkpoints.latest_step(ckpt_lib.BEST) is not None
              else jax.tree.map(jnp.copy, state))
    else:
      state = jax.device_put(setup.init(seeds), setup.state_sharding)
      if config.init_from:
        state = _init_from(_init_source(config.init_from, manifest), state,
                           setup.abstract_state, manifest)
      best = jax.tree.map(jnp.copy, state)
      checkpoints.save(ckpt_lib.LATEST, 0, state, _meta(progress, manifest, batches))
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
  run = _run_loop(config, workdir, _StackedMembers(setup, states, bests, batch_size, members),
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
    fileio.write_json(workdir / "metrics.json", _jsonable(result))
  return result


# ---------------------------------------------------------------------------------------------
# The loop, shared by one model and by stacked members.
# ---------------------------------------------------------------------------------------------


class _OneModel:
  """What the loop trains for one model: its state, update and validation."""

  def __init__(self, setup: Setup, state: Any, batch_size: int):
    self.setup, self.state = setup, state
    self.volumes_per_step = batch_size

  def write_images(self, writer: SummaryWriter, batch: Any, n: int, dtype: np.dtype) -> None:
    _write_input_images(writer, batch, n, dtype)

  def train(self, batch: Any, pending: list[dict[str, jax.Array]]) -> None:
    self.state, metrics = self.setup.train_step(self.state, batch)
    pending.append(metrics)

  def validate(self, val_batches: Any, progress: dict[str, Any],
               step: int) -> tuple[bool, dict[str, Any], dict[str, float], str]:
    """One pass over the validation split: (improved, history entry, scalars, message)."""
    val = evaluate(self.setup.eval_step, self.state, val_batches)
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


class _StackedMembers:
  """What the loop trains for M stacked members: group states, their updates, per-member
  validation and best states (selected on device)."""

  def __init__(self, setup: MemberSetup, states: list[Any], bests: list[Any], batch_size: int,
               members: int):
    self.setup, self.states, self.bests, self.members = setup, states, bests, members
    self.volumes_per_step = batch_size * members

  def write_images(self, writer: SummaryWriter, group_batches: Any, n: int,
                   dtype: np.dtype) -> None:
    _write_input_images(writer, group_batches[0], n, dtype, members=True)

  def train(self, group_batches: Any, pending: list[dict[str, jax.Array]]) -> None:
    for g, train_step in enumerate(self.setup.train_steps):
      self.states[g], metrics = train_step(self.states[g], group_batches[g])
      pending.append(metrics)

  def validate(self, val_batches: Any, progress: dict[str, Any],
               step: int) -> tuple[bool, dict[str, Any], dict[str, float], str]:
    val = evaluate_members(self.setup.eval_step, self.states, val_batches, self.members)
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


def _run_loop(config: ml_collections.ConfigDict, workdir: Path, trainee: Any, *, batches: Any,
              val_batches: Any, checkpoints: ckpt_lib.Checkpoints, progress: dict[str, Any],
              manifest: dict[str, Any], schedule: optax.Schedule, step: int, total_steps: int,
              steps_per_epoch: int, quiet: bool, max_steps: int | None,
              data_dtype: np.dtype) -> dict[str, Any]:
  """Trains `trainee` (`_OneModel` or `_StackedMembers`) from `step` to the end, early
  stopping or `max_steps`; validates, logs and checkpoints on the way, and closes the
  checkpoints, batches, writer and bar whatever happens.

  Returns:
    dict with step, train_seconds (all runs of the experiment) and volumes_per_second
    (training volumes, compilation and validation excluded; every member's batch counts).
  """
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
  counted = [0, 0.0]  # timed steps and seconds already added to `progress`

  def save(which: str) -> None:
    nonlocal last_good
    # Never write parameters that came out of a non-finite step.
    _check_finite(pending, last_good, workdir)
    progress["train_seconds"] = train_seconds_before + time.perf_counter() - start_time
    progress["timed_steps"] += steps_timed - counted[0]
    progress["timed_seconds"] += timed_seconds - counted[1]
    counted[:] = [steps_timed, timed_seconds]
    checkpoints.save(which, step, trainee.checkpoint_state(which),
                     _meta(progress, manifest, batches))
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
        means = _check_finite(pending, last_good, workdir)
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
          "volumes_per_second": _throughput(progress, steps_timed - counted[0],
                                            timed_seconds - counted[1],
                                            trainee.volumes_per_step)}

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


def _check_finite(pending: list[dict[str, jax.Array]], last_good_step: int | None,
                  workdir: Path) -> dict[str, float]:
  """Means of the pending step metrics; NonFiniteLossError if any loss was NaN/Inf."""
  if not pending:
    return {}
  fetched = sharding.to_host(pending)
  # Ensemble steps report per member ([w]); the first bad member step counts.
  bad = min(int(np.min(m["bad_step"])) for m in fetched)
  if bad != _NO_BAD_STEP:
    loss = next(float(np.ravel(m["loss"])[np.argmin(np.ravel(m["bad_step"]))])
                for m in fetched if int(np.min(m["bad_step"])) == bad)
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


def _write_input_images(writer: SummaryWriter, batch: dict[str, jax.Array], n: int,
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


class OverrideParser(argparse.ArgumentParser):
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
  parser.__class__ = OverrideParser


def run(args: argparse.Namespace) -> int:
  config = config_lib.load_config(args.config)
  config = config_lib.apply_overrides(config, getattr(args, "overrides", []) or [])
  if config.ensemble.members > 1 or config.ensemble.sub_ensembles:
    # An ensemble experiment: sub-ensembles of stacked members, head, correction, store.
    from jax_brainage.ensemble import experiment

    summary = experiment.train_ensemble(config, args.workdir, quiet=args.quiet,
                                        max_steps=args.max_steps)
    if sharding.is_main_process():
      if summary["stopped"] != "done":
        print(f"brainage train: stopped at --max-steps {args.max_steps} in sub-ensemble "
              f"{list(summary['subs'])[-1]}; run again to continue; workdir {args.workdir}")
      else:
        e = summary["ensemble"]
        print(f"brainage train: ensemble of {e['n_members']} members "
              f"({', '.join(summary['subs'])}); validation MAE {e['mae']:.2f} years, "
              f"corrected {e['mae_corrected']:.2f}; store {args.workdir}/ensemble")
    return 0
  result = train_and_evaluate(config, args.workdir, quiet=args.quiet, max_steps=args.max_steps)
  if sharding.is_main_process():
    print(f"brainage train: {result['stopped']} at step {result['step']} (epoch "
          f"{result['epoch']}); best validation MAE {result['best_val_mae']:.2f} years at step "
          f"{result['best_step']}; workdir {args.workdir}")
  return 0
