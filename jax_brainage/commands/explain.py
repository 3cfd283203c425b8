"""`brainage explain`: relevance maps, group maps, region tables and figures of new subjects.

    brainage explain --workdir W --data DIR --out DIR [--composite NAME] [--subjects ID ...]
        [--batch-size N] [--checkpoint best|latest] [--atlas FILE] [--age-band YEARS]
        [--groups COL,...] [--levels ensemble,subs,members] [--members-per-call N]
        [--figures N] [--no-glass-brain]
        [--session S] [--entities KEY=VALUE,...] [--participants TSV] [--workers N]
        [--skip-bad] [--seed S] [--target age|gap] [--reference nearest|age|expected|ageing]

The run is `jax_brainage.explain.derivative.explain_dataset` (its module docstring lists what is
written under --out: subject-space maps, group maps, region tables, figures, explain.json),
holding the lock of --out (`jax_brainage.lock`) from before the model loads. This command
prints the subjects it skipped (stderr) and one line: subjects explained, group maps, region
tables and the index.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from jax_brainage import lock, predict
from jax_brainage.commands.prepare import add_layout_options
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.explain import derivative, maps, reference


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage explain`."""
  p = subparsers.add_parser(
      "explain", help="relevance maps (subject space), group maps, region tables and figures",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, type=Path,
                 help="training workdir (brainage train) or ensemble workdir")
  p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                 help="BIDS dataset, fMRIPrep derivatives, FreeSurfer/FastSurfer SUBJECTS_DIR, "
                      "or image files (one subject each)")
  p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
  p.add_argument("--composite", default=None, metavar="NAME",
                 help=f"LRP composite or baseline ({', '.join(maps.METHODS)}; default "
                      f"{maps.DEFAULT_METHOD}, with --target gap {reference.DEFAULT_GAP_METHOD})")
  p.add_argument("--subjects", nargs="+", default=None, metavar="ID",
                 help="explain only these subjects (default: all)")
  p.add_argument("--batch-size", type=int, default=8, help="volumes per jitted call (8)")
  p.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                 help="single-model workdirs: best by validation loss (default) or latest")
  p.add_argument("--atlas", type=Path, default=None,
                 help="label image for region tables (default: the simulated cohort's atlas or "
                      "the training cache's region atlas)")
  p.add_argument("--age-band", type=float, default=10.0,
                 help="width of the age bands of the group maps, years (10; 0 = none)")
  p.add_argument("--groups", default=None, metavar="COL,...",
                 help="participants.tsv columns to group by (default: sex and all covariates)")
  p.add_argument("--levels", default=",".join(derivative.LEVELS),
                 help="ensembles: which maps to write per subject (ensemble,subs,members)")
  p.add_argument("--members-per-call", type=int, default=0, metavar="N",
                 help="ensembles: members explained per jitted call (0 = all of a sub-ensemble; "
                      "fewer bound device memory at study-sized volumes)")
  p.add_argument("--figures", type=int, default=4, metavar="N",
                 help="slice montages of the first N subjects (4); groups always get one")
  p.add_argument("--no-glass-brain", action="store_true", help="skip the glass-brain figure")
  p.add_argument("--target", choices=reference.TARGETS, default="age",
                 help="age: relevance of the predicted age (against a zero input); gap: of the "
                      "difference from age-matched training brains (needs ages)")
  p.add_argument("--reference", choices=reference.DESIGNS, default=reference.DEFAULT_DESIGN,
                 help="--target gap: nearest: the subject's map less the mean map of the "
                      f"{reference.NEAREST} age-matched training scans most similar to it "
                      "(image correlation); age: less the mean map of every age-matched "
                      f"training scan (at most {reference.MAX_SCANS}); expected: integrated "
                      "gradients on the paths towards the nearest scans, each cut where the "
                      "estimate reaches the one expected at the subject's age (the map sums "
                      "to the gap); ageing: one such path from the subject's own image back "
                      "along the training cohort's ageing direction")
  p.add_argument("--seed", type=int, default=0, help="seed of SmoothGrad's noise (0)")
  add_layout_options(p)
  p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                 help="threads preprocessing subjects")
  p.add_argument("--skip-bad", action="store_true",
                 help="report and skip subjects with bad data instead of stopping")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
  if args.figures < 0:
    raise ConfigError(f"--figures {args.figures} must be at least 0")
  if args.age_band < 0 or not math.isfinite(args.age_band):
    raise ConfigError(f"--age-band {args.age_band} must be a non-negative number of years")
  levels = tuple(s.strip() for s in args.levels.split(",") if s.strip())
  bad = [s for s in levels if s not in derivative.LEVELS]
  if bad or "ensemble" not in levels:
    raise ConfigError(f"--levels {args.levels}: choose from {', '.join(derivative.LEVELS)} "
                      "(ensemble always included)")
  method = maps.get_method(args.composite if args.composite is not None else
                           reference.DEFAULT_GAP_METHOD if args.target == "gap" else
                           maps.DEFAULT_METHOD)
  if args.members_per_call < 0:
    raise ConfigError(f"--members-per-call {args.members_per_call} must be 0 (all) or more")
  if args.atlas is not None and not args.atlas.is_file():
    raise DataError(f"--atlas {args.atlas}: file not found")
  # --out's lock from the start: a second writer is refused before the model loads
  # (explain_dataset holds the same lock again: one holder).
  with lock.hold(args.out, "brainage explain"):
    target = derivative.Target(args.workdir, args.checkpoint, method,
                               batch_size=args.batch_size, seed=args.seed, levels=levels,
                               members_per_call=args.members_per_call, target=args.target,
                               reference_design=args.reference)
    dataset = predict.read_dataset(args.data, target.required_sequences, session=args.session,
                                   skip_bad=args.skip_bad, entities=args.entities,
                                   participants=args.participants)
    atlas = args.atlas if args.atlas is not None else derivative.find_atlas(args.data, target)
    columns = None if args.groups is None else [c.strip() for c in args.groups.split(",")
                                                if c.strip()]
    index = derivative.explain_dataset(target, dataset, args.out, subjects=args.subjects,
                                       workers=args.workers, skip_bad=args.skip_bad,
                                       atlas_path=atlas, age_band=args.age_band,
                                       group_columns=columns, n_figures=args.figures,
                                       glass_brain=not args.no_glass_brain, quiet=args.quiet)
  for s in index["skipped"]:
    print(f"skipped {s['participant_id']}: {s['reason']}", file=sys.stderr)
  print(f"explained {len(index['subjects'])} subjects with {args.workdir} ({method.name}) -> "
        f"{args.out} ({len(index['groups'])} group maps"
        f"{', region tables' if index['tables'] else ''}; index {args.out / derivative.INDEX})")
  return 0
