"""The one place that decides how arrays are laid out over devices.

Everything runs on a 2-D device mesh with axes ('ensemble', 'data'):

- batches are split along their leading (example) axis over 'data' and repeated over 'ensemble';
- one model's parameters and optimiser state are replicated on every device;
- stacked ensemble members (leading axis = member) are split over 'ensemble', so each group of
  devices holds and updates its own members while sharing the batch within the group.

The same code runs on one CPU, on 8 GPUs, and on many hosts: global batches are assembled from
each process's own rows with `jax.make_array_from_process_local_data`, so a process only ever
loads the examples its devices will see.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_brainage.errors import ConfigError

ENSEMBLE_AXIS = "ensemble"
DATA_AXIS = "data"
MESH_AXES = (ENSEMBLE_AXIS, DATA_AXIS)


def make_mesh(ensemble: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh of shape `[ensemble, n_devices // ensemble]` over axes ('ensemble', 'data').

  Args:
    ensemble: size of the 'ensemble' axis (1 for a single model: all devices do data parallel).
    devices: devices to use; default all devices of all processes (`jax.devices()`).
  """
  devices = list(jax.devices() if devices is None else devices)
  if ensemble < 1 or len(devices) % ensemble:
    raise ConfigError(f"mesh: ensemble axis of size {ensemble} does not divide the "
                      f"{len(devices)} devices")
  shape = (ensemble, len(devices) // ensemble)
  processes = sorted({d.process_index for d in devices})
  if len(processes) > 1:
    # Multi-host: process p loads rows [pB/P, (p+1)B/P) of every member's batch, so 'data'
    # must run over the processes in order, each owning a contiguous block of it, and the
    # 'ensemble' axis must lie within every process (members are not split across hosts).
    local = [[d for d in devices if d.process_index == p] for p in processes]
    per = len(local[0])
    if any(len(block) != per for block in local) or per % ensemble:
      raise ConfigError(f"mesh: ensemble axis of size {ensemble} must divide the {per} devices "
                        "of every process (members are not split across hosts)")
    blocks = [np.asarray(block, dtype=object).reshape(ensemble, per // ensemble)
              for block in local]
    return Mesh(np.concatenate(blocks, axis=1), MESH_AXES)
  try:
    # Topology-aware device order (keeps 'data' neighbours on fast links on GPU/TPU).
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, ValueError, NotImplementedError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def data_size(mesh: Mesh) -> int:
  """Number of devices a batch is split over."""
  return mesh.shape[DATA_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
  """Same full array on every device (one model's parameters, scalars, RNG keys)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, members: bool = False) -> NamedSharding:
  """Leading (example) axis split over 'data'.

  With `members=True` the array is `[member, batch, ...]`: members over 'ensemble' and
  examples over 'data'.
  """
  return NamedSharding(mesh, P(ENSEMBLE_AXIS, DATA_AXIS) if members else P(DATA_AXIS))


def member_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (member) axis split over 'ensemble'; for stacked ensemble parameters."""
  return NamedSharding(mesh, P(ENSEMBLE_AXIS))


def state_shardings(mesh: Mesh, abstract_state: Any, *, members: bool = False) -> Any:
  """Shardings for a training-state pytree (from `jax.eval_shape`).

  One model: every leaf replicated. Stacked members (`members=True`): leaves with a leading
  member axis are split over 'ensemble', scalars (e.g. the step counter) are replicated.
  """
  if not members:
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return jax.tree.map(
      lambda x: member_sharding(mesh) if np.ndim(x) >= 1 else replicated(mesh), abstract_state)


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "config.batch_size") -> None:
  """Raises ConfigError unless the global batch splits evenly over devices and processes."""
  n = data_size(mesh)
  if batch_size < 1 or batch_size % n:
    raise ConfigError(f"{key}={batch_size} must be a positive multiple of the {n} devices "
                      "on the mesh's 'data' axis")
  if batch_size % jax.process_count():
    raise ConfigError(f"{key}={batch_size} must be a multiple of the "
                      f"{jax.process_count()} processes")


def process_batch_size(batch_size: int) -> int:
  """Rows of a global batch that this process loads (its devices' share)."""
  return batch_size // jax.process_count()


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], *,
                 members: bool = False) -> dict[str, jax.Array]:
  """Assembles a global batch (split over 'data') from this process's rows.

  Args:
    local: dict of host arrays holding this process's rows, e.g. `image` uint8
      `[batch / process_count, x, y, z, channel]`, `age` float32 `[batch / process_count]`.
    members: arrays are `[member, rows, ...]` (see `batch_sharding`).
  Returns:
    dict of global `jax.Array`s with the process-count-times larger leading (batch) axis.
  """
  sharding = batch_sharding(mesh, members=members)
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    # Member arrays hold every member (axis 0 is global) and this process's rows (axis 1).
    shape = ((v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:]) if members
             else None)
    out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
  return out


def put_replicated(mesh: Mesh, tree: Any) -> Any:
  """Places a host pytree on every device of `mesh` (same value everywhere)."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
  """Fetches a pytree to numpy on every process (gathers shards across hosts if needed)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def is_main_process() -> bool:
  """Only process 0 writes logs, summaries and reports (checkpoints are written collectively)."""
  return jax.process_index() == 0
