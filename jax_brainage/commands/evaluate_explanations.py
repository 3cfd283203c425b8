"""`brainage evaluate-explanations`: score relevance maps against the simulated cohort's truth.

    brainage evaluate-explanations --workdir W --data DIR --out DIR [--methods a,b,...]
        [--n-subjects N] [--split test|val|train|all] [--patch-mm 16] [--steps 16]
        [--max-fraction 0.5] [--perturbation blur|patch_mean|zero] [--batch-size N] [--seed S]
        [--sanity-check | --no-sanity-check]

The LRP rule-experimentation tool (`jax_brainage.explain.evaluate`): on a simulated cohort it
explains the held-out subjects of a trained workdir with every method of `explain.maps.METHODS`
and scores each map against the ground-truth masks (`explain.truth`), by 3D region perturbation
and by the model-parameter randomisation sanity check (`explain.scoring`, which also describes
the outputs: scores.tsv, summary.tsv, evaluation.json, evaluation.png, sanity.tsv), holding the
lock of --out (`jax_brainage.lock`: a second writer is refused in one line). It prints one line:
the methods evaluated, the summary table and the best composite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jax_brainage.commands import parsing
from jax_brainage.errors import ConfigError
from jax_brainage.explain import evaluate, scoring
from jax_brainage.explain.truth import PRIMARY_MASK


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage evaluate-explanations`."""
  p = subparsers.add_parser(
      "evaluate-explanations",
      help="score relevance maps of every LRP composite and baseline against the simulated "
           "cohort's ground truth (mass/rank accuracy, region perturbation)",
      description=__doc__.split("\n\n")[2])
  p.add_argument("--workdir", required=True, type=Path, help="trained workdir (single or ensemble)")
  p.add_argument("--data", required=True, type=Path, help="simulated cohort (brainage simulate)")
  p.add_argument("--out", required=True, type=Path, help="directory for the tables and plot")
  p.add_argument("--methods", default=None,
                 help="comma-separated methods (default: every composite and baseline)")
  # A count here; `--subjects` in explain is a list of ids. The old spelling still works.
  p.add_argument("--n-subjects", type=int, default=8, metavar="N",
                 help="explain and score at most N subjects of the split (0 = the whole split)")
  p.add_argument("--subjects", dest="n_subjects", type=int, action=parsing.DeprecatedAlias,
                 replacement="--n-subjects", help=argparse.SUPPRESS)
  p.add_argument("--split", choices=evaluate.SPLITS, default="test",
                 help="subjects of the workdir's recorded split (all = any subject)")
  p.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                 help="which checkpoint of the workdir to explain")
  p.add_argument("--patch-mm", type=float, default=16.0,
                 help="edge of the perturbed cubes in mm (rounded to whole voxels)")
  p.add_argument("--steps", type=int, default=16, help="perturbation steps")
  p.add_argument("--max-fraction", type=float, default=0.5,
                 help="share of brain patches replaced at the last step")
  p.add_argument("--perturbation", choices=scoring.PERTURBATIONS, default="blur",
                 help="what replaces a patch: the blurred input, its mean, or zero")
  p.add_argument("--random-repeats", type=int, default=4, help="random orders averaged")
  p.add_argument("--no-perturbation", action="store_true",
                 help="mass and rank accuracy only (no region perturbation)")
  p.add_argument("--batch-size", type=int, default=8, help="volumes per relevance call")
  p.add_argument("--seed", type=int, default=0,
                 help="SmoothGrad noise, random orders, ties, randomised layers")
  p.add_argument("--sanity-check", action=argparse.BooleanOptionalAction, default=None,
                 help="model-parameter randomisation check per method, layers randomised from "
                      "the output to the input (sanity.tsv; default: on with an accelerator, "
                      "off on CPU)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
  if args.random_repeats < 1:
    raise ConfigError(f"--random-repeats {args.random_repeats} must be at least 1")
  if args.patch_mm <= 0:
    raise ConfigError(f"--patch-mm {args.patch_mm} must be positive")
  methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
  settings = evaluate.Settings(steps=args.steps, max_fraction=args.max_fraction,
                               perturbation=args.perturbation,
                               random_repeats=args.random_repeats, batch_size=args.batch_size,
                               seed=args.seed, perturb=not args.no_perturbation,
                               sanity=args.sanity_check)
  result, paths = evaluate.evaluate_explanations(
      args.workdir, args.data, args.out, methods, checkpoint=args.checkpoint,
      patch_mm=args.patch_mm, settings=settings, subjects=args.n_subjects, split=args.split,
      progress=not args.quiet)
  best = result["best_composite"]
  line = (f"evaluated {len(result['summary'])} methods on {len(result['subjects'])} "
          f"{args.split} subjects -> {paths['summary']}")
  if best:
    row = result["summary"][best]
    line += (f"; best composite {best} (ageing mass accuracy "
             f"{row[f'{PRIMARY_MASK}_mass_accuracy']:.3f}, share "
             f"{row[f'{PRIMARY_MASK}_share']:.3f})")
  print(line)
  return 0
