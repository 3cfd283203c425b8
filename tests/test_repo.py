"""The repository's promises to a new user: README commands, CI and the `brainage` entry points."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
  return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
  readme_blocks = _bash_blocks((ROOT / "README.md").read_text())
  ci = (ROOT / ".ci" / "run").read_text()
  ci_command = re.search(r"# TEST-COMMAND-BEGIN\n(.*?)\n# TEST-COMMAND-END", ci, flags=re.S)
  assert ci_command is not None, ".ci/run lost its TEST-COMMAND markers"
  assert "pytest" in ci_command.group(1)
  assert ci_command.group(1).strip() in readme_blocks


def test_readme_main_command_uses_existing_subcommands():
  from jax_brainage.cli import build_parser

  main_command = _bash_blocks((ROOT / "README.md").read_text())[0]
  known = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
  used = set(re.findall(r"brainage (\S+)", main_command))
  assert used and used <= known, f"README uses unknown sub-commands {used - known}"


def test_python_dash_m_entry_point_prints_help():
  out = subprocess.run([sys.executable, "-m", "jax_brainage", "--help"], capture_output=True,
                       text=True, cwd=ROOT, check=True)
  assert "simulate" in out.stdout and "prepare" in out.stdout


def test_requirements_match_pyproject_dependencies():
  import tomllib

  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  req = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
         if l.strip() and not l.startswith("#")]
  assert sorted(deps) == sorted(req)
