"""`brainage calibrate`: calibrated prediction intervals for a trained workdir.

    brainage calibrate --workdir W [--data DIR] [--checkpoint best|latest] [--batch-size N]
        [--workers N] [--session S] [--normalize|--no-normalize] [--method smooth|mondrian]
        [--tta N [--tta-degrees D] [--tta-voxels V]]

Predicts held-out labelled scans (W's validation split by default, read from the dataset its
training cache was prepared from; or a labelled BIDS dataset `--data`, e.g. for an imported
model) and stores their residuals in W/calibration.json (atomically). `brainage predict` then
adds split-conformal intervals for the brain age and the corrected gap (`jax_brainage.ensemble.
conformal`; `--method`: scores scaled by smooth functions of age, one quantile (default), or
Mondrian age bins). `--tta`: predict the calibration scans with test-time augmentation, as
`brainage predict --tta` will (recorded in the calibration). Prints the residual range at the
default level per calibration age bin.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jax_brainage import calibration
from jax_brainage.commands.predict import add_pose_average_options, pose_average
from jax_brainage.ensemble import conformal
from jax_brainage.errors import ConfigError
from jax_brainage.train import artifact


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage calibrate`."""
  p = subparsers.add_parser(
      "calibrate", help="calibrate prediction intervals on held-out labelled scans",
      description="`brainage calibrate`: calibrated prediction intervals for a trained workdir.")
  p.add_argument("--workdir", required=True, type=Path, help="training workdir (brainage train)")
  p.add_argument("--data", nargs="+", default=None, metavar="DIR",
                 help="labelled BIDS dataset to calibrate on (default: W's validation split)")
  p.add_argument("--checkpoint", choices=artifact.CHECKPOINTS, default="best",
                 help="best by validation loss (default) or latest (single-model workdirs)")
  p.add_argument("--session", default=None, help="use images of ses-SESSION only")
  p.add_argument("--batch-size", type=int, default=8, help="volumes per model call (8)")
  p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                 help="threads preprocessing subjects")
  p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                 help="scale residuals by the members' spread (default: for ensembles)")
  p.add_argument("--method", choices=conformal.METHODS, default=conformal.METHOD,
                 help="smooth: residuals centred and scaled by smooth functions of age, one "
                      "conformal quantile; mondrian: one per age bin of >= 50 scans")
  add_pose_average_options(p)
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
  model = artifact.load(args.workdir, args.checkpoint)
  dataset, source = calibration.calibration_dataset(model, args.data, session=args.session)
  cal = calibration.calibrate(model, dataset, source=source, batch_size=args.batch_size,
                              workers=args.workers, normalize=args.normalize,
                              method=args.method, pose_average=pose_average(args))
  path = calibration.save(args.workdir, cal)
  bins = cal.bin_bounds(conformal.LEVEL)["age"]
  widths = ", ".join(f"{b['from']:.0f}-{b['to']:.0f}: {b['high'] - b['low']:.1f}" for b in bins)
  where = "per age bin" if cal.method == "mondrian" else "at the median age of each age bin"
  print(f"calibrated on {cal.n} scans ({source}; {cal.method}"
        f"{', normalised' if cal.normalize else ''}) -> {path}; {conformal.LEVEL:.0%} residual "
        f"range {where} (years{' x scale' if cal.normalize else ''}): {widths}")
  return 0
