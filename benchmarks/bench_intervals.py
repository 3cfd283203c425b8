"""Calibrated intervals on a trained workdir (issue 22): coverage of the 90% split-conformal
intervals on the held-out test split, overall and per age decile, their mean width, and how
coverage degrades on test scans corrupted by a contrast or noise shift.

Calibration: the workdir's validation split through the one path (`calibration.calibrate`,
from NIfTI as `brainage calibrate`), written to --out (never into the workdir, which may be
read-only). Test scans: the cached cubes of the test split (the model's input as trained),
clean, with a contrast shift (gamma 1.5 of the [0, 1] intensities: GM/WM contrast changes, as
on another scanner) and with Gaussian noise (sd 0.05 of the range); `Ensemble.predict` on them.

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

SHIFTS = ("clean", "contrast_gamma1.5", "noise_sd0.05")


def shifted(volumes: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
  """float32 network inputs `[n, X, Y, Z, C]` of uint8 cubes under a shift."""
  x = volumes.astype(np.float32) / 255.0
  if shift.startswith("contrast"):
    return x ** 1.5
  if shift.startswith("noise"):
    return np.clip(x + rng.normal(0, 0.05, x.shape).astype(np.float32), 0, 1) * (x > 0)
  return x


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", type=Path, required=True)
  p.add_argument("--out", type=Path, required=True)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--level", type=float, default=conformal.LEVEL)
  args = p.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  model = artifact.load(args.workdir)
  t0 = time.perf_counter()
  dataset, source = calibration.calibration_dataset(model)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cal = calibration.calibrate(model, dataset, source=source, batch_size=args.batch_size,
                                workers=2)
  conformal.save_calibration(args.out / conformal.CALIBRATION_FILE, cal)
  calibrate_s = time.perf_counter() - t0
  sub = model.subs[0]
  cache = cache_lib.Cache.open(sub.cache_dir, verify=False)
  parts = splits.subject_parts(args.workdir)
  test = np.array([i for i, s in enumerate(cache.subject_ids) if parts.get(s) == "test"])
  channels = [list(cache.index["sequences"]).index(q) for q in sub.sequences]
  ages = cache.ages[test].astype(np.float64)
  rng = np.random.default_rng(0)
  result = {"workdir": str(args.workdir), "model": artifact.describe(model),
            "calibration": {"n": cal.n, "source": source, "seconds": calibrate_s,
                            "bins": cal.bin_bounds(args.level)["age"],
                            "warnings": [str(w.message) for w in caught]},
            "level": args.level, "n_test": int(len(test)), "shifts": {}}
  print(f"calibrated on {cal.n} validation scans in {calibrate_s:.0f} s; {len(test)} test scans")
  print(f"{'shift':<20} {'MAE':>6} {'coverage':>9} {'worst decile':>13} {'best decile':>12} "
        f"{'width':>7} {'gap excl. 0':>12}")
  for shift in SHIFTS:
    preds = []
    for start in range(0, len(test), 64):
      rows = test[start:start + 64]
      x = shifted(np.asarray(cache.volumes[rows])[..., channels], shift, rng)
      preds.append(model.predict({sub.name: x}, args.batch_size).ensemble)
    pred = np.concatenate(preds).astype(np.float64)
    corrected = model.correction.apply(pred, ages)
    bounds = cal.intervals(pred, ages, corrected, np.zeros_like(pred), args.level)
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
  # The same test subjects through the one prediction path (NIfTI, as brainage predict).
  subjects, prediction, _ = predict.predict_dataset(
      model, _only(dataset, cache, test, source), batch_size=args.batch_size, workers=2)
  b = predict.intervals(prediction, subjects, cal, args.level)
  a = np.array([s.age for s in subjects], np.float64)
  result["predict_path_coverage"] = conformal.coverage(b["predicted_age_low"],
                                                       b["predicted_age_high"], a)
  print(f"predict path (NIfTI): coverage {result['predict_path_coverage']:.3f} over {len(a)}")
  fileio.write_json(args.out / "intervals.json", fileio.jsonable(result))


def _only(dataset, cache, rows, source):
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
