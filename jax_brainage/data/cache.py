"""`brainage prepare`: one pass over NIfTI files into a compact, memory-mapped cache.

    brainage prepare --data DIR --out CACHE [--sequences T1w,FLAIR] [--shape 98,98,98]
        [--voxel-size MM] [--scaling minmax|zscore] [--regions LABELS --atlas FILE]
        [--workers N] [--skip-bad]

Per subject (`preprocess_subject`, the one place this happens, also used on simulated subjects
in memory and by `brainage predict` on new data): load and check every sequence; bring them onto
the reference (first) sequence's grid, resampled to `--voxel-size` mm if asked; reorient to
RAS+; centre the brain's bounding box (nonzero voxels of the reference, or a brain mask) in the
cube; scale intensities (clip at a brain percentile + min-max to uint8, or z-score -> float16);
optionally zero everything outside atlas regions. Sequences become channels.

The cube shape defaults from the voxel size: 98^3 at 2 mm and 198^3 at 1 mm (the study's), else
the smallest even side that holds 198 mm (`prune.default_cube_shape`). Without `--voxel-size`,
every subject must have the same voxel size (checked), as the cube is counted in voxels.

Cache layout:
  CACHE/volumes.npy   uint8 [n, X, Y, Z, C] (float16 for zscore), `np.load(mmap_mode="r")`.
  CACHE/index.json    format and version, shape, sequences, scaling, voxel size, source, the
                      preprocessing settings, and per subject: subject_id, age, sex, covariates,
                      the `CubeInverse` that maps cube arrays back onto the subject's grid.
  CACHE/atlas.nii.gz  the region atlas, when `--regions` was used (so predict can re-apply it).

The cache is built in a hidden temporary directory beside CACHE and renamed into place when
complete: an interrupted or failed prepare leaves no half cache and an existing good cache intact.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from jax_brainage import fileio
from jax_brainage.data import bids, intensity, nifti, prune, regions
from jax_brainage.errors import BrainAgeError, ConfigError, DataError

FORMAT = "jax-brainage-cache"
FORMAT_VERSION = 1
VOLUMES = "volumes.npy"
INDEX = "index.json"
ATLAS = "atlas.nii.gz"


# ---------------------------------------------------------------------------------------------
# Preprocessing settings and the per-subject function.


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How images become cubes; stored in the cache so new data is prepared identically.

  Attributes:
    sequences: sequence names, in channel order; the first is the reference (grid, brain).
    shape: cube shape `[3]` (voxels); None = `prune.default_cube_shape` of the voxel size.
    voxel_size: resample to this isotropic voxel size (mm); None = keep each image's grid.
    scaling: "minmax" (uint8) or "zscore" (float16).
    ceiling_percentile: brain percentile used as the minmax ceiling.
    regions: atlas labels to keep (None = whole brain).
    bias_sigma_mm: > 0: homomorphic bias-field correction of every sequence with a Gaussian
      field of this width (mm) before scaling (`intensity.correct_bias`); 0 = none.
  """

  sequences: tuple[str, ...] = ("T1w",)
  shape: tuple[int, int, int] | None = None
  voxel_size: float | None = None
  scaling: str = "minmax"
  ceiling_percentile: float = intensity.DEFAULT_CEILING_PERCENTILE
  regions: tuple[int, ...] | None = None
  bias_sigma_mm: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "sequences", bids.parse_sequences(self.sequences))
    if self.scaling not in intensity.SCALINGS:
      raise ConfigError(
          f"unknown scaling {self.scaling!r}; choose {' or '.join(intensity.SCALINGS)}")
    if self.shape is not None:
      shape = tuple(int(s) for s in self.shape)
      if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"cube shape must be 3 positive sizes, got {self.shape}")
      object.__setattr__(self, "shape", shape)
    if self.voxel_size is not None and not 0 < float(self.voxel_size) < 100:
      raise ConfigError(f"voxel size must be a positive number of mm, got {self.voxel_size}")
    if not 0 < float(self.ceiling_percentile) <= 100:
      raise ConfigError(f"ceiling percentile must be in (0, 100], got {self.ceiling_percentile}")
    if self.regions is not None:
      object.__setattr__(self, "regions", tuple(int(r) for r in self.regions))
    if not 0 <= float(self.bias_sigma_mm) < 1000:
      raise ConfigError(f"bias_sigma_mm must be 0 (no correction) or a width in mm, got "
                        f"{self.bias_sigma_mm}")
    object.__setattr__(self, "bias_sigma_mm", float(self.bias_sigma_mm))

  @property
  def dtype(self) -> np.dtype:
    return intensity.storage_dtype(self.scaling)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields})


