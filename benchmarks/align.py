"""Affine registration of raw scans to the template: JAX (`data.register`) vs ANTsPy, and the
trained model's estimate after `--align template` vs the template-space scan.

    python benchmarks/align.py register --resolution 2 --n 6 [--engines jax,ants] [--polish K]
        [--metric ncc,mi,mi@jitter=0.5] [--problems template,pose] [--out FILE]
    python benchmarks/align.py model --workdir W --n 20 [--offset K] [--out FILE]

`register`: simulates `n` subjects as acquired (`simulation.acquisition`, seed 0) and registers
them, for each problem, one at a time (JAX with each `--metric`, compile excluded: the first
subject is registered twice), then (template) all in one vmapped call (compiled by a first
call), and with ANTsPy's `Affine`
(`ants.registration`, default settings) on the same NIfTI files; prints the mean displacement
over the template's brain against the true transform and seconds per subject. Problems:
"template" (to the head template; truth `scan_to_template`, the least-squares affine of the
simulator's non-linear warp) and "pose" (to the subject's own template-space image; truth
`scan_to_subject`, exactly the pose and grid change).
`model`: W's held-out test subjects (its cohort's seed, resolution, sequences) in template space
and as acquired (`acquisition.acquire`); each raw scan through `align.to_template` with the TRUE
transform or the JAX registration and the subject's own mask, the refined mask or the carried
template mask (`MODEL_ROWS`), then W's preprocessing, exactly the cube `predict --align template`
makes; prints per row the mean absolute difference (years) of W's estimates from the
template-space estimates, the registration error (mm) and the masks' Dice against the true brain.

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
  metrics = args.metric.split(",")
  problems = args.problems.split(",")
  rows = []
  for i, raw in enumerate(raws):
    rows.append({"subject": i, "orientation": raw.orientation})
  for name in problems:
    cases = [_problems(cohort, i, raw, fixed, fixed_affine)[name] for i, raw in enumerate(raws)]
    for row, (_, _, truth) in zip(rows, cases):
      row[f"{name}_start_mm"] = acquisition.mean_displacement_mm(
          np.eye(4), np.linalg.inv(truth), points)
    for spec in metrics if "jax" in engines else ():
      # "mi@jitter=0.5@sampling=0.25": the metric, then other Schedule fields.
      metric, *fields = spec.split("@")
      jax_key = "_".join([f"jax_{metric}"] + [f.replace("=", "") for f in fields])
      schedule = register.Schedule(
          polish=args.polish if metric == "ncc" else 0, metric=metric,
          **{k: float(v) for k, v in (f.split("=") for f in fields)})
      f, fa, _ = cases[0]
      register.register([raws[0].images["T1w"]], [raws[0].affine], f, fa, schedule)  # compile
      for row, raw, (f, fa, truth) in zip(rows, raws, cases):
        t0, c0 = time.perf_counter(), time.process_time()
        m, _ = register.register([raw.images["T1w"]], [raw.affine], f, fa, schedule)
        row[f"{name}_{jax_key}_seconds"] = time.perf_counter() - t0
        row[f"{name}_{jax_key}_cpu_seconds"] = time.process_time() - c0
        row[f"{name}_{jax_key}_mm"] = acquisition.mean_displacement_mm(
            np.linalg.inv(m[0]), np.linalg.inv(truth), points)
      if name == "template" and args.n > 1 and not args.no_batch:
        # One vmapped call: every scan resampled onto one shape per level inside `register`
        # (compiled once for this batch size first: the steady cost per subject).
        images, affines = [r.images["T1w"] for r in raws], [r.affine for r in raws]
        register.register(images, affines, fixed, fixed_affine, schedule)
        t0, c0 = time.perf_counter(), time.process_time()
        batch, _ = register.register(images, affines, fixed, fixed_affine, schedule)
        for row in rows:
          row[f"template_{jax_key}_batch_seconds_per_subject"] = (
              time.perf_counter() - t0) / args.n
          row[f"template_{jax_key}_batch_cpu_seconds_per_subject"] = (
              time.process_time() - c0) / args.n
        for row, m, raw in zip(rows, batch, raws):
          row[f"template_{jax_key}_batch_mm"] = acquisition.mean_displacement_mm(
              np.linalg.inv(m), np.linalg.inv(raw.scan_to_template), points)
      print(json.dumps(rows), flush=True)
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
             "metrics": metrics,
             "threads": os.environ.get("XLA_FLAGS", ""), "rows": rows,
             "load_average": os.getloadavg()}
  for key in sorted({k for r in rows for k in r if k not in ("subject", "orientation")}):
    if all(key in r for r in rows):
      summary[f"mean_{key}"] = float(np.mean([r[key] for r in rows]))
  return summary


# Model-check rows: (name, transform: "true_subject" | "true_template" | "registered",
# mask: "own" | "refined" | "template", spline order of acquisition and alignment).
MODEL_ROWS = (
    ("true transform (pose undone) + own mask", "true_subject", "own", 3),
    ("true transform (pose undone) + own mask, trilinear (session 10)", "true_subject", "own", 1),
    ("true scan_to_template + own mask", "true_template", "own", 3),
    ("registration + own mask", "registered", "own", 3),
    ("registration + refined mask, threshold 0.5", "registered", "refined@0.5", 3),
    ("registration + refined mask (default, threshold 0.6)", "registered", "refined", 3),
    ("registration + carried template mask", "registered", "template", 3),
)


def _aligned_cube(view, raw, sequences, transform, masking, order, anatomy):
  """One raw scan through `align.to_template` (known or registered transform), then the view's
  preprocessing (template grid): the cube `predict_dataset` would make."""
  from jax_brainage.data import align, nifti, skullstrip

  masking, _, threshold = masking.partition("@")
  refinement = skullstrip.Refinement(**({"threshold": float(threshold)} if threshold else {}))
  images = [nifti.make_image(raw.images[q].astype(np.float32), raw.affine) for q in sequences]
  own = nifti.make_image(raw.brain_mask.astype(np.uint8), raw.affine)
  if order == 3:
    a = align.to_template(images, sequences, mask=own if masking == "own" else None,
                          scan_to_template=transform, refinement=refinement,
                          masking=masking if masking != "own" else "refined")
    imgs, mask = a.images, a.mask
  else:  # session 10's resampling: trilinear images, nearest-neighbour mask
    shape, aff = anatomy.shape, np.asarray(anatomy.affine, np.float64)
    imgs = [nifti.make_image(align.resample_image(img.dataobj, img.affine, shape, aff, transform,
                                                  order=1), aff) for img in images]
    mask = nifti.make_image(acquisition.regrid(raw.brain_mask.astype(np.uint8), raw.affine,
                                               shape, aff, transform, order=0), aff)
  cube, _ = view.preprocess(dict(zip(sequences, imgs)), mask=mask)
  return cube


def run_model(args) -> dict:
  from jax_brainage import predict
  from jax_brainage.data import align, skullstrip
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
  # --offset skips the first test subjects (e.g. those a setting was chosen on).
  held_out = sorted(int(t.split("-")[-1]) - 1 for t in test)
  indices = held_out[args.offset:args.offset + args.n] or list(range(args.n))
  model = artifact.load(workdir)
  inputs = predict.model_inputs(model)  # template-space preprocessing; alignment done here
  key, view = next(iter(inputs.views.items()))
  sequences = tuple(view.sequences)
  anatomy = cohort.anatomy
  shape, aff = anatomy.shape, np.asarray(anatomy.affine, np.float64)
  cubes: dict[str, list] = {"template": []}
  dice: dict[str, list] = {"refined": [], "template": []}
  registered_mm, ages, seconds = [], [], []
  for i in indices:
    s = cohort.subject(i, ground_truth=False)
    ages.append(float(s.age))
    cube, _ = view.preprocess({q: nifti_image(s.images[q], s.affine) for q in sequences})
    cubes["template"].append(cube)
    raws = {o: acquisition.acquire(s.images, s.brain_mask, config, anatomy, cohort.nuisance(i),
                                   acquisition.session_rng(config.seed, i, 0), order=o)
            for o in (1, 3)}
    raw = raws[3]
    t0 = time.perf_counter()
    ref = [nifti_image(raw.images[sequences[0]], raw.affine)]
    m = align.to_template(ref, sequences[:1], mask=ref[0]).scan_to_template  # registered once
    seconds.append(time.perf_counter() - t0)
    registered_mm.append(acquisition.mean_displacement_mm(
        np.linalg.inv(m), np.linalg.inv(raw.scan_to_template), _brain_points(anatomy)))
    transforms = {"true_subject": raw.scan_to_subject, "true_template": raw.scan_to_template,
                  "registered": m}
    for name, how, masking, order in MODEL_ROWS:
      cubes.setdefault(name, []).append(
          _aligned_cube(view, raws[order], sequences, transforms[how], masking, order, anatomy))
    # Masks against the subject's true brain, on the template grid through the registration.
    truth = align.carry_mask(raw.brain_mask, raw.affine, shape, aff, m)
    image = align.resample_image(raw.images[sequences[0]], raw.affine, shape, aff, m)
    carried = anatomy.brain > 0.5
    dice["template"].append(skullstrip.dice(carried, truth))
    dice["refined"].append(skullstrip.dice(skullstrip.refine_mask(
        image, carried, [anatomy.resolution_mm] * 3), truth))
    print(f"subject {i}: registered {registered_mm[-1]:.2f} mm, Dice refined "
          f"{dice['refined'][-1]:.3f} template {dice['template'][-1]:.3f}", flush=True)
  predicted = {}
  for name, cs in cubes.items():
    volumes = inputs.volumes(model, {key: np.stack(cs)})
    predicted[name] = np.asarray(model.predict(volumes).ensemble, np.float64)
  base = predicted["template"]
  rows = []
  for name, p in predicted.items():
    d = p - base
    rows.append({"row": name, "mean_abs_difference_years": float(np.abs(d).mean()),
                 "mean_difference_years": float(d.mean()),
                 "max_abs_difference_years": float(np.abs(d).max()),
                 "mae_vs_age_years": float(np.abs(p - np.asarray(ages)).mean())})
  return {"workdir": str(workdir), "indices": indices, "ages": ages, "rows": rows,
          "predicted": {k: v.tolist() for k, v in predicted.items()},
          "registration_mm": float(np.mean(registered_mm)),
          "registration_seconds_per_subject": float(np.mean(seconds)),
          "dice_refined": float(np.mean(dice["refined"])),
          "dice_refined_min": float(np.min(dice["refined"])),
          "dice_template": float(np.mean(dice["template"])),
          "dice_template_min": float(np.min(dice["template"])),
          "load_average": os.getloadavg()}


def nifti_image(data, affine):
  from jax_brainage.data import nifti

  return nifti.make_image(np.asarray(data, np.float32), np.asarray(affine, np.float64))


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
                 help="Levenberg-Marquardt iterations after Adam (register.Schedule.polish; "
                 "ncc only)")
  r.add_argument("--metric", default="ncc,mi",
                 help="comma-separated JAX similarities (register.Schedule.metric): ncc, mi; "
                 "NAME@FIELD=V[@...]: other float register.Schedule fields, e.g. "
                 "mi@jitter=0.5@sampling=0.25")
  r.add_argument("--no-batch", action="store_true", help="skip the vmapped batch call")
  m = sub.add_parser("model")
  m.add_argument("--workdir", required=True)
  m.add_argument("--n", type=int, default=20)
  m.add_argument("--offset", type=int, default=0,
                 help="skip this many of the sorted test subjects first")
  for q in (r, m):
    q.add_argument("--out", default=None)
  args = p.parse_args(argv)
  result = run_register(args) if args.mode == "register" else run_model(args)
  text = json.dumps(result, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "predicted")},
                   indent=1))
  for row in result["rows"]:
    print("\t".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()))
  if args.out:
    Path(args.out).write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
