"""One static HTML report of a brain-age run: W/report/index.html with its images beside it.

    write_report(workdir, summary, figures, tables) -> W/report/index.html

No network, no JavaScript: one HTML file with inline CSS, the PNGs copied next to it (relative
links) and the tables copied as TSV, so the folder can be zipped, mailed or opened from a
cluster's file browser. Every section appears only when its inputs are given, so a caller passes
what it has:

  accuracy     summary metrics (MAE, RMSE, r, oracle MAE, ensemble vs best member, corrected
               MAE) and figure "scatter" (predicted vs true age);
  bias         Spearman gap-age correlations and figure "bias" (gap vs age before/after
               correction);
  gap          figure "forest", table "gap_effects" (`brainage analyze`), summary
               "risk_effects" ({factor: {estimated, true, ...}});
  relevance    figures and tables whose name contains relevance, montage, glass, region or lrp
               (slice montages, glass brains, region tables);
  evaluation   summary relevance_mass_accuracy / relevance_rank_accuracy (and the gradient
               baseline's), figures and tables whose name contains scores, evaluation,
               perturbation or ground_truth (`brainage evaluate-explanations`);
  qc           tables whose name starts with qc or contains conformity (`brainage predict`'s
               NAME.qc.tsv, a cache's qc.tsv), headed by how many scans are flagged and why;
  other        any other figure or table, under its own name;
  details      every other scalar of the summary (run configuration, timings, versions).
The first matching rule, in the order qc, evaluation, gap, bias, accuracy, relevance, decides
("relevance_scores" is evaluation); a name "SECTION:label" puts it in SECTION under label.

A figure is a path or (path, caption); a table is a TSV path or a list of row dicts; a table of
more than LINK_ONLY_ROWS rows (the per-region relevance of every subject and group) is a link to
its TSV with its size, not a page-wide dump. The gap section states the regression's n
(summary "gap_n", "gap_terms") and warns when it is small (`forest.small_sample_warning`).
Every string from the inputs is HTML-escaped. Dicts of numbers in the summary such as
"mae_subs" or "member_mae" ({name: years}) become small tables in the accuracy section.

From the command line: `brainage report` (jax_brainage/commands/report.py); the demo calls
`write_report` itself.
"""

from __future__ import annotations

import csv
import html
import math
import os
import re
import shutil
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, Sequence

from jax_brainage import fileio
from jax_brainage.analyse import forest
from jax_brainage.errors import DataError

REPORT_DIR = "report"
# Longer tables are linked (with their size), not shown: nobody reads 1232 rows in a browser.
LINK_ONLY_ROWS = 40
INDEX = "index.html"

