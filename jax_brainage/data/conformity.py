"""The input-conformity gate: is a scan like the scans the model was trained on?

A brain-age model gives a number for any cube it is fed; for a scan that was not skull-stripped,
is tilted, was acquired at another resolution or went through another intensity pipeline that
number is meaningless. This module measures, per scan, what tells such scans apart, calibrates
the measures on the training cache's own scans, and flags a scan whose measures fall outside.

Measures (one float each; `MEASURES` lists them with their flag names):
  On the scan, before the cube (`scan_measures`, filled in by `preprocess_subject(measures=...)`):
    voxel_mm          largest native voxel edge (mm), from the header.
    brain_volume_ml   brain (the mask, or the reference's nonzero voxels) volume (mL). A scan
                      with skull and scalp has a "brain" about twice as large; half a brain half.
    raw_intensity     median raw intensity of the reference inside the brain (scanner units): a
                      scan from another intensity pipeline (rescaled, normalised) sits far off.
    fov_edge          fraction of brain voxels on the faces of the image grid (brain cut by the
                      field of view).
  On the cube, against the training cache's reference (`cube_measures`, vectorised over scans):
    correlation       Pearson r of the cube (reference channel) with the training mean image:
                      a head that is not the training data's kind of image lowers it.
    tilt_deg          rotation angle (degrees) of the scan against the training frame: the
                      rotation part (polar decomposition) of a similarity registration
                      (`register.register`, 8 and 4 mm levels, NCC, vmapped over scans) of the
                      cube to the training scans' group-wise mean (`Reference.tilt_template`:
                      up to `TILT_TEMPLATE_SCANS` training cubes registered to their mean and
                      averaged once more, a sharper image than the plain mean).
    outside_fraction  fraction of the cube's nonzero voxels outside the training brain mask (mean
                      occupancy >= 0.5, dilated by `MASK_MARGIN_MM`): skull, tilt, another pose.
    intensity_distance  1-D Wasserstein distance between the scan's brain intensities and the
                      training cache's pooled brain intensities (scaled units: [0, 1] for minmax,
                      z for zscore; max over channels): another contrast or a non-linear change.
    cube_edge         fraction of nonzero voxels on the cube's faces (brain cut by the cube).
    noise             median |voxel - mean of its 6 neighbours| inside the eroded brain over the
                      median brain intensity (a cheap noise / blur / motion-ringing proxy).

Calibration (`calibrate`): per measure, from the training scans' own values: a robust centre
(median) and spread (1.4826 x MAD, at least the measure's `floor`), and the accepted range
centre -/+ z spreads (`Measure.z`: `Z_LIMIT`; 7 for the correlation, chosen on the benchmark's
seed-0 run and checked on seed 1: see benchmarks/RESULTS.md) (log scale for volumes and raw
intensity; one-sided where only one direction means trouble). The tilt is the norm of a 3-D
rotation vector whose axes are each about N(0, sigma^2) over the training scans (their own pose):
its spread is sigma = median / `CHI3_MEDIAN` (the median of a chi distribution with 3 degrees of
freedom, robust to odd scans) and its limit `TILT_Z` sigma above 0 (`Measure.rotation`). On a
cache of more than `TILT_CALIBRATION_SCANS` rows the tilt is measured (and calibrated) on an
evenly spaced subset of that many; the other rows' tilt is "n/a" in the QC table (not checked);
a cache of fewer than `TILT_MIN_SCANS` rows has no tilt check. The voxel size is accepted within `VOXEL_TOLERANCE` of the training
scans' range. Measures that a reference lacks (an older cache without scan measures) are skipped.

Files (written by `brainage prepare` into the cache; `load_reference` computes the cube part from
the cache's volumes when they are missing):
  CACHE/conformity.npz   mean and std image `[X, Y, Z, C]` float32, brain mask `[X, Y, Z]`,
                         pooled brain-intensity histogram `[C, BINS]` and its bin edges, the
                         tilt's group-wise template `[X, Y, Z]` float32.
  CACHE/conformity.json  the calibration: {measure: {centre, spread, low, high, scale}}.
  CACHE/qc.tsv           every training scan's measures and flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from jax_brainage import fileio
from jax_brainage.data import nifti, register
from jax_brainage.errors import DataError

__all__ = ["MEASURES", "Measure", "Reference", "Assessment", "scan_measures", "cube_measures",
           "build_reference", "calibrate", "assess", "assess_cubes", "calibrated_reference",
           "load_reference", "save_reference", "qc_tsv", "read_qc_flags", "rotation_deg",
           "tilt_template", "Z_LIMIT", "TILT_Z", "VOXEL_TOLERANCE", "MASK_MARGIN_MM"]

REFERENCE_NPZ = "conformity.npz"
CALIBRATION_JSON = "conformity.json"
QC_TSV = "qc.tsv"
# Robust z beyond which a measure is out of the training range (`Measure.z`). Chosen on the
# benchmark (benchmarks/bench_conformity.py): <= 5% of clean held-out scans out, >= 95% of
# corrupted ones.
Z_LIMIT = 6.0
VOXEL_TOLERANCE = 0.15  # relative: a voxel edge within 15% of the training range is accepted
MASK_MARGIN_MM = 12.0  # dilation of the training brain mask (pose and head-size variation)
BINS = 256  # histogram bins of the scaled brain intensities
ZSCORE_RANGE = (-6.0, 6.0)  # histogram range of z-scored caches
CHUNK = 16  # cache rows read at a time when building a reference
# The tilt: a similarity registration at 8 and 4 mm (never finer: cheap at any cube voxel size).
TILT_SCHEDULE = register.Schedule(stages=("similarity",), levels_mm=(8.0, 4.0), steps=(60, 30),
                                  learning_rates=(0.2, 0.1))
TILT_TEMPLATE_SCANS = 64  # training cubes averaged into the group-wise template
TILT_CALIBRATION_SCANS = 512  # training rows whose tilt is measured (an evenly spaced subset)
# Fewer training scans: no group-wise template and no tilt check (a chi_3 spread from a handful
# of scans means little, and tiny caches, e.g. in tests, skip the registrations).
TILT_MIN_SCANS = 20
CHI3_MEDIAN = 1.5382  # median of |v| for v ~ N(0, I_3)
# sigma's multiple where a tilt is flagged (P(chi_3 > 3.2) = 1.7%). The training scans' own pose
# is ~3 degrees per axis, so a 10-degree tilt against a scan's opposite pose can look clean: even
# an exact estimate flags only ~96% of 10-20 degree tilts at a 5% false alarm rate. 2.8 (chosen
# on the benchmark's seed 0) flagged 3 of 40 clean scans on seed 1; 3.2 leaves room for the other
# measures' false alarms (seeds 0 and 1; seed 2 held out: benchmarks/RESULTS.md, session 11).
TILT_Z = 3.2


@dataclasses.dataclass(frozen=True)
class Measure:
  """One conformity measure.

  Attributes:
    name: column name; flag: the reason written to `qc_flags` when out of range.
    side: "both", "high" or "low" (which deviation is trouble).
    log: calibrate on log(value) (positive, multiplicative quantities).
    floor: smallest spread (in the calibrated scale) so a constant training value still leaves
      a margin.
    scan: measured on the scan (`scan_measures`), else on the cube (`cube_measures`).
    z: robust z beyond which the measure is out of range (`Z_LIMIT` unless said otherwise).
    rotation: the norm of a rotation vector: calibrated as a chi distribution (module docstring).
  """

  name: str
  flag: str
  side: str
  log: bool
  floor: float
  scan: bool
  z: float = 6.0
  rotation: bool = False


MEASURES = (
    Measure("voxel_mm", "voxel_size", "both", False, 0.0, True),
    Measure("brain_volume_ml", "brain_volume", "both", True, 0.03, True),
    Measure("raw_intensity", "intensity_scale", "both", True, 0.03, True),
    Measure("fov_edge", "field_of_view", "high", False, 0.001, True),
    Measure("correlation", "alignment", "low", False, 0.005, False, z=7.0),
    # The training scans carry their own pose: the limit is a multiple of its per-axis spread.
    Measure("tilt_deg", "tilt", "high", False, 0.5, False, z=TILT_Z, rotation=True),
    Measure("outside_fraction", "outside_brain", "high", False, 0.01, False),
    Measure("intensity_distance", "intensity_distribution", "high", False, 0.003, False),
    Measure("cube_edge", "cube_cut", "high", False, 0.001, False),
    Measure("noise", "noise", "both", True, 0.03, False),
)
_BY_NAME = {m.name: m for m in MEASURES}


# ---------------------------------------------------------------------------------------------
# Measures.


def _faces(mask: np.ndarray) -> np.ndarray:
  """Count of True voxels on the 6 faces of the last three axes, `[...]` (edges counted once)."""
  inner = np.zeros(mask.shape[-3:], bool)
  inner[1:-1, 1:-1, 1:-1] = True
  return np.sum(mask & ~inner, axis=(-3, -2, -1))


def scan_measures(volume: np.ndarray, brain: np.ndarray, affine: np.ndarray,
                  native_affine: np.ndarray) -> dict[str, float]:
  """The scan-level measures of one reference image on its canonical grid.

  Args:
    volume: the reference sequence `[X, Y, Z]` (raw scanner units) on the canonical grid.
    brain: bool `[X, Y, Z]` brain mask on the same grid (nonzero voxels when no mask is given).
    affine: the canonical grid's affine `[4, 4]` (mm); native_affine: the file's own.
  Returns:
    {voxel_mm, brain_volume_ml, raw_intensity, fov_edge} (see the module docstring).
  """
  n = int(np.count_nonzero(brain))
  voxel_ml = float(np.prod(nifti.voxel_size(affine))) / 1000.0
  values = np.asarray(volume)[brain]
  return {
      "voxel_mm": float(np.max(nifti.voxel_size(native_affine))),
      "brain_volume_ml": n * voxel_ml,
      "raw_intensity": float(np.median(values)) if n else math.nan,
      "fov_edge": float(_faces(brain)) / max(n, 1),
  }


def _as_float(cubes: np.ndarray, scaling: str) -> np.ndarray:
  cubes = np.asarray(cubes)
  return cubes.astype(np.float32) / 255.0 if scaling == "minmax" else cubes.astype(np.float32)


def _histogram_edges(scaling: str) -> np.ndarray:
  lo, hi = (0.0, 1.0) if scaling == "minmax" else ZSCORE_RANGE
  if scaling == "minmax":  # One bin per uint8 level (k / 255), so the histogram is exact.
    return (np.arange(BINS + 1, dtype=np.float64) - 0.5) / 255.0
  return np.linspace(lo, hi, BINS + 1)


def _histograms(x: np.ndarray, brain: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Brain-intensity histograms `[n, C, BINS]` (counts) of scaled cubes `x [n, X, Y, Z, C]`."""
  n, c = x.shape[0], x.shape[-1]
  idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
  out = np.zeros((n, c, len(edges) - 1), np.float64)
  for i in range(n):
    for k in range(c):
      out[i, k] = np.bincount(idx[i, ..., k][brain[i]], minlength=len(edges) - 1)
  return out