def _as_image(image, subject: str | None, *, require_brain: bool = True) -> nib.Nifti1Image:
  """A checked in-memory image from a path or a nibabel image."""
  if isinstance(image, (str, os.PathLike)):
    return nifti.load_image(image, subject, require_brain=require_brain)
  data = nifti.check_volume(
      np.asanyarray(image.dataobj), getattr(image, "get_filename", lambda: None)(), subject,
      require_brain=require_brain)
  return nifti.make_image(data, image.affine)


def preprocess_subject(
    images: Mapping[str, Any],
    prep: Preprocessing,
    *,
    subject: str | None = None,
    mask=None,
    atlas: regions.Atlas | None = None,
) -> tuple[np.ndarray, prune.CubeInverse]:
  """One subject's images -> the cube the network sees, plus its exact inverse.

  Args:
    images: sequence name -> image path or nibabel image, for every `prep.sequences` entry.
    prep: the preprocessing settings.
    subject: subject id, to name the culprit in errors.
    mask: brain mask (path or image, any grid); default: nonzero voxels of the reference.
    atlas: the region atlas, required when `prep.regions` is set.

  Returns:
    (cube `[X, Y, Z, C]` uint8 (minmax) or float16 (zscore), `CubeInverse` of the reference).

  Raises:
    DataError: one line naming subject and file (missing/corrupt file, 4D, NaN/Inf, empty brain,
      nothing left inside the regions).
  """
  missing = [s for s in prep.sequences if s not in images]
  if missing:
    raise DataError(f"{subject or 'subject'}: no {missing[0]} image given")
  loaded = [_as_image(images[s], subject) for s in prep.sequences]
  names = [nifti.describe(images[s] if isinstance(images[s], (str, os.PathLike)) else None,
                          subject) + f" ({s})" for s in prep.sequences]
  ref = loaded[0]
  ref_affine = np.asarray(ref.affine, np.float64)

  # Target grid: the reference's own, or its isotropic resampling.
  resampled = nifti.needs_resampling(ref_affine, prep.voxel_size)
  if resampled:
    grid_shape, grid_affine = nifti.isotropic_grid(ref.shape, ref_affine, prep.voxel_size)
  else:
    grid_shape, grid_affine = tuple(ref.shape[:3]), ref_affine

  def on_grid(img: nib.Nifti1Image, order: int) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    if nifti.same_grid(img.shape, img.affine, grid_shape, grid_affine):
      return data
    return nifti.resample(data, img.affine, grid_shape, grid_affine, order=order)

  ornt = nifti.canonical_orientation(grid_affine)
  canonical_affine = nifti.reorient_affine(grid_affine, grid_shape, ornt)
  volumes = [nifti.reorient_array(on_grid(img, 1), ornt) for img in loaded]
  canonical_shape = volumes[0].shape

  if mask is not None:
    mask_img = _as_image(mask, subject)
    brain = nifti.reorient_array(on_grid(mask_img, 0) != 0, ornt)
    where_mask = nifti.describe(mask if isinstance(mask, (str, os.PathLike)) else None, subject)
  else:
    brain = volumes[0] != 0
    where_mask = names[0]
  try:
    box = prune.brain_box(brain)
  except ValueError:
    raise DataError(f"{where_mask}: empty brain (no nonzero voxel on the "
                    f"{'resampled ' if resampled else ''}grid)") from None

  cube_shape = prep.shape or prune.default_cube_shape(
      prep.voxel_size or float(np.max(nifti.voxel_size(grid_affine))))
  inverse = prune.make_inverse(ref, canonical_shape, canonical_affine, ornt, resampled, box,
                               cube_shape)
  # Scale on the cube: its statistics are those of what the network sees, at a fraction of the
  # cost of the whole field of view.
  brain_cube = prune.crop_or_pad(brain, inverse.offset, cube_shape)
  cubes = [prune.crop_or_pad(v, inverse.offset, cube_shape) for v in volumes]
  if prep.bias_sigma_mm > 0:
    spacing = nifti.voxel_size(canonical_affine)
    cubes = [intensity.correct_bias(c, brain_cube, prep.bias_sigma_mm, spacing, where=n)
             for c, n in zip(cubes, names)]
  cube = intensity.scale_channels(
      cubes, brain_cube,
      scaling=prep.scaling, ceiling_percentile=prep.ceiling_percentile, names=names)

  if prep.regions is not None:
    if atlas is None:
      raise ConfigError("region masking needs an atlas (--atlas FILE)")
    keep = regions.region_mask(atlas, prep.regions, cube_shape, inverse.cube_affine)
    if not np.any(keep & brain_cube):
      raise DataError(f"{names[0]}: no brain voxel inside atlas regions "
                      f"{','.join(map(str, prep.regions))}")
    cube = regions.apply_mask(cube, keep)
  return cube, inverse


