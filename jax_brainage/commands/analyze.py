"""`brainage analyze`: the brain-age gap against covariates by ordinary least squares.

    brainage analyze --predictions preds.tsv --participants participants.tsv --out DIR
        [--gap-column brain_age_gap_corrected] [--covariates diabetes,hypertension,...]
        [--truth DATASET_DIR] [--confidence 0.95] [--se classical|hc3]

The analysis is `jax_brainage.analyse.gap.analyze` (its docstring has the model, the covariate
rules and the outputs). This command prints the fit, one line per covariate with its interval
(and, with --truth, the true effect and the latent gap's estimate), and on stderr what the
record flags: repeated participants (sessions: OLS treats them as independent people),
covariates left out for being constant, rows dropped for missing values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jax_brainage.analyse import gap
from jax_brainage.analyse.regression import INTERCEPT, SE_KINDS
from jax_brainage.analyse.tables import ID_COLUMN
from jax_brainage.errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage analyze`."""
  p = subparsers.add_parser(
      "analyze", help="brain-age gap vs covariates (risk factors, sex, age): OLS with CIs and "
                      "p-values, TSV + forest plot",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--predictions", required=True, type=Path, metavar="TSV",
                 help="predictions TSV (brainage predict / demo)")
  p.add_argument("--participants", required=True, type=Path, metavar="TSV",
                 help="participants.tsv with the covariates")
  p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
  p.add_argument("--gap-column", default=None,
                 help="gap column of the predictions (default brain_age_gap_corrected, else "
                      "brain_age_gap)")
  p.add_argument("--covariates", default=None,
                 help="comma-separated columns or COLUMN_over_T hinges (default: every numeric "
                      "or two-level participants column)")
  p.add_argument("--truth", type=Path, default=None, metavar="DATASET_DIR",
                 help="simulated dataset (brainage simulate): show the true effects beside the "
                      "estimates")
  p.add_argument("--confidence", type=float, default=0.95, help="interval level (0.95)")
  p.add_argument("--se", choices=SE_KINDS, default="classical",
                 help="standard errors: classical (homoscedastic) or hc3 (robust to a gap "
                      "spread that changes with age or group)")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  covariates = None
  if args.covariates is not None:
    covariates = [c.strip() for c in args.covariates.split(",") if c.strip()]
    if not covariates:
      raise ConfigError("--covariates is empty")
  record = gap.analyze(args.predictions, args.participants, args.out, gap_column=args.gap_column,
                       covariates=covariates, truth=args.truth, confidence=args.confidence,
                       se=args.se)
  if record["repeated_participants"]:
    print(f"warning: {record['repeated_participants']} rows repeat a participant (sessions); "
          "OLS treats them as independent people", file=sys.stderr)
  if record["constant_left_out"]:
    print(f"left out (the same for every subject): {', '.join(record['constant_left_out'])}",
          file=sys.stderr)
  if record["n_dropped"]:
    first = record["dropped"][0]
    print(f"dropped {record['n_dropped']} rows with missing values (first: "
          f"{first[ID_COLUMN]}, {first['missing']})", file=sys.stderr)
  level = round(100 * record["confidence"])
  print(f"{record['gap_column']} on {', '.join(record['covariates'])}: n {record['n']}, "
        f"R^2 {record['r2']:.3f}")
  for row in record["terms"]:
    if row["term"] == INTERCEPT:
      continue
    line = (f"  {row['term']:<22} {row['estimate']:+8.3f} y  [{row['ci_low']:+.3f}, "
            f"{row['ci_high']:+.3f}] {level}% CI  p {row['p']:.3g}")
    true = row.get("true_effect")
    if true is not None:
      line += f"  (true {true:+.3f}"
    if row.get("latent_estimate") is not None:
      line += f"{', ' if true is not None else '  ('}latent gap {row['latent_estimate']:+.3f}"
    if true is not None or row.get("latent_estimate") is not None:
      line += ")"
    print(line)
  print(f"-> {Path(args.out) / gap.EFFECTS_TSV}, {gap.EFFECTS_JSON}, {gap.FOREST_PNG}")
  return 0
