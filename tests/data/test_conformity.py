"""The input-conformity gate (jax_brainage.data.conformity) against independent references:
volumes and face counts by hand, the Wasserstein distance of scipy.stats, Pearson r of numpy,
a known rotation (scipy) for the tilt estimate, chi_3 for its calibration, and the flag rates on small simulated subjects and
their corrupted copies (the benchmark's public corruption functions)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from jax_brainage.data import bids, cache, conformity, prepare, simulate
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_conformity  # noqa: E402


def test_scan_measures_by_hand():
  brain = np.zeros((10, 12, 8), bool)
  brain[0:4, 3:7, 2:5] = True  # touches the x = 0 face: 4 * 3 voxels there
  volume = np.where(brain, np.arange(brain.size).reshape(brain.shape), 0).astype(np.float32)
  affine = np.diag([2.0, 2.0, 3.0, 1.0])
  native = np.diag([1.0, 1.0, 3.5, 1.0])
  m = conformity.scan_measures(volume, brain, affine, native)
  n = brain.sum()
  assert m["voxel_mm"] == 3.5
  assert m["brain_volume_ml"] == pytest.approx(n * 12.0 / 1000)
  assert m["raw_intensity"] == pytest.approx(np.median(volume[brain]))
  assert m["fov_edge"] == pytest.approx(12 / n)


def _cubes(n, seed=0, shape=(20, 22, 18)):
  """Noisy ellipsoid 'brains' of random size, uint8 [n, X, Y, Z, 1]."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij"))
  out = []
  for _ in range(n):
    radii = np.array([7.0, 8.5, 6.0]) * rng.uniform(0.93, 1.07)
    inside = np.sum((grid / radii[:, None, None, None]) ** 2, axis=0) <= 1
    core = np.sum((grid / (0.5 * radii[:, None, None, None])) ** 2, axis=0) <= 1
    x = np.where(core, 200, 120) + rng.normal(0, 8, shape)
    out.append(np.where(inside, np.clip(x, 1, 255), 0).astype(np.uint8))
  return np.stack(out)[..., None]


def test_cube_measures_against_numpy_and_scipy():
  train = _cubes(12)
  reference = conformity.build_reference(train, "minmax", 4.0)
  np.testing.assert_allclose(reference.mean, train.astype(np.float64).mean(0) / 255, atol=1e-6)
  new = _cubes(3, seed=1)
  m = conformity.cube_measures(new, reference)
  for i in range(3):
    x = new[i, ..., 0].astype(np.float64) / 255
    r = np.corrcoef(x.ravel(), reference.mean[..., 0].ravel())[0, 1]
    assert m["correlation"][i] == pytest.approx(r, abs=1e-9)
    # W1 of the scan's brain intensities against the pooled training brain intensities.
    pooled = train[..., 0][train[..., 0] > 0].astype(np.float64) / 255
    w = stats.wasserstein_distance(x[x > 0], pooled)
    assert m["intensity_distance"][i] == pytest.approx(w, abs=1e-9)
    brain = x > 0
    occupancy = (train[..., 0] > 0).mean(0) >= 0.5
    mask = ndimage.binary_dilation(occupancy, iterations=3)  # 12 mm at 4 mm voxels
    assert m["outside_fraction"][i] == pytest.approx((brain & ~mask).sum() / brain.sum())
  assert np.all(m["cube_edge"] == 0)


