"""The input-conformity gate: flag rates on clean held-out scans and their corrupted copies.

Simulated subjects (`--resolution` mm): `--train` of them make the training cubes the gate is
calibrated on (`conformity.build_reference` + `calibrate`, as `brainage prepare` does); `--test`
others are assessed clean and after each corruption below (the public functions of this file,
also used by tests/data/test_conformity.py), all through `preprocess_subject` with the training
voxel size (`Preprocessing(voxel_size=R)`, so other grids are resampled, not refused):

  skull      not skull-stripped: CSF, skull and scalp shells outside the brain (`add_skull`)
  tilt       content rotated 10-20 degrees about a random axis through the brain (`tilt`)
  voxel_fine / voxel_coarse   acquired on 0.75 mm and 4 mm (8 mm when trained at 4 mm) voxels
  rescale    intensities multiplied by 4 or 1/4 (`rescale_intensity`)
  gamma      a non-linear intensity change, gamma 0.5 or 2 (`rescale_intensity`)
  crop_half  the field of view ends at the middle of the brain (`crop_half`)

Goal (issue 20): >= 95% of corrupted scans flagged, <= 5% of clean ones.

  python benchmarks/bench_conformity.py --resolution 2 --train 60 --test 40 --out gate.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from jax_brainage import fileio  # noqa: E402
from jax_brainage.data import conformity, nifti, simulate  # noqa: E402
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Corruptions: (data [X, Y, Z] float32, affine [4, 4], ...) -> (data, affine).


def _pad(data: np.ndarray, affine: np.ndarray, mm: float) -> tuple[np.ndarray, np.ndarray]:
  """Zero margin of `mm` on every side (room for a skull or a rotation)."""
  k = int(math.ceil(mm / float(np.min(nifti.voxel_size(affine)))))
  out = np.pad(data, k)
  affine = np.array(affine, np.float64)
  affine[:3, 3] -= affine[:3, :3] @ np.full(3, k)
  return out, affine


def add_skull(data, affine, seed: int = 0):
  """The scan as acquired before skull-stripping: a CSF shell (0-3 mm outside the brain), dark
  bone (3-8 mm) and bright scalp (8-14 mm), each a fraction of the white-matter intensity with
  smooth +-10% variation, and a little noise. The background stays 0 (a thresholded scan:
  harder for the gate than a noisy background, which fills the whole field of view)."""
  data, affine = _pad(np.asarray(data, np.float32), affine, 20.0)
  brain = data != 0
  distance = ndimage.distance_transform_edt(~brain, sampling=nifti.voxel_size(affine))
  wm = float(np.percentile(data[brain], 95))
  rng = np.random.default_rng(seed)
  smooth = 1 + 0.1 * ndimage.gaussian_filter(rng.standard_normal(data.shape), 3) * 10
  shell = np.select([distance <= 0, distance <= 3, distance <= 8, distance <= 14],
                    [0.0, 0.25, 0.08, 0.9], 0.0) * wm * smooth
  shell += (distance > 0) * (distance <= 14) * rng.normal(0, 0.03 * wm, data.shape)
  return np.where(brain, data, np.maximum(shell, 0) * (distance <= 14)).astype(np.float32), affine


def tilt(data, affine, degrees: float, axis=(1.0, 0.0, 0.0)):
  """The head rotated by `degrees` about `axis` (world) through the brain's centre, on the same
  grid (linear interpolation): a scan not aligned like the training data."""
  data, affine = _pad(np.asarray(data, np.float32), affine, 20.0)
  axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
  a = math.radians(degrees)
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  rotation = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
  centre = np.array(ndimage.center_of_mass(data != 0))
  # Voxel-space rotation (the grid is isotropic and axis-aligned): output x <- input R^T(x-c)+c.
  m = rotation.T
  out = ndimage.affine_transform(data, m, offset=centre - m @ centre, order=1)
  return out.astype(np.float32), affine


def regrid(data, affine, voxel_mm: float):
  """The scan acquired on `voxel_mm` isotropic voxels (linear resampling of the same head;
  coarser grids are smoothed first, as a scanner's larger voxels average)."""
  data = np.asarray(data, np.float32)
  ratio = voxel_mm / float(np.max(nifti.voxel_size(affine)))
  if ratio > 1:
    data = ndimage.gaussian_filter(data, 0.4 * ratio)
  shape, target = nifti.isotropic_grid(data.shape, affine, voxel_mm)
  return nifti.resample(data, affine, shape, target, order=1), target


def rescale_intensity(data, affine, factor: float = 1.0, gamma: float = 1.0):
  """Intensities x `factor` after a power-law `gamma` of the normalised intensity (another
  scanner unit or intensity pipeline)."""
  data = np.asarray(data, np.float32)
  top = float(np.max(data)) or 1.0
  return (factor * top * np.power(np.maximum(data, 0) / top, gamma)).astype(np.float32), affine


def crop_half(data, affine, axis: int = 2, keep_low: bool = True):
  """The field of view ends at the middle of the brain along voxel `axis`."""
  data = np.asarray(data, np.float32)
  nz = np.flatnonzero(np.any(data != 0, axis=tuple(i for i in range(3) if i != axis)))
  middle = (int(nz[0]) + int(nz[-1]) + 1) // 2
  index = [slice(None)] * 3
  affine = np.array(affine, np.float64)
  if keep_low:
    index[axis] = slice(0, middle)
  else:
    index[axis] = slice(middle, None)
    affine[:3, 3] += affine[:3, axis] * middle
  return np.ascontiguousarray(data[tuple(index)]), affine


def corruptions(resolution: float) -> dict[str, Any]:
  """name -> function (data, affine, rng) -> (data, affine): the benchmark's corruptions."""
  coarse = 4.0 if resolution < 4 else 8.0

  def angle(rng):
    return float(rng.uniform(10, 20) * rng.choice([-1, 1]))

  return {
      "skull": lambda d, a, rng: add_skull(d, a, seed=int(rng.integers(1 << 30))),
      "tilt": lambda d, a, rng: tilt(d, a, angle(rng), rng.standard_normal(3)),
      "voxel_fine": lambda d, a, rng: regrid(d, a, 0.75),
      "voxel_coarse": lambda d, a, rng: regrid(d, a, coarse),
      "rescale": lambda d, a, rng: rescale_intensity(d, a, float(rng.choice([4.0, 0.25]))),
      "gamma": lambda d, a, rng: rescale_intensity(d, a, gamma=float(rng.choice([0.5, 2.0]))),
      "crop_half": lambda d, a, rng: crop_half(d, a, int(rng.integers(3)),
                                               bool(rng.integers(2))),
  }


# ---------------------------------------------------------------------------------------------
# The benchmark.


def prepared(data, affine, prep):
  """(cube, scan measures) of one T1w image as `preprocess_subject` makes them."""
  measures: dict[str, float] = {}
  cube, _ = preprocess_subject({"T1w": nib.Nifti1Image(np.asarray(data, np.float32), affine)},
                               prep, measures=measures)
  return cube, measures


def run(resolution: int, n_train: int, n_test: int, seed: int,
        cases: tuple[str, ...] | None = None) -> dict[str, Any]:
  cohort = simulate.Cohort(simulate.CohortConfig(seed=seed, n=n_train + n_test,
                                                 resolution_mm=resolution, sequences=("T1w",)))
  prep = Preprocessing(sequences=("T1w",), voxel_size=float(resolution))
  t = time.perf_counter()
  train = [prepared(s.images["T1w"], s.affine, prep)
           for s in (cohort.subject(i, ground_truth=False) for i in range(n_train))]
  cubes = np.stack([c for c, _ in train])
  reference = conformity.build_reference(cubes, prep.scaling, float(resolution))
  measures = {m.name: np.array([s[m.name] for _, s in train]) for m in conformity.MEASURES
              if m.scan}
  measures.update(conformity.cube_measures(cubes, reference))
  conformity.calibrate(reference, measures)
  calibrate_s = time.perf_counter() - t
  rng = np.random.default_rng(seed + 1)
  cases = {k: f for k, f in {"clean": lambda d, a, rng: (d, a), **corruptions(resolution)}.items()
           if cases is None or k in cases}
  rows: dict[str, list[tuple[str, ...]]] = {k: [] for k in cases}
  values: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
  assess_s = []
  for i in range(n_train, n_train + n_test):
    s = cohort.subject(i, ground_truth=False)
    for name, corrupt in cases.items():
      data, affine = corrupt(s.images["T1w"].astype(np.float32), s.affine, rng)
      t = time.perf_counter()
      cube, scan = prepared(data, affine, prep)
      a = conformity.assess_cubes(cube[None], [scan], reference)[0]
      assess_s.append(time.perf_counter() - t)
      rows[name].append(a.flags)
      values[name].append(a.measures)
  table = {}
  for name, flags in rows.items():
    reasons: dict[str, int] = {}
    for f in flags:
      for r in f:
        reasons[r] = reasons.get(r, 0) + 1
    table[name] = {"flagged": sum(bool(f) for f in flags) / len(flags), "n": len(flags),
                   "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}
  return {"resolution_mm": resolution, "train": n_train, "test": n_test,
          "calibration": reference.calibration, "rates": table, "measures": values,
          "seconds_calibrate": calibrate_s,
          "seconds_per_scan_prepare_and_assess": float(np.median(assess_s))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--resolution", type=int, default=4, choices=(2, 4))
  p.add_argument("--train", type=int, default=60)
  p.add_argument("--test", type=int, default=40)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cases", default=None, help="comma-separated subset (default: all)")
  p.add_argument("--out", type=Path, default=None)
  args = p.parse_args(argv)
  result = {"benchmark": "conformity", **common.environment(),
            **run(args.resolution, args.train, args.test, args.seed,
                  tuple(args.cases.split(",")) if args.cases else None)}
  print(f"conformity gate at {args.resolution} mm: calibrated on {args.train}, "
        f"{args.test} held-out subjects per case")
  print(f"{'case':14s} {'flagged':>8s}  reasons")
  for name, r in result["rates"].items():
    reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())
    print(f"{name:14s} {100 * r['flagged']:7.1f}%  {reasons}")
  print(f"calibration {result['seconds_calibrate']:.1f} s; prepare + assess "
        f"{result['seconds_per_scan_prepare_and_assess']:.3f} s per scan (median)")
  if args.out:
    fileio.write_json(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
