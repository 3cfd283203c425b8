"""`brainage demo`: the whole path on a simulated cohort, from nothing to a report.

    brainage demo --workdir W [--preset tiny|cpu|gpu] [--data-dir DIR] [--quiet]
        [--config.KEY VALUE ...]

Stages (each reused when a previous run of the same demo completed it):
  1. simulate the preset's cohort as a BIDS dataset into W/data (or --data-dir), with its ground
     truth and oracle MAE (`brainage simulate`);
  2. prepare the cube cache W/cache (`brainage prepare`);
  3. train the preset's config with W as the training workdir (`brainage train`: a single model,
     or an ensemble experiment with W/sub/<name> per sub-ensemble and the store W/ensemble; an
     interrupted run resumes);
  4. predict the held-out test split (the seeded 80/10/10 split the trainer recorded): an
     ensemble from the test subjects' NIfTI files exactly as `brainage predict` prepares new data
     (member, sub-ensemble, ensemble, bias-corrected columns and member spread), a single model
     from their cached cubes, into W/test_predictions.tsv;
  5. explain a few test subjects with the default method (`brainage explain`: subject-space
     NIfTI maps, region tables, montages in W/explain) and score the maps of the default method
     and of the gradient against the simulator's ageing masks (W/evaluation);
  6. regress the bias-corrected gap on the risk factors, beside the simulator's true effects
     (`brainage analyze`, W/analysis; skipped with a note when the test split is too small);
  7. write W/summary.json (mae, rmse, r, oracle_mae, interval_coverage and interval_width of
     the 90% intervals calibrated on the validation split (W/calibration.json) on the test
     split, the ensemble's mae_ensemble,
     mae_best_member, mae_corrected, spearman_gap_age, n_members, relevance_mass_accuracy,
     relevance_rank_accuracy and their gradient baselines, risk_effects, split sizes, timings),
     the scatter and bias plots and the static report W/report/index.html.

Presets (configs/): tiny (tiny.py: 100 subjects at 4 mm, 2 narrow MRInets; a smoke test in
minutes), cpu (cpu.py: 400 subjects at 4 mm, 3 MRInets on T1w + FLAIR + SWI; sized for 2 CPU
cores) and gpu (ensemble_wholebrain.py:5: 2637 subjects at 2 mm as in the study, 98^3 cubes,
3 sequences x 5 members; for an accelerator). The default is gpu when JAX has an accelerator,
else cpu. A workdir belongs to one preset: another preset's workdir is refused with a one-line
error; and to one demo at a time (`jax_brainage.lock`: a second one is refused in one line).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jax_brainage import calibration, fileio, lock, plots, predict
from jax_brainage.analyse import forest, gap, report
from jax_brainage.data import bids, simulate, splits
from jax_brainage.data import cache as cache_lib
from jax_brainage.data import prepare as prepare_lib
from jax_brainage.ensemble import conformal
from jax_brainage.ensemble import model as ensemble_model
from jax_brainage.errors import ConfigError, DataError, SmallSampleWarning
from jax_brainage.explain import derivative, evaluate, maps, scoring, truth
from jax_brainage.train import artifact
from jax_brainage.train import config_checks
from jax_brainage.train import config_loading
from jax_brainage.train import data as train_data
from jax_brainage.train import experiment

# preset -> configs/FILE[:ARG]
PRESETS = {"tiny": "tiny.py", "cpu": "cpu.py", "gpu": "ensemble_wholebrain.py:5"}
DEMO_RECORD = "demo.json"
SUMMARY = "summary.json"
PREDICTIONS = "test_predictions.tsv"
QC_TABLE = "test_predictions.qc.tsv"  # the conformity gate's measures of the test scans
SCATTER = "test_scatter.png"
SUMMARY_KEYS = ("mae", "rmse", "r", "oracle_mae", "n_train", "n_val", "n_test", "train_seconds",
                "volumes_per_second", "preset", "data_dir")


def default_preset() -> str:
  """gpu on an accelerator, cpu otherwise."""
  return "cpu" if jax.default_backend() == "cpu" else "gpu"


def configs_dir() -> Path:
  """The repository's configs/ directory (beside the package)."""
  return Path(__file__).resolve().parent.parent / "configs"


def preset_config(preset: str, workdir: Path, data_dir: Path,
                  overrides: Sequence[str] = ()):
  """The preset's training config with the demo's data locations and `--config.KEY VALUE`
  overrides applied (a locked, validated ConfigDict)."""
  if preset not in PRESETS:
    raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
  name, _, arg = PRESETS[preset].partition(":")
  path = configs_dir() / name
  if not path.is_file():
    raise ConfigError(f"preset {preset}: config file {path} not found (run from a source "
                      "checkout of jax-brainage)")
  config = config_loading.load_config(str(path) + (f":{arg}" if arg else ""))
  config = config_loading.apply_overrides(config, list(overrides))
  with config.unlocked():
    config.data.simulate.out = str(data_dir.resolve())
    config.data.cache = str((workdir / "cache").resolve())
  if config.data.simulate.n <= 0:
    raise ConfigError(f"preset {preset}: config.data.simulate.n must be > 0 for the demo")
  config_checks.validate(config)
  return config


def _claim(workdir: Path, preset: str, data_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
  """Reads or creates W/demo.json; one-line ConfigError if W belongs to something else."""
  record_path = workdir / DEMO_RECORD
  if record_path.is_file():
    try:
      record = json.loads(record_path.read_text(encoding="utf-8"))
      made_by = record["preset"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"{record_path}: unreadable demo record ({type(e).__name__})") from None
    if made_by != preset:
      raise ConfigError(f"--workdir {workdir} holds a demo of the {made_by!r} preset, not "
                        f"{preset!r}; use another --workdir (or --preset {made_by})")
    if record.get("data_dir") != str(data_dir):
      raise ConfigError(f"--workdir {workdir} holds a demo on data {record.get('data_dir')}, "
                        f"not {data_dir}; use another --workdir")
    if list(record.get("overrides", [])) != list(overrides):
      raise ConfigError(f"--workdir {workdir} holds a demo with overrides "
                        f"{record.get('overrides', [])}, not {list(overrides)}; use another "
                        "--workdir")
    return record
  if (workdir / "config.json").exists():
    raise ConfigError(f"--workdir {workdir} holds a training run that is not a demo; use "
                      "another --workdir")
  record = {"preset": preset, "data_dir": str(data_dir), "overrides": list(overrides),
            "created": _now(), "stages": {}}
  fileio.write_json(record_path, record)
  return record


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _log(quiet: bool, text: str) -> None:
  if not quiet:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def run_demo(workdir: str | os.PathLike, preset: str | None = None, *,
             data_dir: str | os.PathLike | None = None, overrides: Sequence[str] = (),
             quiet: bool = False, workers: int | None = None) -> dict[str, Any]:
  """Simulate, prepare, train, predict the test split and summarise; returns the summary.

  Args:
    workdir: the demo's directory (also the training workdir).
    preset: "tiny", "cpu" or "gpu"; default `default_preset()`.
    data_dir: where the simulated BIDS dataset goes (default W/data).
    overrides: `--config.KEY VALUE` pairs (flat list) applied to the preset's config.
    quiet: no progress bars or stage messages.
    workers: processes for simulation and preparation (default: CPU count, at most 8).
  Returns:
    the summary dict written to W/summary.json (ages and errors in years).
  """
  preset = preset or default_preset()
  if preset not in PRESETS:
    raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
  workdir = Path(workdir).resolve()
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir {workdir}: exists and is not a directory")
  data_dir = Path(data_dir).resolve() if data_dir is not None else workdir / "data"
  overrides = [str(o) for o in overrides]
  workers = workers or min(os.cpu_count() or 1, 8)
  config = preset_config(preset, workdir, data_dir, overrides)
  # One demo per workdir at a time (the training inside takes the same lock: one holder).
  with lock.hold(workdir, "brainage demo"):
    return _run_stages(workdir, preset, data_dir, overrides, config, quiet, workers)


def _run_stages(workdir: Path, preset: str, data_dir: Path, overrides: list[str], config,
                quiet: bool, workers: int) -> dict[str, Any]:
  """`run_demo`'s stages, inside the workdir's lock."""
  workdir.mkdir(parents=True, exist_ok=True)
  record = _claim(workdir, preset, data_dir, overrides)
  stages = record.setdefault("stages", {})
  sequences = tuple(config.data.sequences)
  t_start = time.perf_counter()

  def save_record():
    fileio.write_json(workdir / DEMO_RECORD, record)

  # 1. Simulate (write_cohort returns a complete dataset of this configuration as it is).
  s = config.data.simulate
  cohort_config, prep = train_data.cohort_and_preprocessing(config)
  t0 = time.perf_counter()
  cohort_json = simulate.derivatives_dir(data_dir) / "cohort.json"
  reused = cohort_json.is_file()
  _log(quiet, f"simulate {s.n} subjects at {s.resolution} mm -> {data_dir}"
       + (" (reused)" if reused else ""))
  simulate.write_cohort(data_dir, cohort_config, workers=workers, progress=not quiet)
  if not reused:
    stages["simulate_seconds"] = time.perf_counter() - t0
    save_record()
  oracle = json.loads(cohort_json.read_text(encoding="utf-8"))

  # 2. Prepare the cache (reused when it is complete and made from this dataset).
  cache_dir = Path(config.data.cache)
  t0 = time.perf_counter()
  cache = None
  if (cache_dir / cache_lib.INDEX).is_file():
    cache = cache_lib.Cache.open(cache_dir)
    # The whole preprocessing (sequences, cube, scaling, bias correction) must be the preset's;
    # a cache stores its cube resolved, which a preset without image_shape leaves to the default.
    stored = cache.preprocessing
    if prep.shape is None:
      stored = dataclasses.replace(stored, shape=None)
    if (Path(cache.index.get("source", "")).resolve() != data_dir.resolve()
        or len(cache) != int(s.n) or stored != prep):
      _log(quiet, f"cache {cache_dir} is not of {data_dir}; preparing it again")
      cache = None
  if cache is None:
    _log(quiet, f"prepare {cache_dir}")
    dataset = bids.read_bids(data_dir, sequences)
    cache = prepare_lib.prepare(dataset, cache_dir, prep, workers=workers, progress=not quiet)
    stages["prepare_seconds"] = time.perf_counter() - t0
    save_record()
  else:
    _log(quiet, f"prepare {cache_dir} (reused)")

  # 3. Train (resumes an interrupted run; a finished one is not trained again).
  ensemble_run = experiment.is_ensemble(config)
  metrics_path = workdir / "metrics.json"
  train = stages.get("train")
  if train is None or not metrics_path.is_file():
    _log(quiet, f"train configs/{PRESETS[preset]} in {workdir}"
         + (" (ensemble)" if ensemble_run else ""))
    train = _train(config, workdir, quiet, ensemble_run)
    stages["train"] = train
    save_record()
  else:
    _log(quiet, f"train (reused: {train['stopped']} at step {train['step']})")

  # 4. Predict the held-out test split (the split the trainer recorded in W/split.json).
  split_path = workdir / "split.json"
  if split_path.is_file():
    split = splits.load_split(split_path, cache.subject_ids)
  else:
    split = splits.split_subjects(len(cache), seed=int(config.data.split_seed),
                                  groups=cache.participant_ids)
  test = split.test
  test_ids = [cache.subject_ids[i] for i in test]
  t0 = time.perf_counter()
  val_ids = [cache.subject_ids[i] for i in split.val]
  ages, predicted, extra, checkpoint, model_name, image_shape, used_sequences = _predict(
      workdir, data_dir, test_ids, int(config.eval_batch_size or config.batch_size), val_ids)
  predict_seconds = time.perf_counter() - t0
  metrics = predict.summary_metrics(ages, predicted)

  # 5. Explanations of a few test subjects (default method), scored against the ground truth.
  t0 = time.perf_counter()
  explained = _explain(workdir, data_dir, sequences, test_ids[:N_EXPLAINED], quiet)
  explain_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  scores = _evaluate_explanations(workdir, data_dir, min(N_EXPLAINED, len(test_ids)), quiet)
  evaluate_seconds = time.perf_counter() - t0

  # 6. Brain-age gap against the risk factors (estimated vs true effects) and the bias plot.
  analysis = _analyse(workdir, data_dir, quiet)

  # 7. Summary, scatter plot and the report.
  plots.scatter_predicted_vs_true(
      workdir / SCATTER, ages, predicted, mae=metrics["mae"], oracle_mae=oracle["oracle_mae"],
      title=f"brainage demo ({preset}): held-out test split"
            + (", ensemble" if ensemble_run else ", best checkpoint"))
  default = scores.get("method")
  summary = {
      "preset": preset,
      "mae": metrics["mae"],
      "rmse": metrics["rmse"],
      "r": metrics["r"],
      "mean_brain_age_gap": metrics["mean_gap"],
      "oracle_mae": float(oracle["oracle_mae"]),
      "mae_over_oracle": metrics["mae"] / float(oracle["oracle_mae"]),
      **extra,
      "relevance_mass_accuracy": scores.get(default, {}).get("relevance_mass_accuracy"),
      "relevance_rank_accuracy": scores.get(default, {}).get("relevance_rank_accuracy"),
      "gradient_relevance_mass_accuracy": scores.get("gradient", {}).get(
          "relevance_mass_accuracy"),
      "gradient_relevance_rank_accuracy": scores.get("gradient", {}).get(
          "relevance_rank_accuracy"),
      "ageing_mask_share": scores.get(default, {}).get("mask_share"),
      "composite": default,
      "explained_subjects": scores.get(default, {}).get("n"),
      "risk_effects": analysis.get("risk_effects"),
      # the gap regression's size: the report states it and warns when it is small
      "gap_n": ((analysis.get("record") or {}).get("n")),
      "gap_terms": len((analysis.get("record") or {}).get("terms") or []) or None,
      "risk_analysis": analysis.get("note"),
      "n": len(cache),
      "n_train": int(len(split.train)),
      "n_val": int(len(split.val)),
      "n_test": int(len(split.test)),
      "train_seconds": train["train_seconds"],
      "volumes_per_second": train["volumes_per_second"],
      "predict_seconds": predict_seconds,
      "explain_seconds": explain_seconds,
      "evaluate_seconds": evaluate_seconds,
      "best_val_mae": train["best_val_mae"],
      "best_step": train["best_step"],
      "best_steps": train.get("best_steps"),
      "epochs": train["epoch"],
      "steps": train["step"],
      "stopped": train["stopped"],
      "num_params": train["num_params"],
      "checkpoint": checkpoint,
      "model": model_name,
      "image_shape": list(image_shape),
      "sequences": list(used_sequences),
      "resolution_mm": int(s.resolution),
      "simulate_seconds": stages.get("simulate_seconds"),
      "prepare_seconds": stages.get("prepare_seconds"),
      "total_seconds_this_run": time.perf_counter() - t_start,
      "data_dir": str(data_dir),
      "cache_dir": str(cache_dir),
      "workdir": str(workdir),
      "predictions": PREDICTIONS,
      "scatter_plot": SCATTER,
      "report": str(Path(REPORT_DIR) / "index.html"),
      "config": f"configs/{PRESETS[preset]}",
      "overrides": overrides,
      "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind} x {jax.device_count()}",
      "date": _now(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "numpy": np.__version__},
  }
  summary = fileio.jsonable(summary)
  fileio.write_json(workdir / SUMMARY, summary)
  _report(workdir, summary, explained, scores, analysis)
  return summary


N_EXPLAINED = 4  # test subjects explained and scored against the ground truth
REPORT_DIR = "report"


def _train(config, workdir: Path, quiet: bool, ensemble_run: bool) -> dict[str, Any]:
  """Trains the preset (`experiment.train`: a single model or an ensemble experiment); the
  demo's training record."""
  result = experiment.train(config, workdir, quiet=quiet)
  if not ensemble_run:
    vps = result["volumes_per_second"]
    return {"train_seconds": result["train_seconds"],
            "volumes_per_second": vps if math.isfinite(vps) else None,
            "step": result["step"], "epoch": result["epoch"], "stopped": result["stopped"],
            "best_step": result["best_step"], "best_val_mae": result["best_val_mae"],
            "num_params": result["num_params"]}
  subs = list((result.get("subs") or {}).values())
  seconds = sum(float(r.get("train_seconds") or 0.0) for r in subs)
  # Training volumes per second over all sub-ensembles (each step feeds every stacked member
  # its own batch, so member-volumes/s is this times the members).
  volumes = sum(float(r.get("volumes_per_second") or 0.0) * float(r.get("train_seconds") or 0.0)
                for r in subs)
  validation = result.get("ensemble") or {}
  return {"train_seconds": seconds,
          "volumes_per_second": volumes / seconds if seconds > 0 else None,
          "step": sum(int(r.get("step") or 0) for r in subs),
          "epoch": max((int(r.get("epoch") or 0) for r in subs), default=0),
          "stopped": ",".join(sorted({str(r.get("stopped")) for r in subs})),
          # The step of each sub-ensemble's best checkpoint (it holds every member at its own
          # best epoch, saved at the latest of them); best_step is the last one written.
          "best_step": max((int(r["best_step"]) for r in subs
                            if r.get("best_step") is not None and int(r["best_step"]) >= 0),
                           default=None),
          "best_steps": {name: r.get("best_step")
                         for name, r in (result.get("subs") or {}).items()},
          "best_val_mae": validation.get("mae"),
          "num_params": sum(int(r.get("num_params") or 0) * len(r.get("members") or [1])
                            for r in subs)}


def _predict(workdir: Path, data_dir: Path, test_ids: Sequence[str], batch_size: int,
             val_ids: Sequence[str] = ()):
  """The trained model (`artifact.load`) on the test subjects, prepared from their NIfTI files
  exactly as `brainage predict` prepares new data; writes predict's TSV, with intervals
  calibrated on the validation subjects (`brainage calibrate`: W/calibration.json) and their
  coverage of the test ages."""
  model = artifact.load(workdir)
  inputs = predict.model_inputs(model)
  everyone = bids.read_bids(data_dir, inputs.sequences)

  def only(ids):
    wanted = set(ids)
    return dataclasses.replace(everyone, subjects=tuple(x for x in everyone.subjects
                                                        if x.subject_id in wanted))
  qc: list = []
  subjects, prediction, _ = predict.predict_dataset(model, only(test_ids), inputs=inputs,
                                                    batch_size=batch_size, qc=qc)
  fileio.write_text(workdir / QC_TABLE, predict.qc_table(subjects, qc))
  ages = np.asarray([x.age for x in subjects], np.float64)
  cal, intervals = None, {}
  if len(val_ids) >= 2:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", SmallSampleWarning)
      cal = calibration.calibrate(model, only(val_ids), source=f"validation split of {workdir}",
                                  batch_size=batch_size)
    calibration.save(workdir, cal)
    intervals = _interval_metrics(predict.intervals(prediction, subjects, cal), ages)
    if caught:
      intervals["interval_note"] = str(caught[0].message)
  predict.write_predictions(workdir / PREDICTIONS, model, subjects, prediction, calibration=cal,
                            parts=splits.subject_parts(workdir) or None)
  first = model.subs[0]
  if artifact.is_single_model(model):
    extra, checkpoint = {}, f"best/{first.step}"
  else:
    extra = ensemble_model.prediction_metrics(model, prediction, ages)
    extra["correction"] = model.correction.kind
    checkpoint = "ensemble"
  extra.update(intervals)
  return (ages, np.asarray(prediction.ensemble, np.float64), extra, checkpoint,
          first.manifest["model"], first.image_shape, inputs.sequences)


def _explain(workdir: Path, data_dir: Path, sequences: Sequence[str], subject_ids: Sequence[str],
             quiet: bool) -> dict[str, Any]:
  """`brainage explain` of a few test subjects: subject-space maps, region tables, montages."""
  if not subject_ids:
    return {}
  _log(quiet, f"explain {len(subject_ids)} test subjects ({maps.DEFAULT_METHOD}) -> "
              f"{workdir / 'explain'}")
  target = derivative.Target(workdir, "best", maps.get_method(maps.DEFAULT_METHOD),
                             batch_size=N_EXPLAINED, seed=0, levels=derivative.LEVELS)
  dataset = bids.read_bids(data_dir, target.sequences)
  atlas = simulate.derivatives_dir(data_dir) / "atlas.nii.gz"
  return derivative.explain_dataset(
      target, dataset, workdir / "explain", subjects=list(subject_ids),
      atlas_path=atlas if atlas.is_file() else None, group_columns=["diabetes"], n_figures=2,
      glass_brain=True, quiet=quiet)


def _evaluate_explanations(workdir: Path, data_dir: Path, n: int,
                           quiet: bool) -> dict[str, Any]:
  """Relevance mass / rank accuracy on the ageing masks: default method and the gradient."""
  if n == 0:
    return {}
  methods = (maps.DEFAULT_METHOD, "gradient")
  _log(quiet, f"evaluate explanations ({', '.join(methods)}) on {n} test subjects")
  model = artifact.load(workdir)
  # Region perturbation costs ~2 x 16 forward passes per subject and method: on an accelerator
  # only (the mass and rank accuracies in the summary do not need it).
  settings = evaluate.Settings(perturb=jax.default_backend() != "cpu")
  result = evaluate.evaluate(model, data_dir, methods, subjects=n, split="test",
                             settings=settings, progress=not quiet)
  files = scoring.write_outputs(workdir / "evaluation", result)
  out: dict[str, Any] = {"method": maps.DEFAULT_METHOD, "files": files}
  for name, row in result["summary"].items():
    out[name] = {"relevance_mass_accuracy": row[f"{truth.PRIMARY_MASK}_mass_accuracy"],
                 "relevance_rank_accuracy": row[f"{truth.PRIMARY_MASK}_rank_accuracy"],
                 "mask_share": row[f"{truth.PRIMARY_MASK}_share"], "n": row["n"]}
  return out


def _analyse(workdir: Path, data_dir: Path, quiet: bool) -> dict[str, Any]:
  """OLS of the (corrected) gap on the risk factors with the simulator's true effects beside;
  the bias plot. Too few test subjects for the covariates is recorded, not fatal."""
  out: dict[str, Any] = {}
  tsv = workdir / PREDICTIONS
  try:
    out["bias"] = forest.bias_plot_from_predictions(workdir / BIAS_PLOT, tsv)
    out["bias_plot"] = workdir / BIAS_PLOT
  except DataError as e:
    out["note"] = f"bias plot: {e}"
  try:
    record = gap.analyze(tsv, data_dir / "participants.tsv", workdir / "analysis",
                         truth=data_dir)
  except DataError as e:
    _log(quiet, f"analyze: skipped ({e})")
    out["note"] = f"gap analysis skipped: {e}"
    return out
  out["record"] = record
  out["risk_effects"] = gap.risk_effects(record)
  return out


BIAS_PLOT = "test_bias.png"


def _report(workdir: Path, summary: dict[str, Any], explained: dict[str, Any],
            scores: dict[str, Any], analysis: dict[str, Any]) -> Path:
  """W/report/index.html: metrics, scatter, bias and forest plots, montages, scores."""
  figures: dict[str, Any] = {"scatter": workdir / SCATTER}
  if analysis.get("bias_plot"):
    figures["bias"] = analysis["bias_plot"]
  files = (analysis.get("record") or {}).get("files") or {}
  if files.get("forest"):
    figures["forest"] = files["forest"]
  # Relevance: the ranked region chart, the all-subject maps, the subjects', then every other
  # group's (age bands, risk groups), each with its caption in words (explain.json).
  captions = (explained or {}).get("captions") or {}
  items = [Path(item["path"]) if isinstance(item, dict) else Path(item)
           for item in (explained or {}).get("figures", [])]
  order = lambda p: (0 if p.stem == "regions_ranked" else 1 if "group-all_" in p.stem  # noqa
                     else 2 if p.stem.startswith("sub-") else 3)
  for rel in sorted(items, key=order):
    path = rel if rel.is_absolute() else workdir / "explain" / rel
    if path.suffix == ".png" and path.is_file():
      figures[f"relevance:{path.stem}"] = (path, captions.get(str(rel)))
  for name, path in (scores.get("files") or {}).items():
    if Path(path).suffix == ".png":
      figures[f"evaluation:{name}"] = path
  tables: dict[str, Any] = {}
  if files.get("tsv"):
    tables["gap_effects"] = files["tsv"]
  for name, path in (scores.get("files") or {}).items():
    if Path(path).suffix == ".tsv":
      tables[f"evaluation:{name}"] = path
  # Relevance per atlas region, averaged over the explained subjects' groups.
  groups = ((explained or {}).get("tables") or {}).get("groups")
  if groups and (workdir / "explain" / groups).is_file():
    tables["relevance:regions"] = workdir / "explain" / groups
  if (workdir / QC_TABLE).is_file():
    tables["qc"] = workdir / QC_TABLE
  return report.write_report(workdir, summary, figures, tables,
                             title=f"jax-brainage demo ({summary['preset']})")


def _interval_metrics(bounds: dict[str, np.ndarray], ages: np.ndarray) -> dict[str, Any]:
  """Coverage of the test ages by the calibrated brain-age intervals: overall, per age decile
  (its worst), mean width (years) and the share of gaps whose interval excludes 0."""
  low, high = bounds["predicted_age_low"], bounds["predicted_age_high"]
  by_decile = conformal.coverage_by_bin(low, high, ages, ages, bins=10) if len(ages) >= 10 else []
  return {"interval_level": conformal.LEVEL,
          "interval_coverage": conformal.coverage(low, high, ages),
          "interval_width": float(np.mean(high - low)) if len(ages) else None,
          "interval_coverage_worst_age_decile": min((r["coverage"] for r in by_decile),
                                                    default=None),
          "interval_coverage_by_age_decile": by_decile,
          "gap_excludes_zero_share": float(np.nanmean(bounds["gap_excludes_zero"]))
          if len(ages) else None}