def _wasserstein(hist: np.ndarray, ref: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """W1 between histograms `[..., BINS]` and `ref [..., BINS]` on `edges`: integral |CDF diff|."""
  def cdf(h):
    total = np.sum(h, axis=-1, keepdims=True)
    return np.cumsum(h, axis=-1) / np.where(total > 0, total, 1.0)

  return np.sum(np.abs(cdf(hist) - cdf(ref)) * np.diff(edges), axis=-1)


def _noise(x: np.ndarray, brain: np.ndarray) -> np.ndarray:
  """Median |x - mean of the 6 neighbours| in the eroded brain / median brain intensity `[n]`."""
  core = brain[:, 1:-1, 1:-1, 1:-1].copy()
  centre = x[:, 1:-1, 1:-1, 1:-1]
  neighbours = np.zeros_like(centre)
  for axis in (1, 2, 3):
    for shift in (0, 2):
      sl = [slice(None)] + [slice(1, -1)] * 3
      sl[axis] = slice(shift, x.shape[axis] - 2 + shift)
      neighbours += x[tuple(sl)]
      core &= brain[tuple(sl)]
  residual = np.abs(centre - neighbours / 6.0)
  out = np.full(len(x), np.nan)
  for i in range(len(x)):
    if core[i].any():
      out[i] = np.median(residual[i][core[i]]) / max(float(np.median(x[i][brain[i]])), 1e-6)
  return out


def _correlation(x: np.ndarray, template: np.ndarray) -> np.ndarray:
  """Pearson r of every image of `x [n, ...]` with `template [...]`, `[n]`."""
  a = x.reshape(len(x), -1).astype(np.float64)
  b = template.reshape(-1).astype(np.float64)
  a = a - a.mean(axis=1, keepdims=True)
  b = b - b.mean()
  return (a @ b) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b), 1e-12)


