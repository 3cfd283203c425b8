"""The `brainage` command: one sub-command per pipeline stage (`jax_brainage.commands`).

This file starts the process (huge pages, multi-host options before the sub-command) and turns
a `BrainAgeError` into one line on stderr and exit code 2; each sub-command lives in its own
thin module under jax_brainage/commands/, in pipeline order, so that `brainage --help` reads like
the pipeline: data -> model -> train -> ensemble -> explain -> analyse.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

from jax_brainage import commands, distributed
from jax_brainage.commands import parsing
from jax_brainage.errors import BrainAgeError, SmallSampleWarning

# XLA:CPU writes each step's activations and gradients into freshly allocated buffers; with 4 KiB
# pages the kernel faults every page in again (18 M faults in one epoch of the cpu preset, a
# third of its CPU time). glibc's `hugetlb=1` tunable (glibc >= 2.35) asks for transparent huge
# pages on malloc's memory, ~28x fewer faults: ~1.4x more volumes/s. It is read when the process
# starts, so the command re-executes itself once with it set.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_environment(environ: dict[str, str], thp_mode: str,
                          libc: tuple[str, str]) -> dict[str, str] | None:
  """The environment to re-execute with for huge pages, or None where it would change nothing.

  Args:
    environ: the current environment.
    thp_mode: contents of `THP_MODE_FILE`, e.g. "always [madvise] never" ("" if unreadable).
    libc: `platform.libc_ver()`, e.g. ("glibc", "2.36").
  Returns:
    `environ` with `HUGE_PAGES_TUNABLE` added to `GLIBC_TUNABLES`; None when it is there already,
    `BRAINAGE_HUGEPAGES=0` opts out, the C library is not glibc >= 2.35, or the kernel's mode
    is not `[madvise]` (`[always]` gives huge pages anyway, `[never]` none at all).
  """
  tunables = environ.get("GLIBC_TUNABLES", "")
  if environ.get("BRAINAGE_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables:
    return None
  name, version = libc
  try:
    new_enough = name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    new_enough = False
  if not new_enough or "[madvise]" not in thp_mode:
    return None
  return {**environ,
          "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def _reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with huge pages on (see HUGE_PAGES_TUNABLE)."""
  if not sys.platform.startswith("linux") or not getattr(sys, "orig_argv", None):
    return
  try:
    with open(THP_MODE_FILE) as f:
      thp_mode = f.read()
  except OSError:
    return
  env = huge_page_environment(dict(os.environ), thp_mode, platform.libc_ver())
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def add_multihost_arguments(parser: argparse.ArgumentParser) -> None:
  """The multi-host options (--coordinator, --num-processes, --process-id, --local-device-ids,
  --cpu-devices), given before the sub-command: `brainage --coordinator H:P ... train ...`."""
  group = parser.add_argument_group(
      "multi-host", "join a multi-process run (SLURM, Open MPI and Cloud TPU are detected "
      "automatically; these override the BRAINAGE_* environment variables)")
  group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                     help="address of process 0's coordinator (same on every process)")
  group.add_argument("--num-processes", type=int, metavar="N", default=None)
  group.add_argument("--process-id", type=int, metavar="I", default=None)
  group.add_argument("--local-device-ids", metavar="IDS", default=None,
                     help="accelerators of this process, e.g. 0,1")
  group.add_argument("--cpu-devices", type=int, metavar="K", default=None,
                     help="fake CPU devices of this process (trying the multi-host path on CPU)")


def build_parser() -> argparse.ArgumentParser:
  """The `brainage` parser. Every sub-command's parser is a `parsing.SubcommandParser` (no
  abbreviated options, defaults in --help, "did you mean" on a typo, the sub-command's usage on
  its errors), so a new command gets the same behaviour by being listed in `commands.COMMANDS`."""
  parser = parsing.BrainageParser(
      prog="brainage",
      description="Brain age from structural MRI with ensembles of 3D CNNs, explained with LRP.\n"
                  "Run `brainage COMMAND --help` for what a command does and its options.",
  )
  # Multi-host options go before the sub-command: `brainage --coordinator H:P ... train ...`.
  add_multihost_arguments(parser)
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=parsing.SubcommandParser)
  for command in commands.COMMANDS:
    command.add_parser(subparsers)
  return parser


def _warning_printer(command: str, default):
  """showwarning that prints a SmallSampleWarning as one line ("brainage CMD: warning: ...")."""
  def show(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, SmallSampleWarning):
      print(f"brainage {command}: warning: {message}", file=sys.stderr)
    else:
      default(message, category, filename, lineno, file, line)
  return show


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # a process of its own (the console script, `python -m jax_brainage`)
    _reexec_with_huge_pages()
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    # Join a multi-process run when options, BRAINAGE_* variables or a SLURM / Open MPI /
    # Cloud TPU environment say so; a plain local run initialises nothing. Every process logs
    # where it stands.
    settings = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                      args.local_device_ids, args.cpu_devices)
  except BrainAgeError as e:  # the run as a whole, not the sub-command, could not start
    print(f"brainage: error: {e}", file=sys.stderr)
    return 2
  if settings is not None:
    print(f"brainage: {distributed.describe()}", file=sys.stderr, flush=True)
  try:
    with warnings.catch_warnings():  # restores showwarning afterwards
      warnings.simplefilter("always", SmallSampleWarning)
      warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
      return int(args.func(args) or 0)
  except BrainAgeError as e:
    # One line naming the culprit; the traceback helps nobody who gave a wrong path.
    print(f"brainage {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"brainage {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
