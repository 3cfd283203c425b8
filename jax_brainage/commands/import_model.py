"""`brainage import`: a published pretrained model (or an exported folder, or several imported
workdirs as one ensemble) as a workdir that predict and explain take as a trained one.

    brainage import --format mrinet-keras --weights t1_model.h5 --workdir W [--sequence T1w]
    brainage import --format sfcn-torch --weights run_20190719_00_epoch_best_mae.p --workdir W
    brainage import --format pyment-keras --weights sfcn-reg.h5 --workdir W [--age-range 3,95]
    brainage import --format jax-brainage --weights EXPORTED_DIR --workdir W
    brainage import --format ensemble --members W1,W2,W3 --calibration-data BIDS --workdir W

Formats and what each model was trained with: `jax_brainage.pretrained.sources`; the workdir
layout: `jax_brainage.pretrained.workdir`. A bad weights file is one line naming the file and the
first layer that does not fit; nothing is written then.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from jax_brainage.data import bids
from jax_brainage.errors import BrainAgeError, ConfigError
from jax_brainage.pretrained import sources
from jax_brainage.pretrained import workdir as pretrained
from jax_brainage.train import artifact

FORMATS = (*sources.SOURCES, "jax-brainage", "ensemble")


def _numbers(text: str | None, n: int, what: str, kind=float):
  if text is None:
    return None
  try:
    values = [kind(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) != n:
    raise ConfigError(f"{what} {text!r}: give {n} comma-separated numbers")
  return values


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage import`."""
  p = subparsers.add_parser(
      "import", help="a pretrained model (MRInet .h5, SFCN .p, pyment .h5, an export folder) "
                     "or an ensemble of imported ones as a workdir",
      description="`brainage import`: a pretrained model as a workdir for predict and explain.")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--weights", type=Path, default=None,
                 help="the weights file as published, or an export folder (jax-brainage)")
  p.add_argument("--workdir", required=True, type=Path, help="new workdir to write")
  p.add_argument("--sequence", default="T1w",
                 help="the model's input sequence (T1w; FLAIR or SWI for those MRInets)")
  p.add_argument("--image-shape", default=None, metavar="X,Y,Z",
                 help="input array shape in the source's orientation (default: the source's)")
  p.add_argument("--voxel-size", type=float, default=None, metavar="MM",
                 help="voxel size new data are resampled to (default: the source's, 1 mm)")
  p.add_argument("--age-range", default=None, metavar="LOW,HIGH",
                 help="sfcn-torch: first bin start (years); pyment-keras: output range")
  p.add_argument("--members", default=None, metavar="W1,W2,...",
                 help="ensemble: single-model workdirs to combine")
  p.add_argument("--calibration-data", default=None, nargs="+", metavar="DIR",
                 help="ensemble: BIDS dataset with ages to fit the head and bias correction on")
  p.add_argument("--head", default="linear", choices=("linear", "nonnegative", "mean"))
  p.add_argument("--correction", default="linear", choices=("none", "linear", "poly3"))
  p.add_argument("--folds", type=int, default=5, help="ensemble: folds of the head's CV")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  fresh = not args.workdir.exists()
  try:
    if args.format == "ensemble":
      if not args.members or not args.calibration_data:
        raise ConfigError("--format ensemble needs --members W1,W2,... and --calibration-data")
      model = pretrained.ensemble_of(args.members.split(","), args.calibration_data,
                                     args.workdir, head=args.head, folds=args.folds,
                                     correction=args.correction)
    elif args.weights is None:
      raise ConfigError(f"--format {args.format} needs --weights")
    elif args.format == "jax-brainage":
      model = pretrained.import_export(args.weights, args.workdir)
    else:
      model = pretrained.import_model(
          args.format, args.weights, args.workdir,
          sequences=bids.parse_sequences(args.sequence),
          image_shape=_numbers(args.image_shape, 3, "--image-shape", int),
          age_range=_numbers(args.age_range, 2, "--age-range"), voxel_size=args.voxel_size)
  except BrainAgeError:
    if fresh and args.workdir.exists():  # nothing half-written stays behind
      shutil.rmtree(args.workdir, ignore_errors=True)
    raise
  print(f"imported {artifact.describe(model)}")
  return 0