def rotation_deg(matrices: np.ndarray) -> np.ndarray:
  """Rotation angle (degrees) `[n]` of the linear parts of `[n, 4, 4]` matrices: the orthogonal
  factor of their polar decomposition (scale and shear removed)."""
  u, _, vt = np.linalg.svd(np.asarray(matrices, np.float64)[:, :3, :3])
  rot = u @ vt
  cos = np.clip((np.trace(rot, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
  return np.degrees(np.arccos(cos))


def _register_cubes(x: np.ndarray, template: np.ndarray, voxel_mm: float) -> np.ndarray:
  """Cube -> template world transforms `[n, 4, 4]` of cubes `x [n, X, Y, Z]` (`TILT_SCHEDULE`)."""
  affine = np.diag([float(voxel_mm)] * 3 + [1.0])
  matrices, _ = register.register(list(x), np.broadcast_to(affine, (len(x), 4, 4)), template,
                                  affine, TILT_SCHEDULE)
  return matrices


def tilt_template(x: np.ndarray, mean: np.ndarray, voxel_mm: float) -> np.ndarray:
  """The group-wise template `[X, Y, Z]`: training cubes `x [n, X, Y, Z]` registered to their
  plain `mean [X, Y, Z]`, resampled into its frame and averaged (one round)."""
  affine = np.diag([float(voxel_mm)] * 3 + [1.0])
  matrices = _register_cubes(x, mean, voxel_mm)
  return np.mean([nifti.resample(c, m @ affine, c.shape, affine)
                  for c, m in zip(x, matrices)], axis=0).astype(np.float32)


@dataclasses.dataclass
class Reference:
  """What a training cache looks like: the images and intensities new scans are compared with.

  Attributes:
    scaling: the cache's intensity scaling ("minmax" or "zscore").
    voxel_mm: the cube's voxel size (mm).
    mean, std: float32 `[X, Y, Z, C]` mean and standard deviation of the training cubes.
    mask: bool `[X, Y, Z]` training brain mask (occupancy >= 0.5, dilated `MASK_MARGIN_MM`).
    tilt_template: float32 `[X, Y, Z]` group-wise mean of the reference channel (`tilt_template`);
      the plain mean for a reference stored before it existed.
    histogram: float64 `[C, BINS]` pooled brain-intensity histogram (counts); edges `[BINS+1]`.
    calibration: {measure name: {centre, spread, low, high, scale}} (`calibrate`); empty until
      calibrated.
  """

  scaling: str
  voxel_mm: float
  mean: np.ndarray
  std: np.ndarray
  mask: np.ndarray
  histogram: np.ndarray
  edges: np.ndarray
  tilt_template: np.ndarray
  calibration: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def build_reference(volumes: np.ndarray, scaling: str, voxel_mm: float) -> Reference:
  """The reference of training cubes `volumes [n, X, Y, Z, C]` (read `CHUNK` rows at a time, so
  a memory-mapped cache of any size works); not yet calibrated."""
  n = len(volumes)
  if n == 0:
    raise DataError("no training scan to build a conformity reference from")
  edges = _histogram_edges(scaling)
  total = np.zeros(volumes.shape[1:], np.float64)
  squares = np.zeros(volumes.shape[1:], np.float64)
  occupancy = np.zeros(volumes.shape[1:4], np.float64)
  histogram = np.zeros((volumes.shape[-1], BINS), np.float64)
  for start in range(0, n, CHUNK):
    x = _as_float(volumes[start:start + CHUNK], scaling)
    brain = x[..., 0] != 0
    total += x.sum(axis=0)
    squares += np.square(x, dtype=np.float64).sum(axis=0)
    occupancy += brain.sum(axis=0)
    histogram += _histograms(x, brain, edges).sum(axis=0)
  mean = total / n
  std = np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))
  margin = max(1, int(round(MASK_MARGIN_MM / float(voxel_mm))))
  mask = ndimage.binary_dilation(occupancy / n >= 0.5, iterations=margin)
  template = mean[..., 0].astype(np.float32)
  if n >= TILT_MIN_SCANS:
    rows = np.unique(np.linspace(0, n - 1, min(n, TILT_TEMPLATE_SCANS)).astype(int))
    template = tilt_template(_as_float(volumes[rows], scaling)[..., 0], template, voxel_mm)
  return Reference(scaling, float(voxel_mm), mean.astype(np.float32), std.astype(np.float32),
                   mask, histogram, edges, template)


def cube_measures(cubes: np.ndarray, reference: Reference, tilt: bool = True
                  ) -> dict[str, np.ndarray]:
  """The cube-level measures of prepared cubes `[n, X, Y, Z, C]` (the cache's dtype) against
  `reference`; {name: float64 `[n]`}. Images are compared on the first (reference) channel; the
  intensity distance on every channel when C is the cache's, else on the first. `tilt=False`
  leaves the tilt out (its registration is the costly measure)."""
  x = _as_float(cubes, reference.scaling)
  if x.shape[1:4] != reference.mean.shape[:3]:
    raise DataError(f"cubes of shape {x.shape[1:]} cannot be compared with a conformity "
                    f"reference of shape {reference.mean.shape}")
  brain = x[..., 0] != 0
  count = np.maximum(brain.sum(axis=(1, 2, 3)), 1)
  # A model reading fewer sequences than its cache holds: compare the reference channel only.
  channels = x.shape[-1] if x.shape[-1] == reference.histogram.shape[0] else 1
  hist = _histograms(x[..., :channels], brain, reference.edges)
  out = {} if not tilt else {"tilt_deg": rotation_deg(_register_cubes(
      x[..., 0], reference.tilt_template, reference.voxel_mm))}
  return {
      **out,
      "correlation": _correlation(x[..., 0], reference.mean[..., 0]),
      "outside_fraction": np.sum(brain & ~reference.mask, axis=(1, 2, 3)) / count,
      "intensity_distance": np.max(
          _wasserstein(hist, reference.histogram[:channels], reference.edges), axis=1),
      "cube_edge": _faces(brain) / count,
      "noise": _noise(x[..., 0], brain),
  }


# ---------------------------------------------------------------------------------------------
# Calibration and assessment.


def _scaled(measure: Measure, values: np.ndarray) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if measure.log:
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.log(np.where(values > 0, values, np.nan))
  return values


def calibrate(reference: Reference, measures: Mapping[str, np.ndarray]) -> Reference:
  """Sets `reference.calibration` from the training scans' own `measures` ({name: `[n]`});
  measures absent or all NaN are left out (not checked). Returns `reference`."""
  calibration = {}
  for m in MEASURES:
    if m.name not in measures:
      continue
    v = _scaled(m, measures[m.name])
    v = v[np.isfinite(v)]
    if not len(v):
      continue
    if m.name == "voxel_mm":
      calibration[m.name] = {"centre": float(np.median(v)), "spread": 0.0, "scale": "linear",
                             "low": float(np.min(v)) * (1 - VOXEL_TOLERANCE),
                             "high": float(np.max(v)) * (1 + VOXEL_TOLERANCE)}
      continue
    if m.rotation:  # |rotation vector|, each axis N(0, sigma^2): a chi distribution, 3 dof
      spread = max(float(np.median(v)) / CHI3_MEDIAN, m.floor)
      calibration[m.name] = {"centre": 0.0, "spread": spread, "scale": "chi3",
                             "low": -math.inf, "high": m.z * spread}
      continue
    centre = float(np.median(v))
    spread = max(1.4826 * float(np.median(np.abs(v - centre))), m.floor)
    low = centre - m.z * spread if m.side in ("both", "low") else -math.inf
    high = centre + m.z * spread if m.side in ("both", "high") else math.inf
    if m.log:
      low, high = math.exp(low), math.exp(high)
    calibration[m.name] = {"centre": math.exp(centre) if m.log else centre, "spread": spread,
                           "scale": "log" if m.log else "linear", "low": low, "high": high}
  reference.calibration = calibration
  return reference


@dataclasses.dataclass(frozen=True)
class Assessment:
  """One scan's conformity: its measures, and the flags (reasons) of those out of range.

  Attributes:
    measures: {name: value} (NaN where not measured).
    flags: reasons in `MEASURES` order (empty: the scan looks like the training data).
    details: one "name value (training low..high)" text per flag, for warnings.
  """

  measures: dict[str, float]
  flags: tuple[str, ...]
  details: tuple[str, ...]

  @property
  def text(self) -> str:
    """The `qc_flags` cell: reasons joined by ";" (empty when none)."""
    return ";".join(self.flags)


def _range_text(c: Mapping[str, Any]) -> str:
  low, high = c["low"], c["high"]
  if not math.isfinite(low):
    return f"<= {high:.3g}"
  if not math.isfinite(high):
    return f">= {low:.3g}"
  return f"{low:.3g}..{high:.3g}"


def assess(measures: Mapping[str, float], reference: Reference) -> Assessment:
  """Flags the measures of one scan outside `reference.calibration`."""
  flags, details = [], []
  for m in MEASURES:
    c = reference.calibration.get(m.name)
    v = measures.get(m.name)
    if c is None or v is None:
      continue
    v = float(v)
    if not math.isfinite(v) or not c["low"] <= v <= c["high"]:
      flags.append(m.flag)
      details.append(f"{m.name} {v:.3g} (training {_range_text(c)})")
  full = {m.name: float(measures.get(m.name, math.nan)) for m in MEASURES}
  return Assessment(full, tuple(flags), tuple(details))


def assess_cubes(cubes: np.ndarray, scan: Sequence[Mapping[str, float]],
                 reference: Reference) -> list[Assessment]:
  """Assessments of prepared cubes `[n, X, Y, Z, C]` with their scan measures (one dict each)."""
  cube = cube_measures(cubes, reference, tilt="tilt_deg" in reference.calibration)
  return [assess({**scan[i], **{k: float(v[i]) for k, v in cube.items()}}, reference)
          for i in range(len(cubes))]


# ---------------------------------------------------------------------------------------------
# Files.


def save_reference(reference: Reference, directory: str | Path) -> None:
  """Writes conformity.npz and conformity.json into `directory` (atomically, each)."""
  directory = Path(directory)
  with fileio.atomic_path(directory / REFERENCE_NPZ) as tmp, open(tmp, "wb") as f:
    np.savez_compressed(f, mean=reference.mean, std=reference.std, mask=reference.mask,
                        histogram=reference.histogram, edges=reference.edges,
                        tilt_template=reference.tilt_template)
  fileio.write_json(directory / CALIBRATION_JSON, {
      "scaling": reference.scaling, "voxel_mm": reference.voxel_mm, "z_limit": Z_LIMIT,
      "voxel_tolerance": VOXEL_TOLERANCE, "mask_margin_mm": MASK_MARGIN_MM,
      "calibration": reference.calibration})


def load_reference(directory: str | Path, volumes: np.ndarray | None = None,
                   scaling: str = "minmax", voxel_mm: float = 1.0,
                   scan: Sequence[Mapping[str, float]] | None = None) -> Reference:
  """The reference stored in `directory` (a cache); when it holds none (a cache prepared before
  the gate), built and calibrated from `volumes` (its cubes) and `scan` (the scan measures its
  index records, if any)."""
  directory = Path(directory)
  npz, js = directory / REFERENCE_NPZ, directory / CALIBRATION_JSON
  if npz.is_file() and js.is_file():
    try:
      with np.load(npz, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("mean", "std", "mask", "histogram", "edges")}
        # A reference stored before the group-wise template: the plain mean stands in.
        template = z["tilt_template"] if "tilt_template" in z.files else arrays["mean"][..., 0]
      meta = json.loads(js.read_text(encoding="utf-8"))
      return Reference(meta["scaling"], float(meta["voxel_mm"]), arrays["mean"], arrays["std"],
                       arrays["mask"].astype(bool), arrays["histogram"], arrays["edges"],
                       np.asarray(template, np.float32),
                       {k: dict(v) for k, v in meta["calibration"].items()})
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"{npz}: corrupt conformity reference ({type(e).__name__}: {e}); re-run "
                      "`brainage prepare`") from None
  if volumes is None:
    raise DataError(f"{directory}: no conformity reference ({REFERENCE_NPZ})")
  return calibrated_reference(volumes, scaling, voxel_mm, scan)[0]


