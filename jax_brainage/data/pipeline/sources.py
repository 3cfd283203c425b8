"""Random-access sources the pipelines read from: the memory-mapped cache, arrays in memory, or the
simulator itself (`SimulatorSource`: subjects rendered and preprocessed on demand, no files).

A source has `ages` float32 [n] (years), `volume_shape` (X, Y, Z, C), the stored `dtype` (uint8
for minmax caches, float16 for z-scored ones) and `read(rows)` -> `dtype` [k, X, Y, Z, C]; it
pickles cheaply, as grain worker processes receive a copy (memory maps re-open by file name).
"""

from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

import nibabel as nib
import numpy as np

from jax_brainage.data import cache as cache_lib
from jax_brainage.data import intensity, preprocess, simulate
from jax_brainage.errors import DataError


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
    check_volumes(volumes)
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


def check_volumes(volumes: np.ndarray) -> None:
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
  c = cache_lib.Cache.open(path)
  ids = getattr(c, "subject_ids", None)
  return ArraySource(c.volumes, np.asarray(c.ages, np.float32),
                     list(ids) if ids is not None else None)


def check_ages(ages: np.ndarray, rows: np.ndarray, subject_ids: Sequence[str] | None) -> None:
  """DataError naming the first of `rows` whose age (years, `ages` [n]) is not finite."""
  bad = rows[~np.isfinite(np.asarray(ages)[rows])]
  if bad.size:
    who = subject_ids[bad[0]] if subject_ids is not None else f"row {bad[0]}"
    raise DataError(f"subject {who}: no age (select labelled subjects for training/evaluation)")


class SimulatorSource:
  """Subjects simulated on demand (pure in (seed, index)) and preprocessed exactly as `prepare`.

  The images are quantised to int16 as `brainage simulate` stores them, so a batch from this
  source equals the same subject read from a simulated-then-prepared cache.

  Args:
    cohort_config: `CohortConfig` of the simulated cohort (its `n` is the number of subjects).
    preprocessing: `preprocess.Preprocessing`; default: the cohort's sequences, minmax uint8, the
      cube shape of its resolution (`prune.default_cube_shape`: 98^3 at 2 mm, 50^3 at 4 mm).
      `read` returns the dtype a cache of these settings stores (zscore: float16).

  Ages come from the cohort's population model without rendering images; `read` renders and
  preprocesses the requested subjects (in grain workers when `worker_count > 0`).
  """

  def __init__(self, cohort_config, preprocessing=None):
    self.cohort_config = cohort_config
    self.preprocessing = preprocessing or preprocess.Preprocessing(
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
    self.__dict__.update(state)
    self._cohort = simulate.Cohort(self.cohort_config)

  def subject_images(self, i: int) -> dict[str, Any]:
    """Sequence name -> nibabel image of simulated subject i, as `brainage simulate` writes it."""
    # Training needs only the images: skipping the reference rendering and masks is ~40% faster.
    subject = self._cohort.subject(int(i), ground_truth=False)
    return {s: nib.Nifti1Image(subject.images[s].astype(np.int16), subject.affine)
            for s in self.preprocessing.sequences}

  def read(self, rows: np.ndarray) -> np.ndarray:
    cubes = []
    for i in np.asarray(rows).tolist():
      cube, _ = preprocess.preprocess_subject(self.subject_images(i), self.preprocessing,
                                              subject=self.subject_ids[i])
      cubes.append(cube)
    return np.stack(cubes).astype(self.dtype, copy=False)
