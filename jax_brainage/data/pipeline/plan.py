"""The plan both pipelines follow: which rows go into which batch, on which process.

Host and device-resident pipelines follow one plan (`BatchPlan`), so they deliver the same
examples in the same order with the same augmentation, and an iterator state saved in one mode
resumes in the other:

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
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage.errors import ConfigError, DataError

STATE_VERSION = 1
# Hash streams: two shuffle keys (lexicographic sort: ties are practically impossible) and the
# two words of an example's augmentation seed; the device-resident pipeline hashes the same.
STREAM_ORDER0, STREAM_ORDER1, STREAM_AUG0, STREAM_AUG1 = 0x51, 0x52, 0xA1, 0xA2
STREAM_REPEAT = 0xB0  # repeated rows of a bootstrap resample


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


def seed_words(seed: int) -> tuple[np.uint32, np.uint32]:
  """The two uint32 words (low, high) a seed in [0, 2**64) enters the hashes as; ConfigError
  for a seed outside that range."""
  seed = int(seed)
  if not 0 <= seed < 2**64:
    raise ConfigError(f"seed={seed} must lie in [0, 2**64)")
  return np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)


def aug_seeds(seed: int, epoch: int, rows: np.ndarray) -> np.ndarray:
  """Per-example augmentation seeds uint32 [k, 2] for cache rows [k] in an epoch."""
  lo, hi = seed_words(seed)
  rows = np.asarray(rows, np.uint32)
  e = np.uint32(epoch)
  return np.stack([hash_words((lo, hi, e, rows, STREAM_AUG0)),
                   hash_words((lo, hi, e, rows, STREAM_AUG1))], axis=-1).astype(np.uint32)


def epoch_order(rows: np.ndarray, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """Positions into `rows` in the order of an epoch, int64 [m].

  The order sorts rows by hash(seed, epoch, row); ties (vanishingly rare with two 32-bit keys)
  keep the order of `rows`. The device-resident pipeline computes the same on device
  (`pipeline.device`).
  """
  m = len(rows)
  if not shuffle:
    return np.arange(m)
  lo, hi = seed_words(seed)
  r = np.asarray(rows, np.uint32)
  e = np.uint32(epoch)
  k0 = hash_words((lo, hi, e, r, STREAM_ORDER0))
  k1 = hash_words((lo, hi, e, r, STREAM_ORDER1))
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
    seed_words(self.seed)

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
    repeat = hash_words((rows, occurrence.astype(np.uint32), np.uint32(STREAM_REPEAT)))
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
