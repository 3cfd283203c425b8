"""Ensemble members: M models trained at once (stacked parameters, one vmapped, jitted step).

Member m is the single-model run with seed `config.seed + m` (`member_seeds`): every leaf of
its state but the step counter gains a leading member axis (`stack_states`, `member_state`),
the single-model steps of `train.steps` are vmapped over it, and the vmapped step is mapped
manually over the mesh's 'ensemble' axis. `build_member_setup` picks how many members one
compiled step holds (the vmap width, from the compiled memory analysis and the device's free
memory) and trains the member groups one after another (`member_groups`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jax_brainage import models, sharding
from jax_brainage.errors import ConfigError
from jax_brainage.train import config as config_lib
from jax_brainage.train import steps

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
  """(state [w, ...], batch [w, B, ...]) -> (state, metrics [w]): `steps.make_train_step` vmapped
  over members; every member sees its own batch, dropout key and optimiser state."""
  return jax.vmap(steps.make_train_step(config, model, tx), in_axes=(MEMBER_AXES, 0),
                  out_axes=(MEMBER_AXES, 0))


def make_member_eval_step(config: ml_collections.ConfigDict, model) -> Callable:
  """(state [w, ...], batch [B, ...]) -> weighted sums [w]: every member on the same batch."""
  return jax.vmap(steps.make_eval_step(config, model), in_axes=(MEMBER_AXES, None))


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
    model, tx, schedule: as in `steps.Setup`.
    init: seeds [M] -> fresh stacked state `[M, ...]` (host-side; member m =
      `steps.init_state(seeds[m])`).
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


# Compiled member setups by experiment and mesh (the few most recent; emptied to rebuild one).
MEMBER_SETUPS: dict[tuple[str, Any], MemberSetup] = {}


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
  if key in MEMBER_SETUPS:
    return MEMBER_SETUPS[key]
  model = models.get_model(config.model.name,
                           **config_lib.model_kwargs(config, mean_age, age_scale))
  schedule = steps.make_schedule(config.optimizer, total_steps)
  tx = steps.optimizer_for(config, schedule, steps.model_params(model, image_shape, channels))
  single = functools.partial(steps.init_state, model, tx, tuple(image_shape), channels)
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
  compiled_steps = {w: compile_width(w) for w in widths}
  full_abstract, full_sharding = abstract(members)
  group_shardings = tuple(abstract(g.stop - g.start)[1] for g in groups)
  setup = MemberSetup(
      model=model, tx=tx, schedule=schedule, init=init,
      abstract_state=full_abstract, state_sharding=full_sharding, groups=groups,
      width=max(widths), group_shardings=group_shardings,
      train_steps=tuple(compiled_steps[g.stop - g.start] for g in groups),
      eval_step=jax.jit(member_eval, out_shardings=replicated),
      keep_best=jax.jit(_keep_best, donate_argnums=(0,)),
      memory={"needed_bytes_per_device": needed(max(widths)), "budget_bytes_per_device": budget,
              "state_bytes_per_member": member_bytes})
  if len(MEMBER_SETUPS) >= steps.MAX_SETUPS:
    MEMBER_SETUPS.pop(next(iter(MEMBER_SETUPS)))
  MEMBER_SETUPS[key] = setup
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
