"""`brainage prepare`: one pass over NIfTI files into a compact, memory-mapped cache.

    brainage prepare --data DIR --out CACHE [--sequences T1w,FLAIR] [--shape 98,98,98]
        [--voxel-size MM] [--scaling minmax|zscore|mean] [--ceiling-percentile P] [--bias-sigma MM]
        [--regions LABELS --atlas FILE] [--mask-suffix SUFFIX | --mask PATTERN] [--session S]
        [--entities KEY=VALUE,...] [--participants TSV] [--workers N]
        [--age-range MIN,MAX] [--no-resample-oblique] [--align template
        [--align-transform affine|rigid]] [--skip-bad] [--quiet]

The work is `jax_brainage.data.prepare.prepare` with a `Preprocessing` record made of the options
(`jax_brainage.data.preprocess` says what happens to each subject; `cache` the cache's layout).
`--data` is a BIDS dataset (with sessions: one row each), fMRIPrep derivatives, a FreeSurfer or
FastSurfer SUBJECTS_DIR (`jax_brainage.data.layouts`), or a list of image files (one subject
each, no age). Prints the layout and the cache's size, and on stderr skipped subjects, brains the cube
crops, and the subjects outside the conformity gate's range calibrated on the cache itself
(CACHE/qc.tsv: outliers of the training data, worth a look before training).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from jax_brainage.data import align, bids, conformity, intensity, layouts, regions
from jax_brainage.data.prepare import prepare
from jax_brainage.data.preprocess import Preprocessing
from jax_brainage.errors import ConfigError


def _shape_arg(text: str) -> tuple[int, int, int]:
  """argparse type of --shape: "N" (a cube) or "X,Y,Z" positive voxel counts."""
  try:
    sizes = tuple(int(s) for s in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected N or X,Y,Z voxels, got {text!r}") from None
  if len(sizes) == 1:
    sizes = sizes * 3
  if len(sizes) != 3 or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f"expected N or X,Y,Z positive voxels, got {text!r}")
  return sizes


def add_layout_options(p: argparse.ArgumentParser) -> None:
  """--session, --entities and --participants: how rows and images are chosen in --data (shared
  by prepare, predict and explain)."""
  p.add_argument("--session", default=None,
                 help="use images of ses-SESSION only (default: every session is a row)")
  p.add_argument("--entities", default=None, metavar="KEY=VALUE,...",
                 help="pick among several images by BIDS entities, e.g. space=MNI152NLin2009cAsym,"
                      "desc=preproc or acq=mprage,run=2 (value 'none': without the entity); "
                      "default: native (no space-) for BIDS, MNI152NLin2009cAsym desc-preproc "
                      "for fMRIPrep, then the lowest run")
  p.add_argument("--participants", default=None, metavar="TSV",
                 help="participants table (participant_id, age, ...[, session_id]) for layouts "
                      "without one: fMRIPrep derivatives, FreeSurfer/FastSurfer SUBJECTS_DIRs")


def with_masks(dataset: bids.Dataset, pattern: str) -> bids.Dataset:
  """`dataset` with every subject's mask at `pattern` ({subject}: its id); a missing file or a
  single file for several subjects is a one-line ConfigError naming it."""
  if "{subject}" not in pattern and len(dataset.subjects) != 1:
    raise ConfigError(f"--mask {pattern}: one file for {len(dataset.subjects)} subjects; use "
                      "{subject} in the path")
  subjects = []
  for s in dataset.subjects:
    path = pattern.replace("{subject}", s.subject_id)
    if not Path(path).is_file():
      raise ConfigError(f"--mask {pattern}: {path} ({s.subject_id}) does not exist")
    subjects.append(dataclasses.replace(s, mask=path))
  return dataclasses.replace(dataset, subjects=tuple(subjects))


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage prepare`."""
  p = subparsers.add_parser(
      "prepare", help="preprocess a BIDS dataset into a memory-mapped cube cache",
      description=__doc__.split("\n\n")[0] + " Cube shape default: 98^3 at 2 mm, 198^3 at 1 mm, "
      "else the smallest even side holding 198 mm.")
  p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                 help="BIDS dataset (participants.tsv + sub-*/[ses-*/]anat/), fMRIPrep "
                      "derivatives, FreeSurfer/FastSurfer SUBJECTS_DIR, or image files (one "
                      "subject each, no age)")
  p.add_argument("--out", required=True, metavar="CACHE", help="cache directory to write")
  p.add_argument("--sequences", default="T1w", help="comma-separated, channel order (T1w)")
  p.add_argument("--shape", type=_shape_arg, default=None,
                 help="cube shape N or X,Y,Z (default from the voxel size)")
  p.add_argument("--voxel-size", type=float, default=None, metavar="MM",
                 help="resample to isotropic MM voxels (default: keep; all must agree)")
  p.add_argument("--scaling", choices=intensity.SCALINGS, default="minmax",
                 help="minmax: clip + min-max to uint8; zscore: within the brain, float16")
  p.add_argument("--ceiling-percentile", type=float, default=intensity.DEFAULT_CEILING_PERCENTILE,
                 metavar="P", help="brain percentile used as the minmax ceiling (99.5)")
  p.add_argument("--bias-sigma", type=float, default=0.0, metavar="MM",
                 help="homomorphic bias-field correction with a Gaussian field of MM mm "
                      "(e.g. 20) before scaling; 0: none (default)")
  p.add_argument("--regions", default=None, metavar="LABELS",
                 help="keep only these atlas regions: labels or names, comma-separated")
  p.add_argument("--atlas", default=None, metavar="FILE", help="label image for --regions")
  p.add_argument("--mask-suffix", default=None, metavar="SUFFIX",
                 help="per-subject brain mask image suffix, e.g. 'mask' (default: nonzero "
                      "voxels of the first sequence)")
  add_layout_options(p)
  p.add_argument("--mask", default=None, metavar="FILE_OR_PATTERN",
                 help="each subject's own brain mask: a path with {subject} for the subject id "
                      "(e.g. masks/{subject}_mask.nii.gz), or one file for a single subject; "
                      "with --align it is carried through the subject's transform")
  p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                 help="parallel processes (default: CPU count, at most 8)")
  p.add_argument("--age-range", default=None, metavar="MIN,MAX",
                 help="plausible ages in years; an age outside is bad data (default 0,120)")
  p.add_argument("--no-resample-oblique", dest="resample_oblique", action="store_false",
                 help="refuse images with an oblique affine instead of resampling them onto an "
                      "axis-aligned grid")
  p.add_argument("--align", choices=("template",), default=None,
                 help="register each scan (as acquired: any pose, grid, orientation, with or "
                      "without skull) to the template with a JAX affine registration and "
                      "resample it onto the template grid first; a scan with skull gets the "
                      "template's brain mask (coarse; --mask-suffix gives one's own)")
  p.add_argument("--align-transform", choices=align.TRANSFORMS, default=align.DEFAULT_TRANSFORM,
                 help="with --align: affine (rigid, then 12 degrees of freedom: head size "
                      "normalised) or rigid (that registration's rigid part: head size kept)")
  p.add_argument("--skip-bad", action="store_true",
                 help="report and skip subjects with bad data instead of stopping")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  """Reads the dataset, prepares its cache and prints what it holds; returns 0."""
  sequences = bids.parse_sequences(args.sequences)
  if (args.regions is None) != (args.atlas is None):
    raise ConfigError("--regions and --atlas go together")
  dataset = layouts.read_dataset(args.data, sequences, session=args.session,
                                 entities=args.entities, participants=args.participants,
                                 mask_suffix=args.mask_suffix, skip_bad=args.skip_bad,
                                 age_range=args.age_range)
  if args.mask is not None:
    dataset = with_masks(dataset, args.mask)
  atlas = labels = None
  if args.atlas is not None:
    atlas = regions.load_atlas(args.atlas)
    labels = regions.parse_labels(args.regions, atlas)
  prep = Preprocessing(sequences=sequences, shape=args.shape, voxel_size=args.voxel_size,
                       scaling=args.scaling, ceiling_percentile=args.ceiling_percentile,
                       regions=labels, bias_sigma_mm=args.bias_sigma,
                       resample_oblique=args.resample_oblique,
                       align=args.align_transform if args.align else None)
  for sid, why in dataset.skipped:
    print(f"skipped {why}", file=sys.stderr)
  cache = prepare(dataset, args.out, prep, atlas=atlas, workers=args.workers,
                  skip_bad=args.skip_bad, progress=not args.quiet)
  skipped = len(cache.index["skipped"])
  print(f"prepared {len(cache)} subjects ({dataset.layout}) -> {cache.path} "
        f"({cache.volumes.dtype} {tuple(cache.volumes.shape)}, "
        f"{cache.volumes.nbytes / 2**20:.1f} MiB)" + (f", skipped {skipped}" if skipped else ""))
  not_fitting = [r["subject_id"] for r in cache.records if not r["brain_fits"]]
  if not_fitting:
    print(f"warning: the brain is cropped by the {'x'.join(map(str, cache.shape))} cube for "
          f"{len(not_fitting)} subjects (e.g. {not_fitting[0]}); consider a larger --shape",
          file=sys.stderr)
  flagged = conformity.read_qc_flags(cache.path / conformity.QC_TSV)
  if flagged:
    print(f"note: {len(flagged)} of {len(cache)} subjects lie outside the conformity range "
          f"calibrated on this cache (e.g. {flagged[0][0]}: {flagged[0][1]}); see "
          f"{cache.path / conformity.QC_TSV}", file=sys.stderr)
  return 0
