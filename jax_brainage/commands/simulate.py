"""`brainage simulate`: write a simulated BIDS cohort with ground truth.

    brainage simulate --out DIR --n N [--resolution 1|2|3|4] [--seed S]
        [--sequences T1w,FLAIR,swi] [--workers N] [--acquisition template|raw] [--sessions N]

The cohort is `jax_brainage.data.simulate.write_cohort` of a `CohortConfig` (the simulator's
docstring lists the files and the model). Prints where it went and the cohort's oracle MAE.
"""

from __future__ import annotations

import argparse
import json
import sys

from jax_brainage.data import simulate
from jax_brainage.errors import ConfigError, DataError


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage simulate`."""
  parser = subparsers.add_parser(
      "simulate",
      help="write a simulated BIDS cohort with ground truth",
      description="Simulate a 3D multi-sequence cohort on the MNI152 template with known ground "
      "truth (latent brain age, ageing and lesion masks, atlas, oracle MAE), as a BIDS dataset.",
  )
  parser.add_argument("--out", required=True, help="output directory (new or empty)")
  parser.add_argument("--n", type=int, required=True, help="number of subjects")
  parser.add_argument("--resolution", type=int, default=2, help="voxel size in mm: 1, 2, 3 or 4")
  parser.add_argument("--seed", type=int, default=0, help="cohort seed")
  parser.add_argument(
      "--sequences", default=",".join(simulate.SEQUENCES),
      help="comma-separated subset of T1w,FLAIR,swi"
  )
  parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
  parser.add_argument(
      "--acquisition", choices=simulate.ACQUISITIONS, default="template",
      help="template: skull-stripped images on the template grid (default); raw: scans as "
           "acquired (skull and scalp, pose up to 20 degrees / 20 mm, scanner grid and "
           "orientation, sidecars) with the true transforms under derivatives/simulation/")
  parser.add_argument("--sessions", type=int, default=1,
                      help="raw only: sessions per subject (ses-1..ses-N, same-day rescans)")
  parser.set_defaults(func=run)
  return parser


def run(args: argparse.Namespace) -> int:
  """Checks the options, writes the cohort and prints where it went; returns 0."""
  sequences = tuple(s.strip() for s in str(args.sequences).split(",") if s.strip())
  if args.workers is not None and args.workers < 1:
    raise ConfigError(f"--workers {args.workers} must be at least 1")
  if args.n is None or args.n < 1:
    raise ConfigError(f"--n {args.n} must be at least 1")
  if args.resolution not in (1, 2, 3, 4):
    raise ConfigError(f"--resolution {args.resolution} must be 1, 2, 3 or 4 (mm)")
  if args.seed < 0:
    raise ConfigError(f"--seed {args.seed} must be non-negative")
  config = simulate.CohortConfig(seed=args.seed, n=args.n, resolution_mm=args.resolution,
                                 sequences=sequences)
  try:
    out = simulate.write_cohort(args.out, config, workers=args.workers,
                                progress=sys.stderr.isatty(), acquisition=args.acquisition,
                                sessions=args.sessions)
  except OSError as e:  # disk full, permissions: files already written stay whole (atomic writes)
    raise DataError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
  cohort_json = json.loads((simulate.derivatives_dir(out) / "cohort.json").read_text())
  print(f"wrote {config.n} subjects to {out} (oracle MAE {cohort_json['oracle_mae']:.2f} years)")
  return 0
