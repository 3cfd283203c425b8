"""Input pipelines: grain on the host, or the whole cohort resident on the accelerator.

Both modes follow one plan (`BatchPlan`), so they deliver the same examples in the same order
with the same augmentation, and an iterator state saved in one mode resumes in the other:

- The order of an epoch sorts the selected cache rows by a counter-based hash of
  (seed, epoch, row): reproducible per seed, different every epoch, computable in numpy (grain
  workers) and in jnp (on device) bit for bit, and independent of worker and process counts.
- Global batch `t` holds positions `[t * B, (t + 1) * B)` of its epoch's order; JAX process `p`
  of `P` loads rows `[p * B / P, (p + 1) * B / P)` of it, which is exactly its devices' share
  of the batch sharded over 'data' (`jax_brainage.sharding.global_batch`). Shards partition
  every epoch without overlap, and the global batch does not depend on the process count, so a
  run resumes on a different number of hosts with the same data.
- Training drops the last incomplete batch of an epoch; evaluation (`drop_remainder=False`)
  pads the final batch to full size with `mask = False` rows (index -1, zero image), so every
  subject is counted exactly once and shapes stay static for jit.
- Each example's `aug_seed` (uint32 [2]) is a hash of (seed, epoch, row): the augmentation of
  an example does not depend on where or in which batch it is processed.

Host mode (`HostPipeline`): a grain `MapDataset` over batch numbers (each element reads one
process-local batch from a random-access source: the memory-mapped cache, in-memory arrays, or
the simulator itself), optional grain worker processes (`worker_count`, 0 = in-process) and
thread prefetch. Batches are dicts of numpy arrays (`image` [B, X, Y, Z, C] in the stored dtype:
uint8 for minmax caches, float16 for z-scored ones; `age` float32 [B], `index` int32 [B],
`aug_seed` uint32 [B, 2], `mask` bool [B]); `DeviceFeed` moves them to the mesh and makes network
inputs (float32: uint8 / 255 or the z-scores as they are; augmented) with
`augment.prepare_images`.

Device-resident mode (`DeviceResidentPipeline`): the stored volumes of the selected rows are put
once on every device of the mesh; per epoch a jitted function computes the order on device, and
per step a jitted `shard_map` lets every device gather, scale and augment its own share of the
batch. The host only passes the step number.

Trainers use `make_pipeline(source, mode="host" | "device" | "auto", ...)`: a re-iterable
pipeline (`HostFeedPipeline` or `DeviceResidentPipeline`) whose iterators yield the same
network-ready batches and share one JSON state format (`get_state` / `set_state`), so a checkpoint
resumes in either mode and on any number of processes. `brainage batches` iterates it from a
cache or straight from the simulator (`SimulatorSource`) and reports volumes/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
import zlib
from typing import Any, Callable, Mapping, Protocol, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jax_brainage import sharding as shd
from jax_brainage.data import augment as aug
from jax_brainage.data import intensity
from jax_brainage.errors import ConfigError, DataError

STATE_VERSION = 1
# Hash streams: two shuffle keys (lexicographic sort: ties are practically impossible) and the
# two words of an example's augmentation seed.
_STREAM_ORDER0, _STREAM_ORDER1, _STREAM_AUG0, _STREAM_AUG1 = 0x51, 0x52, 0xA1, 0xA2
_STREAM_REPEAT = 0xB0  # repeated rows of a bootstrap resample


# ------------------------------------------------------------------------------------------------
# Counter-based hashing: identical in numpy (host, grain workers) and jnp (device).
# ------------------------------------------------------------------------------------------------


def _mix32(x, xp):
  """Bijective 32-bit integer finaliser ('lowbias32', C. Wellons) on uint32 arrays."""
  x = x ^ (x >> 16)
  x = x * xp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * xp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_words(words: Sequence[Any], xp=np):
  """Hashes a sequence of uint32 arrays/scalars (broadcast together) to uint32."""
  with np.errstate(over="ignore"):  # wrap-around is the point (numpy scalars would warn)
    h = xp.uint32(0x243F6A88)
    for w in words:
      h = _mix32((h ^ xp.asarray(w, xp.uint32)) + xp.uint32(0x9E3779B9), xp)
  return h


def _seed_words(seed: int) -> tuple[np.uint32, np.uint32]:
  seed = int(seed)
  if not 0 <= seed < 2**64:
    raise ConfigError(f"seed={seed} must lie in [0, 2**64)")
  return np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)


def aug_seeds(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
  """Per-example augmentation seeds uint32 [k, 2] for cache rows [k] in an epoch."""
  lo, hi = _seed_words(seed)
  rows = np.asarray(rows, np.uint32)
  e = np.uint32(epoch)
  return np.stack([hash_words((lo, hi, e, rows, _STREAM_AUG0)),
                   hash_words((lo, hi, e, rows, _STREAM_AUG1))], axis=-1).astype(np.uint32)


def epoch_order(rows: np.ndarray, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """Positions into `rows` in the order of an epoch, int64 [m].

  The order sorts rows by hash(seed, epoch, row); ties (vanishingly rare with two 32-bit keys)
  keep the order of `rows`. `_device_epoch_order` computes the same on device.
  """
  m = len(rows)
  if not shuffle:
    return np.arange(m)
  lo, hi = _seed_words(seed)
  r = np.asarray(rows, np.uint32)
  e = np.uint32(epoch)
  k0 = hash_words((lo, hi, e, r, _STREAM_ORDER0))
  k1 = hash_words((lo, hi, e, r, _STREAM_ORDER1))
  return np.lexsort((np.arange(m), k1, k0))


# ------------------------------------------------------------------------------------------------
# The plan: which rows go into which batch, on which process.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BatchPlan:
  """The sequence of batches, shared by the host and the device-resident pipelines.

  Attributes:
    rows: int32 [m], the cache/cohort rows to iterate (e.g. the training split).
    batch_size: global batch size B (all processes together).
    seed: shuffling and augmentation seed.
    shuffle: shuffle each epoch (training) or keep the order of `rows` (evaluation).
    drop_remainder: drop the last incomplete batch of each epoch (training) or pad it with
      `mask = False` rows (evaluation).
    num_epochs: epochs to iterate; None iterates forever.
    shard_index, shard_count: this JAX process and the number of processes.
  """

  rows: np.ndarray
  batch_size: int
  seed: int = 0
  shuffle: bool = True
  drop_remainder: bool = True
  num_epochs: int | None = None
  shard_index: int = 0
  shard_count: int = 1
  allow_duplicates: bool = False

  def __post_init__(self):
    rows = np.asarray(self.rows)
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= 2**31)):
      raise ConfigError("pipeline rows must be a 1-D array of non-negative row numbers")
    if not self.allow_duplicates and len(np.unique(rows)) != len(rows):
      raise ConfigError("pipeline rows contain duplicates: each subject must appear once")
    object.__setattr__(self, "rows", rows.astype(np.int32))
    if len(rows) == 0:
      raise DataError("pipeline: no subjects to iterate (empty selection)")
    if self.batch_size < 1:
      raise ConfigError(f"batch_size={self.batch_size} must be positive")
    if not 0 <= self.shard_index < self.shard_count:
      raise ConfigError(f"shard_index={self.shard_index} must lie in [0, {self.shard_count})")
    if self.batch_size % self.shard_count:
      raise ConfigError(f"batch_size={self.batch_size} must be a multiple of the "
                        f"{self.shard_count} processes (shard_count)")
    if self.drop_remainder and self.batch_size > len(rows):
      raise ConfigError(f"batch_size={self.batch_size} exceeds the {len(rows)} subjects: "
                        "training would see no batch (lower batch_size)")
    if self.num_epochs is not None and self.num_epochs < 0:
      raise ConfigError(f"num_epochs={self.num_epochs} must be >= 0 or None")
    _seed_words(self.seed)

  @property
  def num_examples(self) -> int:
    return len(self.rows)

  @property
  def local_batch_size(self) -> int:
    """Rows of each global batch that this process loads."""
    return self.batch_size // self.shard_count

  @property
  def steps_per_epoch(self) -> int:
    m, b = self.num_examples, self.batch_size
    return m // b if self.drop_remainder else -(-m // b)

  @property
  def num_steps(self) -> int | None:
    return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

  @functools.cached_property
  def rows_digest(self) -> int:
    """crc32 of the rows: a resumed run must iterate the same selection."""
    return zlib.crc32(self.rows.tobytes())

  @functools.cached_property
  def keys(self) -> np.ndarray:
    """uint32 [m]: what the order and augmentation hashes see for each position of `rows`.

    The row itself, so plans without repeated rows (the usual case) hash exactly as before;
    the k-th repeat (k >= 1) of a row in a bootstrap resample gets hash(row, k), so that its
    copies land at independent places of an epoch with independent augmentations.
    """
    rows = self.rows.astype(np.uint32)
    if not self.allow_duplicates:
      return rows
    sort = np.argsort(self.rows, kind="stable")
    sorted_rows = self.rows[sort]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1]
    starts = np.repeat(first, np.diff(np.r_[first, len(sorted_rows)]))
    occurrence = np.empty(len(rows), np.int64)
    occurrence[sort] = np.arange(len(sorted_rows)) - starts
    repeat = hash_words((rows, occurrence.astype(np.uint32), np.uint32(_STREAM_REPEAT)))
    return np.where(occurrence > 0, repeat, rows).astype(np.uint32)

  def order(self, epoch: int) -> np.ndarray:
    """Positions into `rows` for an epoch, int64 [m] (last two epochs cached)."""
    # grain's reader threads call this concurrently: swap an immutable tuple, never mutate.
    cached = self.__dict__.get("_orders", ())
    for e, order in cached:
      if e == epoch:
        return order
    order = epoch_order(self.keys, self.seed, epoch, self.shuffle)
    self.__dict__["_orders"] = ((epoch, order),) + cached[:1]
    return order

  def local_positions(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, positions into rows [local_batch], -1 for padding) of this process at a step."""
    epoch, b = divmod(int(step), self.steps_per_epoch)
    lb = self.local_batch_size
    slots = b * self.batch_size + self.shard_index * lb + np.arange(lb)
    order = self.order(epoch)
    valid = slots < len(order)
    return epoch, np.where(valid, order[np.minimum(slots, len(order) - 1)], -1)

  def state(self, step: int) -> dict[str, Any]:
    """JSON-serialisable iterator state: the next global step plus what fixes the sequence."""
    return dict(version=STATE_VERSION, step=int(step), seed=int(self.seed),
                batch_size=int(self.batch_size), num_examples=self.num_examples,
                rows_crc32=self.rows_digest, shuffle=bool(self.shuffle),
                drop_remainder=bool(self.drop_remainder))

  def check_state(self, state: Mapping[str, Any]) -> int:
    """Validates a saved state against this plan; returns its step."""
    if not isinstance(state, Mapping) or "step" not in state:
      raise ConfigError(f"pipeline state {state!r} is not a pipeline iterator state")
    expected = self.state(0)
    for key in ("seed", "batch_size", "num_examples", "rows_crc32", "shuffle", "drop_remainder"):
      if key in state and state[key] != expected[key]:
        raise ConfigError(f"pipeline state was saved with {key}={state[key]!r} but this pipeline "
                          f"has {key}={expected[key]!r}: resuming would not continue the same data")
    step = int(state["step"])
    if step < 0 or (self.num_steps is not None and step > self.num_steps):
      raise ConfigError(f"pipeline state step={step} lies outside [0, {self.num_steps}]")
    return step