def _blobs(n, seed=0, shape=(32, 32, 32)):
  """Asymmetric smooth 'brains' (6 Gaussian blobs, random +-5% sizes and +-10% weights),
  uint8 [n, X, Y, Z, 1]: an object whose rotation is well defined."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij"))
  centres = np.array([[0, 0, 0], [6, 2, -3], [-5, 4, 2], [2, -7, 3], [-3, -3, -6], [4, 5, 6]])
  widths = np.array([7.0, 3.0, 4.0, 3.5, 2.5, 3.0])
  out = []
  for _ in range(n):
    x = np.zeros(shape)
    for c, w, k in zip(centres, widths * rng.uniform(0.95, 1.05), rng.uniform(0.9, 1.1, 6)):
      x += k * np.exp(-np.sum((grid - c[:, None, None, None]) ** 2, axis=0) / (2 * w * w))
    out.append(np.where(x > 0.05, np.clip(200 * x, 1, 255), 0).astype(np.uint8))
  return np.stack(out)[..., None]


def test_tilt_estimate_recovers_a_known_rotation():
  """A cube rotated by a known angle about a random axis (scipy): the tilt is that angle."""
  from scipy.spatial.transform import Rotation

  reference = conformity.build_reference(_blobs(8), "minmax", 4.0)
  base = _blobs(1, seed=2)[0, ..., 0].astype(np.float32)
  centre = (np.array(base.shape) - 1) / 2
  axis = np.array([0.3, -0.8, 0.5]) / np.linalg.norm([0.3, -0.8, 0.5])
  rotated = []
  for deg in (0.0, 8.0, 16.0):
    m = Rotation.from_rotvec(np.radians(deg) * axis).as_matrix().T  # output x <- R^T (x - c) + c
    rotated.append(ndimage.affine_transform(base, m, offset=centre - m @ centre, order=1))
  # One vmapped call for the three copies.
  tilts = conformity.cube_measures(np.stack(rotated)[..., None].astype(np.uint8),
                                   reference)["tilt_deg"]
  np.testing.assert_allclose(tilts, [0.0, 8.0, 16.0], atol=1.0)


def test_rotation_angle_of_a_similarity_matches_scipy():
  from scipy.spatial.transform import Rotation

  rot = Rotation.from_euler("xyz", [[10, -5, 3], [0, 0, 0], [-40, 20, 5]], degrees=True)
  m = np.tile(np.eye(4), (3, 1, 1))
  m[:, :3, :3] = 1.1 * rot.as_matrix()  # scaled: the polar decomposition removes it
  np.testing.assert_allclose(conformity.rotation_deg(m), np.degrees(rot.magnitude()), atol=1e-6)


def test_tilt_calibration_is_a_chi_distribution():
  """sigma = median / median of chi_3 (scipy), limit `TILT_Z` sigma."""
  reference = conformity.build_reference(_cubes(2), "minmax", 4.0)
  values = np.array([2.0, 3.0, 4.0, 5.0, 30.0])
  conformity.calibrate(reference, {"tilt_deg": values})
  c = reference.calibration["tilt_deg"]
  sigma = 4.0 / stats.chi(3).median()
  assert c["spread"] == pytest.approx(sigma, rel=1e-4)
  assert c["high"] == pytest.approx(conformity.TILT_Z * sigma, rel=1e-4) and c["low"] == -math.inf
  assert conformity.assess({"tilt_deg": 30.0}, reference).flags == ("tilt",)


def test_calibration_is_median_and_mad():
  values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
  reference = conformity.build_reference(_cubes(2), "minmax", 4.0)
  conformity.calibrate(reference, {"cube_edge": values, "noise": values,
                                   "voxel_mm": np.array([2.0, 2.0])})
  c = reference.calibration["cube_edge"]  # one-sided, linear
  assert c["centre"] == 3.0 and c["spread"] == pytest.approx(1.4826)
  assert c["low"] == -math.inf and c["high"] == pytest.approx(3 + conformity.Z_LIMIT * 1.4826)
  c = reference.calibration["noise"]  # two-sided, log scale
  logs = np.log(values)
  spread = 1.4826 * np.median(np.abs(logs - np.median(logs)))
  assert c["low"] == pytest.approx(3 * math.exp(-conformity.Z_LIMIT * spread))
  assert reference.calibration["voxel_mm"]["high"] == pytest.approx(2 * 1.15)
  a = conformity.assess({"cube_edge": 50.0, "noise": 3.0, "voxel_mm": 4.0}, reference)
  assert a.flags == ("voxel_size", "cube_cut") and a.text == "voxel_size;cube_cut"
  assert "cube_edge 50" in a.details[1]


@pytest.mark.slow  # 83 s at load 10: 78 tilt registrations (calibration, template, 48 scans)
def test_gate_flags_corrupted_scans_and_passes_clean_ones():
  """Calibrated on 30 simulated 4 mm subjects; 6 others clean and corrupted."""
  cohort = simulate.Cohort(simulate.CohortConfig(seed=3, n=36, resolution_mm=4,
                                                 sequences=("T1w",)))
  prep = Preprocessing(sequences=("T1w",), voxel_size=4.0)

  def prepared(data, affine):
    measures = {}
    cube, _ = preprocess_subject({"T1w": nib.Nifti1Image(data, affine)}, prep,
                                 measures=measures)
    return cube, measures

  subjects = [cohort.subject(i, ground_truth=False) for i in range(36)]
  train = [prepared(s.images["T1w"], s.affine) for s in subjects[:30]]
  cubes = np.stack([c for c, _ in train])
  reference = conformity.load_reference(Path("/nonexistent"), cubes, "minmax", 4.0,
                                        [m for _, m in train])
  corruptions = bench_conformity.corruptions(4.0)
  corruptions["voxel_fine"] = lambda d, a, rng: bench_conformity.regrid(d, a, 2.0)  # fast
  rng = np.random.default_rng(0)
  names, cubes, scans = [], [], []
  for s in subjects[30:]:
    data = s.images["T1w"].astype(np.float32)
    cases = {"clean": (data, s.affine)}
    cases.update({k: f(data, s.affine, rng) for k, f in corruptions.items()})
    for name, (d, a) in cases.items():
      cube, scan = prepared(d, a)
      names.append(name)
      cubes.append(cube)
      scans.append(scan)
  # All 48 scans in one call (the tilt's registrations in one vmapped batch).
  flagged = {name: 0 for name in ["clean", *corruptions]}
  for name, a in zip(names, conformity.assess_cubes(np.stack(cubes), scans, reference)):
    flagged[name] += bool(a.flags)
  assert flagged.pop("clean") == 0
  assert all(v == 6 for v in flagged.values()), flagged


def test_prepare_writes_the_gate_and_an_old_cache_gets_it(make_bids, tmp_path):
  """prepare's qc.tsv against nibabel (volume, median raw intensity of each file), the stored
  reference against the cubes, and a cache without the gate's files computing the same one."""
  rng = np.random.default_rng(0)
  affine = np.diag([4.0, 4.0, 4.0, 1.0])
  subjects = {}
  for i in range(6):
    data = np.zeros((24, 26, 22), np.int16)
    data[4:18, 5:21, 4:17] = rng.integers(300, 900, (14, 16, 13)) * (1 + 0.1 * i)
    subjects[f"sub-{i + 1:02d}"] = {"age": 30 + i, "T1w": nib.Nifti1Image(data, affine)}
  root = make_bids(subjects)
  prepared = prepare.prepare(bids.read_bids(root, "T1w"), tmp_path / "cache",
                             Preprocessing(shape=(20, 20, 20)))
  lines = (tmp_path / "cache" / conformity.QC_TSV).read_text().splitlines()
  header = lines[0].split("\t")
  rows = {r[0]: dict(zip(header, r)) for r in (line.split("\t") for line in lines[1:])}
  assert sorted(rows) == sorted(subjects)
  for sid, spec in subjects.items():
    data = np.asanyarray(nib.load(root / sid / "anat" / f"{sid}_T1w.nii.gz").dataobj)
    assert float(rows[sid]["brain_volume_ml"]) == pytest.approx((data != 0).sum() * 64 / 1000)
    assert float(rows[sid]["raw_intensity"]) == pytest.approx(np.median(data[data != 0]))
    assert float(rows[sid]["voxel_mm"]) == 4.0
  stored = prepared.conformity
  np.testing.assert_allclose(stored.mean, prepared.volumes.astype(np.float64).mean(0) / 255,
                             atol=1e-6)
  for name in (conformity.REFERENCE_NPZ, conformity.CALIBRATION_JSON):
    (tmp_path / "cache" / name).unlink()
  rebuilt = cache.Cache.open(tmp_path / "cache").conformity
  assert rebuilt.calibration.keys() == stored.calibration.keys()
  for k, c in stored.calibration.items():
    assert rebuilt.calibration[k]["high"] == pytest.approx(c["high"])
