"""Host mode: a grain pipeline over a random-access source, and its feed onto the mesh.

`HostPipeline` is a grain `MapDataset` over batch numbers (each element reads one process-local
batch from a `sources.Source`: the memory-mapped cache, in-memory arrays, or the simulator
itself), optional grain worker processes (`worker_count`, 0 = in-process) and thread prefetch.
Batches are dicts of numpy arrays (`image` [B, X, Y, Z, C] in the stored dtype: uint8 for minmax
caches, float16 for z-scored ones; `age` float32 [B], `index` int32 [B], `aug_seed` uint32
[B, 2], `mask` bool [B]); `DeviceFeed` moves them to the mesh and makes network inputs (float32:
uint8 / 255 or the z-scores as they are; augmented) with `augment.prepare_images`.
"""

from __future__ import annotations

from typing import Any, Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from jax_brainage import sharding as shd
from jax_brainage.data import augment as aug
from jax_brainage.data.pipeline.plan import BatchPlan, aug_seeds
from jax_brainage.data.pipeline.sources import Source, check_ages, source_dtype
from jax_brainage.errors import ConfigError, DataError


class _ReadBatch:
  """grain map function: global step -> this process's batch (picklable for worker processes)."""

  def __init__(self, plan: BatchPlan, source: Source):
    self.plan = plan
    self.source = source

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    plan = self.plan
    epoch, pos = plan.local_positions(step)
    valid = pos >= 0
    rows = np.where(valid, plan.rows[np.maximum(pos, 0)], -1).astype(np.int32)
    image = np.zeros((len(rows),) + tuple(self.source.volume_shape), source_dtype(self.source))
    if valid.any():
      image[valid] = self.source.read(rows[valid])
    age = np.where(valid, self.source.ages[np.maximum(rows, 0)], 0).astype(np.float32)
    seeds = aug_seeds(plan.seed, epoch, np.maximum(rows, 0))
    seeds[~valid] = 0
    return dict(image=image, age=age, index=rows, aug_seed=seeds, mask=valid)


def absl_flags_parsed() -> None:
  """Marks absl's flags parsed if nobody did: call before iterating a grain dataset."""
  # grain reads absl flags inside its iterators; programs that never parse absl flags (ours,
  # pytest) would fail with UnparsedFlagAccessError.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class HostPipeline:
  """grain pipeline over a random-access source; iterating gives a `BatchIterator`.

  Args:
    source: random-access `Source` (see `ArraySource`, `cache_source`, `SimulatorSource`).
    batch_size: global batch size (all processes); this process loads batch_size / shard_count.
    seed: shuffling and augmentation seed.
    rows: cache rows to iterate (e.g. a split); default all.
    shuffle, drop_remainder, num_epochs: see `BatchPlan`. Evaluation: shuffle=False,
      drop_remainder=False, num_epochs=1.
    worker_count: grain worker processes (0: read in this process).
    worker_buffer_size: batches each worker prepares ahead.
    read_threads, prefetch: threads and buffered batches of grain's in-process reading.
    shard_index, shard_count: default `jax.process_index()` / `jax.process_count()`.
    require_ages: raise DataError if a selected subject has no (finite) age; set False to
      iterate unlabelled data (prediction).
  """

  def __init__(self, source: Source, *, batch_size: int, seed: int = 0,
               rows: np.ndarray | None = None, shuffle: bool = True,
               drop_remainder: bool = True, num_epochs: int | None = None,
               worker_count: int = 0, worker_buffer_size: int = 2, read_threads: int = 2,
               prefetch: int = 2, shard_index: int | None = None,
               shard_count: int | None = None, require_ages: bool = True):
    if worker_count < 0 or read_threads < 0 or prefetch < 0 or worker_buffer_size < 1:
      raise ConfigError("worker_count, read_threads and prefetch must be >= 0, "
                        "worker_buffer_size >= 1")
    self.source = source
    self.plan = BatchPlan(
        rows=np.arange(len(source)) if rows is None else np.asarray(rows),
        batch_size=batch_size, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder,
        num_epochs=num_epochs,
        shard_index=jax.process_index() if shard_index is None else shard_index,
        shard_count=jax.process_count() if shard_count is None else shard_count)
    if self.plan.rows.max() >= len(source):
      raise DataError(f"row {self.plan.rows.max()} is out of range for a source of "
                      f"{len(source)} subjects")
    if require_ages:
      check_ages(source.ages, self.plan.rows, getattr(source, "subject_ids", None))
    self.worker_count = worker_count
    self.worker_buffer_size = worker_buffer_size
    self.read_threads = read_threads
    self.prefetch = prefetch

  @property
  def steps_per_epoch(self) -> int:
    return self.plan.steps_per_epoch

  def dataset(self, start_step: int = 0) -> grain.IterDataset:
    """The grain dataset of this process's batches from global step `start_step` on."""
    stop = self.plan.num_steps if self.plan.num_steps is not None else 2**62
    ds = grain.MapDataset.range(start_step, max(start_step, stop))
    ds = ds.map(_ReadBatch(self.plan, self.source))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                              prefetch_buffer_size=self.prefetch))
    if self.worker_count > 0:
      # Workers take whole batches in turn; grain interleaves them back in order, so batches do
      # not depend on the number of workers.
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.worker_count, per_worker_buffer_size=self.worker_buffer_size))
    return ds

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self)


