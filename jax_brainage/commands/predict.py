"""`brainage predict`: brain age of new subjects from a trained workdir.

    brainage predict --workdir W --data DIR --out preds.tsv [--checkpoint best|latest]
        [--sequences T1w,...] [--batch-size N] [--workers N] [--session S] [--skip-bad]
        [--entities KEY=VALUE,...] [--participants TSV]
        [--qc-out TSV] [--strict-qc]
        [--calibration DIR] [--level 0.9] [--tta N [--tta-degrees D] [--tta-voxels V]]

The model comes from `artifact.load(W)` (one model or an ensemble, one path); its preprocessing
is that of the cache it was trained on; the TSV's columns are described in
`jax_brainage.predict`. With a calibration (W/calibration.json from `brainage calibrate`, or
`--calibration DIR`, a labelled BIDS dataset calibrated on the fly and not stored) the TSV has
split-conformal intervals at `--level`; subjects of the model's training or validation split
(W/split.json) are marked in the column `split` and named in a warning.

Failures are one line on stderr and exit status 2, with --out left as it was (the previous file
or none; it is written atomically and only on success). That includes a damaged model (a
checkpoint or ensemble store failing its checksums: the file is named) and any predicted age
that is NaN or infinite: then NOTHING is written (no TSV with some rows marked), and the line
names the subjects and the sub-ensemble member (or the head, or the bias correction) that gave
it, since a table with silent "n/a" predictions would read as a success.

`--tta N` (test-time augmentation, `augment.PoseAverage`): every estimate is the mean over N
small rigid poses of the input (the identity and N-1 drawn within +-`--tta-degrees` and
+-`--tta-voxels`, always the same ones). It makes the estimate of a scan brought to the template
by `--align template` nearly independent of the registration's last degree or millimetre (README,
"Preparing your scans"); it costs N forward passes. Intervals hold for predictions made as the
calibration's were: `brainage calibrate --tta` with the same setting (a warning says when they
differ).

The conformity gate (`jax_brainage.data.conformity`): every scan is measured against the
training cache (skull-stripped, tilt, voxel size, intensities, field of view...); the TSV's last
column `qc_flags` holds the reasons a scan lies outside the training data, each such subject
gets a one-line warning on stderr, and the measures go to --qc-out (default: beside --out,
`<name>.qc.tsv`). With --strict-qc a flagged scan is an error instead: exit 2 naming them, and
neither file written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from jax_brainage import calibration, predict
from jax_brainage.data import align, augment, bids, splits
from jax_brainage.ensemble import conformal
from jax_brainage.ensemble import correction as correction_lib
from jax_brainage import fileio
from jax_brainage.commands.prepare import add_layout_options
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.train import artifact


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage predict`."""
  p = subparsers.add_parser(
      "predict", help="predicted age and brain-age gap of new subjects from a trained workdir",
      description="`brainage predict`: brain age of new subjects from a trained workdir.")
  p.add_argument("--workdir", required=True, type=Path,
                 help="training workdir (brainage train): one model, or an ensemble experiment")
  p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                 help="BIDS dataset, fMRIPrep derivatives, FreeSurfer/FastSurfer SUBJECTS_DIR, "
                      "or image files (one subject each, no age)")
  p.add_argument("--out", required=True, type=Path, metavar="TSV", help="predictions to write")
  p.add_argument("--checkpoint", choices=artifact.CHECKPOINTS, default="best",
                 help="best by validation loss (default) or latest (single-model workdirs)")
  p.add_argument("--sequences", default=None,
                 help="comma-separated sequences of the data (default: the model's); must be "
                      "the model's")
  add_layout_options(p)
  p.add_argument("--batch-size", type=int, default=8, help="volumes per model call (8)")
  p.add_argument("--members-per-call", type=int, default=0, metavar="N",
                 help="ensembles: members evaluated per call (0 = all of a sub-ensemble at "
                      "once; fewer bound device memory)")
  p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                 help="threads preprocessing subjects")
  p.add_argument("--skip-bad", action="store_true",
                 help="report and skip subjects with bad data instead of stopping")
  p.add_argument("--align", choices=("template",), default=None,
                 help="register each scan to the template first (scans as acquired; see "
                      "`brainage prepare --align`)")
  p.add_argument("--align-transform", choices=align.TRANSFORMS, default=align.DEFAULT_TRANSFORM,
                 help="with --align: affine (head size normalised) or rigid (head size kept)")
  p.add_argument("--qc-out", type=Path, default=None, metavar="TSV",
                 help="conformity measures and flags per scan (default: beside --out, "
                      "NAME.qc.tsv)")
  p.add_argument("--strict-qc", action="store_true",
                 help="refuse (exit 2, nothing written) when a scan lies outside the training "
                      "data (a non-empty qc_flags) instead of warning")
  p.add_argument("--calibration", nargs="+", default=None, metavar="DIR",
                 help="labelled BIDS dataset to calibrate the intervals on (default: "
                      "W/calibration.json from brainage calibrate, if any)")
  p.add_argument("--level", type=float, default=conformal.LEVEL,
                 help="coverage of the prediction intervals (0.9)")
  add_pose_average_options(p)
  p.set_defaults(func=run)
  return p


