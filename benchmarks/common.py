"""What every benchmark records and how it times: environment (device, date, versions), the
median of synchronised steps, and the JSON written with --out.

Imported by the scripts in benchmarks/ (they put the repository root and this folder on
sys.path, so `python benchmarks/<name>.py` works from anywhere).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import jax

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
  """The host CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions(*packages: str) -> dict[str, str]:
  """Installed versions of python, jax, jaxlib, flax, numpy and `packages` ("absent" if not)."""
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", *packages):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = "absent"
  return out


def environment(*packages: str) -> dict[str, Any]:
  """Device, host and versions for a result's JSON (`packages`: extra versions to record)."""
  device = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": device.device_kind, "platform": device.platform,
      "n_devices": jax.device_count(), "host": platform.node(), "cpu": cpu_name(),
      "cpu_count": os.cpu_count(), "versions": versions(*packages),
  }


def torch_device_name(device: str) -> str:
  """The torch device's name ("cpu: <model>" or the CUDA device name)."""
  import torch

  if device == "cuda":
    return torch.cuda.get_device_name(0)
  return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"


def median_seconds(fn: Callable[[], Any], sync: Callable[[Any], Any], *, steps: int,
                   warmup: int) -> tuple[float, list[float]]:
  """Median wall time (s) of `steps` calls of `fn`, each synchronised by `sync(result)`.

  The first `warmup` calls (compilation, autotuning, allocator growth) are not timed.
  Returns (median, all timed seconds).
  """
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def write_result(path: str | os.PathLike | None, result: dict[str, Any]) -> None:
  """Writes `result` atomically as JSON when a path was given (--out)."""
  if path:
    from jax_brainage import fileio

    fileio.write_json(path, result)


def parse_shape(text: str) -> tuple[int, int, int]:
  """'98' -> (98, 98, 98); '160x192x160' or '160,192,160' -> (160, 192, 160) voxels."""
  parts = [int(p) for p in text.replace(",", "x").split("x") if p]
  if len(parts) == 1:
    return (parts[0],) * 3
  if len(parts) != 3:
    raise ValueError(f"shape {text!r}: give one side or three (e.g. 98 or 160x192x160)")
  return tuple(parts)  # type: ignore[return-value]