# ------------------------------------------------------------------------------------------------
# Random-access sources.
# ------------------------------------------------------------------------------------------------


class Source(Protocol):
  """What the pipelines read from (the cache, arrays in memory, the simulator).

  `ages` float32 [n] (years); `volume_shape` (X, Y, Z, C); `dtype` the stored dtype (uint8 or
  float16, `intensity.STORED_DTYPES`); `read(rows)` `dtype` [k, X, Y, Z, C].
  Must pickle cheaply (grain workers receive a copy): memory maps re-open by file name.
  """

  ages: np.ndarray
  volume_shape: tuple[int, int, int, int]
  dtype: np.dtype

  def __len__(self) -> int: ...

  def read(self, rows: np.ndarray) -> np.ndarray: ...


class ArraySource:
  """Stored volumes [n, X, Y, Z, C] (uint8 or float16; a numpy array or a memory map) with ages
  float32 [n]."""

  def __init__(self, volumes: np.ndarray, ages: np.ndarray,
               subject_ids: Sequence[str] | None = None):
    _check_volumes(volumes)
    ages = np.asarray(ages, np.float32)
    if ages.shape != (volumes.shape[0],):
      raise DataError(f"ages has shape {ages.shape}, expected ({volumes.shape[0]},) for the "
                      "volumes")
    self.volumes = volumes
    self.ages = ages
    self.subject_ids = list(subject_ids) if subject_ids is not None else None

  @classmethod
  def from_npy(cls, path: str | os.PathLike, ages: np.ndarray, **kw) -> ArraySource:
    try:
      volumes = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: cannot memory-map volumes ({e})") from None
    return cls(volumes, ages, **kw)

  def __len__(self) -> int:
    return self.volumes.shape[0]

  @property
  def volume_shape(self) -> tuple[int, int, int, int]:
    return tuple(self.volumes.shape[1:])

  @property
  def dtype(self) -> np.dtype:
    return self.volumes.dtype

  def read(self, rows: np.ndarray) -> np.ndarray:
    # Fancy indexing of a memory map reads just these rows (sorted for sequential disk access).
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + self.volume_shape, self.dtype)
    out[order] = self.volumes[rows[order]]
    return out

  def __getstate__(self):
    state = dict(self.__dict__)
    memmap = _reopenable_memmap(self.volumes)
    if memmap is not None:
      state["volumes"] = memmap  # re-opened in the worker instead of copying gigabytes
    return state

  def __setstate__(self, state):
    if isinstance(state["volumes"], tuple):
      filename, offset, shape, dtype = state["volumes"]
      state["volumes"] = np.memmap(filename, np.dtype(dtype), "r", offset=offset, shape=shape)
    self.__dict__.update(state)


