"""One static HTML report of a brain-age run: W/report/index.html with its images beside it.

    brainage report --workdir W [--summary W/summary.json] [--figure NAME=PNG ...]
        [--table NAME=TSV ...] [--title TEXT]

The page is `jax_brainage.analyse.report.write_report` (its docstring says which name goes to
which section); the demo calls it itself. Prints the path of index.html.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from jax_brainage.analyse.report import write_report
from jax_brainage.errors import DataError


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
  """{NAME: PATH} of repeated `flag NAME=PATH` options."""
  out = {}
  for item in items or ():
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise DataError(f"{flag} {item!r}: expected NAME=PATH")
    out[name] = path
  return out


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage report`."""
  p = subparsers.add_parser(
      "report", help="one static HTML report (metrics, figures, tables) in WORKDIR/report",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, type=Path, help="the report goes to WORKDIR/report")
  p.add_argument("--summary", type=Path, default=None,
                 help="summary JSON (default WORKDIR/summary.json when it exists)")
  p.add_argument("--figure", action="append", default=[], metavar="NAME=PNG",
                 help="a figure; NAME picks the section (scatter, bias, forest, relevance_*, "
                      "perturbation_*, ...); repeat")
  p.add_argument("--table", action="append", default=[], metavar="NAME=TSV",
                 help="a table (gap_effects, relevance_scores, ...); repeat")
  p.add_argument("--title", default="jax-brainage report")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  path = args.summary or (args.workdir / "summary.json")
  summary = {}
  if args.summary is not None or path.is_file():
    try:
      summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise DataError(f"--summary {path}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(summary, dict):
      raise DataError(f"--summary {path}: not a JSON object")
  index = write_report(args.workdir, summary, _pairs(args.figure, "--figure"),
                       _pairs(args.table, "--table"), title=args.title)
  print(f"report -> {index}")
  return 0
