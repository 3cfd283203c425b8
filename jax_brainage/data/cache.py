"""The cube cache: `prepare` (one pass over NIfTI files into a compact, memory-mapped cache) and
`Cache` (open one read-only). `brainage prepare` (jax_brainage.commands.prepare) runs `prepare`.

Every subject goes through `preprocess.preprocess_subject` (re-exported here with the
`Preprocessing` record it follows) into a cube `[X, Y, Z, C]`. Without a `voxel_size`, every
subject must have the same voxel size (checked), as the cube is counted in voxels.

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

The cache is built in a hidden temporary directory beside CACHE and renamed into place when
complete: an interrupted or failed prepare leaves no half cache and an existing good cache intact.

Integrity: each worker takes the CRC-32 of the cube it writes; once every row is on disk, prepare
reads the rows back and compares (a write that did not land is an error) and stores the
checksums in index.json. `Cache.open` (verify=True, the default) checks every row against them
once per process and file version (a memo keyed by the files' device, inode, size and times), so
a cache garbled on disk is a one-line DataError naming the cache and its first bad subject.
CRC-32 runs at ~4 GB/s on one core (zlib): 0.2 s for 5000 subjects of 50^3 voxels (625 MB, in
the page cache), ~12 s plus the disk read for 46 GB (2000 subjects of 198^3 x 3), once per process.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import uuid
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from jax_brainage import fileio
from jax_brainage.data import align, bids, conformity, nifti, prune, regions
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject
from jax_brainage.errors import BrainAgeError, ConfigError, DataError

__all__ = ["FORMAT", "FORMAT_VERSION", "CHECKSUM", "VOLUMES", "INDEX", "ATLAS", "Cache",
           "Preprocessing", "prepare", "prepare_row", "preprocess_subject", "row_checksum",
           "write_record"]

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


def write_record(out: str | os.PathLike, prep: Preprocessing, *,
                 source: str = "") -> "Cache":
  """A cache of no subjects: only the preprocessing record, so that new data are prepared as a
  model needs them when it was not trained on a cache of ours (an imported pretrained model).

  `prep.shape` and `prep.voxel_size` must be set (the model's input cube, mm); `source` says
  where the record comes from. Writes CACHE/index.json and an empty CACHE/volumes.npy
  `[0, X, Y, Z, C]` atomically; returns the cache opened.
  """
  if prep.shape is None or prep.voxel_size is None:
    raise ConfigError("a preprocessing record needs the cube shape and the voxel size (mm)")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  with fileio.atomic_path(out / VOLUMES, suffix=".npy") as tmp, open(tmp, "wb") as f:
    np.save(f, np.zeros((0, *prep.shape, len(prep.sequences)), prep.dtype))
  fileio.write_json(out / INDEX, {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "versions": {"nibabel": nib.__version__, "numpy": np.__version__}, "source": source,
      "shape": list(prep.shape), "sequences": list(prep.sequences),
      "channels": len(prep.sequences), "dtype": np.dtype(prep.dtype).name,
      "scaling": prep.scaling, "voxel_size": [float(prep.voxel_size)] * 3,
      "preprocessing": prep.to_dict(), "regions": None, "subjects": [],
      "checksums": {"algorithm": CHECKSUM, "rows": []}, "skipped": []})
  return Cache.open(out)


# ---------------------------------------------------------------------------------------------
# prepare.

_WORKER: dict[str, Any] = {}


def _init_worker(volumes_path: str, prep: dict[str, Any], atlas_path: str | None) -> None:
  _WORKER["volumes"] = np.load(volumes_path, mmap_mode="r+")
  _WORKER["prep"] = Preprocessing.from_dict(prep)
  _WORKER["atlas"] = regions.load_atlas(atlas_path) if atlas_path else None


def prepare_row(item: tuple[int, bids.Subject]) -> tuple[int, dict[str, Any] | None, str | None]:
  """One unit of `prepare`'s work (in a worker process, or in this one): preprocesses subject
  `item = (i, subject)` into row i of the shared volumes memmap.

  Returns:
    (i, record, None) with the record's `inverse`, `voxel_size` (mm), `brain_fits` and the
    `checksum` of the row as written (`row_checksum`), or
    (i, None, error message) when the subject's data is bad (DataError).
  """
  i, subject = item
  measures: dict[str, float] = {}
  try:
    cube, inverse = preprocess_subject(
        subject.images, _WORKER["prep"], subject=subject.subject_id, mask=subject.mask,
        atlas=_WORKER["atlas"], measures=measures)
  except DataError as e:
    return i, None, str(e)
  row = _WORKER["volumes"][i]
  row[...] = cube
  return i, {"inverse": inverse.to_dict(), "voxel_size": list(inverse.voxel_size),
             "brain_fits": inverse.brain_fits, "checksum": row_checksum(row), "qc": measures}, None


def _record(subject: bids.Subject, root: str, result: dict[str, Any]) -> dict[str, Any]:
  def rel(p: str) -> str:
    try:
      return str(Path(p).resolve().relative_to(Path(root).resolve())) if root else str(p)
    except ValueError:
      return str(Path(p).resolve())

  return {
      "subject_id": subject.subject_id,
      "age": subject.age,
      "sex": subject.sex,
      "covariates": subject.covariates,
      "session": subject.session,
      "images": {s: rel(p) for s, p in subject.images.items()},
      "brain_fits": result["brain_fits"],
      "voxel_size": result["voxel_size"],
      "inverse": result["inverse"],
      "qc": result["qc"],
  }


def _check_out(out: Path) -> None:
  """Refuses to replace anything but an empty directory or an earlier cache."""
  if out.exists() and not out.is_dir():
    raise ConfigError(f"--out {out}: exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file():
    raise ConfigError(f"--out {out}: non-empty directory that is not a cache; refusing to replace")


def _install(tmp: Path, out: Path) -> None:
  """Moves the finished cache `tmp` onto `out`, keeping the old one until the new is in place."""
  if not out.exists():
    os.rename(tmp, out)
    return
  backup = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
  os.rename(out, backup)
  try:
    os.rename(tmp, out)
  except BaseException:
    os.rename(backup, out)
    raise
  shutil.rmtree(backup, ignore_errors=True)


def _first_voxel_size(subjects: Sequence[bids.Subject], sequence: str, skip_bad: bool) -> float:
  """Largest voxel edge (mm) of the first reference image whose header passes the checks of
  `nifti.read_geometry` (finite, plausible voxel sizes, units); header only, no voxel read.
  A bad header is the error (or, with `skip_bad`, the next subject is tried: the worker reports
  the bad one when it gets to it)."""
  for subject in subjects:
    try:
      _, affine = nifti.read_geometry(subject.images[sequence], subject.subject_id)
    except DataError:
      if not skip_bad:
        raise
      continue
    return float(max(nifti.voxel_size(affine)))
  raise DataError(f"no readable {sequence} image among {len(subjects)} subjects")


def _remove_stale(out: Path) -> None:
  """Cleans up after earlier prepares of `out` that were killed.

  Removes their temporaries (when their process is gone). A run killed in the instant between
  moving the old cache aside and moving the new one in leaves the old one as a backup: it is put
  back if `out` is missing, else removed.
  """
  for stale in out.parent.glob(f".{out.name}.tmp-*"):
    pid = stale.name[len(f".{out.name}.tmp-"):].split("-")[0]
    if pid.isdigit() and not _alive(int(pid)) and stale.is_dir():
      shutil.rmtree(stale, ignore_errors=True)
  for backup in sorted(out.parent.glob(f".{out.name}.old-*")):
    if not out.exists() and (backup / INDEX).is_file():
      os.rename(backup, out)
    elif out.exists():
      shutil.rmtree(backup, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _publish_permissions(tmp: Path) -> None:
  """mkdtemp/mkstemp make private (0700/0600) entries; a cache is shared like any output."""
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)
  for f in tmp.iterdir():
    f.chmod(0o666 & ~umask)


def _common_voxel_size(results: dict[int, dict[str, Any]]) -> tuple[float, ...]:
  counts = collections.Counter(
      tuple(round(v, 3) for v in r["voxel_size"]) for r in results.values())
  return counts.most_common(1)[0][0]


def prepare(
    dataset: bids.Dataset,
    out: str | os.PathLike,
    prep: Preprocessing,
    *,
    atlas: regions.Atlas | None = None,
    workers: int = 1,
    skip_bad: bool = False,
    progress: bool = False,
) -> Cache:
  """Preprocesses every subject of `dataset` into a cache at `out`; returns it opened.

  Args:
    dataset: from `bids.read_bids` or `bids.read_image_list`.
    out: cache directory; an existing cache there is replaced only once the new one is complete.
    prep: preprocessing settings (`prep.sequences` must match the dataset's).
    atlas: region atlas, needed when `prep.regions` is set; copied into the cache.
    workers: processes working on subjects in parallel (1 = in this process).
    skip_bad: leave out subjects whose images fail (reported in index.json "skipped").
    progress: show a progress bar on stderr.

  Raises:
    DataError: the first failing subject (unless skip_bad), mismatched voxel sizes without
      `voxel_size`, or no subject left.
  """
  out = Path(out)
  _remove_stale(out)
  _check_out(out)
  if tuple(prep.sequences) != tuple(dataset.sequences):
    raise ConfigError(f"preprocessing sequences {prep.sequences} differ from the dataset's "
                      f"{dataset.sequences}")
  if prep.regions is not None and atlas is None:
    raise ConfigError("--regions needs --atlas FILE")
  subjects = list(dataset.subjects)
  if prep.shape is None:
    # Fix the shape up front so every worker cuts the same cube.
    if prep.voxel_size is not None:
      shape = prune.default_cube_shape(prep.voxel_size)
    else:
      shape = prune.default_cube_shape(_first_voxel_size(subjects, prep.sequences[0], skip_bad))
      if prep.align is not None:  # aligned scans are cut from the template grid
        shape = prune.default_cube_shape(align.template_resolution(
            _first_voxel_size(subjects, prep.sequences[0], skip_bad)))
    prep = dataclasses.replace(prep, shape=shape)

  n = len(subjects)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
  try:
    if atlas is not None:
      fileio.save_nifti(nib.Nifti1Image(atlas.labels.astype(np.int32), atlas.affine), tmp / ATLAS)
      if atlas.names:
        fileio.write_text(tmp / "atlas.tsv", "index\tname\n" + "".join(
            f"{k}\t{v}\n" for k, v in sorted(atlas.names.items())))
    with fileio.atomic_path(tmp / VOLUMES, suffix=".npy") as volumes_tmp:
      volumes = np.lib.format.open_memmap(
          volumes_tmp, mode="w+", dtype=prep.dtype, shape=(n, *prep.shape, len(prep.sequences)))
      del volumes  # Workers open it themselves; the header and size are on disk.
      results, failures = _run_workers(
          subjects, str(volumes_tmp), prep, str(tmp / ATLAS) if atlas is not None else None,
          workers, skip_bad, progress)

      if prep.voxel_size is None and results:
        common = _common_voxel_size(results)
        for i in sorted(results):
          size = tuple(round(v, 3) for v in results[i]["voxel_size"])
          if not np.allclose(size, common, rtol=1e-3, atol=1e-3):
            msg = (f"{subjects[i].images[prep.sequences[0]]}: {subjects[i].subject_id}: voxel "
                   f"size {'x'.join(f'{v:g}' for v in size)} mm differs from the dataset's "
                   f"{'x'.join(f'{v:g}' for v in common)} mm; resample with --voxel-size MM")
            if not skip_bad:
              raise DataError(msg)
            failures[i] = msg
            del results[i]
      if failures and not skip_bad:
        raise DataError(failures[min(failures)])
      if not results:
        raise DataError(f"{dataset.root or 'dataset'}: no subject could be prepared "
                        f"({failures[min(failures)]})")
      keep = sorted(results)
      if len(keep) < n:
        _compact(volumes_tmp, keep)
      checksums = _read_back(volumes_tmp, [results[i]["checksum"] for i in keep],
                             [subjects[i].subject_id for i in keep])

    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"nibabel": nib.__version__, "numpy": np.__version__},
        "source": str(Path(dataset.root).resolve()) if dataset.root else "",
        "shape": list(prep.shape),
        "sequences": list(prep.sequences),
        "channels": len(prep.sequences),
        "dtype": np.dtype(prep.dtype).name,
        "scaling": prep.scaling,
        "voxel_size": [float(prep.voxel_size)] * 3 if prep.voxel_size is not None else (
            list(_common_voxel_size(results))),
        "preprocessing": prep.to_dict(),
        "regions": None if prep.regions is None else {
            "labels": list(prep.regions), "atlas": ATLAS, "source": atlas.path,
            "names": [atlas.names.get(r, "") for r in prep.regions]},
        "subjects": [_record(subjects[i], dataset.root, results[i]) for i in keep],
        "checksums": {"algorithm": CHECKSUM, "rows": checksums},
        "skipped": [{"subject_id": sid, "reason": why} for sid, why in dataset.skipped] + [
            {"subject_id": subjects[i].subject_id, "reason": failures[i]}
            for i in sorted(failures)],
    }
    fileio.write_json(tmp / INDEX, index)
    _write_conformity(tmp, index)
    _publish_permissions(tmp)
    _install(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return Cache.open(out, verify=False)  # Its rows were just read back and checked.


def _write_conformity(directory: Path, index: dict[str, Any]) -> None:
  """The conformity gate's reference, calibrated on the cache's own subjects, and their QC table
  (`conformity.QC_TSV`), into the cache being built."""
  volumes = np.load(directory / VOLUMES, mmap_mode="r")
  records = index["subjects"]
  reference, assessments = conformity.calibrated_reference(
      volumes, index["scaling"], float(np.max(index["voxel_size"])), [r["qc"] for r in records])
  del volumes
  conformity.save_reference(reference, directory)
  fileio.write_text(directory / conformity.QC_TSV, conformity.qc_tsv(
      [r["subject_id"] for r in records], [r.get("session") for r in records], assessments))


def _run_workers(subjects, volumes_path, prep, atlas_path, workers, skip_bad, progress):
  from tqdm import tqdm

  results: dict[int, dict[str, Any]] = {}
  failures: dict[int, str] = {}
  items = list(enumerate(subjects))
  init_args = (volumes_path, prep.to_dict(), atlas_path)
  pool = None
  if workers > 1 and len(items) > 1:
    # fork starts workers in milliseconds but copies a process with threads (e.g. an initialised
    # JAX backend) in a broken state; then spawn fresh interpreters instead (seconds each).
    method = "fork" if threading.active_count() == 1 and os.name == "posix" else "spawn"
    pool = multiprocessing.get_context(method).Pool(
        min(workers, len(items)), initializer=_init_worker, initargs=init_args)
  bar = tqdm(total=len(items), desc="prepare", unit="subject", disable=not progress,
             file=sys.stderr)

  def collect(outcome) -> bool:
    i, result, error = outcome
    bar.update(1)
    if error is not None:
      failures[i] = error
      if skip_bad:
        bar.write(f"skipped {error}")
      return skip_bad  # Strict mode stops at the first failure.
    results[i] = result
    return True

  try:
    if pool is None:
      _init_worker(*init_args)
      try:
        for item in items:
          if not collect(prepare_row(item)):
            break
      finally:
        _WORKER.clear()
    else:
      with pool:  # Leaving the block terminates the workers, also on errors and Ctrl-C.
        for outcome in pool.imap_unordered(prepare_row, items):
          if not collect(outcome):
            break
  finally:
    bar.close()
  return results, failures


def _read_back(volumes_path: Path, written: list[int], subject_ids: list[str]) -> list[int]:
  """Checksums of the rows on disk, checked against those of the cubes the workers wrote."""
  volumes = np.load(volumes_path, mmap_mode="r")
  checksums = [row_checksum(volumes[j]) for j in range(len(volumes))]
  del volumes
  for j, (got, want) in enumerate(zip(checksums, written)):
    if got != want:
      raise DataError(f"{volumes_path}: row {j} ({subject_ids[j]}) reads back different from "
                      "what was written (disk or file-system error)")
  return checksums


def _compact(volumes_path: Path, keep: list[int]) -> None:
  """Rewrites volumes.npy with only the rows in `keep` (after skipped subjects)."""
  source = np.load(volumes_path, mmap_mode="r")
  with fileio.atomic_path(volumes_path, suffix=".npy") as tmp:
    target = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=source.dtype, shape=(len(keep), *source.shape[1:]))
    for j, i in enumerate(keep):
      target[j] = source[i]
    target.flush()
    del target
  del source