def source_dtype(source: Source) -> np.dtype:
  """The dtype a source's `read` returns; sources that declare none are uint8 (minmax), the
  contract before z-scored caches."""
  return np.dtype(getattr(source, "dtype", np.uint8))


def _check_volumes(volumes: np.ndarray) -> None:
  """DataError (one line) unless `volumes` is [n, x, y, z, channel] of a stored dtype."""
  if volumes.ndim != 5:
    raise DataError(f"volumes must be [n, x, y, z, channel], got shape {tuple(volumes.shape)}")
  intensity.check_stored_dtype(volumes.dtype, f"volumes {tuple(volumes.shape)}")


def _reopenable_memmap(a: np.ndarray) -> tuple[str, int, tuple[int, ...], str] | None:
  """(file, offset, shape, dtype) if `a` is a whole C-contiguous memory map of a file."""
  if not isinstance(a, np.memmap) or not getattr(a, "filename", None):
    return None
  if not a.flags.c_contiguous or not a.dtype.isnative:
    return None
  base = a
  while isinstance(base.base, np.memmap):
    base = base.base
  if base is not a and base.__array_interface__["data"][0] != a.__array_interface__["data"][0]:
    return None
  try:
    if os.path.getsize(a.filename) != a.offset + a.nbytes:
      return None
  except OSError:
    return None
  return (a.filename, int(a.offset), tuple(a.shape), a.dtype.str)