def calibrated_reference(volumes: np.ndarray, scaling: str, voxel_mm: float,
                         scan: Sequence[Mapping[str, float]] | None = None
                         ) -> tuple[Reference, list[Assessment]]:
  """The reference of training cubes `volumes [n, X, Y, Z, C]`, calibrated on them and their
  `scan` measures (one dict per row; missing: scan measures unchecked), and each row's
  `Assessment` against it (the cache's own QC table)."""
  reference = build_reference(volumes, scaling, voxel_mm)
  scan = list(scan) if scan is not None else [{} for _ in range(len(volumes))]
  measures = {k: np.array([s.get(k, math.nan) for s in scan], np.float64) for k in _BY_NAME}
  for start in range(0, len(volumes), CHUNK):
    for k, v in cube_measures(volumes[start:start + CHUNK], reference, tilt=False).items():
      measures[k][start:start + len(v)] = v
  # The tilt (a registration per scan) on an evenly spaced subset of a large cache.
  tilted = np.unique(np.linspace(0, len(volumes) - 1,
                                 min(len(volumes), TILT_CALIBRATION_SCANS)).astype(int))
  tilted = tilted if len(volumes) >= TILT_MIN_SCANS else tilted[:0]
  for start in range(0, len(tilted), CHUNK):
    rows = tilted[start:start + CHUNK]
    x = _as_float(volumes[rows], scaling)[..., 0]
    measures["tilt_deg"][rows] = rotation_deg(_register_cubes(x, reference.tilt_template,
                                                              voxel_mm))
  calibrate(reference, measures)
  rows = [{k: float(v[i]) for k, v in measures.items() if np.isfinite(v[i]) or k != "tilt_deg"}
          for i in range(len(volumes))]
  return reference, [assess(r, reference) for r in rows]


def qc_tsv(ids: Sequence[str], sessions: Sequence[str | None],
           assessments: Sequence[Assessment]) -> str:
  """The QC table: participant_id, session, one column per measure, qc_flags."""
  cols = ["participant_id", "session"] + [m.name for m in MEASURES] + ["qc_flags"]
  lines = ["\t".join(cols)]
  for sid, ses, a in zip(ids, sessions, assessments):
    values = ["n/a" if not math.isfinite(a.measures[m.name]) else f"{a.measures[m.name]:.6g}"
              for m in MEASURES]
    lines.append("\t".join([sid, ses or "n/a", *values, a.text]))
  return "\n".join(lines) + "\n"


def read_qc_flags(path: str | Path) -> list[tuple[str, str]]:
  """(participant_id, qc_flags) of the flagged rows of a QC table written by `qc_tsv`."""
  lines = Path(path).read_text(encoding="utf-8").splitlines()
  header = lines[0].split("\t")
  sid, flags = header.index("participant_id"), header.index("qc_flags")
  rows = [line.split("\t") for line in lines[1:] if line]
  return [(r[sid], r[flags]) for r in rows if len(r) > flags and r[flags]]
