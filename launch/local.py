#!/usr/bin/env python3
"""Start N JAX processes on this machine, K CPU devices each: the multi-host path on one box.

    python launch/local.py --processes 2 --cpu-devices 2 -- \
        brainage train --config configs/tiny.py --workdir runs/tiny-2x2

Every process runs the same command with BRAINAGE_COORDINATOR=127.0.0.1:<free port>,
BRAINAGE_NUM_PROCESSES, BRAINAGE_PROCESS_ID and BRAINAGE_CPU_DEVICES set (and JAX_PLATFORMS=cpu),
so `jax_brainage.distributed.initialize()` joins them into one run with N*K devices, gloo
collectives over loopback. Nothing listens or connects on any address but 127.0.0.1.

A leading `brainage` is run as `python -m jax_brainage ...` (initialise, then the
`brainage` command). Output lines are prefixed with [p<i>] (or written to --log-dir/p<i>.log).
If one process fails, or --timeout passes, or you press Ctrl-C, all processes (and their
children) are stopped; the exit status is the first failure's (124 on timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Mapping, Sequence

LOOPBACK = "127.0.0.1"
TIMEOUT_STATUS = 124


def free_port() -> int:
  """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind((LOOPBACK, 0))
    return int(s.getsockname()[1])


def process_command(command: Sequence[str]) -> list[str]:
  """The command each process runs: `brainage ...` -> `python -m jax_brainage ...` (the same
  command through this Python, which initialises from the environment before it touches JAX)."""
  command = list(command)
  if not command:
    raise ValueError("no command to launch (give it after --)")
  if command[0] == "brainage":
    return [sys.executable, "-m", "jax_brainage", *command[1:]]
  return command


@dataclasses.dataclass
class LaunchResult:
  """returncodes: per process (None: killed before it finished); port: the coordinator's;
  timed_out: --timeout passed; status: 0, the first failure's code, or 124 on timeout."""

  returncodes: list[int | None]
  port: int
  timed_out: bool
  status: int


def _pump(stream: IO[bytes], prefix: str, sink: IO[str], lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b""):
    line = raw.decode("utf-8", "replace").rstrip("\n")
    with lock:
      sink.write(f"{prefix}{line}\n")
      sink.flush()
  stream.close()


def _group_alive(pgid: int) -> bool:
  try:
    os.killpg(pgid, 0)
    return True
  except (ProcessLookupError, PermissionError):
    return False


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = 5.0) -> None:
  """SIGTERM every process group (a process and the children it started, also when the process
  itself has already exited), then SIGKILL what is left after `grace_s`."""
  groups = [p.pid for p in procs]  # start_new_session: process id == its group id
  for sig in (signal.SIGTERM, signal.SIGKILL):
    for pgid in groups:
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
      for p in procs:
        p.poll()  # reap exited leaders, so that only live members keep a group alive
      if not any(_group_alive(g) for g in groups):
        break
      time.sleep(0.05)
    else:
      continue
    break
  for p in procs:
    with contextlib.suppress(subprocess.TimeoutExpired):
      p.wait(timeout=1.0)


def launch(command: Sequence[str], processes: int, cpu_devices: int = 1, *,
           port: int | None = None, timeout_s: float | None = None,
           env: Mapping[str, str] | None = None, log_dir: str | os.PathLike | None = None,
           cwd: str | os.PathLike | None = None, sink: IO[str] | None = None) -> LaunchResult:
  """Runs `command` as `processes` JAX processes on 127.0.0.1 and waits for all of them.

  Args:
    command: argv of one process (a leading "brainage" becomes `python -m jax_brainage`).
    processes: number of processes N; cpu_devices: CPU devices K of each (N*K in all).
    port: coordinator port on 127.0.0.1 (default: a free one).
    timeout_s: stop everything after this many seconds (status 124).
    env: extra environment variables for every process.
    log_dir: write process i's output to log_dir/p<i>.log instead of `sink`.
    sink: where prefixed output lines go (default sys.stdout).
  Returns:
    a LaunchResult; every process has ended when it returns (also on errors and Ctrl-C).
  """
  if processes < 1 or cpu_devices < 1:
    raise ValueError(f"processes={processes} and cpu_devices={cpu_devices} must be >= 1")
  argv = process_command(command)
  port = free_port() if port is None else int(port)
  sink = sink or sys.stdout
  lock = threading.Lock()
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  logs: list[IO[bytes]] = []
  timed_out = False
  try:
    for i in range(processes):
      penv = dict(os.environ)
      penv.update(env or {})
      penv.update({
          "BRAINAGE_COORDINATOR": f"{LOOPBACK}:{port}",
          "BRAINAGE_NUM_PROCESSES": str(processes),
          "BRAINAGE_PROCESS_ID": str(i),
          "BRAINAGE_CPU_DEVICES": str(cpu_devices),
          "BRAINAGE_DISTRIBUTED": "on",
          "JAX_PLATFORMS": "cpu",
          "PYTHONUNBUFFERED": "1",
      })
      # Not a member of any cluster the launcher itself may run in.
      for key in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri"):
        penv.pop(key, None)
      if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        out: IO[bytes] | int = open(Path(log_dir) / f"p{i}.log", "wb")
        logs.append(out)  # type: ignore[arg-type]
      else:
        out = subprocess.PIPE
      p = subprocess.Popen(argv, env=penv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT, start_new_session=True)
      procs.append(p)
      if log_dir is None:
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", sink, lock), daemon=True)
        t.start()
        pumps.append(t)

    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    while True:
      codes = [p.poll() for p in procs]
      if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.05)
  finally:
    # Reached on success, on a failed process, on timeout and on KeyboardInterrupt alike.
    _stop(procs)
    for t in pumps:
      t.join(timeout=5.0)
    for f in logs:
      f.close()
  codes = [p.returncode for p in procs]
  failed = [c for c in codes if c not in (None, 0)]
  if timed_out:
    status = TIMEOUT_STATUS
  elif failed:
    # The first process to fail: the others were stopped (negative signal codes) after it.
    positive = [c for c in failed if c > 0]
    status = positive[0] if positive else 1
  else:
    status = 0
  return LaunchResult(codes, port, timed_out, status)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description="Run a brainage command as N JAX processes on 127.0.0.1 (K CPU devices each).",
      usage="%(prog)s [-n N] [-k K] [--port P] [--timeout S] [--log-dir D] -- COMMAND ...")
  parser.add_argument("-n", "--processes", type=int, default=2)
  parser.add_argument("-k", "--cpu-devices", type=int, default=2)
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before stopping all")
  parser.add_argument("--log-dir", type=Path, default=None, help="per-process log files")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --, e.g. -- brainage train --config ... --workdir ...")
  try:
    result = launch(command, args.processes, args.cpu_devices, port=args.port,
                    timeout_s=args.timeout, log_dir=args.log_dir)
  except KeyboardInterrupt:
    print("launch/local.py: interrupted; all processes stopped", file=sys.stderr)
    return 130
  if result.timed_out:
    print(f"launch/local.py: timed out after {args.timeout} s; all processes stopped",
          file=sys.stderr)
  elif result.status:
    print(f"launch/local.py: a process failed (exit codes {result.returncodes})", file=sys.stderr)
  return result.status


if __name__ == "__main__":
  sys.exit(main())