def cache_source(path: str | os.PathLike) -> ArraySource:
  """A source over a prepared cache directory (`brainage prepare`)."""
  from jax_brainage.data import cache as cache_lib  # another stage; imported when used

  c = cache_lib.Cache.open(path)
  ids = getattr(c, "subject_ids", None)
  return ArraySource(c.volumes, np.asarray(c.ages, np.float32),
                     list(ids) if ids is not None else None)


# ------------------------------------------------------------------------------------------------
# Host mode: grain.
# ------------------------------------------------------------------------------------------------


def _check_ages(ages: np.ndarray, rows: np.ndarray, subject_ids: Sequence[str] | None) -> None:
  bad = rows[~np.isfinite(np.asarray(ages)[rows])]
  if bad.size:
    who = subject_ids[bad[0]] if subject_ids is not None else f"row {bad[0]}"
    raise DataError(f"subject {who}: no age (select labelled subjects for training/evaluation)")


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


def _absl_flags_parsed() -> None:
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
      _check_ages(source.ages, self.plan.rows, getattr(source, "subject_ids", None))
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


class _SteppedIterator:
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


class BatchIterator(_SteppedIterator):
  """Iterator of host batches with checkpointable position (`get_state` / `set_state`)."""

  def _positions(self) -> BatchPlan:
    return self.pipeline.plan

  def _open(self):
    _absl_flags_parsed()
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


# ------------------------------------------------------------------------------------------------
# Device-resident mode.
# ------------------------------------------------------------------------------------------------


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


def _device_epoch_order(rows: jax.Array, seed_words: jax.Array, epoch: jax.Array,
                        shuffle: bool) -> jax.Array:
  """jnp twin of `epoch_order`: positions into rows [m] (int32)."""
  m = rows.shape[0]
  pos = jnp.arange(m, dtype=jnp.int32)
  if not shuffle:
    return pos
  r = rows.astype(jnp.uint32)
  e = epoch.astype(jnp.uint32)
  k0 = hash_words((seed_words[0], seed_words[1], e, r, _STREAM_ORDER0), jnp)
  k1 = hash_words((seed_words[0], seed_words[1], e, r, _STREAM_ORDER1), jnp)
  return jax.lax.sort((k0, k1, pos), num_keys=3)[2]


