"""The `brainage` command: one sub-command per pipeline stage.

Each stage module owns its sub-command through `add_parser(subparsers)`, which adds a parser and
sets `func=run(args) -> int`. This file only lists the modules, in pipeline order, so that
`brainage --help` reads like the pipeline: data -> model -> train -> ensemble -> explain -> analyse.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jax_brainage import distributed
from jax_brainage.errors import BrainAgeError

# Pipeline order; a module is listed once it provides `add_parser`.
COMMAND_MODULES = (
    "jax_brainage.data.simulate",  # brainage simulate
    "jax_brainage.data.cache",  # brainage prepare
    "jax_brainage.data.pipeline",  # brainage batches
    "jax_brainage.train.trainer",  # brainage train
    "jax_brainage.predict",  # brainage predict (single models and ensembles)
    "jax_brainage.explain.command",  # brainage explain: relevance maps, region tables, figures
    "jax_brainage.explain.evaluate",  # brainage evaluate-explanations: ground-truth scores
    "jax_brainage.analyse.gap",  # brainage analyze: brain-age gap vs covariates
    "jax_brainage.analyse.report",  # brainage report: the static HTML report
    "jax_brainage.demo",  # brainage demo: the whole path on a simulated cohort
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="brainage",
      description="Brain age from structural MRI with ensembles of 3D CNNs, explained with LRP.",
  )
  # Multi-host options go before the sub-command: `brainage --coordinator H:P ... train ...`.
  distributed.add_arguments(parser)
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name in COMMAND_MODULES:
    importlib.import_module(name).add_parser(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    # Join a multi-process run when options, BRAINAGE_* variables or a SLURM / Open MPI /
    # Cloud TPU environment say so; a plain local run initialises nothing.
    if distributed.initialize_from_args(args) is not None:
      print(f"brainage: {distributed.describe()}", file=sys.stderr)
    return int(args.func(args) or 0)
  except BrainAgeError as e:
    # One line naming the culprit; the traceback helps nobody who gave a wrong path.
    print(f"brainage {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"brainage {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
