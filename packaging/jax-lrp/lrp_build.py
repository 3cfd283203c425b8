"""A PEP 517 build backend for the jax-lrp distribution (standard library only).

The package lives at ../../lrp (repository layout) or ./lrp (inside an sdist made by this
backend). The wheel holds lrp/ (its tests included: `python -m pytest --pyargs lrp.tests`) and
the metadata of pyproject.toml's [project] table; version and dependencies are read from there.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis"}


def _project():
  return tomllib.loads((HERE / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _package_dir() -> Path:
  for cand in (HERE / "lrp", HERE.parent.parent / "lrp"):
    if (cand / "__init__.py").is_file():
      return cand
  raise FileNotFoundError("lrp/ not found next to pyproject.toml nor at ../../lrp")


def _readme() -> Path:
  return _package_dir() / "README.md"


def _files():
  """(archive name, path) of every file of the package, sorted (reproducible archives)."""
  root = _package_dir()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for f in sorted(filenames):
      if f.endswith((".pyc", ".pyo")):
        continue
      p = Path(dirpath) / f
      out.append(("lrp/" + p.relative_to(root).as_posix(), p))
  return out


def _metadata() -> str:
  proj = _project()
  lines = ["Metadata-Version: 2.1", f"Name: {proj['name']}", f"Version: {proj['version']}",
           f"Summary: {proj['description']}", f"Requires-Python: {proj['requires-python']}",
           f"License: {proj['license']['text']}"]
  lines += [f"Requires-Dist: {d}" for d in proj.get("dependencies", [])]
  for extra, deps in proj.get("optional-dependencies", {}).items():
    lines.append(f"Provides-Extra: {extra}")
    lines += [f'Requires-Dist: {d}; extra == "{extra}"' for d in deps]
  lines.append("Description-Content-Type: text/markdown")
  readme = _readme().read_text(encoding="utf-8") if _readme().is_file() else ""
  return "\n".join(lines) + "\n\n" + readme


def _dist_name():
  proj = _project()
  return proj["name"].replace("-", "_"), proj["version"]


def _record_line(name, data: bytes):
  digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
  return f"{name},sha256={digest},{len(data)}"


def _zip_write(zf, name, data: bytes):
  info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
  info.external_attr = 0o644 << 16
  info.compress_type = zipfile.ZIP_DEFLATED
  zf.writestr(info, data)


# --- PEP 517 hooks ---------------------------------------------------------------------------

def get_requires_for_build_wheel(config_settings=None):
  return []


def get_requires_for_build_sdist(config_settings=None):
  return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
  name, version = _dist_name()
  wheel_name = f"{name}-{version}-py3-none-any.whl"
  dist_info = f"{name}-{version}.dist-info"
  records = []
  with zipfile.ZipFile(Path(wheel_directory) / wheel_name, "w") as zf:
    for arc, path in _files():
      data = path.read_bytes()
      _zip_write(zf, arc, data)
      records.append(_record_line(arc, data))
    meta = {
        "METADATA": _metadata().encode(),
        "WHEEL": b"Wheel-Version: 1.0\nGenerator: lrp_build\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n",
        "top_level.txt": b"lrp\n",
    }
    for fname, data in meta.items():
      _zip_write(zf, f"{dist_info}/{fname}", data)
      records.append(_record_line(f"{dist_info}/{fname}", data))
    records.append(f"{dist_info}/RECORD,,")
    _zip_write(zf, f"{dist_info}/RECORD", ("\n".join(records) + "\n").encode())
  return wheel_name


def build_sdist(sdist_directory, config_settings=None):
  name, version = _dist_name()
  base = f"{name}-{version}"
  target = Path(sdist_directory) / f"{base}.tar.gz"
  pyproject = (HERE / "pyproject.toml").read_text(encoding="utf-8").replace(
      '"../../lrp/README.md"', '"lrp/README.md"')
  entries = [("pyproject.toml", pyproject.encode()),
             ("lrp_build.py", Path(__file__).read_bytes()),
             ("PKG-INFO", _metadata().encode())]
  entries += [(arc, p.read_bytes()) for arc, p in _files()]
  with tarfile.open(target, "w:gz", format=tarfile.PAX_FORMAT) as tf:
    for arc, data in entries:
      info = tarfile.TarInfo(f"{base}/{arc}")
      info.size = len(data)
      info.mtime = 1577836800
      info.mode = 0o644
      tf.addfile(info, io.BytesIO(data))
  return target.name
