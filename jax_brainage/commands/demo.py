"""`brainage demo`: the whole path on a simulated cohort, from nothing to a report
(`jax_brainage.demo.run_demo`, whose docstring lists the stages and presets)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jax_brainage import demo
from jax_brainage.commands.train import OverrideParser
from jax_brainage.errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage demo`."""
  p = subparsers.add_parser(
      "demo", help="simulate, prepare, train and evaluate on a held-out test split, end to end",
      description=demo.__doc__.split("\n\n")[0] + " Override preset keys with --config.KEY VALUE.")
  p.add_argument("--workdir", required=True, type=Path, help="the demo's directory")
  p.add_argument("--preset", choices=tuple(demo.PRESETS), default=None,
                 help="tiny (minutes), cpu (<30 min on 2 cores), gpu (accelerator); default: "
                      "gpu on an accelerator, else cpu")
  p.add_argument("--data-dir", type=Path, default=None,
                 help="where the simulated BIDS dataset goes (default WORKDIR/data)")
  p.add_argument("--workers", type=int, default=None,
                 help="processes for simulation and preparation (default: CPU count, <= 8)")
  p.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
  p.set_defaults(func=run, overrides=[])
  # The same `--config.KEY VALUE` collection as `brainage train`.
  p.__class__ = OverrideParser
  return p


def run(args: argparse.Namespace) -> int:
  if args.workers is not None and args.workers < 1:
    raise ConfigError(f"--workers {args.workers} must be at least 1")
  summary = demo.run_demo(args.workdir, args.preset, data_dir=args.data_dir,
                          overrides=getattr(args, "overrides", []) or [], quiet=args.quiet,
                          workers=args.workers)
  vps = summary["volumes_per_second"]
  print(f"brainage demo ({summary['preset']}): test MAE {summary['mae']:.2f} years "
        f"(oracle {summary['oracle_mae']:.2f}, ratio {summary['mae_over_oracle']:.2f}), RMSE "
        f"{summary['rmse']:.2f}, r {summary['r']:.3f} on {summary['n_test']} test subjects; "
        f"trained {summary['train_seconds']:.0f} s"
        + (f" at {vps:.1f} volumes/s" if vps else "")
        + f"; {Path(summary['workdir']) / demo.SUMMARY}")
  return 0
