"""`brainage batches`: iterate the input pipeline and report batches and volumes/s.

    brainage batches (--cache CACHE | --simulate-n N [--resolution MM] [--seed S]
        [--sequences T1w,FLAIR]) [--split all|train|val|test] [--split-seed S] [--batch-size B]
        [--epochs E] [--shuffle-seed S] [--eval] [--mode host|device|auto] [--workers N]
        [--augment] [--max-batches K] [--quiet]

The batches are `jax_brainage.data.pipeline.make_pipeline`'s, from a prepared cache
(`pipeline.cache_source`) or straight from the simulator (`pipeline.SimulatorSource`, no
files). Prints one line per batch (unless --quiet) and the throughput after the first batch
(which holds start-up and compilation).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import numpy as np

from jax_brainage import sharding as shd
from jax_brainage.data import augment as aug
from jax_brainage.data import splits
from jax_brainage.data.pipeline import (SimulatorSource, Source, cache_source, make_pipeline,
                                        source_dtype)
from jax_brainage.data.simulation.config import CohortConfig
from jax_brainage.errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage batches`."""
  p = subparsers.add_parser(
      "batches", help="iterate the input pipeline and report batches and volumes/s",
      description="Iterate training batches from a prepared cache (or straight from the "
                  "simulator) to check that data flows: prints each batch and the throughput.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--cache", help="prepared cache directory (brainage prepare --out)")
  src.add_argument("--simulate-n", type=int, metavar="N",
                   help="iterate N simulated subjects generated on the fly (no files)")
  p.add_argument("--resolution", type=int, default=4, metavar="MM",
                 help="simulated voxel size in mm (with --simulate-n; default 4)")
  p.add_argument("--seed", type=int, default=0, help="simulated cohort seed (with --simulate-n)")
  p.add_argument("--sequences", default=None,
                 help="simulated sequences, comma-separated (default: all the simulator has)")
  p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                 help="iterate one part of the seeded 80/10/10 split (default all)")
  p.add_argument("--split-seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=8, help="global batch size (default 8)")
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--shuffle-seed", type=int, default=0, help="shuffling/augmentation seed")
  p.add_argument("--eval", action="store_true",
                 help="evaluation order: no shuffle, last batch padded (mask) instead of dropped")
  p.add_argument("--mode", choices=("host", "device", "auto"), default="host")
  p.add_argument("--workers", type=int, default=0, help="grain worker processes (host mode)")
  p.add_argument("--augment", action="store_true",
                 help="augment (shifts, rotations, flips, noise; AugmentConfig.training_default)")
  p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
  p.add_argument("--quiet", action="store_true", help="only the summary line")
  p.set_defaults(func=run)
  return p


def _open_source(args: argparse.Namespace) -> tuple[Source, str]:
  """(the source the options name, what it is in words for the first printed line)."""
  if args.cache:
    return cache_source(args.cache), f"cache {args.cache}"
  if args.simulate_n < 1:
    raise ConfigError(f"--simulate-n {args.simulate_n} must be positive")
  kw: dict[str, Any] = dict(seed=args.seed, n=args.simulate_n, resolution_mm=args.resolution)
  if args.sequences:
    kw["sequences"] = tuple(s.strip() for s in args.sequences.split(",") if s.strip())
  cfg = CohortConfig(**kw)
  return SimulatorSource(cfg), (f"simulator (n={cfg.n}, {cfg.resolution_mm} mm, "
                                f"seed {cfg.seed}, no files)")


def run(args: argparse.Namespace) -> int:
  """Iterates the batches the options describe, printing each and the volumes/s; returns 0."""
  source, what = _open_source(args)
  rows = np.arange(len(source))
  labelled = rows[np.isfinite(source.ages)]
  if args.split != "all":
    part = splits.split_subjects(len(labelled), args.split_seed)[args.split]
    rows = labelled[part]
  else:
    rows = labelled
  if args.mode == "device" and not hasattr(source, "volumes"):
    raise ConfigError("--mode device needs --cache (the simulator source generates volumes on "
                      "the host)")
  mesh = shd.make_mesh()
  augment = aug.AugmentConfig.training_default() if args.augment else aug.AugmentConfig()
  pipe = make_pipeline(source, batch_size=args.batch_size, mode=args.mode, mesh=mesh,
                       augment=augment, seed=args.shuffle_seed, rows=rows,
                       shuffle=not args.eval, drop_remainder=not args.eval,
                       num_epochs=args.epochs, worker_count=args.workers)
  it = iter(pipe)
  shape, dtype = tuple(source.volume_shape), source_dtype(source).name
  print(f"{what}: {len(rows)} subjects ({args.split}), volumes {shape} {dtype}; mode {pipe.mode}, "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s), batch {args.batch_size}, "
        f"{pipe.steps_per_epoch} steps/epoch, augment {'on' if augment.enabled else 'off'}")
  ids = getattr(source, "subject_ids", None)
  n_volumes, t_first, t0 = 0, None, time.perf_counter()
  try:
    for step, batch in enumerate(it):
      if args.max_batches is not None and step >= args.max_batches:
        break
      jax.block_until_ready(batch["image"])
      index = np.asarray(batch["index"])
      mask = np.asarray(batch["mask"])
      age = np.asarray(batch["age"])[mask]
      if t_first is None:
        t_first = time.perf_counter()  # excludes start-up and compilation
      else:
        n_volumes += int(mask.sum())
      if not args.quiet:
        names = [ids[i] if ids is not None else str(i) for i in index[mask][:4]]
        more = " ..." if mask.sum() > 4 else ""
        img = batch["image"]
        print(f"epoch {step // pipe.steps_per_epoch} step {step}: image {img.dtype} "
              f"{tuple(img.shape)} over {img.sharding.spec} | {int(mask.sum())} subjects, ages "
              f"{age.min():.1f}-{age.max():.1f} y | {', '.join(names)}{more}")
  finally:
    it.close()
  elapsed = time.perf_counter() - (t_first or t0)
  rate = n_volumes / elapsed if n_volumes and elapsed > 0 else float("nan")
  print(f"{n_volumes} volumes after the first batch in {elapsed:.2f} s: {rate:.1f} volumes/s "
        f"({pipe.mode} mode)")
  return 0