def _device_aug_seeds(seed_words: jax.Array, epoch: jax.Array, rows: jax.Array) -> jax.Array:
  r = rows.astype(jnp.uint32)
  e = epoch.astype(jnp.uint32)
  return jnp.stack([hash_words((seed_words[0], seed_words[1], e, r, _STREAM_AUG0), jnp),
                    hash_words((seed_words[0], seed_words[1], e, r, _STREAM_AUG1), jnp)], -1)


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
    _check_volumes(volumes)
    # The plan is global: device mode has no per-process loading (shard 0 of 1).
    self.plan = BatchPlan(rows=np.arange(volumes.shape[0]) if rows is None else np.asarray(rows),
                          batch_size=batch_size, seed=seed, shuffle=shuffle,
                          drop_remainder=drop_remainder, num_epochs=num_epochs)
    if self.plan.rows.max() >= volumes.shape[0]:
      raise DataError(f"row {self.plan.rows.max()} is out of range for {volumes.shape[0]} volumes")
    if require_ages:
      _check_ages(np.asarray(ages, np.float32), self.plan.rows, None)
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
    lo, hi = _seed_words(seed)
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

    def local_batch(volumes, rows, ages, seed_words, order, step):
      # Each device gathers its own rows of the global batch: no cross-device traffic.
      epoch, b = step // steps_per_epoch, step % steps_per_epoch
      d = jax.lax.axis_index(shd.DATA_AXIS)
      m = order.shape[0]
      slots = b * gb + d * per_device + jnp.arange(per_device, dtype=jnp.int32)
      valid = slots < m
      pos = order[jnp.minimum(slots, m - 1)]
      index = jnp.where(valid, rows[pos], -1)
      seeds = jnp.where(valid[:, None], _device_aug_seeds(seed_words, epoch, rows[pos]),
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


# ------------------------------------------------------------------------------------------------
# Ensemble members: one plan per member, batches stacked [member, batch, ...].
# ------------------------------------------------------------------------------------------------


def bootstrap_rows(rows: np.ndarray, seed: int) -> np.ndarray:
  """A bootstrap resample of `rows`: as many draws with replacement, int32 [m], in draw order.

  A pure function of (rows, seed): member m of an ensemble draws with its own seed.
  """
  rows = np.asarray(rows, np.int32)
  lo, hi = _seed_words(seed)
  rng = np.random.default_rng([int(lo), int(hi), _STREAM_REPEAT])
  return rows[rng.integers(0, len(rows), len(rows))]


class _ReadMembers:
  """grain map function: global step -> this process's rows of every member's batch.

  Each distinct subject of the step is read once, however many members draw it.
  """

  def __init__(self, plans: Sequence[BatchPlan], source: Source):
    self.plans = list(plans)
    self.source = source

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    rows, seeds = _member_rows(self.plans, step)
    unique, inverse = np.unique(rows, return_inverse=True)
    image = self.source.read(unique)[inverse.reshape(rows.shape)]
    age = np.asarray(self.source.ages, np.float32)[rows]
    return dict(image=image, age=age, index=rows, aug_seed=seeds,
                mask=np.ones(rows.shape, bool))


def _member_rows(plans: Sequence[BatchPlan], step: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows int32 [M, local_batch], aug seeds uint32 [M, local_batch, 2]) of a training step."""
  rows, seeds = [], []
  for plan in plans:
    epoch, pos = plan.local_positions(step)
    if np.any(pos < 0):  # member plans drop the last incomplete batch: never padded
      raise ConfigError("member pipelines must drop the last incomplete batch")
    rows.append(plan.rows[pos])
    seeds.append(aug_seeds(plan.seed, epoch, plan.keys[pos]))
  return np.stack(rows).astype(np.int32), np.stack(seeds).astype(np.uint32)


@functools.lru_cache(maxsize=8)
def _member_prepare(cfg: aug.AugmentConfig, mesh: Mesh) -> Callable:
  """Jitted stored `[w, B, ...]` -> augmented float32 network inputs, members over 'ensemble';
  one per augmentation and mesh (pipelines of one experiment share its compilation)."""
  prepare = functools.partial(aug.prepare_images, cfg=cfg)
  return jax.jit(jax.vmap(prepare), out_shardings=shd.batch_sharding(mesh, members=True))


class MemberPipeline:
  """Endless training batches of M ensemble members, delivered in groups of members.

  Member m follows its own `BatchPlan` (its seed, its rows: the training split or a bootstrap
  resample), so its batches are exactly those a single-model pipeline with that seed and rows
  would deliver (same order, same augmentation). Iterating yields, per global step, a list of
  dicts, one per member group: `image` float32 `[w, B, X, Y, Z, C]` (scaled, augmented), `age`
  float32 `[w, B]` (years), `index` int32 `[w, B]`, `aug_seed` uint32 `[w, B, 2]`, `mask` bool
  `[w, B]`; members split over the mesh's 'ensemble' axis and examples over 'data'.

  Args:
    source: random-access `Source`.
    plans: one training plan per member (shuffled, drop_remainder, same batch size).
    groups: member slices trained one after another (together they cover 0..M-1 in order).
    mode: "host" (grain reads each step's distinct subjects once, then the stack goes to the
      devices) or "device" (the union of all members' rows is resident on every device; per
      step only row slots and augmentation seeds travel).
    mesh, augment, worker_count: as in `make_pipeline`.
  """

  def __init__(self, source: Source, plans: Sequence[BatchPlan], groups: Sequence[slice], *,
               mode: str = "host", mesh: Mesh | None = None,
               augment: aug.AugmentConfig | None = None, worker_count: int = 0,
               read_threads: int = 2, prefetch: int = 2):
    self.source = source
    self.plans = list(plans)
    self.groups = list(groups)
    if not self.plans or any(p.num_epochs is not None or not p.drop_remainder
                             for p in self.plans):
      raise ConfigError("member pipelines need endless training plans (drop_remainder)")
    if len({(p.batch_size, p.steps_per_epoch, p.shard_count) for p in self.plans}) != 1:
      raise ConfigError("every member must have the same batch size and steps per epoch")
    covered = [m for g in self.groups for m in range(len(self.plans))[g]]
    if covered != list(range(len(self.plans))):
      raise ConfigError(f"member groups {self.groups} do not cover the {len(self.plans)} members")
    self.mesh = mesh or shd.make_mesh()
    shd.check_batch_size(self.plans[0].batch_size, self.mesh, "batch_size")
    self.augment = aug.AugmentConfig.from_config(augment)
    self.worker_count, self.read_threads, self.prefetch = worker_count, read_threads, prefetch
    for plan in self.plans:
      if plan.rows.max() >= len(source):
        raise DataError(f"row {plan.rows.max()} is out of range for a source of "
                        f"{len(source)} subjects")
      _check_ages(source.ages, plan.rows, getattr(source, "subject_ids", None))
    if mode not in ("host", "device"):
      raise ConfigError(f"member pipeline mode {mode!r}: host or device")
    self.mode = mode
    prepare = functools.partial(aug.prepare_images, cfg=self.augment)
    self._prepare = _member_prepare(self.augment, self.mesh)
    if mode == "device":
      volumes = getattr(source, "volumes", None)
      if volumes is None:
        raise ConfigError("device-resident mode needs volumes in an array or cache (not the "
                          "simulator): use mode='host'")
      self.resident_rows = np.unique(np.concatenate([p.rows for p in self.plans]))
      rep = shd.replicated(self.mesh)
      host = ArraySource(volumes, np.zeros(len(volumes))).read(self.resident_rows)
      self.volumes = jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])
      self._gather = jax.jit(
          lambda volumes, slots, seeds: jax.vmap(prepare)(volumes[slots], seeds),
          out_shardings=shd.batch_sharding(self.mesh, members=True))

  @property
  def steps_per_epoch(self) -> int:
    return self.plans[0].steps_per_epoch

  @property
  def nbytes(self) -> int:
    """Bytes of resident volumes per device (device mode; 0 in host mode)."""
    if self.mode != "device":
      return 0
    return int(np.prod(self.volumes.shape)) * self.volumes.dtype.itemsize

  def dataset(self, start_step: int = 0) -> grain.IterDataset:
    """Host mode: grain dataset of this process's stacked member rows from `start_step` on."""
    ds = grain.MapDataset.range(start_step, 2**62).map(_ReadMembers(self.plans, self.source))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                              prefetch_buffer_size=self.prefetch))
    if self.worker_count > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
    return ds

  def state(self, step: int) -> dict[str, Any]:
    """JSON state: the next global step and each member's plan (seed, rows digest, ...)."""
    return dict(version=STATE_VERSION, step=int(step),
                members=[p.state(step) for p in self.plans])

  def check_state(self, state: Mapping[str, Any]) -> int:
    if not isinstance(state, Mapping) or "members" not in state or "step" not in state:
      raise ConfigError(f"pipeline state {str(state)[:80]!r} is not a member pipeline state")
    if len(state["members"]) != len(self.plans):
      raise ConfigError(f"pipeline state holds {len(state['members'])} members, this pipeline "
                        f"{len(self.plans)}")
    for plan, member in zip(self.plans, state["members"]):
      plan.check_state(member)
    return int(state["step"])

  def __iter__(self) -> MemberIterator:
    return MemberIterator(self)


