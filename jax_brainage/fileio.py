"""Writes that never leave a half-written file behind.

Every file the project produces goes through `atomic_path`: the content is written to a
temporary name in the same directory and renamed into place only once complete, so an
interrupted run leaves the previous file (or nothing), never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
  """Yields a temporary path beside `path`; renames it onto `path` on success.

  `suffix` keeps an extension that a writer needs to pick its format (e.g. ".nii.gz").
  On an exception the temporary file is removed and `path` is untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
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
