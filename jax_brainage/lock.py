"""One writer per directory: the advisory lock every writing command takes on its output.

`brainage train` (on its workdir), `brainage explain` and `brainage evaluate-explanations` (on
--out) and the demo (on its workdir) run inside `hold(directory, command)`. A second writer of
the same directory is refused at once with a one-line `ConfigError` naming the directory and the
holder (pid, host, command, start time), instead of both crashing minutes later and leaving a
workdir that no longer resumes.

The lock is the file DIR/.brainage.lock:
- `fcntl.flock` (exclusive, non-blocking) on it where the platform and file system offer it:
  the kernel drops the lock when the holder exits in any way (kill -9 included), so a crashed
  run never blocks the next one;
- its content, a JSON record (pid, host, command, argv, started: Unix seconds), says who holds
  it. On release (exit, exception, Ctrl-C) the holder removes the file while it still holds the
  flock (and the directory, if it made it and nothing else is in it); a taker checks after its
  flock that the name still is the file it locked, else it tries again, so two processes never
  hold two files of the same name.
A record left by a killed holder is stale and taken over with a warning on stderr. Where flock
is missing or refused (some network file systems), the record alone decides: a record of this
host whose pid is not alive is stale; a live pid, or another host's record (whose pid cannot be
checked from here), refuses; remove the file by hand once that process is gone.

Right after taking the lock, `hold` removes the temporaries an interrupted run left under the
directory (`fileio.clean_stale_temps`: our temporary names only, older than this holder, not
inside a sub-directory with a lock record of its own).

Nested `hold`s of the same directory in the same thread (the demo holds its workdir, then
trains in it) are one lock: the inner one takes nothing and releases nothing. Another thread or
process is a second writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from jax_brainage import fileio
from jax_brainage.errors import ConfigError

try:
  import fcntl
except ImportError:  # Windows: the record alone decides.
  fcntl = None

LOCK_FILE = ".brainage.lock"

# (lock file's real path, thread id) -> [depth, Holder]: the locks this process holds.
_held: dict[tuple[str, int], list[Any]] = {}
_held_guard = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a directory's lock.

  Attributes:
    pid: process id on `host`; host: `socket.gethostname()` of the holder.
    command: what it runs (e.g. "brainage train"); argv: its command line (shortened).
    started: when it took the lock (Unix seconds).
  """

  pid: int
  host: str
  command: str
  started: float
  argv: str = ""

  def describe(self) -> str:
    """'pid 123 on host h (brainage train, since 2026-11-24 09:57:01)': one line."""
    when = datetime.datetime.fromtimestamp(self.started).isoformat(sep=" ", timespec="seconds")
    return f"pid {self.pid} on host {self.host} ({self.command}, since {when})"

  def to_json(self) -> str:
    return json.dumps(fileio.jsonable(dataclasses.asdict(self))) + "\n"

  @classmethod
  def parse(cls, text: str) -> Holder | None:
    """The record in a lock file's text; None when it is empty or unreadable (a holder killed
    while writing it)."""
    try:
      d = json.loads(text)
      return cls(int(d["pid"]), str(d["host"]), _one_line(str(d["command"])),
                 float(d["started"]), _one_line(str(d.get("argv", ""))))
    except (ValueError, TypeError, KeyError):
      return None


def _one_line(text: str, limit: int = 300) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def read_holder(directory: str | os.PathLike) -> Holder | None:
  """The record of DIR/.brainage.lock (None: no lock file, or an empty one: free)."""
  try:
    return Holder.parse((Path(directory) / LOCK_FILE).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError):
    return None


