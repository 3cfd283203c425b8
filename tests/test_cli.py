"""The `brainage` entry point: huge pages for XLA:CPU's buffers (re-executes itself once)."""

import os
import platform
import subprocess
import sys

import pytest

from jax_brainage import cli

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


@pytest.mark.parametrize("environ, thp_mode, libc, tunables", [
    ({}, MADVISE, GLIBC, "glibc.malloc.hugetlb=1"),
    # Existing tunables are kept, in order.
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, GLIBC,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE, GLIBC, None),  # the user's choice
    ({"BRAINAGE_HUGEPAGES": "0"}, MADVISE, GLIBC, None),                   # opted out
    ({}, "[always] madvise never", GLIBC, None),                          # huge pages anyway
    ({}, "always madvise [never]", GLIBC, None),                          # none to be had
    ({}, "", GLIBC, None),                                                # no THP file
    ({}, MADVISE, ("glibc", "2.34"), None),                               # tunable unknown
    ({}, MADVISE, ("glibc", "2.35"), "glibc.malloc.hugetlb=1"),
    ({}, MADVISE, ("", ""), None),                                        # musl, macOS
])
def test_huge_page_environment(environ, thp_mode, libc, tunables):
  env = cli.huge_page_environment({"PATH": "/bin", **environ}, thp_mode, libc)
  if tunables is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == tunables
    assert env["PATH"] == "/bin"


def _thp_mode() -> str:
  try:
    with open(cli.THP_MODE_FILE) as f:
      return f.read()
  except OSError:
    return ""


@pytest.mark.skipif(
    cli.huge_page_environment({}, _thp_mode(), platform.libc_ver()) is None,
    reason="needs Linux with glibc >= 2.35 and transparent huge pages in madvise mode")
@pytest.mark.parametrize("opt_out", [False, True])
def test_a_process_re_executes_itself_once_with_the_tunable(opt_out):
  # The snippet runs twice when the process re-executes: the first run stops at the re-exec.
  code = ("import os; from jax_brainage import cli; print('run'); cli._reexec_with_huge_pages(); "
          "print(os.environ.get('GLIBC_TUNABLES', '-'))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BRAINAGE_HUGEPAGES")}
  if opt_out:
    env["BRAINAGE_HUGEPAGES"] = "0"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == (["run", "-"] if opt_out else ["run", "run", "glibc.malloc.hugetlb=1"])
