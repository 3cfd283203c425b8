"""Writes that never leave a half-written file behind.

Every file the project produces goes through `atomic_path`: the content is written to a
temporary name in the same directory and renamed into place only once complete, so an
interrupted run leaves the previous file (or nothing), never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomically writes `obj` as indented JSON to `path`."""
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
