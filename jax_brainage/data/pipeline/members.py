"""Ensemble members: one `BatchPlan` per member, batches stacked `[member, batch, ...]`.

Member m of an ensemble trains on its own plan (its seed; the training split or a bootstrap
resample of it, `bootstrap_rows`), so its batches are exactly those a single-model pipeline with
that seed and rows would deliver. `MemberPipeline` reads each step's distinct subjects once
(host mode, grain) or keeps the union of the members' rows resident on every device (device
mode), and delivers the members in groups split over the mesh's 'ensemble' axis.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from jax_brainage import sharding as shd
from jax_brainage.data import augment as aug
from jax_brainage.data.pipeline.host import SteppedIterator, absl_flags_parsed
from jax_brainage.data.pipeline.plan import (STATE_VERSION, STREAM_REPEAT, BatchPlan, aug_seeds,
                                             seed_words)
from jax_brainage.data.pipeline.sources import ArraySource, Source, check_ages
from jax_brainage.errors import ConfigError, DataError


def bootstrap_rows(rows: np.ndarray, seed: int) -> np.ndarray:
  """A bootstrap resample of `rows`: as many draws with replacement, int32 [m], in draw order.

  A pure function of (rows, seed): member m of an ensemble draws with its own seed.
  """
  rows = np.asarray(rows, np.int32)
  lo, hi = seed_words(seed)
  rng = np.random.default_rng([int(lo), int(hi), STREAM_REPEAT])
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
      check_ages(source.ages, plan.rows, getattr(source, "subject_ids", None))
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


class MemberIterator(SteppedIterator):
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
        absl_flags_parsed()
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
