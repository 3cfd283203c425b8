"""Checksums of saved directories (checkpoints, the ensemble store): written at save, checked
at load, so that a truncated or overwritten file is a one-line DataError naming it instead of a
decoder traceback or, worse, parameters restored silently from garbage.

A sealed directory D holds `D/checksums.json` (RECORD): for every other file under D, its path
relative to D, its size in bytes and its BLAKE2b digest (streamed in 1 MiB blocks: verifying
costs one read of the directory, about what a restore reads anyway). The record is written last
and atomically (`fileio.write_json`), inside the directory before it is renamed into place, so a
complete directory either carries its record or was never sealed (written before this module, or
by a process killed between the two writes): `verify` then reports False and the caller decides.

Files added after sealing (orbax writes a commit marker after its rename) are not checked: only
what the record lists is, and every listed file must be present with its size and digest.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from jax_brainage import fileio
from jax_brainage.errors import DataError

RECORD = "checksums.json"
ALGORITHM = "blake2b"
FORMAT_VERSION = 1
_BLOCK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
  """Hex BLAKE2b (32-byte) digest of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.blake2b(digest_size=32)
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(_BLOCK), b""):
      h.update(block)
  return h.hexdigest()


def _files(directory: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
  """Every regular file under `directory` except the record and `exclude` (paths relative to
  `directory`), in a fixed order."""
  out = []
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names):
      path = Path(root) / name
      relative = path.relative_to(directory).as_posix()
      if path.is_file() and not path.is_symlink() and relative not in (RECORD, *exclude):
        out.append(path)
  return out


def seal(directory: str | os.PathLike, exclude: tuple[str, ...] = ()) -> Path:
  """Writes `directory/checksums.json` listing every file under `directory` (size, digest)
  except `exclude` (relative paths of files the writer still updates, e.g. orbax's commit
  timestamps).

  Call it once the directory is complete (and before it is renamed into place, where that is
  how it is published). Returns the record's path.
  """
  directory = Path(directory)
  files = {path.relative_to(directory).as_posix(): {"size": path.stat().st_size,
                                                    "digest": file_digest(path)}
           for path in _files(directory, exclude)}
  record = directory / RECORD
  fileio.write_json(record, {"format_version": FORMAT_VERSION, "algorithm": ALGORITHM,
                             "files": files})
  return record


def has_record(directory: str | os.PathLike) -> bool:
  return (Path(directory) / RECORD).is_file()


def read_record(directory: str | os.PathLike, what: str) -> dict[str, dict[str, Any]] | None:
  """{relative path: {"size", "digest"}} of a sealed directory; None if it has no record.

  Raises DataError naming the record when it is unreadable or of an unknown kind.
  """
  path = Path(directory) / RECORD
  if not path.is_file():
    return None
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
    algorithm, files = record["algorithm"], record["files"]
    if not isinstance(files, dict):
      raise TypeError("files is not a mapping")
    files = {str(k): {"size": int(v["size"]), "digest": str(v["digest"])}
             for k, v in files.items()}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: unreadable checksum record of the {what} "
                    f"({type(e).__name__})") from None
  if algorithm != ALGORITHM:
    raise DataError(f"{path}: checksum algorithm {algorithm!r} of the {what} is not "
                    f"{ALGORITHM!r}")
  return files


def verify(directory: str | os.PathLike, what: str) -> bool:
  """Checks every file listed in `directory`'s record: present, same size, same digest.

  Args:
    directory: a sealed directory (e.g. W/checkpoints/latest/12 or W/ensemble).
    what: what it is, for messages ("latest checkpoint", "ensemble store").
  Returns:
    True when verified; False when the directory has no record (unsealed: nothing to check).
  Raises:
    DataError: one line naming the first missing, truncated (or extended) or altered file, or
      an unreadable record.
  """
  directory = Path(directory)
  files = read_record(directory, what)
  if files is None:
    return False
  for name, expected in files.items():
    path = directory / name
    if not path.is_file():
      raise DataError(f"{path}: missing from the {what} (its checksum record lists it)")
    size = path.stat().st_size
    if size != expected["size"]:
      raise DataError(f"{path}: {'truncated' if size < expected['size'] else 'extended'} "
                      f"file of the {what} ({size} bytes, {expected['size']} when saved)")
    if file_digest(path) != expected["digest"]:
      raise DataError(f"{path}: corrupt file of the {what} (its checksum differs from the one "
                      "recorded when it was saved)")
  return True


def decoding_error(path: str | os.PathLike, what: str, error: BaseException) -> DataError:
  """The one-line DataError for a file the decoder (orbax, tensorstore, json) could not read:
  `path: unreadable WHAT (ExceptionType: first words of its message)`."""
  text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
  reason = f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__
  return DataError(f"{path}: unreadable {what} ({reason})")


def collect_quietly() -> None:
  """Collects the reads a failed restore left behind, without their noise.

  orbax reads arrays in concurrent coroutines; when one fails, the others' exceptions are only
  reported when they are garbage collected ("Exception ignored in ..." with a page of
  TensorStore spec) after the one-line error. Call this once the failing restore's exception is
  no longer referenced.
  """
  hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook
