"""Registration of raw scans to the template: JAX (`data.register`) vs ANTsPy, and the trained
model's estimate after `--align template` vs the template-space scan.

    python benchmarks/align.py register --resolution 2 --n 6 [--engines jax,ants] [--polish K]
        [--metric ncc,mi,mi@jitter=0.5] [--problems template,pose] [--transform affine|rigid]
        [--out FILE]
    python benchmarks/align.py model --workdir W --n 20 [--offset K] [--tta N] [--out FILE]

`register`: simulates `n` subjects as acquired (`simulation.acquisition`, seed 0) and registers
them, for each problem, one at a time (JAX with each `--metric`, compile excluded: the first
subject is registered twice), then (template) all in one vmapped call (compiled by a first
call), and with ANTsPy's `Affine`
(`ants.registration`, default settings) on the same NIfTI files; prints the mean displacement
over the template's brain against the true transform and seconds per subject. Problems:
"template" (to the head template; truth `scan_to_template`, the least-squares affine of the
simulator's non-linear warp) and "pose" (to the subject's own template-space image; truth
`scan_to_subject`, exactly the pose and grid change). `--transform rigid`: the rigid part of the
JAX registration (`align.rigid_part`, what `align.to_template(transform="rigid")` keeps) and
ANTs' `Rigid`, against `scan_to_subject` for both problems, and for "template" also against the
rigid part of `scan_to_template` (the subject's own small misalignment, which no registration
can tell from the pose, is in that one only).
`model`: W's held-out test subjects (its cohort's seed, resolution, sequences) in template space
and as acquired (`acquisition.acquire`); each raw scan through `align.to_template` with the TRUE
transform or the JAX registration (all of it, "affine", or its rigid part, "rigid"), and the
subject's own mask, the refined mask or the carried template mask (`MODEL_ROWS`), then W's
preprocessing, exactly the cube `predict --align template` makes; prints per row the mean
absolute difference (years) of W's estimates from the template-space estimates, the
registration errors (mm: affine vs scan_to_template, rigid vs the pose and vs the rigid part of
scan_to_template) and the masks' Dice against the true brain. `--tta N`: every estimate (the
template-space one too) averaged over N poses, as `brainage predict --tta N`.

ANTsPy is not a project dependency: `pip install antspyx` (benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from jax_brainage.data import align, augment, bids, register, simulate
from jax_brainage.data.simulation import acquisition, render


_CPU: dict[str, float] = {}  # CPU seconds (all threads) of the last call: the machine is shared


def _brain_points(anatomy) -> np.ndarray:
  aff = anatomy.affine
  return np.argwhere(anatomy.brain > 0.5) @ aff[:3, :3].T + aff[:3, 3]


def _raw(cohort, i):
  s = cohort.subject(i, ground_truth=False)
  return acquisition.acquire(s.images, s.brain_mask, cohort.config, cohort.anatomy,
                             cohort.nuisance(i), acquisition.session_rng(cohort.config.seed, i, 0))


def _ants_affine(fixed_path: str, moving_path: str, kind: str = "Affine"
                 ) -> tuple[np.ndarray, float]:
  """ANTsPy registration of type `kind` ("Affine" or "Rigid"): (scan -> template world matrix
  in RAS mm, seconds)."""
  import ants

  fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
  t0, c0 = time.perf_counter(), time.process_time()
  out = ants.registration(fixed, moving, type_of_transform=kind)
  seconds = time.perf_counter() - t0
  _CPU["ants"] = time.process_time() - c0
  tx = ants.read_transform(out["fwdtransforms"][0])
  fixed_to_moving = np.eye(4)  # ITK: y = A (x - c) + c + t, in LPS physical mm
  if kind == "Affine":
    p, c = np.asarray(tx.parameters), np.asarray(tx.fixed_parameters)
    a = p[:9].reshape(3, 3)
    fixed_to_moving[:3, :3] = a
    fixed_to_moving[:3, 3] = c - a @ c + p[9:12]
  else:  # any linear transform: the matrix from where it sends the origin and the unit axes
    x = np.vstack([np.zeros(3), np.eye(3)])
    y = np.array([tx.apply_to_point(tuple(v)) for v in x], np.float64)
    fixed_to_moving[:3, :3] = (y[1:] - y[0]).T
    fixed_to_moving[:3, 3] = y[0]
  lps = np.diag([-1.0, -1.0, 1.0, 1.0])
  return np.linalg.inv(lps @ fixed_to_moving @ lps), seconds


def _problems(cohort, i, raw, template, template_affine, rigid=False):
  """The two yardsticks of subject i's raw scan: {name: (fixed, fixed_affine, truth)} with truth
  the scan -> fixed world transform. "template": to the head template, truth `scan_to_template`
  (the least-squares affine of the simulator's non-linear warp, ~2.6 mm off any affine), or
  with `rigid` `scan_to_subject` (the pose: what a rigid alignment is meant to undo);
  "pose": to the same subject's template-space image (skull-stripped), truth `scan_to_subject`:
  exactly the simulated pose and grid change, so an affine engine can reach it."""
  s = cohort.subject(i, ground_truth=False)
  return {"template": (template, template_affine,
                       raw.scan_to_subject if rigid else raw.scan_to_template),
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
  rigid = args.transform == "rigid"
  centre = np.asarray(cohort.anatomy.centre_mm, np.float64)

  def kept(m):  # what `align.to_template(transform=...)` keeps of a registration
    return align.rigid_part(m, centre) if rigid else m
  problems = args.problems.split(",")
  rows = []
  for i, raw in enumerate(raws):
    rows.append({"subject": i, "orientation": raw.orientation})
  for name in problems:
    cases = [_problems(cohort, i, raw, fixed, fixed_affine, rigid)[name]
             for i, raw in enumerate(raws)]
    for row, (_, _, truth) in zip(rows, cases):
      row[f"{name}_start_mm"] = acquisition.mean_displacement_mm(
          np.eye(4), np.linalg.inv(truth), points)
    if rigid and name == "template":  # the rigid truth a registration can reach
      rigid_truths = [align.rigid_part(r.scan_to_template, centre) for r in raws]
      for row, raw, t in zip(rows, raws, rigid_truths):
        row["template_rigid_truth_vs_pose_mm"] = acquisition.mean_displacement_mm(
            np.linalg.inv(t), np.linalg.inv(raw.scan_to_subject), points)
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
        m = kept(m[0])
        row[f"{name}_{jax_key}_seconds"] = time.perf_counter() - t0
        row[f"{name}_{jax_key}_cpu_seconds"] = time.process_time() - c0
        row[f"{name}_{jax_key}_mm"] = acquisition.mean_displacement_mm(
            np.linalg.inv(m), np.linalg.inv(truth), points)
        if rigid and name == "template":
          row[f"template_{jax_key}_mm_vs_rigid_truth"] = acquisition.mean_displacement_mm(
              np.linalg.inv(m), np.linalg.inv(rigid_truths[row["subject"]]), points)
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
        for row, m, (_, _, truth) in zip(rows, batch, cases):
          row[f"template_{jax_key}_batch_mm"] = acquisition.mean_displacement_mm(
              np.linalg.inv(kept(m)), np.linalg.inv(truth), points)
      print(json.dumps(rows), flush=True)
    if "ants" in engines:
      with tempfile.TemporaryDirectory() as tmp:
        for row, raw, (f, fa, truth) in zip(rows, raws, cases):
          fixed_path = os.path.join(tmp, f"fixed{row['subject']}.nii.gz")
          nib.save(nib.Nifti1Image(np.asarray(f, np.float32), fa), fixed_path)
          path = os.path.join(tmp, f"scan{row['subject']}.nii.gz")
          nib.save(nib.Nifti1Image(raw.images["T1w"].astype(np.float32), raw.affine), path)
          m, seconds = _ants_affine(fixed_path, path, "Rigid" if rigid else "Affine")
          row[f"{name}_ants_seconds"] = seconds
          row[f"{name}_ants_cpu_seconds"] = _CPU["ants"]
          row[f"{name}_ants_mm"] = acquisition.mean_displacement_mm(
              np.linalg.inv(m), np.linalg.inv(truth), points)
          if rigid and name == "template":
            row["template_ants_mm_vs_rigid_truth"] = acquisition.mean_displacement_mm(
                np.linalg.inv(m), np.linalg.inv(rigid_truths[row["subject"]]), points)
        print(json.dumps(rows), flush=True)
  summary = {"resolution_mm": args.resolution, "n": args.n, "polish": args.polish,
             "transform": args.transform, "metrics": metrics,
             "threads": os.environ.get("XLA_FLAGS", ""), "rows": rows,
             "load_average": os.getloadavg()}
  for key in sorted({k for r in rows for k in r if k not in ("subject", "orientation")}):
    if all(key in r for r in rows):
      summary[f"mean_{key}"] = float(np.mean([r[key] for r in rows]))
  return summary


# Model-check rows: (name, transform: "true_subject" | "true_template" | "registered" (the JAX
# rigid+affine registration), what `align.to_template` keeps of it: "affine" (all) | "rigid"
# (`align.rigid_part`), mask: "own" | "refined[@threshold]" | "template", spline order of
# acquisition and alignment). The affine rows keep their session-11 names.
MODEL_ROWS = (
    ("true transform (pose undone) + own mask", "true_subject", "affine", "own", 3),
    ("true transform (pose undone) + own mask, trilinear (session 10)", "true_subject", "affine",
     "own", 1),
    ("true scan_to_template + own mask", "true_template", "affine", "own", 3),
    ("rigid part of the true scan_to_template + own mask", "true_template", "rigid", "own", 3),
    ("registration + own mask", "registered", "affine", "own", 3),
    ("registration + refined mask, threshold 0.5", "registered", "affine", "refined@0.5", 3),
    ("registration + refined mask (default, threshold 0.6)", "registered", "affine", "refined",
     3),
    ("registration + carried template mask", "registered", "affine", "template", 3),
    ("rigid registration + own mask", "registered", "rigid", "own", 3),
    ("rigid registration + refined mask (default threshold)", "registered", "rigid", "refined",
     3),
)


FLOOR_ROW = "template-space render without the subject's own rigid misalignment"


def _aligned_cube(view, raw, sequences, transform, kept, masking, order, anatomy):
  """One raw scan through `align.to_template` (known or registered transform `[4, 4]`, of which
  `kept` "affine" | "rigid"), then the view's preprocessing (template grid): the cube
  `predict_dataset` would make."""
  from jax_brainage.data import nifti, skullstrip

  masking, _, threshold = masking.partition("@")
  refinement = skullstrip.Refinement(**({"threshold": float(threshold)} if threshold else {}))
  images = [nifti.make_image(raw.images[q].astype(np.float32), raw.affine) for q in sequences]
  own = nifti.make_image(raw.brain_mask.astype(np.uint8), raw.affine)
  if order == 3:
    a = align.to_template(images, sequences, mask=own if masking == "own" else None,
                          scan_to_template=transform, transform=kept, refinement=refinement,
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
  from jax_brainage.data import skullstrip
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
  dice: dict[str, list] = {"refined": [], "template": [], "rigid_refined": []}
  # Registration error (mm): the affine against the true scan_to_template; its rigid part
  # against the true pose (scan_to_subject) and against the rigid part of the true
  # scan_to_template (the subject's own small misalignment, cohort.md, is in that one only).
  registered_mm: dict[str, list] = {"affine": [], "rigid": [], "rigid_vs_rigid_truth": []}
  seconds, true_rigid_vs_pose, ages = [], [], []
  centre = np.asarray(anatomy.centre_mm, np.float64)
  points = _brain_points(anatomy)
  for i in indices:
    s = cohort.subject(i, ground_truth=False)
    ages.append(float(s.age))
    cube, _ = view.preprocess({q: nifti_image(s.images[q], s.affine) for q in sequences})
    cubes["template"].append(cube)
    # The floor of any registration to the template: the same person rendered by the simulator
    # without its own small rigid misalignment (cohort.md), which every registration undoes
    # with the pose (no registration can tell the two apart); no resampling at all.
    p = cohort.participants(i)
    still = dataclasses.replace(cohort.nuisance(i), rotation_deg=np.zeros(3),
                                translation_mm=np.zeros(3))
    aligned = render.render(config, anatomy, float(p.brain_age[0]), float(p.risk_shift[0]),
                            still, ground_truth=False)
    cube, _ = view.preprocess({q: nifti_image(aligned.images[q], s.affine) for q in sequences},
                              mask=nifti_image(aligned.brain_mask, s.affine))
    cubes.setdefault(FLOOR_ROW, []).append(cube)
    if args.floor_only:
      continue
    raws = {o: acquisition.acquire(s.images, s.brain_mask, config, anatomy, cohort.nuisance(i),
                                   acquisition.session_rng(config.seed, i, 0), order=o)
            for o in (1, 3)}
    raw = raws[3]
    t0 = time.perf_counter()
    ref = [nifti_image(raw.images[sequences[0]], raw.affine)]
    # Registered once (mask=ref: no mask refinement); "rigid" keeps its rigid part.
    m = align.to_template(ref, sequences[:1], mask=ref[0], transform="affine").scan_to_template
    seconds.append(time.perf_counter() - t0)
    rigid, true_rigid = (align.rigid_part(t, centre) for t in (m, raw.scan_to_template))

    def error(a, b):
      return acquisition.mean_displacement_mm(np.linalg.inv(a), np.linalg.inv(b), points)

    registered_mm["affine"].append(error(m, raw.scan_to_template))
    registered_mm["rigid"].append(error(rigid, raw.scan_to_subject))
    registered_mm["rigid_vs_rigid_truth"].append(error(rigid, true_rigid))
    true_rigid_vs_pose.append(error(true_rigid, raw.scan_to_subject))
    transforms = {"true_subject": raw.scan_to_subject, "true_template": raw.scan_to_template,
                  "registered": m}
    for name, how, kept, masking, order in MODEL_ROWS:
      cubes.setdefault(name, []).append(_aligned_cube(
          view, raws[order], sequences, transforms[how], kept, masking, order, anatomy))
    # Masks against the subject's true brain, on the template grid through each alignment; the
    # template's brain placed by the affine (as `align.to_template` does for "rigid" too).
    carried = anatomy.brain > 0.5
    for t, which in ((m, "refined"), (rigid, "rigid_refined")):
      truth = align.carry_mask(raw.brain_mask, raw.affine, shape, aff, t)
      image = align.resample_image(raw.images[sequences[0]], raw.affine, shape, aff, t)
      fitted = align.carry_mask(carried, aff, shape, aff, t @ np.linalg.inv(m))
      if t is m:
        dice["template"].append(skullstrip.dice(carried, truth))
      dice[which].append(skullstrip.dice(skullstrip.refine_mask(
          image, fitted, [anatomy.resolution_mm] * 3), truth))
    print(f"subject {i}: affine {registered_mm['affine'][-1]:.2f} mm (scan_to_template), rigid "
          f"{registered_mm['rigid'][-1]:.2f} mm (pose) "
          f"{registered_mm['rigid_vs_rigid_truth'][-1]:.2f} mm (true rigid part), Dice refined "
          f"affine {dice['refined'][-1]:.3f} rigid {dice['rigid_refined'][-1]:.3f}, template "
          f"{dice['template'][-1]:.3f}", flush=True)
  predicted = {}
  # Test-time augmentation (`predict --tta`), the same poses for every row and the template.
  poses = augment.PoseAverage(args.tta, args.tta_degrees, args.tta_voxels)
  for name, cs in cubes.items():
    volumes = inputs.volumes(model, {key: np.stack(cs)})
    predicted[name] = np.asarray(model.predict(volumes, pose_average=poses).ensemble, np.float64)
  base = predicted["template"]
  rows = []
  for name, p in predicted.items():
    d = p - base
    rows.append({"row": name, "mean_abs_difference_years": float(np.abs(d).mean()),
                 "mean_difference_years": float(d.mean()),
                 "max_abs_difference_years": float(np.abs(d).max()),
                 "mae_vs_age_years": float(np.abs(p - np.asarray(ages)).mean())})
  out = {"workdir": str(workdir), "indices": indices, "ages": ages, "rows": rows,
         "pose_average": poses.describe(),
         "predicted": {k: v.tolist() for k, v in predicted.items()},
         "load_average": os.getloadavg()}
  if args.floor_only:
    return out
  return {**out,
          "registration_mm": float(np.mean(registered_mm["affine"])),
          "registration_seconds_per_subject": float(np.mean(seconds)),
          "rigid_registration_mm_vs_pose": float(np.mean(registered_mm["rigid"])),
          "rigid_registration_mm_vs_pose_max": float(np.max(registered_mm["rigid"])),
          "rigid_registration_mm_vs_rigid_truth": float(
              np.mean(registered_mm["rigid_vs_rigid_truth"])),
          "true_rigid_mm_vs_pose": float(np.mean(true_rigid_vs_pose)),
          "registration_mm_per_subject": registered_mm,
          "dice_refined": float(np.mean(dice["refined"])),
          "dice_refined_min": float(np.min(dice["refined"])),
          "dice_rigid_refined": float(np.mean(dice["rigid_refined"])),
          "dice_rigid_refined_min": float(np.min(dice["rigid_refined"])),
          "dice_template": float(np.mean(dice["template"])),
          "dice_template_min": float(np.min(dice["template"]))}


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
  r.add_argument("--transform", choices=("affine", "rigid"), default="affine",
                 help="rigid: keep the registration's rigid part (align.rigid_part), scored "
                 "against the pose (scan_to_subject) and the rigid part of scan_to_template; "
                 "ANTs runs its Rigid")
  m = sub.add_parser("model")
  m.add_argument("--workdir", required=True)
  m.add_argument("--n", type=int, default=20)
  m.add_argument("--offset", type=int, default=0,
                 help="skip this many of the sorted test subjects first")
  m.add_argument("--tta", type=int, default=1, metavar="N",
                 help="every estimate averaged over N poses (brainage predict --tta)")
  m.add_argument("--tta-degrees", type=float, default=augment.PoseAverage().rotate_degrees)
  m.add_argument("--tta-voxels", type=float, default=augment.PoseAverage().shift_voxels)
  m.add_argument("--floor-only", action="store_true",
                 help="only the floor row (no acquisition, no registration: fast)")
  for q in (r, m):
    q.add_argument("--out", default=None)
  args = p.parse_args(argv)
  result = run_register(args) if args.mode == "register" else run_model(args)
  text = json.dumps(result, indent=1)
  skip = ("rows", "predicted", "registration_mm_per_subject")
  print(json.dumps({k: v for k, v in result.items() if k not in skip},
                   indent=1))
  for row in result["rows"]:
    print("\t".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()))
  if args.out:
    Path(args.out).write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
