"""Calibrated intervals on a trained workdir (issue 22): which conformal method, chosen on the
validation split alone, and its coverage on the held-out test split.

1. Study (validation split only): every method of `variants` (the module's "smooth" and
   "mondrian", and the alternatives they were chosen over) calibrated on one random half of the
   validation scans and measured on the other, `--repeats` times: overall coverage, mean
   coverage per age decile, the share of deciles (25 scans) and quintiles (50 scans) of the
   measured half outside 80-97%, and width.
2. Test: the old ("mondrian") and the new default ("smooth") calibrated on all validation scans,
   measured on the test scans, clean, with a nonlinear contrast shift (tissue contrast changes,
   as on another scanner) and with Gaussian noise (`shifted`): coverage overall and per age
   decile, mean width, gaps flagged; and the summary.json keys the demo would write.

Predictions come from the training cache's cubes (the model's input as trained: on a shared
2-core machine the NIfTI preprocessing of 1000 subjects is the slow part), kept in
OUT/predictions.npz; `--nifti` also calibrates and predicts the test split through the NIfTI path
(`calibration.calibrate`, `predict.predict_dataset`, as `brainage calibrate` and `predict`; the
two paths agree to 2e-3 years, tests/test_predict.py). Nothing is written into the workdir.

  python benchmarks/bench_intervals.py --workdir /work/runs/cpu-short --out /tmp/intervals
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from jax_brainage import calibration, fileio, predict  # noqa: E402
from jax_brainage.data import cache as cache_lib  # noqa: E402
from jax_brainage.data import splits  # noqa: E402
from jax_brainage.ensemble import conformal  # noqa: E402
from jax_brainage.train import artifact  # noqa: E402

SHIFTS = ("clean", "contrast", "noise")


def shifted(volumes: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
  """float32 network inputs `[n, X, Y, Z, C]` of cached cubes under a shift (inside the brain:
  nonzero voxels). uint8 (minmax) caches: gamma 1.5 of [0, 1] intensities, noise sd 0.05.
  float (zscore) caches: a nonlinear contrast change that z-scoring cannot undo,
  z + 0.3 (z^2 - 1), and noise sd 0.3 (5% of a ~6 sd range)."""
  if volumes.dtype == np.uint8:
    x = volumes.astype(np.float32) / 255.0
    contrast, sd = (lambda v: v ** 1.5), 0.05
  else:
    x = volumes.astype(np.float32)
    contrast, sd = (lambda v: v + 0.3 * (v * v - 1.0)), 0.3
  brain = x != 0
  if shift.startswith("contrast"):
    return np.where(brain, contrast(x), 0).astype(np.float32)
  if shift.startswith("noise"):
    return np.where(brain, x + rng.normal(0, sd, x.shape).astype(np.float32), 0)
  return x


def predictions(args, model) -> dict[str, np.ndarray]:
  """Predictions of the validation split (clean) and of the test split (every shift) from the
  training cache's cubes: {"val_age", "val_pred", "val_spread", "test_age", "test_<shift>_pred",
  "test_<shift>_spread"}: `[n]` years, and "val_ids"; kept in OUT/predictions.npz and reused
  when it was made from the same workdir (the model is the slow part on a shared CPU)."""
  path = args.out / "predictions.npz"
  if path.is_file():
    with np.load(path) as f:
      if str(f["workdir"]) == str(args.workdir) and str(f["model"]) == artifact.describe(model):
        print(f"reusing the predictions in {path}")
        return {k: f[k] for k in f.files}
  sub = model.subs[0]
  cache = cache_lib.Cache.open(sub.cache_dir, verify=False)
  parts = splits.subject_parts(args.workdir)
  channels = [list(cache.index["sequences"]).index(q) for q in sub.sequences]
  rng = np.random.default_rng(0)

  def run(rows, shift="clean"):
    out = []
    for start in range(0, len(rows), 64):
      x = shifted(np.asarray(cache.volumes[rows[start:start + 64]])[..., channels], shift, rng)
      p = model.predict({sub.name: x}, args.batch_size)
      out.append((p.ensemble, p.spread))
    return (np.concatenate([a for a, _ in out]).astype(np.float64),
            np.concatenate([b for _, b in out]).astype(np.float64))

  t0 = time.perf_counter()
  result: dict[str, np.ndarray] = {"workdir": np.array(str(args.workdir)),
                                   "model": np.array(artifact.describe(model))}
  for part in ("val", "test"):
    rows = np.array([i for i, s in enumerate(cache.subject_ids) if parts.get(s) == part])
    result[f"{part}_ids"] = np.array([cache.subject_ids[i] for i in rows])
    result[f"{part}_age"] = cache.ages[rows].astype(np.float64)
    for shift in (("clean",) if part == "val" else SHIFTS):
      key = "val" if part == "val" else f"test_{shift}"
      result[f"{key}_pred"], result[f"{key}_spread"] = run(rows, shift)
      print(f"predicted {len(rows)} {part} scans ({shift}) at {time.perf_counter() - t0:.0f} s",
            flush=True)
  np.savez(path, **result)
  return result


def variants(level: float) -> dict[str, Any]:
  """The interval methods the study compares: {name: f(age, residual, new_age) -> (low, high)
  residual bounds `[m]`}; "mondrian" and "smooth" are the module's, the rest built here from
  its parts (chosen against: RESULTS.md session 11)."""
  def mondrian(bins, symmetric=False):
    def f(a, r, at):
      if not symmetric:
        return conformal.mondrian_bounds(a, r, at, level, min_per_bin=1, max_bins=bins)
      edges = conformal.bin_edges(a, 1, bins)
      own, new = conformal.which_bin(edges, a), conformal.which_bin(edges, at)
      lo, hi = np.empty(len(at)), np.empty(len(at))
      for k in np.unique(new):
        rk = r[own == k]
        c = np.median(rk)
        q = _kth(np.abs(rk - c), conformal.symmetric_rank(len(rk), level))
        lo[new == k], hi[new == k] = c - q, c + q
      return lo, hi
    return f

  def smooth(bandwidth=conformal.BANDWIDTH, fit="cross", two_tailed=False):
    def f(a, r, at):
      if fit == "cross" and not two_tailed:
        return conformal.smooth_bounds(a, r, at, level, bandwidth)
      h = conformal.smooth_bandwidth(a, bandwidth)
      if fit == "cross":
        z, scale = conformal.smooth_scores(a, r, bandwidth), conformal.SmoothScale(a, r, h)
      elif fit == "full":  # fitted on the scans it calibrates on: a little optimistic
        scale = conformal.SmoothScale(a, r, h)
        z = scale.scores(a, r)
      else:  # "split": fit on a random half, one quantile on the other (exact guarantee)
        half = np.random.default_rng(0).permutation(len(a)) < len(a) // 2
        scale = conformal.SmoothScale(a[half], r[half], h)
        z = scale.scores(a[~half], r[~half])
      c, s = scale.centre(at), scale.scale(at)
      if two_tailed:
        lo, hi = conformal.residual_bounds(z, level)
        return c + lo * s, c + hi * s
      q = _kth(np.abs(z), conformal.symmetric_rank(len(z), level))
      return c - q * s, c + q * s
    return f

  def cqr(bandwidth=conformal.BANDWIDTH):  # conformalised kernel-quantile regression
    def f(a, r, at):
      h = conformal.smooth_bandwidth(a, bandwidth)
      centre = conformal.SmoothScale(a, r, h).centre
      e = r - centre(a)
      q = {t: (lambda x, t=t: _kernel_quantile(a, e, x, h, t)) for t in (0.05, 0.95)}
      score = np.maximum(q[0.05](a) - e, e - q[0.95](a))
      extra = _kth(score, conformal.symmetric_rank(len(score), level))
      return centre(at) + q[0.05](at) - extra, centre(at) + q[0.95](at) + extra
    return f

  return {"mondrian, 10 bins (old default)": mondrian(10),
          "mondrian, 5 bins": mondrian(5), "mondrian, 5 bins, symmetric": mondrian(5, True),
          "pooled, 1 bin": mondrian(1),
          "smooth, cross-fitted (new default)": smooth(),
          "smooth, bandwidth 0.5": smooth(0.5), "smooth, two-tailed": smooth(two_tailed=True),
          "smooth, fitted on all": smooth(fit="full"), "smooth, split-fitted": smooth(fit="split"),
          "conformalised kernel quantiles": cqr()}


def _kth(values: np.ndarray, k: int) -> float:
  v = np.sort(values)
  return float(v[k - 1]) if k <= len(v) else math.inf


def _kernel_quantile(x, y, at, h, tau):
  """Gaussian-kernel-weighted tau-quantile of y at each `at` `[m]`."""
  order = np.argsort(y)
  x, y = x[order], y[order]
  w = np.exp(-0.5 * ((x[None, :] - np.asarray(at)[:, None]) / h) ** 2)
  c = np.cumsum(w, 1) / w.sum(1, keepdims=True)
  return y[np.minimum((c < tau).sum(1), len(y) - 1)]


def study(age: np.ndarray, residual: np.ndarray, level: float, repeats: int) -> dict[str, Any]:
  """The methods on the VALIDATION split only: `repeats` random 50/50 splits, calibrated on one
  half and measured on the other, overall and per age decile and quintile of the measured half
  (25 and 50 scans), and the share of deciles / quintiles outside 80-97%."""
  methods = variants(level)
  rng = np.random.default_rng(123)
  rows: dict[str, list] = {name: [] for name in methods}
  for _ in range(repeats):
    order = rng.permutation(len(age))
    cal, held = order[:len(age) // 2], order[len(age) // 2:]
    groups = {b: conformal.which_bin(np.quantile(age[held], np.arange(1, b) / b), age[held])
              for b in (10, 5)}
    for name, method in methods.items():
      lo, hi = method(age[cal], residual[cal], age[held])
      inside = (residual[held] >= lo) & (residual[held] <= hi)
      per = {b: np.array([inside[g == k].mean() for k in range(b)]) for b, g in groups.items()}
      rows[name].append((inside.mean(), np.mean(hi - lo), per[10], per[5]))
  out = {}
  for name, r in rows.items():
    cov, width = np.array([x[0] for x in r]), np.array([x[1] for x in r])
    dec, quint = np.array([x[2] for x in r]), np.array([x[3] for x in r])
    out[name] = {"coverage": float(cov.mean()), "coverage_sd": float(cov.std()),
                 "width": float(width.mean()),
                 "deciles_outside": float(np.mean((dec < 0.8) | (dec > 0.97))),
                 "quintiles_outside": float(np.mean((quint < 0.8) | (quint > 0.97))),
                 "decile_rms_error": float(np.sqrt(np.mean((dec - level) ** 2))),
                 "mean_decile_coverage": dec.mean(0).tolist()}
  return out


def evaluate(cal: conformal.Calibration, ages: np.ndarray, pred: np.ndarray,
             corrected: np.ndarray, spread: np.ndarray, level: float) -> dict[str, Any]:
  """Coverage of the test ages: overall, per age decile, mean width, gaps flagged."""
  bounds = cal.intervals(pred, ages, corrected, spread, level)
  low, high = bounds["predicted_age_low"], bounds["predicted_age_high"]
  deciles = conformal.coverage_by_bin(low, high, ages, ages, bins=10)
  cov = [r["coverage"] for r in deciles]
  return {"mae": float(np.mean(np.abs(pred - ages))),
          "coverage": conformal.coverage(low, high, ages), "width": float(np.mean(high - low)),
          "worst_decile": min(cov), "best_decile": max(cov),
          "deciles_in_80_97": int(sum(0.8 <= c <= 0.97 for c in cov)),
          "gap_excludes_zero": float(np.mean(bounds["gap_excludes_zero"])), "deciles": deciles}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", type=Path, required=True)
  p.add_argument("--out", type=Path, required=True)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--level", type=float, default=conformal.LEVEL)
  p.add_argument("--repeats", type=int, default=300,
                 help="random 50/50 splits of the validation split in the study of methods")
  p.add_argument("--predict-only", action="store_true",
                 help="only predict the validation and test splits (OUT/predictions.npz)")
  p.add_argument("--nifti", action="store_true",
                 help="calibrate and check the test split through the NIfTI path too")
  args = p.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  model = artifact.load(args.workdir)
  cached = predictions(args, model)
  if args.predict_only:
    return
  v_age, v_pred, v_spread = cached["val_age"], cached["val_pred"], cached["val_spread"]
  v_corrected = model.correction.apply(v_pred, v_age)
  normalize = model.n_members > 1
  # 1. The methods compared on the validation split alone (the test split is not looked at).
  residual = (v_pred - v_age) / (v_spread + np.median(v_spread) if normalize else 1.0)
  t0 = time.perf_counter()
  result: dict[str, Any] = {"workdir": str(args.workdir), "model": artifact.describe(model),
                            "level": args.level, "n_val": int(len(v_age)),
                            "n_test": int(len(cached["test_age"])),
                            "study": study(v_age, residual, args.level, args.repeats)}
  print(f"methods on {args.repeats} random 50/50 splits of the {len(v_age)} validation scans "
        f"({time.perf_counter() - t0:.0f} s); measured half: deciles of ~{len(v_age) // 20}, "
        f"quintiles of ~{len(v_age) // 10} scans")
  print(f"{'method':<36} {'coverage':>8} {'sd':>6} {'width':>6} {'deciles out':>11} "
        f"{'quintiles out':>13} {'rms':>6}  mean coverage per decile")
  for name, r in result["study"].items():
    print(f"{name:<36} {r['coverage']:8.3f} {r['coverage_sd']:6.3f} {r['width']:6.2f} "
          f"{r['deciles_outside']:11.3f} {r['quintiles_outside']:13.3f} "
          f"{r['decile_rms_error']:6.3f}  "
          + " ".join(f"{c:.2f}" for c in r["mean_decile_coverage"]))
  # 2. The old and the new default calibrated on all validation scans, measured on the test split.
  t_age = cached["test_age"]
  result["test"] = {}
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if args.nifti:
      dataset, source = calibration.calibration_dataset(model)
      nifti_cal = calibration.calibrate(model, dataset, source=source,
                                        batch_size=args.batch_size, workers=2)
    for method in ("mondrian", "smooth"):
      cal = conformal.calibration_from_rows(
          [str(x) for x in cached["val_ids"]], v_age, v_pred, v_corrected, v_spread,
          source=f"validation split of {args.workdir} (cached cubes)", normalize=normalize,
          model=artifact.describe(model), method=method)
      conformal.save_calibration(args.out / f"calibration-{method}.json", cal)
      result["test"][method] = {
          shift: evaluate(cal, t_age, cached[f"test_{shift}_pred"],
                          model.correction.apply(cached[f"test_{shift}_pred"], t_age),
                          cached[f"test_{shift}_spread"], args.level) for shift in SHIFTS}
  result["warnings"] = [str(w.message) for w in caught]
  print(f"\ncalibrated on the {len(v_age)} validation scans, measured on the {len(t_age)} test "
        "scans")
  print(f"{'method':<10} {'shift':<9} {'MAE':>6} {'coverage':>9} {'worst decile':>13} "
        f"{'best decile':>12} {'in 80-97':>9} {'width':>7} {'gap excl. 0':>12}")
  for method, by_shift in result["test"].items():
    for shift, row in by_shift.items():
      print(f"{method:<10} {shift:<9} {row['mae']:6.2f} {row['coverage']:9.3f} "
            f"{row['worst_decile']:13.3f} {row['best_decile']:12.3f} "
            f"{row['deciles_in_80_97']:>6}/10 {row['width']:7.2f} "
            f"{row['gap_excludes_zero']:12.3f}")
  clean = result["test"][conformal.METHOD]["clean"]
  result["demo_summary_keys"] = {  # as demo.py's summary.json (there from the NIfTI path)
      "interval_level": args.level, "interval_coverage": clean["coverage"],
      "interval_width": clean["width"], "interval_coverage_worst_age_decile": clean["worst_decile"],
      "interval_coverage_by_age_decile": clean["deciles"],
      "gap_excludes_zero_share": clean["gap_excludes_zero"]}
  for method, by_shift in result["test"].items():
    print(f"per age decile, {method}, clean (coverage/width): " + ", ".join(
        f"{r['from']:.0f}-{r['to']:.0f}: {r['coverage']:.2f}/{r['width']:.1f}"
        for r in by_shift["clean"]["deciles"]))
  print(f"summary.json interval keys with the default ({conformal.METHOD}; cached cubes):")
  print(json.dumps(fileio.jsonable({k: v for k, v in result["demo_summary_keys"].items()
                                    if k != "interval_coverage_by_age_decile"})))
  if args.nifti:  # the same test subjects through the one prediction path (brainage predict)
    _nifti_check(args, model, nifti_cal, test_rows(args, model), result)
  fileio.write_json(args.out / "intervals.json", fileio.jsonable(result))


def test_rows(args, model):
  sub = model.subs[0]
  cache = cache_lib.Cache.open(sub.cache_dir, verify=False)
  parts = splits.subject_parts(args.workdir)
  return cache, np.array([i for i, s in enumerate(cache.subject_ids) if parts.get(s) == "test"])


def _nifti_check(args, model, cal, rows, result):
  cache, test = rows
  dataset, _ = calibration.calibration_dataset(model)
  subjects, prediction, _ = predict.predict_dataset(
      model, _only(dataset, cache, test), batch_size=args.batch_size, workers=2)
  b = predict.intervals(prediction, subjects, cal, args.level)
  a = np.array([s.age for s in subjects], np.float64)
  result["predict_path_coverage"] = conformal.coverage(b["predicted_age_low"],
                                                       b["predicted_age_high"], a)
  print(f"predict path (NIfTI): coverage {result['predict_path_coverage']:.3f} over {len(a)}")


def _only(dataset, cache, rows):
  """The calibration dataset's source with only the test subjects (read again from BIDS)."""
  import dataclasses

  from jax_brainage.data import bids

  root = cache.index["source"]
  everyone = bids.read_bids(root, dataset.sequences)
  wanted = {cache.subject_ids[i] for i in rows}
  return dataclasses.replace(everyone, subjects=tuple(s for s in everyone.subjects
                                                      if s.subject_id in wanted))


if __name__ == "__main__":
  main()
