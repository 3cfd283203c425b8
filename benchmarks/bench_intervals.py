"""Calibrated intervals on a trained workdir (issue 22): coverage of the 90% split-conformal
intervals on the held-out test split, overall and per age decile, their mean width, and how
coverage degrades on test scans corrupted by a contrast or noise shift.

Calibration: the workdir's validation split, from the training cache's cubes by default (the
model's input as trained: on a shared 2-core machine the NIfTI preprocessing of 1000 subjects is
the slow part), or `--nifti` through the one path (`calibration.calibrate`, from NIfTI as
`brainage calibrate`; the two paths agree to 2e-3 years, tests/test_predict.py); written to
--out (never into the workdir, which may be read-only). Test scans: the cached cubes of the test
split (the model's input as trained),
clean, with a nonlinear contrast shift (tissue contrast changes, as on another scanner) and with
Gaussian noise (`shifted`); `Ensemble.predict` on them.

  python benchmarks/bench_intervals.py --workdir /work/runs/cpu-short --out /tmp/intervals
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

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


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", type=Path, required=True)
  p.add_argument("--out", type=Path, required=True)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--level", type=float, default=conformal.LEVEL)
  p.add_argument("--nifti", action="store_true",
                 help="calibrate and check the test split through the NIfTI path too")
  args = p.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  model = artifact.load(args.workdir)
  sub = model.subs[0]
  cache = cache_lib.Cache.open(sub.cache_dir, verify=False)
  parts = splits.subject_parts(args.workdir)
  test = np.array([i for i, s in enumerate(cache.subject_ids) if parts.get(s) == "test"])
  val = np.array([i for i, s in enumerate(cache.subject_ids) if parts.get(s) == "val"])
  channels = [list(cache.index["sequences"]).index(q) for q in sub.sequences]
  ages = cache.ages[test].astype(np.float64)
  rng = np.random.default_rng(0)

  def cached_predictions(rows, shift="clean"):
    out = []
    for start in range(0, len(rows), 64):
      x = shifted(np.asarray(cache.volumes[rows[start:start + 64]])[..., channels], shift, rng)
      p = model.predict({sub.name: x}, args.batch_size)
      out.append((p.ensemble, p.spread))
    return (np.concatenate([a for a, _ in out]).astype(np.float64),
            np.concatenate([b for _, b in out]).astype(np.float64))

  t0 = time.perf_counter()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if args.nifti:
      dataset, source = calibration.calibration_dataset(model)
      cal = calibration.calibrate(model, dataset, source=source, batch_size=args.batch_size,
                                  workers=2)
    else:
      source = f"validation split of {args.workdir} (cached cubes)"
      v_pred, v_spread = cached_predictions(val)
      v_age = cache.ages[val].astype(np.float64)
      cal = conformal.calibration_from_rows(
          [cache.subject_ids[i] for i in val], v_age, v_pred,
          model.correction.apply(v_pred, v_age), v_spread, source=source,
          normalize=model.n_members > 1, model=artifact.describe(model))
  conformal.save_calibration(args.out / conformal.CALIBRATION_FILE, cal)
  calibrate_s = time.perf_counter() - t0
  result = {"workdir": str(args.workdir), "model": artifact.describe(model),
            "calibration": {"n": cal.n, "source": source, "seconds": calibrate_s,
                            "bins": cal.bin_bounds(args.level)["age"],
                            "warnings": [str(w.message) for w in caught]},
            "level": args.level, "n_test": int(len(test)), "shifts": {}}
  print(f"calibrated on {cal.n} validation scans in {calibrate_s:.0f} s; {len(test)} test scans")
  print(f"{'shift':<20} {'MAE':>6} {'coverage':>9} {'worst decile':>13} {'best decile':>12} "
        f"{'width':>7} {'gap excl. 0':>12}")
  for shift in SHIFTS:
    pred, spread = cached_predictions(test, shift)
    corrected = model.correction.apply(pred, ages)
    bounds = cal.intervals(pred, ages, corrected, spread, args.level)
    low, high = bounds["predicted_age_low"], bounds["predicted_age_high"]
    deciles = conformal.coverage_by_bin(low, high, ages, ages, bins=10)
    row = {"mae": float(np.mean(np.abs(pred - ages))),
           "coverage": conformal.coverage(low, high, ages),
           "width": float(np.mean(high - low)),
           "worst_decile": min(r["coverage"] for r in deciles),
           "best_decile": max(r["coverage"] for r in deciles),
           "gap_excludes_zero": float(np.mean(bounds["gap_excludes_zero"])),
           "deciles": deciles}
    result["shifts"][shift] = row
    print(f"{shift:<20} {row['mae']:6.2f} {row['coverage']:9.3f} {row['worst_decile']:13.3f} "
          f"{row['best_decile']:12.3f} {row['width']:7.2f} {row['gap_excludes_zero']:12.3f}")
  print("per age decile (clean): " + ", ".join(
      f"{r['from']:.0f}-{r['to']:.0f}: {r['coverage']:.2f}/{r['width']:.1f}"
      for r in result["shifts"]["clean"]["deciles"]))
  if args.nifti:  # the same test subjects through the one prediction path (brainage predict)
    _nifti_check(args, model, cal, cache, test, result)
  fileio.write_json(args.out / "intervals.json", fileio.jsonable(result))


def _nifti_check(args, model, cal, cache, test, result):
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