class MemberIterator(_SteppedIterator):
  """Iterator over a `MemberPipeline` with `step`, `get_state` / `set_state`, `close`."""

  def _positions(self) -> MemberPipeline:
    return self.pipeline

  def __next__(self) -> list[dict[str, jax.Array]]:
    p = self.pipeline
    if p.mode == "device":
      rows, seeds = _member_rows(p.plans, self._step)
      slots = np.searchsorted(p.resident_rows, rows).astype(np.int32)
      out = []
      for g in p.groups:
        image = p._gather(p.volumes, slots[g], seeds[g])
        # Device mode plans are global (every process holds the whole plan).
        rest = jax.device_put(dict(age=np.asarray(p.source.ages, np.float32)[rows[g]],
                                   index=rows[g], aug_seed=seeds[g],
                                   mask=np.ones(rows[g].shape, bool)),
                              shd.batch_sharding(p.mesh, members=True))
        out.append(dict(rest, image=image))
    else:
      if self._it is None:
        _absl_flags_parsed()
        self._it = iter(p.dataset(self._step))
      local = next(self._it)
      out = []
      for g in p.groups:
        batch = shd.global_batch(p.mesh, {k: np.asarray(v[g]) for k, v in local.items()},
                                 members=True)
        batch["image"] = p._prepare(batch["image"], batch["aug_seed"])
        out.append(batch)
    self._step += 1
    return out


# ------------------------------------------------------------------------------------------------
# The simulator as a source without files.
# ------------------------------------------------------------------------------------------------