# (summary key, label): the metrics in the order a reader looks for them. Years unless noted.
ACCURACY_METRICS = (
    ("mae", "MAE (years)"),
    ("rmse", "RMSE (years)"),
    ("r", "Pearson r (predicted vs age)"),
    ("oracle_mae", "oracle MAE: best achievable (years)"),
    ("mae_over_oracle", "MAE / oracle MAE"),
    ("mae_ensemble", "ensemble MAE (years)"),
    ("mae_best_member", "best single member MAE on these subjects (years)"),
    ("mae_member_best_on_validation", "MAE of the member best on validation (years)"),
    ("n_members", "ensemble members"),
    ("mean_spread", "mean member spread, SD (years)"),
    ("mae_corrected", "MAE after bias correction (years)"),
    ("mean_brain_age_gap", "mean brain-age gap (years)"),
    ("n_test", "test subjects"),
)
BIAS_METRICS = (
    ("spearman_gap_age", "Spearman rho (gap, age), uncorrected"),
    ("spearman_gap_age_corrected", "Spearman rho (gap, age), bias-corrected"),
    ("correction", "bias correction"),
)
EVALUATION_METRICS = (
    ("relevance_mass_accuracy", "relevance mass accuracy (default composite)"),
    ("relevance_rank_accuracy", "relevance rank accuracy (default composite)"),
    ("gradient_relevance_mass_accuracy", "relevance mass accuracy (gradient baseline)"),
    ("gradient_relevance_rank_accuracy", "relevance rank accuracy (gradient baseline)"),
    ("composite", "composite"),
)
# The section of a figure or table by its name (first match; searched anywhere in the name, so
# "ensemble_montage" and "montage_ensemble" both go to relevance). "SECTION:rest" names it.
_SECTION_RULES = (
    ("qc", re.compile(r"(^qc|conformity)")),
    ("evaluation", re.compile(r"(scores|evaluation|perturbation|ground_truth|mass_accuracy|"
                              r"rank_accuracy)")),
    ("gap", re.compile(r"(forest|gap_effects|risk)")),
    ("bias", re.compile(r"bias")),
    ("accuracy", re.compile(r"(scatter|predicted|accuracy_)")),
    ("relevance", re.compile(r"(relevance|montage|glass|region|lrp)")),
)
SECTION_TITLES = {
    "accuracy": "Accuracy",
    "bias": "Brain-age gap and its age bias",
    "gap": "Brain-age gap vs covariates",
    "relevance": "Relevance maps (LRP)",
    "evaluation": "Explanations against the ground truth",
    "qc": "Input conformity (QC)",
    "other": "Other results",
    "details": "Run details",
}
# Captions of the figures the pipeline makes, when the caller gives none.
DEFAULT_CAPTIONS = {
    "scatter": "Predicted vs chronological age on the held-out test split (identity dashed).",
    "bias": "Brain-age gap vs chronological age, before (and, where given, after) bias "
            "correction; lines are least-squares fits.",
    "forest": "Effects of sex and the risk factors on the brain-age gap: estimates with "
              "confidence intervals; the simulated (true) effects as red diamonds.",
}
# Under a gap-effects table with truth columns (see jax_brainage.analyse.truth).
TRUTH_NOTE = (
    "<p>Simulated cohort: <b>true_effect</b> is the generative coefficient on latent brain "
    "age; <b>latent</b> is the same regression on the true latent gap (brain age minus age) of "
    "these subjects (what a perfect measurement would show); <b>oracle</b> on the gap of the "
    "best predictor of age from brain age alone; <b>oracle_full</b> on that of the best "
    "predictor that also knows sex and the risk factors (it explains the risk effects away).</p>")
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1100px;padding:1em 2em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0.2em}h2{border-bottom:1px solid #ccc;padding-bottom:0.2em;
margin-top:1.6em}p.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}
th,td{border:1px solid #ddd;padding:0.25em 0.6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
figure{margin:0.8em 0;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:0.85em;color:#555}
nav a{margin-right:1em}div.scroll{overflow-x:auto;max-width:100%}
p.warn{color:#a00;font-weight:bold}
""".strip()


def _esc(x: Any) -> str:
  return html.escape(str(x), quote=True)


def _fmt(x: Any) -> str:
  if x is None:
    return "n/a"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, int):
    return str(x)
  if isinstance(x, float):
    if not math.isfinite(x):
      return "n/a"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
  if isinstance(x, (list, tuple)):
    return ", ".join(_fmt(v) for v in x)
  return str(x)


def _safe_name(name: str) -> str:
  """A file name made of [A-Za-z0-9._-] only (keys become file names in the report folder)."""
  s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
  return s or "item"


def _copy(src: Path, dest: Path) -> None:
  if src.resolve() == dest.resolve():
    return
  with fileio.atomic_path(dest, suffix=dest.suffix) as tmp:
    shutil.copyfile(src, tmp)


def _read_table(path: Path) -> tuple[list[str], list[list[str]]]:
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = [r for r in csv.reader(f, delimiter="," if path.suffix == ".csv" else "\t") if r]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{path}: cannot read table for the report ({e})") from None
  if not rows:
    return [], []
  return rows[0], rows[1:]


def _table_html(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
                max_rows: int = 200) -> str:
  heads = "".join(f'<th class="l">{_esc(h)}</th>' if i == 0 else f"<th>{_esc(h)}</th>"
                  for i, h in enumerate(header))
  out = ['<div class="scroll"><table>', f"<tr>{heads}</tr>"]
  for row in rows[:max_rows]:
    cells = []
    for i, v in enumerate(row):
      text = v if isinstance(v, str) else _fmt(v)
      try:
        number = float(text)
        if math.isfinite(number) and isinstance(v, str) and ("." in text or "e" in text.lower()):
          text = f"{number:.4g}"
      except ValueError:
        pass
      cls = ' class="l"' if i == 0 else ""
      cells.append(f"<td{cls}>{_esc(text)}</td>")
    out.append("<tr>" + "".join(cells) + "</tr>")
  out.append("</table></div>")
  if len(rows) > max_rows:
    out.append(f"<p>first {max_rows} of {len(rows)} rows shown; the whole table is in the TSV.</p>")
  return "\n".join(out)


def _metrics_html(summary: Mapping[str, Any], metrics: Sequence[tuple[str, str]],
                  used: set[str]) -> str:
  rows = []
  for key, label in metrics:
    # None = not measured in this run: left out rather than shown as n/a.
    if summary.get(key) is not None and not isinstance(summary[key], (dict, list)):
      used.add(key)
      rows.append(f'<tr><td class="l">{_esc(label)}</td><td>{_esc(_fmt(summary[key]))}</td></tr>')
  if not rows:
    return ""
  return "<table>\n" + "\n".join(rows) + "\n</table>"


def _risk_effects_html(effects: Any) -> str:
  """summary["risk_effects"]: {factor: {estimated, true, ...}} or {factor: number}."""
  if not isinstance(effects, Mapping) or not effects:
    return ""
  columns: list[str] = []
  for v in effects.values():
    if isinstance(v, Mapping):
      columns += [k for k in v if k not in columns]
  rows = []
  for name, v in effects.items():
    if isinstance(v, Mapping):
      rows.append([name, *(v.get(c) for c in columns)])
    else:
      rows.append([name, v])
  return _table_html(["factor", *(columns or ["estimate"])], rows)


ACCURACY_TABLES = (("mae_subs", "MAE per sub-ensemble (years)", "sub-ensemble"),
                   ("member_mae", "MAE per ensemble member (years)", "member"))


def _named_numbers_html(summary: Mapping[str, Any], used: set[str]) -> str:
  out = []
  for key, label, what in ACCURACY_TABLES:
    value = summary.get(key)
    if isinstance(value, (list, tuple)):
      value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, Mapping) and value:
      used.add(key)
      out.append(f"<h3>{_esc(label)}</h3>\n"
                 + _table_html([what, "MAE (years)"], [[k, v] for k, v in value.items()]))
  return "\n".join(out)


def _flatten(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for k, v in summary.items():
    if isinstance(v, Mapping):
      out += _flatten(v, f"{prefix}{k}.")
    elif isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list)) for x in v):
      out.append((f"{prefix}{k}", v))
    elif not isinstance(v, (list, tuple)):
      out.append((f"{prefix}{k}", v))
  return out


def _table_block(name: str, label: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                 dest_name: str, link: str) -> str:
  """A table's block: shown with its TSV link, or (over LINK_ONLY_ROWS rows) the link alone with
  the table's size and columns."""
  title = f'<h3>{_esc(label.replace("_", " "))}</h3>'
  if len(rows) > LINK_ONLY_ROWS:
    href = _esc(urllib.parse.quote(dest_name))
    body = (f'<p>The full table ({len(rows)} rows; columns {_esc(", ".join(header))}) is '
            f'<a href="{href}">{_esc(dest_name)}</a> (tab-separated).</p>')
  else:
    body = f"{_table_html(header, rows)}\n{link}"
  return f'<div class="table" id="table-{_esc(_safe_name(name))}">{title}\n{body}</div>'


def _sample_size_html(summary: Mapping[str, Any], used: set[str]) -> str:
  """The gap regression's n (summary "gap_n", with "gap_terms" coefficients) and a warning when
  it is small; "" without "gap_n"."""
  n = summary.get("gap_n")
  if not isinstance(n, int) or isinstance(n, bool):
    return ""
  used.update({"gap_n", "gap_terms"})
  terms = summary.get("gap_terms")
  terms = int(terms) if isinstance(terms, int) and not isinstance(terms, bool) else 1
  text = f"<p>Estimated on n = {n} subjects ({terms} coefficients).</p>"
  warning = forest.small_sample_warning(n, terms)
  if warning:
    text += f'<p class="warn">Warning: {_esc(warning)}.</p>'
  return text


def _section_of(name: str) -> tuple[str, str]:
  """(section, name without a "SECTION:" prefix) of a figure or table name."""
  head, sep, rest = name.partition(":")
  if sep and head in SECTION_TITLES and rest:
    return head, rest
  for section, pattern in _SECTION_RULES:
    if pattern.search(name.lower()):
      return section, name
  return "other", name


def _qc_note(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """How many scans of a QC table (`jax_brainage.data.conformity.qc_tsv`) are flagged, which
  and why (the first ten)."""
  sid, flags = header.index("participant_id"), header.index("qc_flags")
  flagged = [(r[sid], r[flags]) for r in rows if r[flags] not in (None, "", "n/a")]
  items = "".join(f"<li>{_esc(s)}: {_esc(str(f).replace(';', ', '))}</li>"
                  for s, f in flagged[:10])
  more = f"<li>and {len(flagged) - 10} more</li>" if len(flagged) > 10 else ""
  return (f"<p><b>{len(flagged)} of {len(rows)}</b> scans flagged by the conformity gate "
          "(outside the range of the training scans; their predicted ages are unreliable)."
          + (f"</p><ul>{items}{more}</ul>" if flagged else "</p>"))


def write_report(workdir: str | os.PathLike, summary: Mapping[str, Any] | None = None,
                 figures: Mapping[str, Any] | None = None,
                 tables: Mapping[str, Any] | None = None, *,
                 title: str = "jax-brainage report") -> Path:
  """Writes W/report/index.html (+ the figures and tables beside it); returns its path.

  Args:
    workdir: the run's directory W; the report goes to W/report/.
    summary: metrics and run facts (e.g. the demo's summary.json; years for ages and errors).
    figures: {name: PNG path or (path, caption)}; the name picks the section (module docstring).
    tables: {name: TSV path or list of row dicts}; shown as HTML tables and copied as TSV.
    title: the page title.
  Raises:
    DataError: a figure or table file that does not exist, naming it.
  """
  summary = dict(summary or {})
  figures = dict(figures or {})
  tables = dict(tables or {})
  out = Path(workdir) / REPORT_DIR
  out.mkdir(parents=True, exist_ok=True)
  parts: dict[str, list[str]] = {k: [] for k in SECTION_TITLES}
  used: set[str] = set()

  # Figures: copied beside index.html under their (sanitised) names.
  taken: set[str] = set()
  for name, spec in figures.items():
    path, caption = (spec if isinstance(spec, (tuple, list)) else (spec, None))
    if path is None:
      continue
    path = Path(path)
    if not path.is_file():
      raise DataError(f"report figure {name}: {path} not found")
    dest_name = _safe_name(name) + (path.suffix.lower() or ".png")
    while dest_name in taken:
      dest_name = "_" + dest_name
    taken.add(dest_name)
    _copy(path, out / dest_name)
    section, label = _section_of(name)
    caption = caption or DEFAULT_CAPTIONS.get(label) or label.replace("_", " ")
    parts[section].append(
        f'<figure><img src="{_esc(urllib.parse.quote(dest_name))}" alt="{_esc(caption)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>")

  # Tables: rendered and copied as TSV.
  for name, spec in tables.items():
    if spec is None:
      continue
    path = Path(spec) if isinstance(spec, (str, os.PathLike)) else None
    dest_name = _safe_name(name) + (".csv" if path is not None and path.suffix == ".csv" else
                                    ".tsv")
    while dest_name in taken:
      dest_name = "_" + dest_name
    taken.add(dest_name)
    if path is not None:
      if not path.is_file():
        raise DataError(f"report table {name}: {path} not found")
      header, rows = _read_table(path)
      _copy(path, out / dest_name)
    else:
      records = list(spec)
      header = list(dict.fromkeys(k for r in records for k in r))
      rows = [[r.get(h) for h in header] for r in records]
      fileio.write_text(out / dest_name, "\n".join(
          ["\t".join(header)] + ["\t".join(_fmt(v) for v in row) for row in rows]) + "\n")
    link = f'<p><a href="{_esc(urllib.parse.quote(dest_name))}">{_esc(dest_name)}</a></p>'
    if "latent_estimate" in header:
      link = TRUTH_NOTE + link
    if "qc_flags" in header:  # a conformity table: say first how many and which are flagged
      link = _qc_note(header, rows) + link
    section, label = _section_of(name)
    parts[section].append(_table_block(name, label, header, rows, dest_name, link))

  # Metrics, each group at the top of its section.
  # Summary numbers head their sections, before the figures and tables.
  head: dict[str, list[str]] = {k: [] for k in SECTION_TITLES}
  for section, metrics in (("accuracy", ACCURACY_METRICS), ("bias", BIAS_METRICS),
                           ("evaluation", EVALUATION_METRICS)):
    block = _metrics_html(summary, metrics, used)
    if block:
      head[section].append(block)
  block = _named_numbers_html(summary, used)
  if block:
    head["accuracy"].append(block)
  block = _sample_size_html(summary, used)
  if block:
    head["gap"].append(block)
  if "risk_effects" in summary:
    block = _risk_effects_html(summary["risk_effects"])
    used.add("risk_effects")
    if block:
      head["gap"].append("<h3>risk effects (years of gap)</h3>\n" + block)
  for section in parts:
    parts[section][:0] = head[section]
  subtitle_keys = [k for k in ("preset", "model", "device", "date")
                   if summary.get(k) is not None and not isinstance(summary[k], (dict, list))]
  used.update(subtitle_keys)
  details = [(k, v) for k, v in _flatten({k: v for k, v in summary.items() if k not in used})]
  if details:
    parts["details"].append(_table_html(["item", "value"], [[k, _fmt(v)] for k, v in details]))

  # The page.
  subtitle = " · ".join(_fmt(summary[k]) for k in subtitle_keys)
  body = [f"<h1>{_esc(title)}</h1>"]
  if subtitle:
    body.append(f'<p class="sub">{_esc(subtitle)}</p>')
  shown = [s for s, p in parts.items() if p]
  if shown:
    body.append("<nav>" + "".join(f'<a href="#{s}">{_esc(SECTION_TITLES[s])}</a>'
                                  for s in shown) + "</nav>")
  for s in shown:
    body.append(f'<section id="{s}">\n<h2>{_esc(SECTION_TITLES[s])}</h2>\n'
                + "\n".join(parts[s]) + "\n</section>")
  if not shown:
    body.append("<p>Nothing to report yet.</p>")
  page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
          f"<title>{_esc(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
          + "\n".join(body) + "\n</body>\n</html>\n")
  index = out / INDEX
  fileio.write_text(index, page)
  return index
