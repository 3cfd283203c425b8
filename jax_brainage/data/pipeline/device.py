"""Device-resident mode: the whole selection lives on the accelerator(s).

`DeviceResidentPipeline` puts the stored volumes of the selected rows once on every device of
the mesh; per epoch a jitted function computes the plan's order on device (the jnp twin of
`plan.epoch_order`, bit for bit), and per step a jitted `shard_map` lets every device gather,
scale and augment its own share of the batch. The host only passes the step number.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jax_brainage import sharding as shd
from jax_brainage.data import augment as aug
from jax_brainage.data.pipeline.plan import (STREAM_AUG0, STREAM_AUG1, STREAM_ORDER0,
                                             STREAM_ORDER1, BatchPlan, hash_words, seed_words)
from jax_brainage.data.pipeline.sources import ArraySource, check_ages, check_volumes
from jax_brainage.errors import ConfigError, DataError


def fits_on_device(nbytes: int, device: jax.Device | None = None, *, fraction: float = 0.5,
                   cpu_bytes: int | None = None) -> bool:
  """Whether `nbytes` of data may stay resident on `device`, leaving room for the model.

  Uses `device.memory_stats()` (bytes_limit - bytes_in_use) when the backend reports it; the
  data may take `fraction` of what is free (the rest is for parameters, optimiser state and
  activations). Where no stats exist (CPU), the budget is `cpu_bytes` if given, else a
  conservative 1/8 of the host's physical memory (fake CPU devices all share that memory).
  """
  device = device or jax.local_devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
    stats = None
  if stats and "bytes_limit" in stats:
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return nbytes <= fraction * free
  if cpu_bytes is not None:
    return nbytes <= cpu_bytes
  try:
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return False
  return nbytes <= physical // 8


def _device_epoch_order(rows: jax.Array, words: jax.Array, epoch: jax.Array,
                        shuffle: bool) -> jax.Array:
  """jnp twin of `plan.epoch_order`: positions into rows [m] (int32)."""
  m = rows.shape[0]
  pos = jnp.arange(m, dtype=jnp.int32)
  if not shuffle:
    return pos
  r = rows.astype(jnp.uint32)
  e = epoch.astype(jnp.uint32)
  k0 = hash_words((words[0], words[1], e, r, STREAM_ORDER0), jnp)
  k1 = hash_words((words[0], words[1], e, r, STREAM_ORDER1), jnp)
  return jax.lax.sort((k0, k1, pos), num_keys=3)[2]


def _device_aug_seeds(words: jax.Array, epoch: jax.Array, rows: jax.Array) -> jax.Array:
  """jnp twin of `plan.aug_seeds`: uint32 [k, 2] for rows [k]."""
  r = rows.astype(jnp.uint32)
  e = epoch.astype(jnp.uint32)
  return jnp.stack([hash_words((words[0], words[1], e, r, STREAM_AUG0), jnp),
                    hash_words((words[0], words[1], e, r, STREAM_AUG1), jnp)], -1)


class DeviceResidentPipeline:
  """The cohort lives on the accelerator(s); order, gather, scaling and augmentation run there.

  Args:
    volumes: uint8 or float16 [n, X, Y, Z, C] (array or memory map; only `rows` are transferred,
      in their stored dtype).
    ages: float32 [n] (years).
    mesh: device mesh with a 'data' axis; default all devices on one 'data' axis. The volumes
      are replicated on every device (check with `fits_on_device`).
    batch_size, seed, rows, shuffle, drop_remainder, num_epochs: as in `HostPipeline`.
    augment: AugmentConfig (default off).
    require_ages: as in `HostPipeline`.

  Iterating yields dicts of global arrays split over 'data': `image` float32
  [B, X, Y, Z, C] (`intensity.to_unit_float`, augmented), `age`, `index`, `aug_seed`, `mask`,
  equal to what `DeviceFeed` makes from the host pipeline with the same arguments.
  """

  def __init__(self, volumes: np.ndarray, ages: np.ndarray, *, batch_size: int, seed: int = 0,
               rows: np.ndarray | None = None, shuffle: bool = True,
               drop_remainder: bool = True, num_epochs: int | None = None,
               augment: aug.AugmentConfig | None = None, mesh: Mesh | None = None,
               require_ages: bool = True):
    check_volumes(volumes)
    # The plan is global: device mode has no per-process loading (shard 0 of 1).
    self.plan = BatchPlan(rows=np.arange(volumes.shape[0]) if rows is None else np.asarray(rows),
                          batch_size=batch_size, seed=seed, shuffle=shuffle,
                          drop_remainder=drop_remainder, num_epochs=num_epochs)
    if self.plan.rows.max() >= volumes.shape[0]:
      raise DataError(f"row {self.plan.rows.max()} is out of range for {volumes.shape[0]} volumes")
    if require_ages:
      check_ages(np.asarray(ages, np.float32), self.plan.rows, None)
    self.mesh = mesh or shd.make_mesh()
    if shd.DATA_AXIS not in self.mesh.axis_names:
      raise ConfigError(f"mesh axes {self.mesh.axis_names} have no '{shd.DATA_AXIS}' axis")
    shd.check_batch_size(batch_size, self.mesh, "batch_size")
    self.augment = aug.AugmentConfig.from_config(augment)
    rep = shd.replicated(self.mesh)
    rows_np = self.plan.rows
    ages = np.asarray(ages, np.float32)
    shape = (len(rows_np),) + tuple(volumes.shape[1:])
    everything = len(rows_np) == volumes.shape[0] and np.array_equal(
        rows_np, np.arange(volumes.shape[0]))
    # All rows: transfer straight from the memory map; a subset is read once into host memory.
    host = volumes if everything else ArraySource(volumes, np.zeros(len(volumes))).read(rows_np)
    self.volumes = jax.make_array_from_callback(shape, rep, lambda idx: np.asarray(host[idx]))
    self.rows = jax.make_array_from_callback(rows_np.shape, rep, lambda idx: rows_np[idx])
    self.ages = jax.make_array_from_callback(rows_np.shape, rep, lambda idx: ages[rows_np][idx])
    lo, hi = seed_words(seed)
    sw = np.array([lo, hi], np.uint32)
    self.seed_words = jax.make_array_from_callback((2,), rep, lambda idx: sw[idx])
    self._order_fn = jax.jit(functools.partial(_device_epoch_order, shuffle=self.plan.shuffle),
                             out_shardings=rep)
    self._batch_fn = self._build_batch_fn()
    self._orders: dict[int, jax.Array] = {}

  mode = "device"

  @property
  def steps_per_epoch(self) -> int:
    return self.plan.steps_per_epoch

  @property
  def nbytes(self) -> int:
    """Bytes of resident volumes per device."""
    return int(np.prod(self.volumes.shape)) * self.volumes.dtype.itemsize

  def _build_batch_fn(self) -> Callable[..., dict[str, jax.Array]]:
    mesh, cfg = self.mesh, self.augment
    gb = self.plan.batch_size
    per_device = gb // mesh.shape[shd.DATA_AXIS]
    steps_per_epoch = self.plan.steps_per_epoch

    def local_batch(volumes, rows, ages, words, order, step):
      # Each device gathers its own rows of the global batch: no cross-device traffic.
      epoch, b = step // steps_per_epoch, step % steps_per_epoch
      d = jax.lax.axis_index(shd.DATA_AXIS)
      m = order.shape[0]
      slots = b * gb + d * per_device + jnp.arange(per_device, dtype=jnp.int32)
      valid = slots < m
      pos = order[jnp.minimum(slots, m - 1)]
      index = jnp.where(valid, rows[pos], -1)
      seeds = jnp.where(valid[:, None], _device_aug_seeds(words, epoch, rows[pos]),
                        jnp.uint32(0))
      image = jnp.where(valid[:, None, None, None, None], volumes[pos],
                        jnp.zeros((), volumes.dtype))
      return dict(image=aug.prepare_images(image, seeds, cfg),
                  age=jnp.where(valid, ages[pos], 0.0).astype(jnp.float32),
                  index=index.astype(jnp.int32), aug_seed=seeds, mask=valid)

    fn = jax.shard_map(local_batch, mesh=mesh, in_specs=(P(),) * 6, out_specs=P(shd.DATA_AXIS))
    return jax.jit(fn)

  def order(self, epoch: int) -> jax.Array:
    """Positions into rows for an epoch, computed on device (int32 [m], replicated)."""
    if epoch not in self._orders:
      if len(self._orders) >= 2:
        self._orders.pop(next(iter(self._orders)))
      self._orders[epoch] = self._order_fn(self.rows, self.seed_words, jnp.int32(epoch))
    return self._orders[epoch]

  def batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch at a global step."""
    epoch = step // self.plan.steps_per_epoch
    return self._batch_fn(self.volumes, self.rows, self.ages, self.seed_words, self.order(epoch),
                          jnp.int32(step))

  def __iter__(self) -> DeviceResidentIterator:
    return DeviceResidentIterator(self)


class DeviceResidentIterator:
  """Iterator over a `DeviceResidentPipeline`; `get_state` / `set_state` as in host mode."""

  def __init__(self, pipeline: DeviceResidentPipeline, step: int = 0):
    self.pipeline = pipeline
    self._step = step

  def __iter__(self) -> DeviceResidentIterator:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    num_steps = self.pipeline.plan.num_steps
    if num_steps is not None and self._step >= num_steps:
      raise StopIteration
    batch = self.pipeline.batch(self._step)
    self._step += 1
    return batch

  @property
  def step(self) -> int:
    return self._step

  def get_state(self) -> dict[str, Any]:
    return self.pipeline.plan.state(self._step)

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._step = self.pipeline.plan.check_state(state)

  def close(self) -> None:
    pass
