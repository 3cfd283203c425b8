"""Simulator speed: seconds per subject to render, and to write a whole BIDS cohort.

Two measurements per resolution:
  render   one process, `Cohort.subject(i)` for --render-subjects subjects (images at b, the
           reference images and masks; no files): seconds per subject per core;
  write    `write_cohort` of --n subjects with --workers processes (render + 3 gzipped NIfTI
           + 4 masks per subject, atlas, tables, oracle MAE), wall-clock from call to return,
           start-up of the worker processes included.
Targets (issue 2): 200 subjects at 4 mm in under a minute, 1000 at 2 mm in under 10 minutes
on 2 CPU cores (about 0.6 s per subject per core at 2 mm).

  python benchmarks/bench_simulate.py --resolution 4 --n 200 --workers 2
  python benchmarks/bench_simulate.py --resolution 2 --n 1000 --workers 2 --out sim.json
  python benchmarks/bench_simulate.py --resolution 2 --n 40 --workers 2   # quick extrapolation

Prints a table; --out writes JSON with the device, date and library versions. The simulator is
numpy/scipy only: "device" is the host CPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from jax_brainage import fileio  # noqa: E402
from jax_brainage.data import simulate  # noqa: E402
from jax_brainage.data.anatomy import load_anatomy  # noqa: E402


def bench(resolution: int, n: int, workers: int, render_subjects: int, seed: int) -> dict:
  config = simulate.CohortConfig(seed=seed, n=max(n, render_subjects), resolution_mm=resolution)
  t = time.perf_counter()
  load_anatomy(resolution)
  anatomy_s = time.perf_counter() - t
  cohort = simulate.Cohort(config)
  cohort.subject(0)  # warm caches
  t = time.perf_counter()
  for i in range(render_subjects):
    cohort.subject(i)
  render_s = (time.perf_counter() - t) / max(render_subjects, 1)
  tmp = Path(tempfile.mkdtemp(prefix="bench_simulate_"))
  try:
    t = time.perf_counter()
    simulate.write_cohort(tmp / "cohort", config.replace(n=n), workers=workers)
    write_s = time.perf_counter() - t
    size_mb = sum(p.stat().st_size for p in (tmp / "cohort").rglob("*") if p.is_file()) / 2**20
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {
      "resolution_mm": resolution,
      "n": n,
      "workers": workers,
      "anatomy_load_s": anatomy_s,
      "render_s_per_subject_per_core": render_s,
      "write_total_s": write_s,
      "write_s_per_subject_per_core": write_s * workers / n,
      "dataset_mb": size_mb,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--resolution", type=int, nargs="+", default=[4], help="mm: 1, 2, 3, 4")
  parser.add_argument("--n", type=int, default=40, help="subjects written per resolution")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--render-subjects", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", help="write results as JSON here")
  args = parser.parse_args(argv)
  rows = [bench(r, args.n, args.workers, args.render_subjects, args.seed) for r in args.resolution]
  header = (f"{'mm':>3} {'n':>6} {'workers':>7} {'render s/subj/core':>19} "
            f"{'write total s':>14} {'write s/subj/core':>18} {'MB':>8}")
  print(f"device: {common.cpu_name()} ({os.cpu_count()} cores)")
  print(header)
  for r in rows:
    print(f"{r['resolution_mm']:>3} {r['n']:>6} {r['workers']:>7} "
          f"{r['render_s_per_subject_per_core']:>19.3f} {r['write_total_s']:>14.1f} "
          f"{r['write_s_per_subject_per_core']:>18.3f} {r['dataset_mb']:>8.1f}")
  if args.out:
    fileio.write_json(args.out, {
        "benchmark": "simulate",
        "device": common.cpu_name(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": common.versions("scipy", "nibabel", "nilearn"),
        "results": rows,
    })
  return 0


if __name__ == "__main__":
  sys.exit(main())