def add_pose_average_options(p: argparse.ArgumentParser) -> None:
  """`--tta N`, `--tta-degrees`, `--tta-voxels` (test-time augmentation), for predict and
  calibrate."""
  default = augment.PoseAverage()
  p.add_argument("--tta", type=int, default=default.poses, metavar="N",
                 help="average each estimate over N small rigid poses of the input (1 = off; "
                      "16 for scans aligned with --align template)")
  p.add_argument("--tta-degrees", type=float, default=default.rotate_degrees, metavar="D",
                 help="with --tta: largest rotation about each axis (degrees)")
  p.add_argument("--tta-voxels", type=float, default=default.shift_voxels, metavar="V",
                 help="with --tta: largest shift along each axis (voxels)")


def pose_average(args: argparse.Namespace) -> augment.PoseAverage:
  """The `augment.PoseAverage` of `--tta*` (ConfigError naming the option when out of range)."""
  try:
    return augment.PoseAverage(args.tta, args.tta_degrees, args.tta_voxels)
  except ConfigError as e:
    raise ConfigError(f"--tta {args.tta} --tta-degrees {args.tta_degrees:g} --tta-voxels "
                      f"{args.tta_voxels:g}: {str(e).split(': ', 1)[-1]}") from None


def run(args: argparse.Namespace) -> int:
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
  model = artifact.load(args.workdir, args.checkpoint)
  inputs = predict.model_inputs(model, align=args.align_transform if args.align else None)
  if args.sequences is not None:
    given = bids.parse_sequences(args.sequences)
    if given != inputs.sequences:
      raise DataError(f"--sequences {','.join(given)}: {artifact.describe(model)} needs "
                      f"{','.join(inputs.sequences)} (in that order)")
  if not 0 < args.level < 1:
    raise ConfigError(f"--level {args.level} must lie strictly between 0 and 1")
  poses = pose_average(args)
  cal = None
  if args.calibration:
    cal_data, source = calibration.calibration_dataset(model, args.calibration,
                                                       session=args.session)
    cal = calibration.calibrate(model, cal_data, source=source, batch_size=args.batch_size,
                                workers=args.workers, pose_average=poses)
  elif conformal.calibration_path(args.workdir).is_file():
    cal = conformal.load_calibration(conformal.calibration_path(args.workdir))
  parts = splits.subject_parts(args.workdir) or None
  dataset = predict.read_dataset(args.data, inputs.sequences, session=args.session,
                                 skip_bad=args.skip_bad, entities=args.entities,
                                 participants=args.participants)
  qc: list = []
  subjects, prediction, skipped = predict.predict_dataset(
      model, dataset, batch_size=args.batch_size, workers=args.workers, skip_bad=args.skip_bad,
      inputs=inputs, members_per_call=args.members_per_call, qc=qc, pose_average=poses)
  for sid, why in skipped:
    print(f"skipped {sid}: {why}", file=sys.stderr)
  if not subjects:
    raise DataError(f"{' '.join(map(str, args.data))}: no subject could be predicted")
  try:
    predict.check_finite(model, subjects, prediction)
  except DataError as e:
    raise DataError(f"{e}; {args.out} not written") from None
  qc_out = args.qc_out or args.out.with_name(
      (args.out.name[:-4] if args.out.name.endswith(".tsv") else args.out.name) + ".qc.tsv")
  flagged = [(s, a) for s, a in zip(subjects, qc) if a.flags]
  if flagged and args.strict_qc:
    names = ", ".join(f"{s.subject_id} ({a.text})" for s, a in flagged[:5])
    more = f" and {len(flagged) - 5} more" if len(flagged) > 5 else ""
    raise DataError(f"--strict-qc: {len(flagged)} of {len(subjects)} scans lie outside the "
                    f"training data: {names}{more}; {args.out} not written")
  unchecked = [s for s, a in flagged if a is predict.NO_REFERENCE]
  if unchecked:
    print(f"warning: {len(unchecked)} scans not checked by the conformity gate: "
          f"{predict.NO_REFERENCE.details[0]} (qc_flags 'unchecked')", file=sys.stderr)
  for s, a in flagged:
    if a is not predict.NO_REFERENCE:
      print(f"warning: {s.subject_id}: scan unlike the training data, predicted age "
            f"unreliable: {'; '.join(a.details)}", file=sys.stderr)
  fileio.write_text(qc_out, predict.qc_table(subjects, qc))
  if cal is not None:
    cal.check(args.level, f" ({cal.source})")
    if cal.pose_average != poses.describe():
      made, now = (f"with test-time augmentation ({p})" if p else "without test-time "
                   "augmentation" for p in (cal.pose_average, poses.describe()))
      print(f"warning: the calibration ({cal.source}) was predicted {made}, these {now}: the "
            "intervals may not hold (brainage calibrate with the same --tta)", file=sys.stderr)
  predict.write_predictions(args.out, model, subjects, prediction, qc, calibration=cal,
                            level=args.level, parts=parts)
  seen = {}
  for s in subjects:
    part = (parts or {}).get(s.subject_id)
    if part in ("train", "val"):
      seen.setdefault(part, []).append(s.subject_id)
  if seen:
    print("warning: " + "; ".join(f"{len(ids)} subject(s) of the model's "
                                  f"{'training' if part == 'train' else 'validation'} split "
                                  f"({', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''})"
                                  for part, ids in seen.items())
          + " (column split): their predictions are optimistic", file=sys.stderr)
  line = f"predicted {len(subjects)} subjects with {artifact.describe(model)} -> {args.out}"
  known = np.array([i for i, s in enumerate(subjects) if s.age is not None], int)
  if len(known) > 1:
    ages = np.array([subjects[i].age for i in known], np.float64)
    if artifact.is_single_model(model):
      m = predict.summary_metrics(ages, prediction.ensemble[known])
      line += f"; MAE {m['mae']:.2f} years, r {m['r']:.3f} over {m['n']} with known age"
    else:
      m = correction_lib.gap_metrics(ages, prediction.ensemble[known],
                                     prediction.corrected(ages))
      line += (f"; MAE {m['mae']:.2f} years ({m['mae_corrected']:.2f} "
               f"{model.correction.kind}-corrected), gap-age Spearman "
               f"{m['spearman_gap_age']:.2f} ({m['spearman_gap_age_corrected']:.2f} corrected), "
               f"mean uncertainty {float(np.mean(prediction.spread)):.2f} over {m['n']} with "
               "known age")
  if flagged:
    line += f"; {len(flagged)} flagged by the conformity gate (qc_flags, {qc_out})"
  if cal is not None:
    line += f"; {args.level:.0%} intervals calibrated on {cal.n} scans"
  if poses.enabled:
    line += f"; each estimate averaged over {poses.describe()}"
  print(line)
  return 0
