"""Writes that never leave a half-written file behind.

Every file the project produces goes through `atomic_path`: the content is written to a
temporary name in the same directory and renamed into place only once complete, so an
interrupted run leaves the previous file (or nothing), never a truncated one. A run killed in
the middle of a write (kill -9, power loss) leaves its temporary behind; `clean_stale_temps`
removes exactly those names (`TEMP_NAMES`) and is called by every writer right after it takes
its directory's lock (`jax_brainage.lock.hold`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

# The temporary names of `atomic_path` and `save_nifti` (what `clean_stale_temps` removes):
#   .<name>.<8 random chars><suffix>.tmp   atomic_path (mkstemp); <suffix> is "" or a tail of
#                                          <name>, e.g. ".scan.nii.gz.k3x9_a0q.nii.gz.tmp"
#   .<name>.<8 random chars><ext>          save_nifti's file for nibabel (<ext> .nii or .nii.gz,
#                                          the tail of <name>), e.g. ".scan.nii.gz.k3x9_a0q.nii.gz"
TEMP_NAMES = (".<name>.XXXXXXXX[<suffix>].tmp", ".<name>.XXXXXXXX.nii[.gz]")
_RANDOM = re.compile(r"[a-z0-9_]{8}")  # tempfile's alphabet


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it onto `path` on success.

  `suffix` keeps an extension that a writer needs to pick its format (e.g. ".nii.gz").
  On an exception the temporary file is removed and `path` is untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # The name is one of TEMP_NAMES: change both together (clean_stale_temps relies on it).
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
  os.close(fd)
  tmp = Path(tmp)
  # mkstemp creates 0600; results are meant to be shared like any file the user writes.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
  """Atomically writes `text` (UTF-8) to `path`."""
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def jsonable(x: Any) -> Any:
  """A JSON-safe copy of `x`: mappings with str keys, tuples as lists, numpy scalars and arrays
  as Python numbers and lists, non-finite floats as None (JSON has no NaN or Infinity), paths
  as str. The one sanitiser for every JSON record the project writes."""
  if isinstance(x, dict) or (hasattr(x, "items") and hasattr(x, "keys")):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, "tolist") and hasattr(x, "dtype"):  # numpy arrays and scalars
    return jsonable(x.tolist())
  if isinstance(x, bool) or x is None or isinstance(x, str):
    return x
  if isinstance(x, int):
    return int(x)
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomically writes `obj` as indented JSON to `path` (pass it through `jsonable` first when
  it may hold numpy values or non-finite floats)."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_nifti(img, path: str | os.PathLike) -> None:
  """Atomically saves a nibabel image; the extension of `path` picks .nii or .nii.gz."""
  import nibabel as nib

  name = str(path)
  suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
  with atomic_path(path, suffix=suffix) as tmp:
    # mkstemp's name ends in ".tmp"; nibabel picks the format from the extension, so
    # write to a name that ends with the real suffix, then move it over the temp name.
    real = tmp.with_name(tmp.name[: -len(".tmp")])
    nib.save(img, real)
    os.replace(real, tmp)


def is_temp_name(name: str) -> bool:
  """Whether a file name is one of our temporaries (`TEMP_NAMES`), exactly: a leading dot, the
  target's name, a dot, 8 characters of tempfile's alphabet, and either the target's own
  suffix + ".tmp" or (save_nifti) the target's .nii/.nii.gz extension. A user's file such as
  "scan.nii.gz.tmp" or ".notes.tmp" is not one."""
  if not name.startswith(".") or len(name) < 12:
    return False
  if name.endswith(".tmp"):
    body, ext = name[1:-len(".tmp")], None
  elif name.endswith((".nii", ".nii.gz")):
    ext = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    body = name[1:-len(ext)]
  else:
    return False
  for i, char in enumerate(body):
    if char != "." or i == 0:
      continue
    target, rest = body[:i], body[i + 1:]
    random, suffix = rest[:8], rest[8:]
    if not _RANDOM.fullmatch(random):
      continue
    if ext is None and (suffix == "" or (suffix.startswith(".") and target.endswith(suffix)
                                         and len(target) > len(suffix))):
      return True
    if ext is not None and suffix == "" and target.endswith(ext) and len(target) > len(ext):
      return True
  return False


def clean_stale_temps(directory: str | os.PathLike, older_than: float | None = None,
                      skip: Callable[[Path], bool] | None = None) -> list[Path]:
  """Removes the temporaries an interrupted run left under `directory` (recursively).

  Only regular files whose names are ours (`is_temp_name`) are removed; symbolic links are not
  followed, directories and every other file are left alone. Call it while holding the
  directory's lock (`jax_brainage.lock.hold` does), so that no live writer of this directory
  can own them.

  Args:
    older_than: only files last modified before this time (Unix seconds; the lock holder's
      start) are removed: a temporary a live writer of the same process is filling is newer.
    skip: sub-directories for which it returns True are not entered (another writer's own
      locked directory, e.g. W/explain while W is cleaned).
  Returns:
    the removed paths.
  """
  root = Path(directory)
  removed: list[Path] = []
  if not root.is_dir():
    return removed
  for folder, dirs, files in os.walk(root):
    here = Path(folder)
    if skip is not None:
      dirs[:] = [d for d in dirs if not skip(here / d)]
    for name in files:
      if not is_temp_name(name):
        continue
      path = here / name
      try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
          continue
        if older_than is not None and info.st_mtime >= older_than:
          continue
        path.unlink()
      except OSError:  # gone meanwhile, or not ours to remove (permissions): left as it is
        continue
      removed.append(path)
  return removed
