"""Input pipeline throughput (volumes/s) per mode, volume shape and augmentation.

What is measured is what a training step receives: network-ready global batches on the device(s)
(`image` float32 / 255, augmented when asked), from
- host mode: grain over a memory-mapped uint8 cache (page-cache warm) with 0, 1, 2 worker
  processes, moved to the mesh and augmented on device by `DeviceFeed`;
- device mode: the volumes resident on the device(s), order/gather/scale/augment there
  (`DeviceResidentPipeline`), the host only passing step numbers;
plus, for host mode without augmentation, the raw numpy batches grain delivers to the host
("host-numpy": the upper bound of what the host side can feed).

Against what the training step consumes: per shape, the trainer's own jitted update step
(`bench_train.JaxStep`, --train-case, default MRInet, same batch and devices, data on the device)
is timed too, and every pipeline row gets `headroom` = pipeline volumes/s / step volumes/s; the
pipeline is the bottleneck where headroom < 1 (the step and the pipeline share the device and
the host, so in training they overlap but compete: headroom well above 1 is what is needed).

  python benchmarks/bench_pipeline.py                          # 98^3 (2 mm) and 50^3 (4 mm)
  python benchmarks/bench_pipeline.py --shapes 4mm --subjects 32 --steps 5 --out pipe.json
  python benchmarks/bench_pipeline.py --train-case none              # pipeline only

The first `--warmup` batches (compilation, worker start-up) are not timed. Prints a table;
--out writes JSON with the device, date and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from jax_brainage import fileio, sharding  # noqa: E402
from jax_brainage.data import augment as aug  # noqa: E402
from jax_brainage.data import pipeline as pl  # noqa: E402

SHAPES = {"2mm": (98, 98, 98), "4mm": (50, 50, 50)}


def _timed(it, warmup: int, steps: int, batch_size: int) -> float:
  """Volumes/s over `steps` batches after `warmup` batches, waiting for device work to end."""
  for _ in range(warmup):
    jax.block_until_ready(next(it))
  t0 = time.perf_counter()
  last = None
  for _ in range(steps):
    last = next(it)
  jax.block_until_ready(last)
  return steps * batch_size / (time.perf_counter() - t0)


def run_case(source: pl.ArraySource, mode: str, workers: int, augment: bool, args,
             mesh) -> float:
  cfg = aug.AugmentConfig.training_default() if augment else aug.AugmentConfig()
  kw = dict(batch_size=args.batch_size, seed=0)
  if mode == "device":
    it = iter(pl.DeviceResidentPipeline(source.volumes, source.ages, augment=cfg, mesh=mesh, **kw))
  elif mode == "host-numpy":
    it = iter(pl.HostPipeline(source, worker_count=workers, **kw))
  else:
    it = pl.DeviceFeed(iter(pl.HostPipeline(source, worker_count=workers, **kw)), mesh, cfg)
  try:
    return _timed(it, args.warmup, args.steps, args.batch_size)
  finally:
    it.close()


def train_step_rate(args, shape: tuple[int, int, int], mesh) -> float:
  """Volumes/s the trainer's update step consumes at `shape` (median of --steps steps)."""
  import bench_train

  step = bench_train.JaxStep(args.train_case, args.train_dtype, args.batch_size, "full",
                             shape=shape, mesh=mesh)
  median, _ = common.median_seconds(step.run, jax.block_until_ready, steps=args.steps,
                                    warmup=args.warmup)
  return args.batch_size / median


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="2mm,4mm",
                      help="comma-separated: 2mm (98^3), 4mm (50^3) or a side / XxYxZ (voxels)")
  parser.add_argument("--subjects", type=int, default=64, help="cohort size (random uint8 volumes)")
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10, help="timed batches per case")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--workers", default="0,1,2", help="grain worker counts for host mode")
  parser.add_argument("--modes", default="host-numpy,host,device")
  parser.add_argument("--augment", default="off,on", help="off, on or off,on")
  parser.add_argument("--train-case", default="mrinet-98",
                      help="model whose training step is compared (a bench_train case, run at "
                           "each pipeline shape; 'none' to skip)")
  parser.add_argument("--train-dtype", default="float32", help="its compute dtype")
  parser.add_argument("--out", help="write results as JSON here")
  args = parser.parse_args(argv)

  mesh = sharding.make_mesh()
  device = jax.devices()[0]
  rows: list[dict[str, Any]] = []
  print(f"device: {device.device_kind} x {len(jax.devices())} ({device.platform}); "
        f"batch {args.batch_size}, {args.subjects} subjects, {args.steps} timed batches")
  print(f"{'shape':>10} {'mode':>10} {'workers':>7} {'augment':>7} {'volumes/s':>10}"
        f"{'headroom':>11}")
  steps_rows: list[dict[str, Any]] = []
  with tempfile.TemporaryDirectory() as tmp:
    for shape_name in args.shapes.split(","):
      shape = SHAPES.get(shape_name) or common.parse_shape(shape_name)
      shape = tuple(shape) + (args.channels,)
      rng = np.random.default_rng(0)
      path = Path(tmp) / f"volumes_{shape_name}.npy"
      mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                     shape=(args.subjects,) + shape)
      for i in range(args.subjects):  # brain-like sparsity does not matter for reading speed
        mm[i] = rng.integers(0, 256, shape, dtype=np.uint8)
      mm.flush()
      del mm
      source = pl.ArraySource.from_npy(path, rng.uniform(18, 82, args.subjects))
      step_rate = None
      if args.train_case != "none":
        step_rate = train_step_rate(args, shape[:3], mesh)
        steps_rows.append(dict(shape=shape_name, volume=list(shape), case=args.train_case,
                               dtype=args.train_dtype, volumes_per_second=round(step_rate, 2)))
        print(f"{shape_name + str(shape[:3]):>10} {'train step':>10} {'-':>7} {'-':>7} "
              f"{step_rate:>10.1f}   ({args.train_case}, {args.train_dtype}: what is consumed)",
              flush=True)
      for mode in args.modes.split(","):
        for augment in [a == "on" for a in args.augment.split(",")]:
          if mode == "host-numpy" and augment:
            continue  # augmentation runs on device
          worker_counts = [int(w) for w in args.workers.split(",")] if mode != "device" else [0]
          for workers in worker_counts:
            rate = run_case(source, mode, workers, augment, args, mesh)
            headroom = rate / step_rate if step_rate else None
            rows.append(dict(shape=shape_name, volume=list(shape), mode=mode,
                             workers=workers if mode != "device" else None,
                             augment=augment, volumes_per_second=round(rate, 2),
                             headroom=headroom, bottleneck=bool(headroom is not None
                                                                and headroom < 1)))
            note = "" if headroom is None else (
                f"{headroom:>10.1f}x" + ("  BOTTLENECK" if headroom < 1 else ""))
            print(f"{shape_name + str(shape[:3]):>10} {mode:>10} "
                  f"{(workers if mode != 'device' else '-'):>7} {('on' if augment else 'off'):>7} "
                  f"{rate:>10.1f}{note}", flush=True)
  if args.out:
    fileio.write_json(args.out, dict(
        benchmark="bench_pipeline", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        device=device.device_kind, platform=device.platform, n_devices=len(jax.devices()),
        host=platform.node(), cpu_count=os.cpu_count(), python=platform.python_version(),
        jax=jax.__version__, grain=getattr(grain, "__version__", "?"), numpy=np.__version__,
        batch_size=args.batch_size, subjects=args.subjects, steps=args.steps,
        augment_config=aug.AugmentConfig.training_default().to_dict(), results=rows,
        train_step=steps_rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
