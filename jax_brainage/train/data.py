"""What the trainer reads: a random-access source of volumes, its train/validation/test split,
and the facts the model is built from (cube shape, sequences, mean training age).

Batches come from `jax_brainage.data.pipeline.make_pipeline` (grain on the host, or the cohort
resident on the accelerators): global arrays split over 'data', `image` float32 `[B, X, Y, Z, C]`
(uint8 caches / 255 in [0, 1], float16 z-scored caches as they are; augmented for training),
`age` float32 `[B]` (years), `index` int32 `[B]`, `mask` bool `[B]` (False for padding rows of
the last evaluation batch). Their iterator state (the next global step and what fixes the
sequence) is stored in every checkpoint, so a resumed run reads exactly the batches the
interrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_brainage import sharding
from jax_brainage.data import bids, simulate
from jax_brainage.data import cache as cache_lib
from jax_brainage.data import pipeline as pipeline_lib
from jax_brainage.data import prepare as prepare_lib
from jax_brainage.data import splits as splits_lib
from jax_brainage.data.preprocess import Preprocessing
from jax_brainage.errors import ConfigError, DataError


class ChannelSource:
  """A source's volumes restricted to some channels (the model's sequences), in a given order.

  Args:
    source: a `pipeline.Source` with `C_all` channels.
    channels: for each model input channel, its channel in `source`.
  """

  def __init__(self, source: Any, channels: Sequence[int]):
    self.source = source
    self.channels = list(channels)
    self.ages = source.ages
    self.dtype = pipeline_lib.source_dtype(source)
    self.subject_ids = getattr(source, "subject_ids", None)
    self.volume_shape = (*tuple(source.volume_shape)[:3], len(self.channels))

  def __len__(self) -> int:
    return len(self.source)

  @property
  def volumes(self) -> np.ndarray | None:
    """Volumes as an array view (device-resident mode), if the source has them in memory."""
    volumes = getattr(self.source, "volumes", None)
    return None if volumes is None else volumes[..., self.channels]

  def read(self, rows: np.ndarray) -> np.ndarray:
    """`[k, X, Y, Z, C]` of the given rows, in the stored dtype (uint8 or float16)."""
    return np.ascontiguousarray(self.source.read(rows)[..., self.channels])


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingData:
  """A cohort split for training.

  Attributes:
    source: random-access `pipeline.Source` whose channels are the model's `sequences`.
    split: train / val / test rows of `source`.
    sequences: names of the input channels, in order.
    name: where the data came from (cache directory), for messages.
  """

  source: Any
  split: splits_lib.Split
  sequences: tuple[str, ...]
  name: str = "<memory>"

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(s) for s in self.source.volume_shape[:3])

  @property
  def dtype(self) -> np.dtype:
    """Stored dtype of the volumes: uint8 (minmax, network input / 255) or float16 (zscore)."""
    return pipeline_lib.source_dtype(self.source)

  @property
  def mean_train_age(self) -> float:
    """Mean chronological age of the training split (years): MRInet's initial output bias."""
    return float(np.mean(np.asarray(self.source.ages)[self.split.train]))

  def steps_per_epoch(self, batch_size: int) -> int:
    steps = len(self.split.train) // batch_size
    if steps == 0:
      raise ConfigError(f"config.batch_size={batch_size} exceeds the {len(self.split.train)} "
                        f"training subjects of {self.name}")
    return steps

  def train_batches(self, mesh, batch_size: int, seed: int, augment: Any, mode: str = "host",
                    workers: int = 0):
    """Iterator of endless shuffled training batches (epoch after epoch) with
    `get_state`/`set_state`/`step`."""
    return iter(pipeline_lib.make_pipeline(
        self.source, batch_size=batch_size, mode=mode, mesh=mesh, augment=augment, seed=seed,
        rows=self.split.train, shuffle=True, drop_remainder=True, num_epochs=None,
        worker_count=workers))

  def member_rows(self, seeds: Sequence[int], bootstrap: bool) -> list[np.ndarray]:
    """Training rows of each ensemble member: the training split, or with `bootstrap` a
    resample with replacement of it drawn with the member's seed."""
    train = np.asarray(self.split.train, np.int32)
    if not bootstrap:
      return [train for _ in seeds]
    return [pipeline_lib.bootstrap_rows(train, int(s)) for s in seeds]

  def member_batches(self, mesh, batch_size: int, seeds: Sequence[int],
                     rows: Sequence[np.ndarray], augment: Any, groups: Sequence[slice],
                     mode: str = "host", workers: int = 0):
    """Iterator of endless training batches of ensemble members (see
    `pipeline.MemberPipeline`): per step a list over member `groups` of dicts of
    `[w, B, ...]` arrays; member m follows the plan of a single run with `seeds[m]` over
    `rows[m]`. `get_state`/`set_state`/`step` as for `train_batches`."""
    if mode == "auto":
      union = np.unique(np.concatenate([np.asarray(r) for r in rows]))
      nbytes = len(union) * int(np.prod(self.source.volume_shape)) * self.dtype.itemsize
      accelerator = jax.devices()[0].platform != "cpu"
      fits = all(pipeline_lib.fits_on_device(nbytes, d) for d in jax.local_devices())
      mode = ("device" if accelerator and getattr(self.source, "volumes", None) is not None
              and fits else "host")
    # Device mode builds global batches from the full plan (shard 0 of 1) on every process.
    index, count = ((jax.process_index(), jax.process_count()) if mode == "host" else (0, 1))
    plans = [pipeline_lib.BatchPlan(rows=np.asarray(r), batch_size=batch_size, seed=int(s),
                                    shuffle=True, drop_remainder=True, num_epochs=None,
                                    shard_index=index, shard_count=count, allow_duplicates=True)
             for s, r in zip(seeds, rows)]
    return iter(pipeline_lib.MemberPipeline(self.source, plans, groups, mode=mode, mesh=mesh,
                                            augment=augment, worker_count=workers))

  def eval_batches(self, mesh, batch_size: int, part: str = "val", mode: str = "host",
                   workers: int = 0):
    """Re-iterable pipeline: each `iter()` is one pass over a split in order, the last batch
    padded with `mask` False."""
    return pipeline_lib.make_pipeline(
        self.source, batch_size=batch_size, mode=mode, mesh=mesh, augment=None, seed=0,
        rows=self.split[part], shuffle=False, drop_remainder=False, num_epochs=1,
        worker_count=workers)

  def check_against(self, sequences: Sequence[str], image_shape: Sequence[int]) -> None:
    """DataError unless this data is the input the model was configured (or trained) for."""
    if tuple(sequences) != self.sequences:
      raise DataError(f"{self.name}: data has sequences {list(self.sequences)}, the model "
                      f"expects {list(sequences)}")
    shape = tuple(int(s) for s in image_shape)
    if any(shape) and shape != self.image_shape:
      raise DataError(f"{self.name}: volumes are {self.image_shape} voxels, the model expects "
                      f"{shape}")


