"""Affine registration of raw scans to the template: JAX (`data.register`) vs ANTsPy, and the
trained model's estimate after `--align template` vs the template-space scan.

    python benchmarks/align.py register --resolution 2 --n 6 [--engines jax,ants] [--polish K]
        [--problems template,pose] [--out FILE]
    python benchmarks/align.py model --workdir W --n 20 [--out FILE]

`register`: simulates `n` subjects as acquired (`simulation.acquisition`, seed 0) and registers
them, for each problem, one at a time (JAX, compile excluded: the first subject is registered
twice), then (template) all in one vmapped call, and with ANTsPy's `Affine`
(`ants.registration`, default settings) on the same NIfTI files; prints the mean displacement
over the template's brain against the true transform and seconds per subject. Problems:
"template" (to the head template; truth `scan_to_template`, the least-squares affine of the
simulator's non-linear warp) and "pose" (to the subject's own template-space image; truth
`scan_to_subject`, exactly the pose and grid change).
`model`: the same subjects of W's cohort (its seed, resolution, sequences) raw and in template
space; predicts both with W's model (`predict.predict_dataset`, the raw ones with alignment)
and prints the mean absolute difference of the estimates (years).

ANTsPy is not a project dependency: `pip install antspyx` (benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from jax_brainage.data import bids, register, simulate
from jax_brainage.data.simulation import acquisition


_CPU: dict[str, float] = {}  # CPU seconds (all threads) of the last call: the machine is shared


def _brain_points(anatomy) -> np.ndarray:
  aff = anatomy.affine
  return np.argwhere(anatomy.brain > 0.5) @ aff[:3, :3].T + aff[:3, 3]


def _raw(cohort, i):
  s = cohort.subject(i, ground_truth=False)
  return acquisition.acquire(s.images, s.brain_mask, cohort.config, cohort.anatomy,
                             cohort.nuisance(i), acquisition.session_rng(cohort.config.seed, i, 0))


def _ants_affine(fixed_path: str, moving_path: str) -> tuple[np.ndarray, float]:
  """ANTsPy Affine registration: (scan -> template world matrix in RAS mm, seconds)."""
  import ants

  fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
  t0, c0 = time.perf_counter(), time.process_time()
  out = ants.registration(fixed, moving, type_of_transform="Affine")
  seconds = time.perf_counter() - t0
  _CPU["ants"] = time.process_time() - c0
  tx = ants.read_transform(out["fwdtransforms"][0])
  p, c = np.asarray(tx.parameters), np.asarray(tx.fixed_parameters)
  a = p[:9].reshape(3, 3)
  fixed_to_moving = np.eye(4)  # ITK: y = A (x - c) + c + t, in LPS physical mm
  fixed_to_moving[:3, :3] = a
  fixed_to_moving[:3, 3] = c - a @ c + p[9:12]
  lps = np.diag([-1.0, -1.0, 1.0, 1.0])
  return np.linalg.inv(lps @ fixed_to_moving @ lps), seconds


def _problems(cohort, i, raw, template, template_affine):
  """The two yardsticks of subject i's raw scan: {name: (fixed, fixed_affine, truth)} with truth
  the scan -> fixed world transform. "template": to the head template, truth `scan_to_template`
  (the least-squares affine of the simulator's non-linear warp, ~2.6 mm off any affine);
  "pose": to the same subject's template-space image (skull-stripped), truth `scan_to_subject`:
  exactly the simulated pose and grid change, so an affine engine can reach it."""
  s = cohort.subject(i, ground_truth=False)
  return {"template": (template, template_affine, raw.scan_to_template),
          "pose": (s.images["T1w"].astype(np.float32), cohort.anatomy.affine,
                   raw.scan_to_subject)}


def run_register(args) -> dict:
  config = simulate.CohortConfig(seed=0, n=max(args.n, 1), resolution_mm=args.resolution,
                                 sequences=("T1w",))
  cohort = simulate.Cohort(config)
  fixed, fixed_affine = acquisition.head_template(cohort.anatomy)
  points = _brain_points(cohort.anatomy)
  raws = [_raw(cohort, i) for i in range(args.n)]
  engines = args.engines.split(",")
  schedule = register.Schedule(polish=args.polish)
  problems = args.problems.split(",")
  rows = []
  for i, raw in enumerate(raws):
    rows.append({"subject": i, "orientation": raw.orientation})
  for name in problems:
    cases = [_problems(cohort, i, raw, fixed, fixed_affine)[name] for i, raw in enumerate(raws)]
    for row, (_, _, truth) in zip(rows, cases):
      row[f"{name}_start_mm"] = acquisition.mean_displacement_mm(
          np.eye(4), np.linalg.inv(truth), points)
    if "jax" in engines:
      f, fa, _ = cases[0]
      register.register([raws[0].images["T1w"]], [raws[0].affine], f, fa, schedule)  # compile
      for row, raw, (f, fa, truth) in zip(rows, raws, cases):
        t0, c0 = time.perf_counter(), time.process_time()
        m, _ = register.register([raw.images["T1w"]], [raw.affine], f, fa, schedule)
        row[f"{name}_jax_seconds"] = time.perf_counter() - t0
        row[f"{name}_jax_cpu_seconds"] = time.process_time() - c0
        row[f"{name}_jax_mm"] = acquisition.mean_displacement_mm(
            np.linalg.inv(m[0]), np.linalg.inv(truth), points)
      if name == "template" and args.n > 1:
        # One vmapped call: every scan resampled onto one shape per level inside `register`.
        t0, c0 = time.perf_counter(), time.process_time()
        batch, _ = register.register([r.images["T1w"] for r in raws], [r.affine for r in raws],
                                     fixed, fixed_affine, schedule)
        for row in rows:
          row["template_jax_batch_seconds_per_subject"] = (time.perf_counter() - t0) / args.n
          row["template_jax_batch_cpu_seconds_per_subject"] = (time.process_time() - c0) / args.n
        for row, m, raw in zip(rows, batch, raws):
          row["template_jax_batch_mm"] = acquisition.mean_displacement_mm(
              np.linalg.inv(m), np.linalg.inv(raw.scan_to_template), points)
    if "ants" in engines:
      with tempfile.TemporaryDirectory() as tmp:
        for row, raw, (f, fa, truth) in zip(rows, raws, cases):
          fixed_path = os.path.join(tmp, f"fixed{row['subject']}.nii.gz")
          nib.save(nib.Nifti1Image(np.asarray(f, np.float32), fa), fixed_path)
          path = os.path.join(tmp, f"scan{row['subject']}.nii.gz")
          nib.save(nib.Nifti1Image(raw.images["T1w"].astype(np.float32), raw.affine), path)
          m, seconds = _ants_affine(fixed_path, path)
          row[f"{name}_ants_seconds"] = seconds
          row[f"{name}_ants_cpu_seconds"] = _CPU["ants"]
          row[f"{name}_ants_mm"] = acquisition.mean_displacement_mm(
              np.linalg.inv(m), np.linalg.inv(truth), points)
        print(json.dumps(rows), flush=True)
  summary = {"resolution_mm": args.resolution, "n": args.n, "polish": args.polish,
             "threads": os.environ.get("XLA_FLAGS", ""), "rows": rows,
             "load_average": os.getloadavg()}
  for key in sorted({k for r in rows for k in r if k not in ("subject", "orientation")}):
    if all(key in r for r in rows):
      summary[f"mean_{key}"] = float(np.mean([r[key] for r in rows]))
  return summary


def run_model(args) -> dict:
  from jax_brainage import predict
  from jax_brainage.train import artifact

  workdir = Path(args.workdir)
  fingerprint = json.loads((workdir / "config.json").read_text())["fingerprint"]
  config = simulate.CohortConfig(
      seed=fingerprint["data.simulate.seed"], n=fingerprint["data.simulate.n"],
      resolution_mm=fingerprint["data.simulate.resolution"],
      sequences=tuple(fingerprint["data.sequences"]))
  cohort = simulate.Cohort(config)
  split = json.loads((workdir / "split.json").read_text())
  # The model's held-out test subjects (ids 'sub-0004' -> cohort index 3).
  test = split.get("subject_ids", {}).get("test", [])
  indices = sorted(int(t.split("-")[-1]) - 1 for t in test)[:args.n] or list(range(args.n))
  model = artifact.load(workdir)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    roots = {k: Path(tmp, k) for k in ("template", "raw")}
    rows = ["participant_id\tage"]
    for i in indices:
      s = cohort.subject(i, ground_truth=False)
      sid = simulate.subject_id(i)
      rows.append(f"{sid}\t{s.age:.4f}")
      for seq in config.sequences:
        path = roots["template"] / sid / "anat" / f"{sid}_{seq}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(s.images[seq].astype(np.int16), s.affine), path)
      acquisition.write_raw_subject(roots["raw"], Path(tmp, "deriv"), sid, s.images,
                                    s.brain_mask, config, cohort.anatomy, cohort.nuisance(i), i,
                                    1, s.age)
    for root in roots.values():
      (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    for kind, root in roots.items():
      inputs = predict.model_inputs(model, align="affine" if kind == "raw" else None)
      data = bids.read_bids(root, inputs.sequences, require_age=False)
      t0 = time.perf_counter()
      subjects, prediction, _ = predict.predict_dataset(model, data, inputs=inputs)
      out[kind] = {"ids": [x.subject_id for x in subjects],
                   "age": [x.age for x in subjects],
                   "predicted": np.asarray(prediction.ensemble, np.float64).tolist(),
                   "seconds": time.perf_counter() - t0}
  diff = np.abs(np.asarray(out["raw"]["predicted"]) - np.asarray(out["template"]["predicted"]))
  return {"workdir": str(workdir), "indices": indices, **out,
          "mean_abs_difference_years": float(diff.mean()),
          "max_abs_difference_years": float(diff.max())}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="mode", required=True)
  r = sub.add_parser("register")
  r.add_argument("--resolution", type=int, default=2)
  r.add_argument("--n", type=int, default=6)
  r.add_argument("--engines", default="jax,ants", help="comma-separated: jax, ants")
  r.add_argument("--problems", default="template,pose",
                 help="comma-separated: template (to the head template), pose (to the "
                 "subject's own template-space image: the exact pose/grid change)")
  r.add_argument("--polish", type=int, default=register.Schedule().polish,
                 help="Levenberg-Marquardt iterations after Adam (register.Schedule.polish)")
  m = sub.add_parser("model")
  m.add_argument("--workdir", required=True)
  m.add_argument("--n", type=int, default=20)
  for q in (r, m):
    q.add_argument("--out", default=None)
  args = p.parse_args(argv)
  result = run_register(args) if args.mode == "register" else run_model(args)
  text = json.dumps(result, indent=1)
  print(text if args.mode == "model" else json.dumps(
      {k: v for k, v in result.items() if k != "rows"}, indent=1))
  if args.mode == "register":
    for row in result["rows"]:
      print("\t".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in row.items()))
  if args.out:
    Path(args.out).write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
