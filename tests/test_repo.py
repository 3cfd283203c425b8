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


# ---------------------------------------------------------------------------------------------
# The house: one-way dependencies, public names only, modules of one idea.

PACKAGES = ("jax_brainage", "lrp")
MAX_MODULE_LINES = 650  # "a module past ~600 lines is a sign to split it"


def _modules() -> dict[str, Path]:
  """Dotted module name -> file, for every module of the project's packages."""
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _resolve(module: str, level: int, name: str | None, here: str, is_package: bool) -> str:
  if level == 0:
    return module or ""
  base = here.split(".") if is_package else here.split(".")[:-1]
  base = base[:len(base) - (level - 1)]
  return ".".join(base + ([module] if module else []))


def _imports(modules: dict[str, Path]):
  """Per module: [(imported module, names taken from it, at module level?)] and the local
  aliases bound to project modules."""
  import ast

  graph: dict[str, list[tuple[str, list[str], bool]]] = {}
  aliases: dict[str, dict[str, str]] = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    edges, bound = [], {}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.name.split(".")[0] in PACKAGES:
            edges.append((a.name, [], id(node) in top))
            bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
      elif isinstance(node, ast.ImportFrom):
        target = _resolve(node.module or "", node.level, None, name, path.name == "__init__.py")
        if target.split(".")[0] not in PACKAGES:
          continue
        for a in node.names:
          sub = f"{target}.{a.name}"
          if sub in modules:  # `from pkg import module`
            edges.append((sub, [], id(node) in top))
            bound[a.asname or a.name] = sub
          else:
            edges.append((target, [a.name], id(node) in top))
    graph[name], aliases[name] = edges, bound
  return graph, aliases


def _owner(target: str, modules: dict[str, Path]) -> str:
  while target and target not in modules:
    target = target.rpartition(".")[0]
  return target


def test_no_import_circles_between_the_projects_modules():
  modules = _modules()
  graph, _ = _imports(modules)
  # Importing a package runs its __init__; edges to a package face count as edges to it.
  edges = {m: {_owner(t, modules) for t, _, _ in graph[m]} - {m, ""} for m in modules}
  # Each package's __init__ may re-export its own submodules; that is not a circle.
  edges = {m: {t for t in ts if not (m == t.rpartition(".")[0] or t == m.rpartition(".")[0]
                                     and modules[t].name == "__init__.py"
                                     and m.startswith(t + "."))}
           for m, ts in edges.items()}
  index, low, stack, on, circles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  for v in modules:
    if v not in index:
      visit(v)
  assert not circles, f"import circles: {circles}"


def test_no_module_takes_another_modules_private_names():
  import ast

  modules = _modules()
  graph, aliases = _imports(modules)
  offences = []
  for name, edges in graph.items():
    for target, names, _ in edges:
      offences += [f"{name}: from {target} import {n}" for n in names
                   if n.startswith("_") and not n.startswith("__")
                   and _owner(target, modules) != name]
    tree = ast.parse(modules[name].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases[name] and node.attr.startswith("_")
          and not node.attr.startswith("__") and aliases[name][node.value.id] != name):
        offences.append(f"{name}: {node.value.id}.{node.attr}")
  assert not offences, "private names used across modules:\n" + "\n".join(sorted(set(offences)))


def test_tests_use_public_names_only():
  import ast

  modules = set(_modules())
  offences = []
  for path in sorted((ROOT / "tests").rglob("*.py")):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
          and node.module.split(".")[0] in PACKAGES:
        for a in node.names:
          if f"{node.module}.{a.name}" in modules:
            bound[a.asname or a.name] = True
          elif a.name.startswith("_") and not a.name.startswith("__"):
            offences.append(f"{path.relative_to(ROOT)}: from {node.module} import {a.name}")
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name.split(".")[0] in PACKAGES and a.asname:
            bound[a.asname] = True
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in bound and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        offences.append(f"{path.relative_to(ROOT)}: {node.value.id}.{node.attr}")
  assert not offences, "tests use private names:\n" + "\n".join(sorted(set(offences)))


def test_library_modules_import_the_project_at_the_top():
  """Function-local imports hide the module graph; only optional third-party libraries (torch,
  LXT, orbax in a hot path...) may be imported inside functions."""
  modules = _modules()
  graph, _ = _imports(modules)
  local = sorted(f"{m}: {t}" for m, edges in graph.items() for t, _, top in edges if not top)
  assert not local, "function-local imports of the project's modules:\n" + "\n".join(local)


def test_modules_hold_one_idea():
  long = {str(p.relative_to(ROOT)): n for p in _modules().values()
          if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
  assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_library_modules_do_not_parse_command_lines():
  """argparse lives in jax_brainage/commands (and the cli); the library is used from Python."""
  offenders = [str(p.relative_to(ROOT)) for name, p in _modules().items()
               if not name.startswith(("jax_brainage.commands", "jax_brainage.cli"))
               and re.search(r"^\s*import argparse|^\s*from argparse", p.read_text(), re.M)]
  assert not offenders, f"argparse outside the command layer: {offenders}"
