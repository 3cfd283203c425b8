"""`brainage train --config FILE[:ARG] --workdir W [--config.KEY VALUE ...]`: train a model.

Loads the config, applies big_vision-style `--config.KEY VALUE` overrides and runs
`ensemble.experiment.train` (one model, or an ensemble experiment when the config asks for
members or sub-ensembles); prints one line with the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jax_brainage import sharding
from jax_brainage.commands import parsing
from jax_brainage.train import config_loading
from jax_brainage.train import experiment


class OverrideParser(parsing.SubcommandParser):
  """Collects big_vision-style `--config.KEY VALUE` overrides into `args.overrides`."""

  def claims(self, option: str) -> bool:
    return option.startswith("--config.")

  def claim_extras(self, namespace, extras):
    overrides, rest, i = [], [], 0
    while i < len(extras):
      if extras[i].startswith("--config."):
        take = 1 if "=" in extras[i] else 2
        overrides.extend(extras[i:i + take])
        i += take
      else:
        rest.append(extras[i])
        i += 1
    namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
    return rest


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Adds `brainage train` (its parser collects `--config.KEY VALUE` overrides)."""
  parser = subparsers.add_parser(
      "train", help="train a brain-age model from a config (resumes an interrupted run)",
      description="Train a brain-age model. Override any config key with --config.KEY VALUE, "
                  "e.g. --config.optimizer.learning_rate 1e-3 --config.batch_size 4.")
  parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                      help="config file exposing get_config(arg=None), e.g. configs/cpu.py")
  parser.add_argument("--workdir", required=True, type=Path,
                      help="experiment directory (checkpoints, TensorBoard logs, metrics)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.add_argument("--max-steps", type=int, default=None,
                      help="stop (resumably) after this global step")
  parser.set_defaults(func=run, overrides=[])
  # The sub-parser is made by the shared `brainage` parser; give it the override collection.
  parser.__class__ = OverrideParser
  return parser


def run(args: argparse.Namespace) -> int:
  """Loads the config with its overrides, trains, prints one line (process 0)."""
  config = config_loading.load_config(args.config)
  config = config_loading.apply_overrides(config, getattr(args, "overrides", []) or [])
  summary = experiment.train(config, args.workdir, quiet=args.quiet, max_steps=args.max_steps)
  if not sharding.is_main_process():
    return 0
  if not experiment.is_ensemble(config):
    print(f"brainage train: {summary['stopped']} at step {summary['step']} (epoch "
          f"{summary['epoch']}); best validation MAE {summary['best_val_mae']:.2f} years at step "
          f"{summary['best_step']}; workdir {args.workdir}")
  elif summary["stopped"] != "done":
    print(f"brainage train: stopped at --max-steps {args.max_steps} in sub-ensemble "
          f"{list(summary['subs'])[-1]}; run again to continue; workdir {args.workdir}")
  else:
    e = summary["ensemble"]
    print(f"brainage train: ensemble of {e['n_members']} members "
          f"({', '.join(summary['subs'])}); validation MAE {e['mae']:.2f} years, "
          f"corrected {e['mae_corrected']:.2f}; store {args.workdir}/ensemble")
  return 0