def select_sequences(source: Any, available: Sequence[str], sequences: Sequence[str],
                     name: str) -> Any:
  """`source` restricted to `sequences` (by name, in that order); DataError if one is missing."""
  available = tuple(available)
  missing = [s for s in sequences if s not in available]
  if missing:
    raise DataError(f"{name}: has no sequence {missing[0]!r} (it has {list(available)})")
  channels = [available.index(s) for s in sequences]
  if channels == list(range(len(available))):
    return source
  return ChannelSource(source, channels)


def from_arrays(images: np.ndarray, ages: np.ndarray, sequences: Sequence[str], *,
                split: splits_lib.Split | None = None, split_seed: int = 0,
                available: Sequence[str] | None = None, name: str = "<memory>") -> TrainingData:
  """TrainingData over in-memory (or memory-mapped) volumes.

  Args:
    images: `[n, X, Y, Z, C_all]`, uint8 (minmax) or float16 (z-scores); ages: float32 `[n]`
      (years).
    sequences: the model's input channels, picked by name from `available` (the names of the
      `C_all` channels; default: `sequences` itself).
    split: train/val/test rows; default the study's seeded 80/10/10 split (`split_seed`).
  """
  source = pipeline_lib.ArraySource(images, np.asarray(ages, np.float32))
  available = tuple(sequences if available is None else available)
  if len(available) != images.shape[-1]:
    raise DataError(f"{name}: {images.shape[-1]} channels but {len(available)} sequence names")
  split = split or splits_lib.split_subjects(len(source), seed=split_seed)
  return TrainingData(select_sequences(source, available, sequences, name), split,
                      tuple(sequences), name)