# ---------------------------------------------------------------------------------------------
# The cache.


class Cache:
  """A prepared cache, opened read-only.

  Attributes:
    path: the cache directory.
    index: the parsed index.json.
    volumes: memory-mapped `[n, X, Y, Z, C]` uint8 (float16 for zscore).
    ages: float32 `[n]` chronological ages in years (NaN where unknown).
    subject_ids: list of n ids.
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
    self.subject_ids = [r["subject_id"] for r in self.records]
    self.ages = np.array([np.nan if r["age"] is None else r["age"] for r in self.records],
                         dtype=np.float32)
    self.sequences = tuple(index["sequences"])
    self.shape = tuple(index["shape"])
    self.scaling = index["scaling"]
    self.preprocessing = Preprocessing.from_dict(index["preprocessing"])

  @classmethod
  def open(cls, path: str | os.PathLike) -> "Cache":
    """Opens CACHE; DataError (one line) for a missing, corrupt, incomplete or old cache."""
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
    if version != FORMAT_VERSION:
      raise DataError(f"{index_path}: cache format version {version}, this code reads "
                      f"{FORMAT_VERSION}; re-run `brainage prepare`")
    try:
      n = len(index["subjects"])
      expected = (n, *index["shape"], len(index["sequences"]))
      dtype = np.dtype(index["dtype"])
      Preprocessing.from_dict(index["preprocessing"])
      for r in index["subjects"]:
        r["subject_id"], r["age"], r["inverse"]
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
  def atlas(self) -> regions.Atlas | None:
    """The region atlas the cache was masked with, or None."""
    path = self.path / ATLAS
    return regions.load_atlas(path) if path.exists() else None

  def preprocess(
      self, images: Mapping[str, Any], *, subject: str | None = None, mask=None
  ) -> tuple[np.ndarray, prune.CubeInverse]:
    """New data (e.g. for `brainage predict`) prepared exactly as this cache's subjects.

    Args:
      images: sequence name -> image path or nibabel image, for each of `self.sequences`.
      subject: subject id for error messages.
      mask: optional brain mask (path or image).

    Returns:
      (cube `[X, Y, Z, C]` in the cache's dtype, `CubeInverse`).

    Raises:
      DataError: as `preprocess_subject`, or when the images' voxel size differs from the
        cache's (a cube counted in voxels would then cover a different field of view).
    """
    cube, inverse = preprocess_subject(images, self.preprocessing, subject=subject, mask=mask,
                                       atlas=self.atlas)
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


# ---------------------------------------------------------------------------------------------
# prepare.

_WORKER: dict[str, Any] = {}


def _init_worker(volumes_path: str, prep: dict[str, Any], atlas_path: str | None) -> None:
  _WORKER["volumes"] = np.load(volumes_path, mmap_mode="r+")
  _WORKER["prep"] = Preprocessing.from_dict(prep)
  _WORKER["atlas"] = regions.load_atlas(atlas_path) if atlas_path else None


def _work(item: tuple[int, bids.Subject]) -> tuple[int, dict[str, Any] | None, str | None]:
  """Preprocesses row i into the shared memmap; returns (i, record, None) or (i, None, error)."""
  i, subject = item
  try:
    cube, inverse = preprocess_subject(
        subject.images, _WORKER["prep"], subject=subject.subject_id, mask=subject.mask,
        atlas=_WORKER["atlas"])
  except DataError as e:
    return i, None, str(e)
  _WORKER["volumes"][i] = cube
  return i, {"inverse": inverse.to_dict(), "voxel_size": list(inverse.voxel_size),
             "brain_fits": inverse.brain_fits}, None


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
  """Largest voxel edge (mm) of the first readable reference image (header only)."""
  for subject in subjects:
    path = subject.images[sequence]
    try:
      return float(max(nifti.voxel_size(nib.load(path).affine)))
    except Exception as e:  # The full load in the worker reports it properly (or skips it).
      if not skip_bad:
        nifti.load_image(path, subject.subject_id)
        raise DataError(f"{path}: {subject.subject_id}: unreadable image header "
                        f"({type(e).__name__})") from None
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
        "skipped": [{"subject_id": sid, "reason": why} for sid, why in dataset.skipped] + [
            {"subject_id": subjects[i].subject_id, "reason": failures[i]}
            for i in sorted(failures)],
    }
    fileio.write_json(tmp / INDEX, index)
    _publish_permissions(tmp)
    _install(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return Cache.open(out)


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
          if not collect(_work(item)):
            break
      finally:
        _WORKER.clear()
    else:
      with pool:  # Leaving the block terminates the workers, also on errors and Ctrl-C.
        for outcome in pool.imap_unordered(_work, items):
          if not collect(outcome):
            break
  finally:
    bar.close()
  return results, failures


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


# ---------------------------------------------------------------------------------------------
# Command line.


def _shape_arg(text: str) -> tuple[int, int, int]:
  try:
    sizes = tuple(int(s) for s in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected N or X,Y,Z voxels, got {text!r}") from None
  if len(sizes) == 1:
    sizes = sizes * 3
  if len(sizes) != 3 or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f"expected N or X,Y,Z positive voxels, got {text!r}")
  return sizes


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage prepare`."""
  p = subparsers.add_parser(
      "prepare", help="preprocess a BIDS dataset into a memory-mapped cube cache",
      description=__doc__.split("\n\n")[0] + " Cube shape default: 98^3 at 2 mm, 198^3 at 1 mm, "
      "else the smallest even side holding 198 mm.")
  p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                 help="BIDS dataset directory (participants.tsv + sub-*/anat/), or image files "
                      "(one subject each, no age)")
  p.add_argument("--out", required=True, metavar="CACHE", help="cache directory to write")
  p.add_argument("--sequences", default="T1w", help="comma-separated, channel order (T1w)")
  p.add_argument("--shape", type=_shape_arg, default=None,
                 help="cube shape N or X,Y,Z (default from the voxel size)")
  p.add_argument("--voxel-size", type=float, default=None, metavar="MM",
                 help="resample to isotropic MM voxels (default: keep; all must agree)")
  p.add_argument("--scaling", choices=intensity.SCALINGS, default="minmax",
                 help="minmax: clip + min-max to uint8; zscore: within the brain, float16")
  p.add_argument("--ceiling-percentile", type=float, default=intensity.DEFAULT_CEILING_PERCENTILE,
                 metavar="P", help="brain percentile used as the minmax ceiling (99.5)")
  p.add_argument("--bias-sigma", type=float, default=0.0, metavar="MM",
                 help="homomorphic bias-field correction with a Gaussian field of MM mm "
                      "(e.g. 20) before scaling; 0: none (default)")
  p.add_argument("--regions", default=None, metavar="LABELS",
                 help="keep only these atlas regions: labels or names, comma-separated")
  p.add_argument("--atlas", default=None, metavar="FILE", help="label image for --regions")
  p.add_argument("--mask-suffix", default=None, metavar="SUFFIX",
                 help="per-subject brain mask image suffix, e.g. 'mask' (default: nonzero "
                      "voxels of the first sequence)")
  p.add_argument("--session", default=None, help="use images of ses-SESSION only")
  p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                 help="parallel processes (default: CPU count, at most 8)")
  p.add_argument("--skip-bad", action="store_true",
                 help="report and skip subjects with bad data instead of stopping")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  sequences = bids.parse_sequences(args.sequences)
  if (args.regions is None) != (args.atlas is None):
    raise ConfigError("--regions and --atlas go together")
  if len(args.data) == 1 and bids.split_image_name(Path(args.data[0]).name) is None:
    dataset = bids.read_bids(args.data[0], sequences, session=args.session,
                             mask_suffix=args.mask_suffix, skip_bad=args.skip_bad)
  else:
    if len(sequences) != 1:
      raise ConfigError("a list of image files gives one sequence; pass one --sequences name")
    dataset = bids.read_image_list(args.data, sequences[0], skip_bad=args.skip_bad)
  atlas = labels = None
  if args.atlas is not None:
    atlas = regions.load_atlas(args.atlas)
    labels = regions.parse_labels(args.regions, atlas)
  prep = Preprocessing(sequences=sequences, shape=args.shape, voxel_size=args.voxel_size,
                       scaling=args.scaling, ceiling_percentile=args.ceiling_percentile,
                       regions=labels, bias_sigma_mm=args.bias_sigma)
  for sid, why in dataset.skipped:
    print(f"skipped {why}", file=sys.stderr)
  cache = prepare(dataset, args.out, prep, atlas=atlas, workers=args.workers,
                  skip_bad=args.skip_bad, progress=not args.quiet)
  skipped = len(cache.index["skipped"])
  print(f"prepared {len(cache)} subjects -> {cache.path} "
        f"({cache.volumes.dtype} {tuple(cache.volumes.shape)}, "
        f"{cache.volumes.nbytes / 2**20:.1f} MiB)" + (f", skipped {skipped}" if skipped else ""))
  not_fitting = [r["subject_id"] for r in cache.records if not r["brain_fits"]]
  if not_fitting:
    print(f"warning: the brain is cropped by the {'x'.join(map(str, cache.shape))} cube for "
          f"{len(not_fitting)} subjects (e.g. {not_fitting[0]}); consider a larger --shape",
          file=sys.stderr)
  return 0
