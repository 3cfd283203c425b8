"""The static HTML report: sections shown exactly when their inputs are given, every string
escaped, files beside index.html, and a headless Chromium render in which every image loads."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess

import numpy as np
import pytest

from jax_brainage import plots
from jax_brainage.analyse import forest, gap, report
from jax_brainage.commands import report as report_command
from jax_brainage.errors import DataError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Debian's chromium and sets this, so that a missing browser fails instead of skipping.
REQUIRE_CHROMIUM = os.environ.get("BRAINAGE_REQUIRE_CHROMIUM") == "1"


class _Page(html.parser.HTMLParser):
  """Sections, images, tables and text of a page (an independent parser, not our writer)."""

  def __init__(self):
    super().__init__()
    self.sections, self.images, self.tables, self.scripts = [], [], 0, 0
    self.text = []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "section":
      self.sections.append(attrs.get("id"))
    elif tag == "img":
      self.images.append(attrs)
    elif tag == "table":
      self.tables += 1
    elif tag == "script":
      self.scripts += 1

  def handle_data(self, data):
    self.text.append(data)


def parse(path) -> _Page:
  page = _Page()
  page.feed(path.read_text(encoding="utf-8"))
  return page


def _png(path, seed=0):
  import matplotlib

  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure

  fig = Figure(figsize=(3, 2), dpi=60)
  fig.add_subplot().plot(np.random.default_rng(seed).normal(size=20))
  fig.savefig(path)
  return path


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
  """A report with every section: real forest/bias figures from a small regression."""
  src = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  n = 40
  age = rng.uniform(20, 80, n)
  diab = rng.integers(0, 2, n)
  g = 3 * diab - 0.2 * (age - 50) + rng.normal(0, 2, n)
  fit = gap.gap_regression({"age": age, "diabetes": diab, "gap": g}, "gap", ["age", "diabetes"])
  forest.forest_plot(src / "forest.png", fit, true_effects={"diabetes": 3.0, "age": 0.0})
  forest.bias_plot(src / "bias.png", age, g, g + 0.2 * (age - 50))
  (src / "effects.tsv").write_text(gap.effects_tsv(gap.effects_table(fit)))
  plots.region_bars(src / "regions.png", ["hippocampus", "frontal_cortex", "ventricles"],
                    np.array([0.9, 0.5, 0.2]), np.array([0.1, 0.2, np.nan]),
                    np.array([-0.2, -0.6, -0.1]), np.array([0.05, 0.1, np.nan]),
                    title="Relevance per atlas region, all explained subjects (n = 4)")
  figures = {"scatter": _png(src / "s.png", 1), "bias": src / "bias.png",
             "forest": src / "forest.png",
             "relevance_regions_ranked": (src / "regions.png", "Regions ranked by relevance"),
             "relevance_ensemble": (_png(src / "m.png", 2), "ensemble <relevance> & co"),
             "relevance montage T1w": _png(src / "m2.png", 3),
             "perturbation_curves": _png(src / "p.png", 4),
             "weird": _png(src / "w.png", 5)}
  long_rows = [{"region": f"r{i}", "positive_mean": i / 100} for i in range(report.LINK_ONLY_ROWS + 5)]
  tables = {"gap_effects": src / "effects.tsv", "relevance_regions": long_rows,
            "relevance_scores": [{"method": "epsilon_plus_flat", "mass_accuracy": 0.61},
                                 {"method": "gradient", "mass_accuracy": 0.32}]}
  summary = {"preset": "tiny", "model": "mrinet", "mae": 3.21, "rmse": 4.0, "r": 0.95,
             "oracle_mae": 1.54, "mae_ensemble": 3.0, "mae_best_member": 3.4,
             "mae_corrected": 3.3, "spearman_gap_age": -0.55, "spearman_gap_age_corrected": 0.02,
             "relevance_mass_accuracy": 0.61, "relevance_rank_accuracy": 0.55,
             "gradient_relevance_mass_accuracy": 0.32,
             "risk_effects": {"diabetes": {"estimated": 2.9, "true": 4.0}},
             "versions": {"jax": "0.10.2"}, "note": "<script>alert('x')</script>",
             "gap_n": n, "gap_terms": 3}
  workdir = tmp_path_factory.mktemp("run")
  index = report.write_report(workdir, summary, figures, tables)
  return workdir, index, figures


def test_every_section_and_file(full_report):
  workdir, index, figures = full_report
  assert index == workdir / "report" / "index.html"
  page = parse(index)
  assert page.sections == ["accuracy", "bias", "gap", "relevance", "evaluation", "other",
                           "details"]
  assert page.scripts == 0  # no JavaScript needed
  srcs = [img["src"] for img in page.images]
  assert len(srcs) == len(figures)
  for src in srcs:
    assert "/" not in src and not src.startswith(("http", "file"))  # beside index.html
    assert (index.parent / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (index.parent / "gap_effects.tsv").is_file()
  assert (index.parent / "relevance_scores.tsv").read_text().splitlines()[0] == (
      "method\tmass_accuracy")
  text = " ".join(page.text)
  for value in ("3.21", "1.54", "0.61", "epsilon_plus_flat", "diabetes", "0.10.2"):
    assert value in text
  # An HTML-parsed text holds the strings as given; the file holds them escaped.
  assert "<script>alert('x')</script>" in text
  raw = index.read_text()
  assert "<script>" not in raw and "&lt;script&gt;" in raw
  assert "ensemble &lt;relevance&gt; &amp; co" in raw


def test_sections_appear_only_with_their_inputs(tmp_path):
  index = report.write_report(tmp_path, {"mae": 5.0, "preset": "cpu", "train_seconds": 12.5})
  page = parse(index)
  assert page.sections == ["accuracy", "details"]  # train_seconds: a run detail
  assert page.images == []
  index = report.write_report(tmp_path / "b", {}, {"bias": _png(tmp_path / "b.png")})
  assert parse(index).sections == ["bias"]
  assert "Nothing to report" in report.write_report(tmp_path / "c").read_text()
  # Names route by what they contain; "SECTION:label" overrides.
  png = _png(tmp_path / "x.png")
  (tmp_path / "r.tsv").write_text("label\tmean\nfrontal\t0.5\n")
  index = report.write_report(tmp_path / "e", {}, {"ensemble_T1w_montage": png,
                                                   "evaluation": png, "bias:my own plot": png},
                              {"relevance_regions": tmp_path / "r.tsv"})
  page = parse(index)
  assert page.sections == ["bias", "relevance", "evaluation"]
  assert "my own plot" in " ".join(page.text)
  with pytest.raises(DataError, match="report figure forest: .* not found"):
    report.write_report(tmp_path / "d", {}, {"forest": tmp_path / "missing.png"})


def _chromium(args, tmp_path, timeout=60):
  cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_report_renders_in_headless_chromium_with_every_image(full_report, tmp_path):
  if CHROMIUM is None:
    if REQUIRE_CHROMIUM:
      pytest.fail("chromium not found (BRAINAGE_REQUIRE_CHROMIUM=1): apt-get install chromium")
    pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
  _, index, figures = full_report
  # A probe copy beside the report (same relative links) records, once the page has loaded,
  # each image's decoded width; the report itself carries no script.
  probe = index.with_name("probe.html")
  script = ("<script>window.addEventListener('load',function(){document.querySelectorAll('img')"
            ".forEach(function(i){i.setAttribute('data-natural-width',i.naturalWidth);"
            "i.setAttribute('data-complete',i.complete)});"
            "document.body.setAttribute('data-loaded','yes')});</script>")
  probe.write_text(index.read_text().replace("</body>", script + "</body>"))
  try:
    result = _chromium(["--dump-dom", probe.as_uri()], tmp_path)
  finally:
    probe.unlink()
  assert result.returncode == 0, result.stderr[-2000:]
  page = _Page()
  page.feed(result.stdout)
  assert 'data-loaded="yes"' in result.stdout
  assert page.sections == ["accuracy", "bias", "gap", "relevance", "evaluation", "other",
                           "details"]
  assert len(page.images) == len(figures)
  for img in page.images:
    assert img.get("data-complete") == "true", img
    assert int(img["data-natural-width"]) > 0, img  # decoded: the PNG exists and is valid
  # And a screenshot of the report itself is not blank.
  shot = tmp_path / "shot.png"
  result = _chromium(["--window-size=1000,1400", f"--screenshot={shot}", index.as_uri()],
                     tmp_path)
  assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
  import matplotlib.image

  pixels = matplotlib.image.imread(shot)[..., :3]
  assert pixels.std() > 0.05 and (pixels < 0.5).mean() > 0.005
  # The relevance section (region chart first) alone, kept under the workdir for a reader.
  text = index.read_text()
  start, end = text.index('<section id="relevance">'), text.index("</section>",
                                                                   text.index('id="relevance"'))
  section = index.with_name("relevance_section.html")
  section.write_text(text[:text.index("<body>") + len("<body>")] + text[start:end]
                     + "</section></body></html>")
  shots = index.parent / "screenshots"
  shots.mkdir(exist_ok=True)
  relevance_shot = shots / "relevance_section.png"
  result = _chromium(["--window-size=1000,900", f"--screenshot={relevance_shot}",
                      section.as_uri()], tmp_path)
  assert result.returncode == 0 and relevance_shot.is_file(), result.stderr[-2000:]
  pixels = matplotlib.image.imread(relevance_shot)[..., :3]
  # the chart's red and blue bars are on screen
  red = (pixels[..., 0] > 0.6) & (pixels[..., 2] < 0.5)
  blue = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.5)
  assert red.mean() > 0.001 and blue.mean() > 0.001


def test_report_command(tmp_path):
  import argparse
  import json

  (tmp_path / "summary.json").write_text(json.dumps(
      {"mae": 4.5, "mae_subs": {"t1": 4.9, "flair": 5.6}, "date": "2026-11-24"}))
  _png(tmp_path / "f.png")
  (tmp_path / "t.tsv").write_text("term\testimate\ndiabetes\t3.25\n")
  parser = argparse.ArgumentParser()
  report_command.add_parser(parser.add_subparsers())
  args = parser.parse_args(["report", "--workdir", str(tmp_path), "--figure",
                            f"forest={tmp_path / 'f.png'}", "--table",
                            f"gap_effects={tmp_path / 't.tsv'}"])
  assert args.func(args) == 0
  page = parse(tmp_path / "report" / "index.html")
  assert page.sections == ["accuracy", "gap"]  # date is the subtitle, nothing left for details
  assert page.tables == 3  # metrics, MAE per sub-ensemble, gap_effects
  text = " ".join(page.text)
  assert "flair" in text and "5.6" in text and "3.25" in text and "2026-11-24" in text
  args = parser.parse_args(["report", "--workdir", str(tmp_path), "--figure", "nopath"])
  with pytest.raises(DataError, match="expected NAME=PATH"):
    args.func(args)


def test_bias_plot_from_predictions(tmp_path):
  from scipy import stats

  rng = np.random.default_rng(4)
  age = rng.uniform(20, 80, 30)
  g = -0.4 * (age - 50) + rng.normal(0, 3, 30)
  c = g + 0.4 * (age - 50)
  lines = ["participant_id\tsession\tage\tpredicted_age\tbrain_age_gap\tbrain_age_gap_corrected"]
  lines += [f"sub-{i}\tn/a\t{age[i]:.4f}\t{age[i] + g[i]:.4f}\t{g[i]:.4f}\t{c[i]:.4f}"
            for i in range(30)]
  lines.append("sub-x\tn/a\tn/a\t50\tn/a\tn/a")  # unknown age: left out
  (tmp_path / "p.tsv").write_text("\n".join(lines) + "\n")
  out = forest.bias_plot_from_predictions(tmp_path / "bias.png", tmp_path / "p.tsv")
  assert out["n"] == 30
  assert out["spearman_gap_age"] == pytest.approx(stats.spearmanr(age, g)[0], abs=1e-3)
  assert out["spearman_gap_age_corrected"] == pytest.approx(stats.spearmanr(age, c)[0], abs=1e-3)
  assert (tmp_path / "bias.png").read_bytes()[:4] == b"\x89PNG"
  (tmp_path / "q.tsv").write_text("\n".join(lines[:3]) + "\n")
  with pytest.raises(DataError, match="2 rows with a known age"):
    forest.bias_plot_from_predictions(tmp_path / "b2.png", tmp_path / "q.tsv")


def test_qc_table_gets_its_own_section_and_a_count(tmp_path):
  """A conformity table (`brainage predict`'s NAME.qc.tsv) goes to the QC section, headed by
  how many scans are flagged, which and why."""
  qc = tmp_path / "preds.qc.tsv"
  qc.write_text("participant_id\tsession\tcorrelation\tqc_flags\n"
                "sub-01\tn/a\t0.95\t\n"
                "sub-02\tn/a\t0.61\talignment;outside_brain\n"
                "sub-03\tn/a\t0.93\t\n")
  index = report.write_report(tmp_path / "W", tables={"qc": qc})
  page = index.read_text()
  section = page[page.index('<section id="qc">'):]
  section = section[:section.index("</section>")]
  assert "Input conformity (QC)" in section
  assert "<b>1 of 3</b> scans flagged" in section
  assert "<li>sub-02: alignment, outside_brain</li>" in section


def test_long_tables_are_links_and_small_samples_warn(full_report):
  workdir, index, _ = full_report
  page = index.read_text()
  block = page[page.index('id="table-relevance_regions"'):]
  block = block[:block.index("</div>")]
  assert "<table" not in block  # no page-wide dump
  assert f"{report.LINK_ONLY_ROWS + 5} rows" in block and 'href="relevance_regions.tsv"' in block
  rows = (workdir / "report" / "relevance_regions.tsv").read_text().splitlines()
  assert len(rows) == report.LINK_ONLY_ROWS + 6  # header + every row
  # n = 40 subjects for 3 coefficients: stated, no warning; 12 for 3: a warning.
  gap_section = page[page.index('<section id="gap">'):]
  assert "n = 40 subjects" in gap_section[:gap_section.index("</section>")]
  assert 'class="warn"' not in page
  small = report.write_report(workdir / "small", {"gap_n": 12, "gap_terms": 3})
  assert "Warning: only n = 12 subjects for 3 coefficients" in small.read_text()


def test_forest_plot_speaks_words():
  assert forest.response_words("brain_age_gap_corrected") == \
      "bias-corrected brain-age gap (years)"
  assert forest.small_sample_warning(10, 6) and not forest.small_sample_warning(60, 6)