def pid_alive(pid: int) -> bool:
  """Whether a process `pid` exists on this host (a zombie counts as alive)."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  except OSError:
    return False
  return True


def _refusal(directory: Path, holder: Holder | None, why: str = "") -> ConfigError:
  who = holder.describe() if holder is not None else "another process (its record is not "\
                                                     "written yet)"
  return ConfigError(f"{directory} is in use by {who}{why}; wait for it to finish, or use "
                     "another directory")


def _read_fd(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  chunks = []
  while chunk := os.read(fd, 65536):
    chunks.append(chunk)
  return b"".join(chunks).decode("utf-8", errors="replace")


def _write_fd(fd: int, text: str) -> None:
  # The record is rewritten in place, not through fileio.atomic_path: a rename would put a new
  # file (inode) under the name while the flock stays on the old one.
  os.ftruncate(fd, 0)
  if text:
    os.pwrite(fd, text.encode("utf-8"), 0)
  os.fsync(fd)


def _try_flock(fd: int) -> bool | None:
  """True: locked; False: another holder has it; None: no flock here (or the file system
  refuses it)."""
  if fcntl is None:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  except OSError:  # ENOLCK, EOPNOTSUPP, ...: a file system without flock
    return None
  return True


def _warn(text: str) -> None:
  print(f"brainage: warning: {text}", file=sys.stderr, flush=True)


def _acquire(directory: Path, command: str) -> tuple[int, Holder, bool]:
  """Takes DIR's lock: (open fd, our record, flocked?); ConfigError when it is held."""
  path = directory / LOCK_FILE
  host = socket.gethostname()
  for _ in range(20):
    try:
      directory.mkdir(parents=True, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
      continue  # a releasing holder removed the directory it had made: make it again
    except OSError as e:
      raise ConfigError(f"{directory}: cannot create its lock file {LOCK_FILE} "
                        f"({e.strerror or type(e).__name__}); is it a writable directory?"
                        ) from None
    try:
      locked = _try_flock(fd)
      if locked and not _same_file(path, fd):
        os.close(fd)  # a releasing holder removed it meanwhile: lock the one there now
        continue
      previous = Holder.parse(_read_fd(fd))
      if locked is False:
        # A live process holds the flock, unless it is a killed holder's orphaned child that
        # inherited the descriptor: the recorded pid then is gone, the record is ours to take.
        if previous is None or previous.host != host or pid_alive(previous.pid):
          raise _refusal(directory, previous)
        _warn(f"{path}: its holder {previous.describe()} is not running (a child process of "
              "it still has the file open); taking the lock over without flock")
      elif previous is not None:
        if locked is None and previous.host != host:
          raise _refusal(directory, previous, f" (cannot check a process on another host; "
                         f"remove {path} if it is gone)")
        if locked is None and (pid_alive(previous.pid) if previous.pid != os.getpid()
                               else _held_here(path)):
          raise _refusal(directory, previous)
        _warn(f"{path}: took over the stale lock of {previous.describe()}, which is no "
              "longer running")
      me = Holder(os.getpid(), host, _one_line(command), time.time(), _one_line(" ".join(
          sys.argv)))
      _write_fd(fd, me.to_json())
      if not locked:
        # Without flock two takers may race: the last record written wins, the other yields.
        time.sleep(0.05)
        if Holder.parse(_read_fd(fd)) != me:
          raise _refusal(directory, Holder.parse(_read_fd(fd)))
      return fd, me, bool(locked)
    except BaseException:
      os.close(fd)
      raise
  raise ConfigError(f"{path}: the lock file keeps being removed; is another program removing "
                    "it?")


def _same_file(path: Path, fd: int) -> bool:
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def _held_here(path: Path) -> bool:
  """Whether a thread of this process holds the lock file `path` (without flock, a record of
  our own pid is either that, or a stale record of an earlier process that had our pid)."""
  real = os.path.realpath(path)
  with _held_guard:
    return any(p == real for p, _ in _held)


def _release(directory: Path, fd: int, me: Holder, locked: bool, made: bool) -> None:
  """Removes the lock file (while still holding the flock: see the module docstring), and the
  directory when this holder made it and it stayed empty."""
  try:
    # Without flock a taker may have replaced a record it thought stale: leave theirs.
    if locked or Holder.parse(_read_fd(fd)) == me:
      _write_fd(fd, "")
      if _same_file(directory / LOCK_FILE, fd):
        os.unlink(directory / LOCK_FILE)
  except OSError:
    pass  # the directory went away: nothing left to release but the descriptor
  finally:
    if locked and fcntl is not None:
      with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
  if made:
    with contextlib.suppress(OSError):  # not empty (the usual case), or gone
      directory.rmdir()


def _has_record(folder: Path) -> bool:
  """A sub-directory another writer locks (held now, or left by a killed one): not ours to
  clean; its own next writer cleans it."""
  return read_holder(folder) is not None


@contextlib.contextmanager
def hold(directory: str | os.PathLike, command: str, *, active: bool = True,
         clean: bool = True) -> Iterator[Holder | None]:
  """Holds DIR's lock for the `with` block; removes an interrupted run's temporaries first.

  Args:
    directory: the directory written (created if missing; removed again on release if it is
      still empty then, e.g. after an error before anything was written).
    command: what this process runs, for the refusal another writer gets (e.g.
      "brainage train").
    active: False takes nothing (the processes other than 0 of a multi-host run, whose process
      0 holds the lock for all).
    clean: remove the stale temporaries (`fileio.clean_stale_temps`) after locking.
  Yields:
    the holder record (this process's; the outer one for a nested hold), None when inactive.
  Raises:
    ConfigError: one line naming the directory and the holder, when another writer has it.
  """
  if not active:
    yield None
    return
  directory = Path(directory)
  key = (os.path.realpath(directory / LOCK_FILE), threading.get_ident())
  with _held_guard:
    nested = _held.get(key)
    if nested is not None:
      nested[0] += 1
  if nested is not None:
    try:
      yield nested[1]
    finally:
      with _held_guard:
        nested[0] -= 1
    return
  made = not os.path.exists(directory)
  fd, me, locked = _acquire(directory, command)
  with _held_guard:
    _held[key] = [1, me]
  try:
    if clean:
      removed = fileio.clean_stale_temps(directory, older_than=me.started, skip=_has_record)
      if removed:
        _warn(f"removed {len(removed)} temporary file(s) an interrupted run left in "
              f"{directory} (e.g. {removed[0].relative_to(directory)})")
    yield me
  finally:
    with _held_guard:
      _held.pop(key, None)
    _release(directory, fd, me, locked, made)