class SimulatorSource:
  """Subjects simulated on demand (pure in (seed, index)) and preprocessed exactly as `prepare`.

  The images are quantised to int16 as `brainage simulate` stores them, so a batch from this
  source equals the same subject read from a simulated-then-prepared cache.

  Args:
    cohort_config: `CohortConfig` of the simulated cohort (its `n` is the number of subjects).
    preprocessing: `cache.Preprocessing`; default: the cohort's sequences, minmax uint8, the
      cube shape of its resolution (`prune.default_cube_shape`: 98^3 at 2 mm, 50^3 at 4 mm).
      `read` returns the dtype a cache of these settings stores (zscore: float16).

  Ages come from the cohort's population model without rendering images; `read` renders and
  preprocesses the requested subjects (in grain workers when `worker_count > 0`).
  """

  def __init__(self, cohort_config, preprocessing=None):
    from jax_brainage.data import cache as cache_lib
    from jax_brainage.data import simulate

    self.cohort_config = cohort_config
    self.preprocessing = preprocessing or cache_lib.Preprocessing(
        sequences=tuple(cohort_config.sequences))
    # minmax -> uint8, zscore -> float16: the dtype a prepared cache of these settings stores.
    self.dtype = intensity.check_stored_dtype(self.preprocessing.dtype, "simulator source")
    self._cohort = simulate.Cohort(cohort_config)
    self.ages = np.asarray(self._cohort.latent_table()["age"], np.float32)
    self.subject_ids = [simulate.subject_id(i) for i in range(len(self.ages))]
    self.volume_shape = tuple(self.read(np.array([0]))[0].shape)

  def __len__(self) -> int:
    return len(self.ages)

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_cohort")  # rebuilt in the worker from the (small) config
    return state

  def __setstate__(self, state):
    from jax_brainage.data import simulate

    self.__dict__.update(state)
    self._cohort = simulate.Cohort(self.cohort_config)

  def subject_images(self, i: int) -> dict[str, Any]:
    """Sequence name -> nibabel image of simulated subject i, as `brainage simulate` writes it."""
    import nibabel as nib

    # Training needs only the images: skipping the reference rendering and masks is ~40% faster.
    subject = self._cohort.subject(int(i), ground_truth=False)
    return {s: nib.Nifti1Image(subject.images[s].astype(np.int16), subject.affine)
            for s in self.preprocessing.sequences}

  def read(self, rows: np.ndarray) -> np.ndarray:
    from jax_brainage.data import cache as cache_lib

    cubes = []
    for i in np.asarray(rows).tolist():
      cube, _ = cache_lib.preprocess_subject(self.subject_images(i), self.preprocessing,
                                             subject=self.subject_ids[i])
      cubes.append(cube)
    return np.stack(cubes).astype(self.dtype, copy=False)


# ------------------------------------------------------------------------------------------------
# One entry point for trainers.
# ------------------------------------------------------------------------------------------------


def make_pipeline(source: Source, *, batch_size: int, mode: str = "auto", mesh: Mesh | None = None,
                  augment: aug.AugmentConfig | None = None, seed: int = 0,
                  rows: np.ndarray | None = None, shuffle: bool = True,
                  drop_remainder: bool = True, num_epochs: int | None = None,
                  worker_count: int = 0, require_ages: bool = True,
                  device_fraction: float = 0.5) -> HostFeedPipeline | DeviceResidentPipeline:
  """A re-iterable pipeline of network-ready global batches, host-fed or device-resident.

  Args:
    mode: "host" (grain), "device" (volumes resident on the accelerators), or "auto": device
      when the platform is an accelerator, the source holds its volumes in an array or memory
      map and the selected volumes fit (`fits_on_device`) on every local device, else host.
    Others: as in `HostPipeline` / `DeviceResidentPipeline`.

  Returns:
    a pipeline with `mode`, `plan` and `steps_per_epoch`; each `iter()` yields dicts of global
    arrays split over 'data' (`image` float32 [B, X, Y, Z, C]: uint8 volumes / 255 or float16
    z-scores as float32 (`intensity.to_unit_float`), augmented,
    `age` float32 [B], `index` int32 [B], `aug_seed` uint32 [B, 2], `mask` bool [B]) and has
    `get_state()` / `set_state(state)`, with the same state in both modes.
  """
  if mode not in ("host", "device", "auto"):
    raise ConfigError(f"pipeline mode {mode!r}: choose host, device or auto")
  mesh = mesh or shd.make_mesh()
  augment = aug.AugmentConfig.from_config(augment)
  n_rows = len(source) if rows is None else len(rows)
  nbytes = n_rows * int(np.prod(source.volume_shape)) * source_dtype(source).itemsize
  volumes = getattr(source, "volumes", None)
  if mode == "auto":
    accelerator = jax.devices()[0].platform != "cpu"
    fits = all(fits_on_device(nbytes, d, fraction=device_fraction) for d in jax.local_devices())
    mode = "device" if accelerator and volumes is not None and fits else "host"
  if mode == "device":
    if volumes is None:
      raise ConfigError("device-resident mode needs volumes in an array or cache (not the "
                        "simulator): use mode='host'")
    return DeviceResidentPipeline(
        volumes, source.ages, batch_size=batch_size, seed=seed, rows=rows, shuffle=shuffle,
        drop_remainder=drop_remainder, num_epochs=num_epochs, augment=augment, mesh=mesh,
        require_ages=require_ages)
  host = HostPipeline(
      source, batch_size=batch_size, seed=seed, rows=rows, shuffle=shuffle,
      drop_remainder=drop_remainder, num_epochs=num_epochs, worker_count=worker_count,
      require_ages=require_ages)
  return HostFeedPipeline(host, mesh, augment)


