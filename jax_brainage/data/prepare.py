"""Writing caches: `prepare` (one pass over NIfTI files into a compact, memory-mapped cache, the
format of `jax_brainage.data.cache`) and `write_record` (a cache of no subjects: only the
preprocessing record). `brainage prepare` (jax_brainage.commands.prepare) runs `prepare`.

Every subject goes through `preprocess.preprocess_subject` (following a `preprocess.Preprocessing`
record) into a cube `[X, Y, Z, C]`, in worker processes that write their rows of a shared
volumes.npy memmap. Without a `voxel_size`, every subject must have the same voxel size
(checked), as the cube is counted in voxels.

The cache is built in a hidden temporary directory beside CACHE and renamed into place when
complete: an interrupted or failed prepare leaves no half cache and an existing good cache intact.

Integrity: each worker takes the CRC-32 of the cube it writes (`cache.row_checksum`); once every
row is on disk, prepare reads the rows back and compares (a write that did not land is an error)
and stores the checksums in index.json, which `cache.Cache.open` verifies.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from jax_brainage import fileio
from jax_brainage.data import align, bids, conformity, nifti, prune, regions
from jax_brainage.data.cache import (ATLAS, CHECKSUM, FORMAT, FORMAT_VERSION, INDEX, VOLUMES,
                                     Cache, row_checksum)
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject
from jax_brainage.errors import ConfigError, DataError

__all__ = ["prepare", "prepare_row", "write_record"]


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
