"""lrp as a library of its own: the jax-lrp distribution (packaging/jax-lrp) builds from the
repository's lrp/, installs alone into a fresh virtual environment (jax, numpy, pytest: nothing
of jax_brainage, flax or torch) and its own tests pass there; the wheel holds lrp/ only and its
version is lrp.__version__."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import lrp

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "packaging" / "jax-lrp"


def _backend():
  spec = importlib.util.spec_from_file_location("_lrp_build", DIST / "lrp_build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_wheel_holds_lrp_alone_with_its_metadata(tmp_path):
  backend = _backend()
  name = backend.build_wheel(str(tmp_path))
  project = tomllib.loads((DIST / "pyproject.toml").read_text())["project"]
  assert project["version"] == lrp.__version__
  assert name == f"jax_lrp-{lrp.__version__}-py3-none-any.whl"
  with zipfile.ZipFile(tmp_path / name) as wheel:
    names = wheel.namelist()
    meta = wheel.read(f"jax_lrp-{lrp.__version__}.dist-info/METADATA").decode()
  assert {n.split("/")[0] for n in names} == {"lrp", f"jax_lrp-{lrp.__version__}.dist-info"}
  assert "lrp/tests/test_transformer_rules.py" in names and "lrp/README.md" in names
  assert not any("__pycache__" in n for n in names)
  requires = [l for l in meta.splitlines() if l.startswith("Requires-Dist:") and "extra" not in l]
  assert sorted(requires) == ["Requires-Dist: jax>=0.10.2", "Requires-Dist: numpy>=2.0"]
  sdist = backend.build_sdist(str(tmp_path))
  assert sdist == f"jax_lrp-{lrp.__version__}.tar.gz"


@pytest.mark.slow
def test_fresh_venv_installs_jax_lrp_alone_and_its_tests_pass(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = venv / "bin" / "python"
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  install = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{DIST}[test]"],
                           capture_output=True, text=True, env=env, timeout=1200)
  if install.returncode != 0 and "No matching distribution" in install.stderr + install.stdout:
    pytest.skip(f"no package index reachable: {install.stderr[-300:]}")
  assert install.returncode == 0, install.stderr[-2000:]
  work = tmp_path / "elsewhere"
  work.mkdir()
  where = subprocess.run([str(py), "-c", "import lrp, sys; print(lrp.__file__); "
                          "print('jax_brainage' in sys.modules)"],
                         capture_output=True, text=True, env=env, cwd=work, check=True)
  assert str(venv) in where.stdout.splitlines()[0]  # the installed copy, not the repository's
  run = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs",
                        "lrp.tests"], capture_output=True, text=True, env=env, cwd=work,
                       timeout=1200)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
  assert " passed" in run.stdout