class SteppedIterator:
  """A grain-backed iterator with a checkpointable position: the global step of the next batch
  (`step`, `get_state` / `set_state`) and `close` for grain's worker processes. Subclasses give
  `_positions()`, the object whose `state(step)` / `check_state(state)` fix the sequence."""

  def __init__(self, pipeline: Any, step: int = 0):
    self.pipeline = pipeline
    self._step = step
    self._it = None

  def _positions(self) -> Any:
    raise NotImplementedError

  def __iter__(self):
    return self

  @property
  def step(self) -> int:
    """Global step of the next batch."""
    return self._step

  def get_state(self) -> dict[str, Any]:
    return self._positions().state(self._step)

  def set_state(self, state: Mapping[str, Any]) -> None:
    step = self._positions().check_state(state)
    self.close()
    self._step = step

  def close(self) -> None:
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
      self._it = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 -- interpreter shutdown: nothing left to clean
      pass


class BatchIterator(SteppedIterator):
  """Iterator of host batches with checkpointable position (`get_state` / `set_state`)."""

  def _positions(self) -> BatchPlan:
    return self.pipeline.plan

  def _open(self):
    absl_flags_parsed()
    self._it = iter(self.pipeline.dataset(self._step))

  def __next__(self) -> dict[str, np.ndarray]:
    num_steps = self.pipeline.plan.num_steps
    if num_steps is not None and self._step >= num_steps:
      self.close()
      raise StopIteration
    if self._it is None:
      self._open()
    batch = next(self._it)
    if self.pipeline.worker_count:
      # Copy out of grain's shared memory so it is released now, not when the consumer drops it.
      batch = {k: np.array(v) for k, v in batch.items()}
    self._step += 1
    return batch


class DeviceFeed:
  """Host batches -> network inputs on the mesh: `image` float32 (`intensity.to_unit_float`,
  augmented), the rest as is.

  Every array is a global `jax.Array` split over 'data'; this process contributes its rows.
  Same dict and numbers as `DeviceResidentPipeline`, and the same `get_state` / `set_state`.
  """

  def __init__(self, batches: BatchIterator, mesh: Mesh, augment: aug.AugmentConfig | None = None):
    self.batches = batches
    self.mesh = mesh
    self.augment = aug.AugmentConfig.from_config(augment)
    shd.check_batch_size(batches.pipeline.plan.batch_size, mesh, "batch_size")

  def __iter__(self) -> DeviceFeed:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = shd.global_batch(self.mesh, next(self.batches))
    batch["image"] = aug.prepare_images(batch["image"], batch["aug_seed"], self.augment)
    return batch

  @property
  def step(self) -> int:
    return self.batches.step

  def get_state(self) -> dict[str, Any]:
    return self.batches.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.batches.set_state(state)

  def close(self) -> None:
    self.batches.close()


class HostFeedPipeline:
  """A `HostPipeline` whose iterators deliver network inputs on the mesh (`DeviceFeed`).

  Re-iterable: each `iter()` starts at step 0 (use `set_state` to resume).
  """

  mode = "host"

  def __init__(self, host: HostPipeline, mesh: Mesh, augment: aug.AugmentConfig | None = None):
    self.host = host
    self.mesh = mesh
    self.augment = aug.AugmentConfig.from_config(augment)
    shd.check_batch_size(host.plan.batch_size, mesh, "batch_size")

  @property
  def plan(self) -> BatchPlan:
    return self.host.plan

  @property
  def steps_per_epoch(self) -> int:
    return self.host.plan.steps_per_epoch

  def __iter__(self) -> DeviceFeed:
    return DeviceFeed(iter(self.host), self.mesh, self.augment)
