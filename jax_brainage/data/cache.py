"""The cube cache's on-disk format and `Cache` (open one read-only, verified). Caches are written
by `jax_brainage.data.prepare` (`brainage prepare`).

Every row is a subject's cube `[X, Y, Z, C]` made by `preprocess.preprocess_subject` following
the cache's `preprocess.Preprocessing` record; `Cache.preprocess` applies the same to new data.

Cache layout:
  CACHE/volumes.npy   uint8 [n, X, Y, Z, C] (float16 for zscore), `np.load(mmap_mode="r")`.
  CACHE/index.json    format and version, shape, sequences, scaling, voxel size, source, the
                      preprocessing settings, and per subject: subject_id, age, sex, covariates,
                      the `CubeInverse` that maps cube arrays back onto the subject's grid;
                      "checksums": the CRC-32 of every row of volumes.npy (its bytes in C order).
  CACHE/atlas.nii.gz  the region atlas, when `--regions` was used (so predict can re-apply it).
  CACHE/conformity.npz, conformity.json, qc.tsv   the input-conformity gate's reference (mean
                      image, brain mask, intensity histogram), its calibration on these subjects,
                      and every subject's measures and flags (`jax_brainage.data.conformity`).

Integrity: prepare stores every row's checksum (`row_checksum`) in index.json. `Cache.open`
(verify=True, the default) checks every row against them once per process and file version (a
memo keyed by the files' device, inode, size and times), so a cache garbled on disk is a
one-line DataError naming the cache and its first bad subject.
CRC-32 runs at ~4 GB/s on one core (zlib): 0.2 s for 5000 subjects of 50^3 voxels (625 MB, in
the page cache), ~12 s plus the disk read for 46 GB (2000 subjects of 198^3 x 3), once per process.
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jax_brainage.data import bids, conformity, nifti, prune, regions
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject
from jax_brainage.errors import BrainAgeError, ConfigError, DataError

__all__ = ["FORMAT", "FORMAT_VERSION", "CHECKSUM", "VOLUMES", "INDEX", "ATLAS", "Cache",
           "row_checksum"]

FORMAT = "jax-brainage-cache"
FORMAT_VERSION = 2  # 2: per-row checksums.
CHECKSUM = "crc32"
VOLUMES = "volumes.npy"
INDEX = "index.json"
ATLAS = "atlas.nii.gz"


# ---------------------------------------------------------------------------------------------
# Checksums.

# (device, inode, size, mtime, ctime) of volumes.npy and index.json of caches verified in this
# process: a cache is read in full once per process, not at every open.
_VERIFIED: set[tuple[int, ...]] = set()


def row_checksum(row: np.ndarray) -> int:
  """CRC-32 of one cache row `[X, Y, Z, C]` (its bytes in C order), as index.json stores it."""
  return zlib.crc32(np.ascontiguousarray(row))


def _file_version(*paths: Path) -> tuple[int, ...]:
  key = []
  for p in paths:
    st = os.stat(p)
    key += [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
  return tuple(key)


def _verify(path: Path, volumes: np.ndarray, subject_ids: Sequence[str],
            checksums: Sequence[int]) -> None:
  """Checks every row of `volumes` against `checksums`; DataError naming the first bad one."""
  key = _file_version(path / VOLUMES, path / INDEX)
  if key in _VERIFIED:
    return
  bad = [i for i in range(len(volumes)) if row_checksum(volumes[i]) != int(checksums[i])]
  if bad:
    raise DataError(
        f"{path / VOLUMES}: corrupt cache volumes: row {bad[0]} ({subject_ids[bad[0]]}) fails its "
        f"checksum ({len(bad)} of {len(volumes)} rows bad); re-run `brainage prepare`")
  _VERIFIED.add(key)


# ---------------------------------------------------------------------------------------------
# The cache.


class Cache:
  """A prepared cache, opened read-only.

  Attributes:
    path: the cache directory.
    index: the parsed index.json.
    volumes: memory-mapped `[n, X, Y, Z, C]` uint8 (float16 for zscore).
    ages: float32 `[n]` chronological ages in years (NaN where unknown).
    subject_ids: list of n row ids, unique (`bids.row_id`: `sub-01`, or `sub-01_ses-2`).
    participant_ids: list of n participant ids (the same for every session of a subject).
    sequences: channel names.
    shape: cube shape `(X, Y, Z)`.
    records: per-subject dicts (subject_id, age, sex, covariates, session, images, inverse).
    preprocessing: the `Preprocessing` that made it (apply it to new data).
  """

  def __init__(self, path: Path, index: dict[str, Any], volumes: np.ndarray):
    self.path = path
    self.index = index
    self.volumes = volumes
    self.records: list[dict[str, Any]] = index["subjects"]
    # Row ids (`sub-01_ses-2` where the row has a session) are unique; participant ids repeat
    # over a subject's sessions (splits keep them together).
    self.subject_ids = [bids.row_id(r["subject_id"], r.get("session")) for r in self.records]
    self.participant_ids = [r["subject_id"] for r in self.records]
    self.ages = np.array([np.nan if r["age"] is None else r["age"] for r in self.records],
                         dtype=np.float32)
    self.sequences = tuple(index["sequences"])
    self.shape = tuple(index["shape"])
    self.scaling = index["scaling"]
    self.preprocessing = Preprocessing.from_dict(index["preprocessing"])

  @classmethod
  def open(cls, path: str | os.PathLike, *, verify: bool = True) -> "Cache":
    """Opens CACHE; DataError (one line) for a missing, corrupt, incomplete or old cache.

    With `verify` every row of volumes.npy is checked against its checksum in index.json (once
    per process and file version; see the module docstring for the cost); a garbled cache is a
    DataError naming it and the first bad subject. False skips the check (index-only uses).
    """
    path = Path(path)
    index_path = path / INDEX
    if not path.is_dir():
      raise DataError(f"{path}: cache not found (run `brainage prepare --out {path}`)")
    if not index_path.is_file():
      raise DataError(f"{index_path}: not a prepared cache (no {INDEX}); run `brainage prepare`")
    try:
      index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f"{index_path}: corrupt cache index ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
      raise DataError(f"{index_path}: not a {FORMAT} index")
    version = index.get("format_version")
    # Version 1 (before checksums) still opens, unverified: re-prepare it to get checksums.
    if version not in (1, FORMAT_VERSION):
      raise DataError(f"{index_path}: cache format version {version}, this code reads "
                      f"1 to {FORMAT_VERSION}; re-run `brainage prepare`")
    try:
      n = len(index["subjects"])
      expected = (n, *index["shape"], len(index["sequences"]))
      dtype = np.dtype(index["dtype"])
      Preprocessing.from_dict(index["preprocessing"])
      for r in index["subjects"]:
        r["subject_id"], r["age"], r["inverse"]
      if version == FORMAT_VERSION:
        checksums = index["checksums"]
        if checksums["algorithm"] != CHECKSUM or len(checksums["rows"]) != n:
          raise ValueError("checksums")
        [int(c) for c in checksums["rows"]]
    except (KeyError, TypeError, ValueError, BrainAgeError) as e:
      raise DataError(f"{index_path}: corrupt cache index (bad or missing {e})") from None
    volumes_path = path / VOLUMES
    if not volumes_path.is_file():
      raise DataError(f"{volumes_path}: cache volumes missing; re-run `brainage prepare`")
    try:
      volumes = np.load(volumes_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise DataError(f"{volumes_path}: corrupt cache volumes ({e})") from None
    if volumes.shape != tuple(expected) or volumes.dtype != dtype:
      raise DataError(f"{volumes_path}: holds {volumes.dtype} {volumes.shape}, index says "
                      f"{dtype} {tuple(expected)}; re-run `brainage prepare`")
    if verify and version == FORMAT_VERSION:
      try:
        _verify(path, volumes, [r["subject_id"] for r in index["subjects"]],
                index["checksums"]["rows"])
      except OSError as e:
        raise DataError(f"{volumes_path}: unreadable cache volumes ({e})") from None
    return cls(path, index, volumes)

  def __len__(self) -> int:
    return len(self.records)

  def inverse(self, i: int) -> prune.CubeInverse:
    """The `CubeInverse` of subject row i (maps cube arrays back onto its own grid)."""
    return prune.CubeInverse.from_dict(self.records[i]["inverse"])

  def covariate(self, name: str) -> np.ndarray:
    """A numeric covariate column as float64 `[n]` (NaN where missing or non-numeric)."""
    if not any(name in r.get("covariates", {}) for r in self.records):
      raise ConfigError(f"{self.path}: no covariate {name!r} in the cache")
    values = [r.get("covariates", {}).get(name) for r in self.records]
    return np.array([v if isinstance(v, (int, float)) else np.nan for v in values], np.float64)

  @functools.cached_property
  def conformity(self) -> conformity.Reference:
    """The conformity gate's reference and calibration (`conformity.load_reference`): stored by
    prepare, or (a cache from before the gate) built from the cubes and calibrated on them."""
    return conformity.load_reference(
        self.path, self.volumes, self.scaling, float(np.max(self.index["voxel_size"])),
        [r.get("qc", {}) for r in self.records])

  @functools.cached_property
  def atlas(self) -> regions.Atlas | None:
    """The region atlas the cache was masked with, or None."""
    path = self.path / ATLAS
    return regions.load_atlas(path) if path.exists() else None

  def preprocess(
      self, images: Mapping[str, Any], *, subject: str | None = None, mask=None,
      measures: dict[str, float] | None = None,
  ) -> tuple[np.ndarray, prune.CubeInverse]:
    """New data (e.g. for `brainage predict`) prepared exactly as this cache's subjects.

    Args:
      images: sequence name -> image path or nibabel image, for each of `self.sequences`.
      subject: subject id for error messages.
      mask: optional brain mask (path or image).
      measures: when a dict, filled with the scan's conformity measures (`conformity`).

    Returns:
      (cube `[X, Y, Z, C]` in the cache's dtype, `CubeInverse`).

    Raises:
      DataError: as `preprocess_subject`, or when the images' voxel size differs from the
        cache's (a cube counted in voxels would then cover a different field of view).
    """
    cube, inverse = preprocess_subject(images, self.preprocessing, subject=subject, mask=mask,
                                       atlas=self.atlas, measures=measures)
    expected = self.index.get("voxel_size")
    if expected is not None and self.preprocessing.voxel_size is None:
      expected = np.broadcast_to(np.asarray(expected, np.float64), (3,))
      if not np.allclose(inverse.voxel_size, expected, rtol=1e-3, atol=1e-3):
        first = images[self.sequences[0]]
        where = nifti.describe(first if isinstance(first, (str, os.PathLike)) else None, subject)
        raise DataError(
            f"{where}: voxel size {'x'.join(f'{v:g}' for v in inverse.voxel_size)} mm differs "
            f"from the cache's {'x'.join(f'{v:g}' for v in expected)} mm ({self.path})")
    return cube, inverse
