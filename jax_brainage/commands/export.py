"""`brainage export`: a trained or imported workdir as a self-describing folder (weights.npz +
manifest.json with architecture, preprocessing, provenance and checksum) that another user
imports with `brainage import --format jax-brainage --weights DIR --workdir W`.

    brainage export --workdir W --out DIR [--checkpoint best|latest]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jax_brainage.pretrained import workdir as pretrained
from jax_brainage.train import artifact


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage export`."""
  p = subparsers.add_parser(
      "export", help="a trained or imported workdir as a self-describing folder",
      description="`brainage export`: weights.npz + manifest.json of a workdir's model.")
  p.add_argument("--workdir", required=True, type=Path, help="trained or imported workdir")
  p.add_argument("--out", required=True, type=Path, metavar="DIR", help="new folder to write")
  p.add_argument("--checkpoint", choices=artifact.CHECKPOINTS, default="best",
                 help="best by validation loss (default) or latest (single-model workdirs)")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  out = pretrained.export(args.workdir, args.out, args.checkpoint)
  print(f"exported {args.workdir} to {out}")
  return 0
