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


# --- The command line's manners (jax_brainage.commands.parsing), for every registered command.

def _subcommands():
  """{name: parser} of every registered sub-command (future ones included)."""
  import argparse

  parser = cli.build_parser()
  action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  return parser, dict(action.choices)


def _option_blocks(help_text: str) -> dict[str, str]:
  """{first option string: its help block} from `--help` output (argparse's layout: an option
  line starts with two spaces and a dash; its help continues on deeper-indented lines)."""
  blocks: dict[str, str] = {}
  current = None
  for line in help_text.splitlines():
    if line.startswith("  -"):
      current = line.split()[0].rstrip(",")
      blocks[current] = line
    elif current and line.startswith("   "):
      blocks[current] += " " + line.strip()
    else:
      current = None
  return blocks


def test_every_subcommand_has_a_description_and_shows_its_defaults():
  import argparse

  from jax_brainage.commands import parsing

  _, subcommands = _subcommands()
  assert len(subcommands) >= 10
  for name, sub in subcommands.items():
    assert isinstance(sub, parsing.SubcommandParser), name
    help_text = sub.format_help()
    description = (sub.description or "").strip()
    assert len(description) > 20, f"{name}: no description"
    assert not description.startswith(("brainage", "usage")), f"{name} repeats its usage"
    blocks = _option_blocks(help_text)
    for action in sub._actions:
      if not action.option_strings or action.help == argparse.SUPPRESS:
        continue
      block = blocks[action.option_strings[0]]
      if parsing.shows_default(action):
        assert "default" in block.lower(), f"{name} {action.option_strings[0]}: no default"
      assert len(block.split()) > 1 or parsing.shows_default(action), \
          f"{name} {action.option_strings[0]}: no help"


def test_abbreviated_options_are_refused_everywhere(capsys):
  _, subcommands = _subcommands()
  for name, sub in subcommands.items():
    for action in sub._actions:
      long = [s for s in action.option_strings if s.startswith("--") and len(s) > 4]
      if not long or action.help == "==SUPPRESS==":
        continue
      option = long[0]
      with pytest.raises(SystemExit) as e:
        cli.main([name, option[:-1], "x"] if not any(
            s.startswith(option[:-1]) and s != option for s in sub.option_names()) else
            [name, option[:-1] + "zz", "x"])
      assert e.value.code == 2
      err = capsys.readouterr().err
      assert f"usage: brainage {name}" in err, err  # the sub-command's usage, not the top's
      assert "unrecognized arguments" in err
      break


def test_a_typo_gets_a_suggestion(capsys):
  with pytest.raises(SystemExit):
    cli.main(["explain", "--workdir", "w", "--dat", "d", "--out", "o"])
  err = capsys.readouterr().err
  assert "usage: brainage explain" in err and "did you mean --data?" in err
  # a required option only misspelt: the typo is named, not "required: --data"
  assert "required" not in err
  with pytest.raises(SystemExit):
    cli.main(["evaluate-explanations", "--workdir", "w", "--data", "d", "--out", "o",
              "--n-subject", "3"])
  assert "did you mean --n-subjects?" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["trian", "--config", "c"])
  err = capsys.readouterr().err
  assert "invalid choice" in err and "did you mean train?" in err
  with pytest.raises(SystemExit):
    cli.main(["explain", "--workdir", "w", "--data", "d", "--out", "o", "--composite=lrp_z",
              "--figures", "2", "--checkpoint", "bets"])
  assert "did you mean best?" in capsys.readouterr().err


def test_config_overrides_still_pass_and_old_spelling_warns(capsys):
  parser = cli.build_parser()
  args = parser.parse_args(["train", "--config", "c.py", "--workdir", "w",
                            "--config.batch_size", "4", "--config.seed=3"])
  assert args.overrides == ["--config.batch_size", "4", "--config.seed=3"]
  args = parser.parse_args(["evaluate-explanations", "--workdir", "w", "--data", "d", "--out",
                            "o", "--subjects", "5"])
  assert args.n_subjects == 5
  assert "--subjects is deprecated; use --n-subjects" in capsys.readouterr().err
  assert parser.parse_args(["evaluate-explanations", "--workdir", "w", "--data", "d", "--out",
                            "o"]).n_subjects == 8