def open_training_data(config) -> TrainingData:
  """TrainingData from `config.data`: a prepared cache (`brainage prepare`); with
  `config.data.simulate.n > 0` a simulated cohort is written and prepared there first.

  Raises:
    ConfigError: `config.data.cache` names nothing and the config does not simulate (a path the
      user named that does not exist is an error, never an empty cohort).
    DataError: the cache is corrupt, incomplete or has a subject without an age.
  """
  cache_dir = Path(config.data.cache)
  if config.data.simulate.n > 0:
    # On several hosts process 0 alone writes the cohort and its cache (on the shared file
    # system the others read); they wait for it at a barrier instead of racing to write.
    if sharding.is_main_process() and not (cache_dir / "index.json").exists():
      _simulate_and_prepare(config)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jax_brainage.simulate_and_prepare")
  elif not os.path.exists(cache_dir):  # (False, not OSError, for a name the OS refuses)
    raise ConfigError(f"config.data.cache={str(cache_dir)!r}: no such directory (prepare a "
                      "cache there with brainage prepare, or set config.data.simulate.n > 0 to "
                      "simulate one)")
  cache = cache_lib.Cache.open(cache_dir)
  source = pipeline_lib.ArraySource(cache.volumes, cache.ages, cache.subject_ids)
  unlabelled = np.flatnonzero(~np.isfinite(cache.ages))
  if len(unlabelled):
    raise DataError(f"{cache_dir}: subject {cache.subject_ids[int(unlabelled[0])]} has no age; "
                    "training needs every subject's age")
  # Every session of a participant in the same part (no subject in both train and test).
  split = splits_lib.split_subjects(len(source), seed=int(config.data.split_seed),
                                    groups=cache.participant_ids)
  return TrainingData(
      select_sequences(source, cache.sequences, tuple(config.data.sequences), str(cache_dir)),
      split, tuple(config.data.sequences), str(cache_dir))


def cohort_and_preprocessing(config) -> tuple[simulate.CohortConfig, Preprocessing]:
  """The simulated cohort `config.data.simulate` describes and how to prepare it.

  Returns:
    (`CohortConfig` of `simulate.seed`, `simulate.n` subjects at `simulate.resolution` mm with
    every sequence of `config.data.sequences`, the `Preprocessing` of its cache: those sequences,
    the `data.image_shape` box (voxels) or, when that is (0, 0, 0), the default cube of the
    resolution, `data.scaling` and `data.bias_sigma_mm` (mm)).
  """
  s = config.data.simulate
  sequences = tuple(config.data.sequences)
  cohort = simulate.CohortConfig(seed=int(s.seed), n=int(s.n), resolution_mm=int(s.resolution),
                                 sequences=sequences)
  shape = tuple(int(v) for v in config.data.image_shape)
  prep = Preprocessing(sequences=sequences, shape=shape if any(shape) else None,
                                 scaling=str(config.data.scaling),
                                 bias_sigma_mm=float(config.data.bias_sigma_mm))
  return cohort, prep


def _simulate_and_prepare(config) -> None:
  """Simulates the configured cohort as a BIDS dataset (`cohort_and_preprocessing`) into
  `data.simulate.out` and prepares its cache in `data.cache`."""
  cohort, prep = cohort_and_preprocessing(config)
  # write_cohort re-uses a complete directory of the same configuration (and refuses another).
  out = simulate.write_cohort(config.data.simulate.out, cohort,
                              workers=int(config.data.workers) or None)
  dataset = bids.read_bids(out, tuple(config.data.sequences))
  prepare_lib.prepare(dataset, config.data.cache, prep,
                    workers=max(1, int(config.data.workers)))