# ------------------------------------------------------------------------------------------------
# `brainage batches`
# ------------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
  p = subparsers.add_parser(
      "batches", help="iterate the input pipeline and report batches and volumes/s",
      description="Iterate training batches from a prepared cache (or straight from the "
                  "simulator) to check that data flows: prints each batch and the throughput.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--cache", help="prepared cache directory (brainage prepare --out)")
  src.add_argument("--simulate-n", type=int, metavar="N",
                   help="iterate N simulated subjects generated on the fly (no files)")
  p.add_argument("--resolution", type=int, default=4, metavar="MM",
                 help="simulated voxel size in mm (with --simulate-n; default 4)")
  p.add_argument("--seed", type=int, default=0, help="simulated cohort seed (with --simulate-n)")
  p.add_argument("--sequences", default=None,
                 help="simulated sequences, comma-separated (default: all the simulator has)")
  p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                 help="iterate one part of the seeded 80/10/10 split (default all)")
  p.add_argument("--split-seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--shuffle-seed", type=int, default=0, help="shuffling/augmentation seed")
  p.add_argument("--eval", action="store_true",
                 help="evaluation order: no shuffle, last batch padded (mask) instead of dropped")
  p.add_argument("--mode", choices=("host", "device", "auto"), default="host")
  p.add_argument("--workers", type=int, default=0, help="grain worker processes (host mode)")
  p.add_argument("--augment", action="store_true",
                 help="augment (shifts, rotations, flips, noise; AugmentConfig.training_default)")
  p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
  p.add_argument("--quiet", action="store_true", help="only the summary line")
  p.set_defaults(func=run)
  return p


def _open_source(args: argparse.Namespace) -> tuple[Source, str]:
  if args.cache:
    return cache_source(args.cache), f"cache {args.cache}"
  if args.simulate_n < 1:
    raise ConfigError(f"--simulate-n {args.simulate_n} must be positive")
  from jax_brainage.data.simulation.config import CohortConfig

  kw: dict[str, Any] = dict(seed=args.seed, n=args.simulate_n, resolution_mm=args.resolution)
  if args.sequences:
    kw["sequences"] = tuple(s.strip() for s in args.sequences.split(",") if s.strip())
  cfg = CohortConfig(**kw)
  return SimulatorSource(cfg), (f"simulator (n={cfg.n}, {cfg.resolution_mm} mm, "
                                f"seed {cfg.seed}, no files)")


def run(args: argparse.Namespace) -> int:
  from jax_brainage.data import splits

  source, what = _open_source(args)
  rows = np.arange(len(source))
  labelled = rows[np.isfinite(source.ages)]
  if args.split != "all":
    part = splits.split_subjects(len(labelled), args.split_seed)[args.split]
    rows = labelled[part]
  else:
    rows = labelled
  if args.mode == "device" and not hasattr(source, "volumes"):
    raise ConfigError("--mode device needs --cache (the simulator source generates volumes on "
                      "the host)")
  mesh = shd.make_mesh()
  augment = aug.AugmentConfig.training_default() if args.augment else aug.AugmentConfig()
  pipe = make_pipeline(source, batch_size=args.batch_size, mode=args.mode, mesh=mesh,
                       augment=augment, seed=args.shuffle_seed, rows=rows,
                       shuffle=not args.eval, drop_remainder=not args.eval,
                       num_epochs=args.epochs, worker_count=args.workers)
  it = iter(pipe)
  shape, dtype = tuple(source.volume_shape), source_dtype(source).name
  print(f"{what}: {len(rows)} subjects ({args.split}), volumes {shape} {dtype}; mode {pipe.mode}, "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s), batch {args.batch_size}, "
        f"{pipe.steps_per_epoch} steps/epoch, augment {'on' if augment.enabled else 'off'}")
  ids = getattr(source, "subject_ids", None)
  n_volumes, t_first, t0 = 0, None, time.perf_counter()
  try:
    for step, batch in enumerate(it):
      if args.max_batches is not None and step >= args.max_batches:
        break
      jax.block_until_ready(batch["image"])
      index = np.asarray(batch["index"])
      mask = np.asarray(batch["mask"])
      age = np.asarray(batch["age"])[mask]
      if t_first is None:
        t_first = time.perf_counter()  # excludes start-up and compilation
      else:
        n_volumes += int(mask.sum())
      if not args.quiet:
        names = [ids[i] if ids is not None else str(i) for i in index[mask][:4]]
        more = " ..." if mask.sum() > 4 else ""
        img = batch["image"]
        print(f"epoch {step // pipe.steps_per_epoch} step {step}: image {img.dtype} "
              f"{tuple(img.shape)} over {img.sharding.spec} | {int(mask.sum())} subjects, ages "
              f"{age.min():.1f}-{age.max():.1f} y | {', '.join(names)}{more}")
  finally:
    it.close()
  elapsed = time.perf_counter() - (t_first or t0)
  rate = n_volumes / elapsed if n_volumes and elapsed > 0 else float("nan")
  print(f"{n_volumes} volumes after the first batch in {elapsed:.2f} s: {rate:.1f} volumes/s "
        f"({pipe.mode} mode)")
  return 0
