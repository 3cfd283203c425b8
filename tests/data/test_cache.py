"""cache.py, prepare.py: brainage prepare end to end, Cache.open, atomic replacement, skip mode."""

from __future__ import annotations

import argparse
import gzip
import json
import zlib

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
import scipy.stats

from jax_brainage.commands import prepare as prepare_command
from jax_brainage.data import bids, cache, prepare, prune, regions
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject
from jax_brainage.errors import BrainAgeError, ConfigError, DataError
from tests.data.conftest import oriented_affine, with_header

LAS = np.array([[0, -1], [1, 1], [2, 1]], float)
AFFINE = oriented_affine(LAS, zooms=(2.0, 2.0, 2.0), origin=(20.0, -18.0, -14.0))
SHAPE = (18, 20, 15)


def _brain(seed: int, scale: float = 1.0) -> np.ndarray:
  """An off-centre ellipsoid 'brain' with smooth random intensities, int16 [18, 20, 15]."""
  rng = np.random.default_rng(seed)
  ijk = np.indices(SHAPE).astype(float)
  centre = np.array([7.0, 11.0, 6.0]) + rng.uniform(-1, 1, 3)
  radii = np.array([5.0, 6.5, 4.5])
  inside = sum(((ijk[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1
  values = (200 + 600 * rng.random(SHAPE)) * scale
  return np.where(inside, values, 0).astype(np.int16)


def _flair_on_flipped_grid(t1: np.ndarray) -> nib.Nifti1Image:
  """A FLAIR on the same world grid as the T1 but stored in RAS voxel order."""
  flair = (t1.astype(np.float32) * 0.3 + 5 * (t1 > 0))
  canonical = nib.as_closest_canonical(nib.Nifti1Image(flair, AFFINE))
  return nib.Nifti1Image(np.asanyarray(canonical.dataobj).astype(np.float32), canonical.affine)


@pytest.fixture
def dataset(make_bids):
  subjects = {}
  for i, age in enumerate([25.0, 47.5, 80.0]):
    t1 = _brain(i)
    subjects[f"sub-{i + 1:02d}"] = {
        "age": age, "sex": "FM"[i % 2], "T1w": nib.Nifti1Image(t1, AFFINE),
        "FLAIR": _flair_on_flipped_grid(t1)}
  return make_bids(subjects)


PREP = Preprocessing(sequences=("T1w", "FLAIR"), shape=(16, 16, 16))


def _replica_uint8(values: np.ndarray, brain: np.ndarray, q: float = 99.5) -> np.ndarray:
  """Independent replica of the study scaling for non-negative images (floor 0)."""
  ceiling = np.percentile(values[brain].astype(np.float64), q)
  out = np.rint(255.0 * np.clip(values.astype(np.float64), 0, ceiling) / ceiling)
  return np.where(brain, out, 0).astype(np.uint8)


def test_prepare_open_and_map_back(dataset, tmp_path):
  ds = bids.read_bids(dataset, "T1w,FLAIR")
  c = prepare.prepare(ds, tmp_path / "cache", PREP)
  assert len(c) == 3 and c.volumes.shape == (3, 16, 16, 16, 2) and c.volumes.dtype == np.uint8
  assert isinstance(c.volumes, np.memmap)
  np.testing.assert_array_equal(c.ages, np.array([25.0, 47.5, 80.0], np.float32))
  assert c.subject_ids == ["sub-01", "sub-02", "sub-03"] and c.sequences == ("T1w", "FLAIR")
  assert c.shape == (16, 16, 16) and c.records[1]["sex"] == "M"
  index = json.loads((tmp_path / "cache" / "index.json").read_text())
  assert index["format_version"] == cache.FORMAT_VERSION and index["scaling"] == "minmax"
  assert index["source"] == str(dataset.resolve()) and index["voxel_size"] == [2.0, 2.0, 2.0]
  assert index["subjects"][0]["images"]["T1w"] == "sub-01/anat/sub-01_T1w.nii.gz"
  for i in range(3):
    t1 = _brain(i)
    brain = t1 > 0
    inverse = c.inverse(i)
    assert inverse.brain_fits
    back = prune.to_subject_space(np.asarray(c.volumes[i]), inverse)
    np.testing.assert_array_equal(back.affine, AFFINE)
    data = np.asarray(back.dataobj)
    assert data.shape == SHAPE + (2,)
    np.testing.assert_array_equal(data[..., 0], _replica_uint8(t1, brain))
    flair = t1.astype(np.float32) * 0.3 + 5 * brain
    np.testing.assert_array_equal(data[..., 1], _replica_uint8(flair, brain))
    # The cube saved with its own affine lands on the subject in world space (nibabel).
    ref = nib.processing.resample_from_to(prune.cube_image(c.volumes[i][..., 0], inverse),
                                          (SHAPE, AFFINE), order=0)
    np.testing.assert_array_equal(np.asanyarray(ref.dataobj), data[..., 0])


def test_in_memory_images_give_the_same_cube(dataset, tmp_path):
  ds = bids.read_bids(dataset, "T1w,FLAIR")
  c = prepare.prepare(ds, tmp_path / "cache", PREP)
  t1 = _brain(1)
  cube, inverse = preprocess_subject(
      {"T1w": nib.Nifti1Image(t1, AFFINE), "FLAIR": _flair_on_flipped_grid(t1)}, PREP)
  np.testing.assert_array_equal(cube, c.volumes[1])
  assert inverse == c.inverse(1)


def _prepare_cli(argv):
  parser = argparse.ArgumentParser(prog="brainage")
  prepare_command.add_parser(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["prepare"] + [str(a) for a in argv])
  return args.func(args)


def test_cli_with_worker_processes(dataset, tmp_path, capsys):
  assert _prepare_cli(["--data", dataset, "--out", tmp_path / "one", "--sequences", "t1w,flair",
                       "--shape", "16", "--workers", "1", "--quiet"]) == 0
  assert _prepare_cli(["--data", dataset, "--out", tmp_path / "two", "--sequences", "T1w,FLAIR",
                       "--shape", "16,16,16", "--workers", "2", "--quiet"]) == 0
  assert "prepared 3 subjects" in capsys.readouterr().out
  one, two = cache.Cache.open(tmp_path / "one"), cache.Cache.open(tmp_path / "two")
  np.testing.assert_array_equal(np.asarray(one.volumes), np.asarray(two.volumes))
  assert one.records == two.records


def test_default_shape_from_voxel_size(dataset, tmp_path):
  ds = bids.read_bids(dataset, "T1w")
  c = prepare.prepare(ds, tmp_path / "cache", Preprocessing())
  assert c.shape == (98, 98, 98)  # 2 mm voxels: the study's MNI cube
  c4 = prepare.prepare(ds, tmp_path / "c4", Preprocessing(voxel_size=4.0))
  assert c4.shape == (50, 50, 50) and c4.inverse(0).resampled
  assert c4.index["voxel_size"] == [4.0, 4.0, 4.0]


def _snapshot(path):
  return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_failed_prepare_keeps_the_existing_cache(dataset, tmp_path):
  out = tmp_path / "cache"
  prepare.prepare(bids.read_bids(dataset, "T1w"), out, Preprocessing(shape=(16, 16, 16)))
  before = _snapshot(out)
  bad = dataset / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
  bad.write_bytes(bad.read_bytes()[:200])  # truncated
  with pytest.raises(DataError) as e:
    prepare.prepare(bids.read_bids(dataset, "T1w"), out, Preprocessing(shape=(16, 16, 16)))
  assert "\n" not in str(e.value) and "sub-02" in str(e.value) and str(bad) in str(e.value)
  assert _snapshot(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ds"]  # no temporaries left
  assert len(cache.Cache.open(out)) == 3


def test_interrupted_prepare_keeps_the_existing_cache(dataset, tmp_path, monkeypatch):
  out = tmp_path / "cache"
  prepare.prepare(bids.read_bids(dataset, "T1w"), out, Preprocessing(shape=(16, 16, 16)))
  before = _snapshot(out)
  calls = []
  real_work = prepare.prepare_row

  def interrupted(item):
    calls.append(item[0])
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real_work(item)

  monkeypatch.setattr(prepare, "prepare_row", interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(bids.read_bids(dataset, "T1w"), out, Preprocessing(shape=(8, 8, 8)))
  assert _snapshot(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ds"]


def test_skip_bad_subjects(dataset, tmp_path, make_bids):
  prep = Preprocessing(shape=(16, 16, 16))
  clean = prepare.prepare(bids.read_bids(dataset, "T1w"), tmp_path / "clean", prep)
  # sub-02: NaN voxels; sub-04: 4D; sub-05: empty brain; sub-06: in the table without images.
  t1 = _brain(1).astype(np.float32)
  t1[3, 4, 5] = np.nan
  nib.save(nib.Nifti1Image(t1, AFFINE), dataset / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
  for sid, data in [("sub-04", np.stack([_brain(4)] * 2, -1)),
                    ("sub-05", np.zeros(SHAPE, np.int16))]:
    (dataset / sid / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, AFFINE), dataset / sid / "anat" / f"{sid}_T1w.nii.gz")
  with open(dataset / "participants.tsv", "a") as f:
    f.write("sub-04\t50\tF\nsub-05\t51\tM\nsub-06\t52\tF\n")
  with pytest.raises(DataError, match="sub-06"):
    bids.read_bids(dataset, "T1w")
  ds = bids.read_bids(dataset, "T1w", skip_bad=True)
  with pytest.raises(DataError, match="sub-02.*NaN"):
    prepare.prepare(ds, tmp_path / "strict", prep)
  c = prepare.prepare(ds, tmp_path / "skip", prep, skip_bad=True)
  assert c.subject_ids == ["sub-01", "sub-03"]
  np.testing.assert_array_equal(np.asarray(c.volumes), np.asarray(clean.volumes)[[0, 2]])
  np.testing.assert_array_equal(c.ages, [25.0, 80.0])
  reasons = {s["subject_id"]: s["reason"] for s in c.index["skipped"]}
  assert set(reasons) == {"sub-02", "sub-04", "sub-05", "sub-06"}
  assert "NaN" in reasons["sub-02"] and "4D" in reasons["sub-04"]
  assert "empty brain" in reasons["sub-05"] and "no T1w image" in reasons["sub-06"]
  assert all("\n" not in r for r in reasons.values())


def test_zscore_cache(dataset, tmp_path):
  ds = bids.read_bids(dataset, "T1w")
  c = prepare.prepare(ds, tmp_path / "z", Preprocessing(shape=(16, 16, 16), scaling="zscore"))
  assert c.volumes.dtype == np.float16 and c.scaling == "zscore"
  back = np.asarray(prune.to_subject_space(np.asarray(c.volumes[0][..., 0]), c.inverse(0)).dataobj)
  t1 = _brain(0)
  np.testing.assert_allclose(back[t1 > 0], scipy.stats.zscore(t1[t1 > 0].astype(float)),
                             atol=5e-3, rtol=2e-3)


def test_voxel_size_check_and_resampling(dataset, tmp_path):
  coarse = oriented_affine(LAS, zooms=(3.0, 3.0, 3.0), origin=(20.0, -18.0, -14.0))
  path = dataset / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
  nib.save(nib.Nifti1Image(_brain(2), coarse), path)
  ds = bids.read_bids(dataset, "T1w")
  with pytest.raises(DataError) as e:
    prepare.prepare(ds, tmp_path / "c", Preprocessing(shape=(16, 16, 16)))
  assert "sub-03" in str(e.value) and str(path) in str(e.value) and "--voxel-size" in str(e.value)
  c = prepare.prepare(ds, tmp_path / "c", Preprocessing(shape=(30, 30, 30), voxel_size=2.0))
  assert not c.inverse(0).resampled and c.inverse(2).resampled
  assert c.inverse(2).voxel_size == (2.0, 2.0, 2.0)
  # Back on the 3 mm grid, the brain's voxels are where they were (linear interpolation).
  back = np.asarray(prune.to_subject_space(np.asarray(c.volumes[2][..., 0]), c.inverse(2),
                                           order=1).dataobj)
  brain = _brain(2) > 0
  assert back.shape == SHAPE and np.mean((back > 0) == brain) > 0.9


def test_regions_with_atlas_on_another_grid(dataset, tmp_path):
  # Atlas at 1 mm in RAS order: label 1 left of x = 0 mm, label 2 right, 3 in a band at the top.
  shape = (44, 44, 34)
  affine = oriented_affine(np.array([[0, 1], [1, 1], [2, 1]], float), zooms=(1.0, 1.0, 1.0),
                           origin=(-22.0, -20.0, -16.0))
  world = nib.affines.apply_affine(affine, np.indices(shape).reshape(3, -1).T).reshape(*shape, 3)
  labels = np.where(world[..., 0] < 0, 1, 2).astype(np.int16)
  labels[world[..., 2] > 6] = 3
  atlas_path = tmp_path / "atlas_dseg.nii.gz"
  nib.save(nib.Nifti1Image(labels, affine), atlas_path)
  (tmp_path / "atlas_dseg.tsv").write_text("index\tname\n1\tleft\n2\tright\n3\ttop\n")
  ds = bids.read_bids(dataset, "T1w")
  whole = prepare.prepare(ds, tmp_path / "whole", Preprocessing(shape=(16, 16, 16)))
  atlas = regions.load_atlas(atlas_path)
  assert atlas.names == {1: "left", 2: "right", 3: "top"}
  keep = regions.parse_labels("Left,3", atlas)
  assert keep == (1, 3)
  with pytest.raises(ConfigError, match="unknown region 'middle'"):
    regions.parse_labels("middle", atlas)
  with pytest.raises(ConfigError, match="label 7 does not occur"):
    regions.parse_labels("7", atlas)
  c = prepare.prepare(ds, tmp_path / "regional",
                      Preprocessing(shape=(16, 16, 16), regions=keep), atlas=atlas)
  assert (tmp_path / "regional" / "atlas.nii.gz").exists()
  assert c.atlas.names == atlas.names and c.index["regions"]["labels"] == [1, 3]
  for i in range(3):
    # Independent reference: nibabel's nearest-neighbour resampling of the atlas to the cube.
    ref = nib.processing.resample_from_to(nib.Nifti1Image(labels, affine),
                                          ((16, 16, 16), c.inverse(i).cube_affine), order=0)
    inside = np.isin(np.asanyarray(ref.dataobj), keep)
    np.testing.assert_array_equal(c.volumes[i][..., 0],
                                  np.where(inside, whole.volumes[i][..., 0], 0))
    assert c.volumes[i][..., 0][inside].any() and inside.mean() < 0.9


def test_open_errors(dataset, tmp_path):
  def fails(path, *words):
    with pytest.raises(DataError) as e:
      cache.Cache.open(path)
    assert "\n" not in str(e.value)
    for w in words:
      assert w in str(e.value)

  fails(tmp_path / "nothing", "not found", "brainage prepare")
  (tmp_path / "empty").mkdir()
  fails(tmp_path / "empty", "index.json")
  out = tmp_path / "cache"
  prepare.prepare(bids.read_bids(dataset, "T1w"), out, Preprocessing(shape=(8, 8, 8)))
  index_text = (out / "index.json").read_text()
  (out / "index.json").write_text(index_text[:100])
  fails(out, "corrupt cache index")
  index = json.loads(index_text)
  (out / "index.json").write_text(json.dumps({**index, "format_version": 0}))
  fails(out, "format version 0", "re-run")
  (out / "index.json").write_text(json.dumps({**index, "shape": [8, 8, 9]}))
  fails(out, "volumes.npy", "(3, 8, 8, 9, 1)")
  (out / "index.json").write_text(index_text)
  (out / "volumes.npy").write_bytes(b"\x93NUMPY garbage")
  fails(out, "corrupt cache volumes")
  (out / "volumes.npy").unlink()
  fails(out, "volumes missing")


def test_out_must_be_a_cache_or_empty(dataset, tmp_path):
  ds = bids.read_bids(dataset, "T1w")
  precious = tmp_path / "results"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me")
  with pytest.raises(ConfigError, match="not a cache"):
    prepare.prepare(ds, precious, Preprocessing(shape=(8, 8, 8)))
  assert (precious / "notes.txt").read_text() == "keep me"
  (tmp_path / "empty").mkdir()
  assert len(prepare.prepare(ds, tmp_path / "empty", Preprocessing(shape=(8, 8, 8)))) == 3


def test_cli_errors_are_one_line(dataset, tmp_path):
  for argv, exc, words in [
      (["--sequences", "T1w,T3"], ConfigError, ["'T3'"]),
      (["--regions", "1"], ConfigError, ["--atlas"]),
  ]:
    with pytest.raises(exc) as e:
      _prepare_cli(["--data", dataset, "--out", tmp_path / "c", "--quiet"] + argv)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)
  with pytest.raises(BrainAgeError, match="participants.tsv"):
    _prepare_cli(["--data", tmp_path, "--out", tmp_path / "c", "--quiet"])
  with pytest.raises(DataError, match="nowhere: dataset directory not found"):
    _prepare_cli(["--data", tmp_path / "nowhere", "--out", tmp_path / "c", "--quiet"])


def test_image_list_prepare_has_unknown_ages(dataset, tmp_path):
  files = sorted(dataset.glob("sub-*/anat/*_T1w.nii.gz"))
  assert _prepare_cli(["--data", *files, "--out", tmp_path / "pred", "--shape", "8",
                       "--workers", "1", "--quiet"]) == 0
  c = cache.Cache.open(tmp_path / "pred")
  assert c.subject_ids == ["sub-01", "sub-02", "sub-03"] and np.all(np.isnan(c.ages))


def test_cache_preprocesses_new_data_like_its_subjects(dataset, tmp_path):
  ds = bids.read_bids(dataset, "T1w,FLAIR")
  c = prepare.prepare(ds, tmp_path / "cache", PREP)
  t1 = _brain(2)
  cube, inverse = c.preprocess({"T1w": nib.Nifti1Image(t1, AFFINE),
                                "FLAIR": _flair_on_flipped_grid(t1)}, subject="new")
  np.testing.assert_array_equal(cube, c.volumes[2])
  coarse = oriented_affine(LAS, zooms=(3.0, 3.0, 3.0))
  path = tmp_path / "new_T1w.nii.gz"
  nib.save(nib.Nifti1Image(t1, coarse), path)
  nib.save(nib.Nifti1Image(t1, coarse), tmp_path / "new_FLAIR.nii.gz")
  with pytest.raises(DataError) as e:
    c.preprocess({"T1w": path, "FLAIR": tmp_path / "new_FLAIR.nii.gz"}, subject="sub-new")
  assert all(w in str(e.value) for w in ("sub-new", str(path), "3x3x3 mm", "2x2x2 mm"))


def test_stale_temporaries_of_killed_runs_are_removed(dataset, tmp_path):
  stale = tmp_path / ".cache.tmp-999999999-abc"  # No such process.
  stale.mkdir()
  (stale / "volumes.npy").write_bytes(b"half")
  mine = tmp_path / f".cache.tmp-{__import__('os').getpid()}-live"  # A live process's: kept.
  mine.mkdir()
  prepare.prepare(bids.read_bids(dataset, "T1w"), tmp_path / "cache",
                  Preprocessing(shape=(8, 8, 8)))
  assert not stale.exists() and mine.exists()
  # Killed between moving the old cache aside and the new one in: the old one comes back.
  before = _snapshot(tmp_path / "cache")
  (tmp_path / "cache").rename(tmp_path / ".cache.old-1234abcd")
  with pytest.raises(ConfigError):
    prepare.prepare(bids.read_bids(dataset, "T1w"), tmp_path / "cache", Preprocessing(
        sequences=("FLAIR",), shape=(8, 8, 8)))  # fails after the clean-up, before any work
  assert _snapshot(tmp_path / "cache") == before


def test_default_shape_when_the_first_subject_is_bad(dataset, tmp_path):
  bad = dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
  bad.write_bytes(b"not an image")
  ds = bids.read_bids(dataset, "T1w")
  with pytest.raises(DataError, match="sub-01.*corrupt"):
    prepare.prepare(ds, tmp_path / "strict", Preprocessing())
  c = prepare.prepare(ds, tmp_path / "skip", Preprocessing(), skip_bad=True)
  assert c.shape == (98, 98, 98) and c.subject_ids == ["sub-02", "sub-03"]


def test_freesurfer_conformed_mgz(make_bids, tmp_path):
  # FreeSurfer's conformed LIA orientation (brain.finalsurfs.mgz), here at 2 mm.
  lia = np.array([[-2.0, 0, 0, 20], [0, 0, 2.0, -15], [0, -2.0, 0, 18], [0, 0, 0, 1]])
  brains = [_brain(i).astype(np.float32) for i in range(2)]
  root = make_bids({f"sub-{i}": {"age": 30 + i, "T1w": nib.MGHImage(b, lia)}
                    for i, b in enumerate(brains)}, ext=".mgz")
  c = prepare.prepare(bids.read_bids(root, "T1w"), tmp_path / "c", Preprocessing())
  assert c.shape == (98, 98, 98)
  for i, t1 in enumerate(brains):
    back = prune.to_subject_space(np.asarray(c.volumes[i][..., 0]), c.inverse(i))
    np.testing.assert_array_equal(back.affine, lia)
    np.testing.assert_array_equal(np.asarray(back.dataobj), _replica_uint8(t1, t1 > 0))


def test_bias_corrected_cache_records_and_reapplies_the_correction(dataset, tmp_path):
  """--bias-sigma is stored with the cache, changes the cubes, and new data gets it too."""
  ds = bids.read_bids(dataset, "T1w,FLAIR")
  _prepare_cli(["--data", str(dataset), "--out", str(tmp_path / "bc"), "--sequences",
                "T1w,FLAIR", "--shape", "16", "--scaling", "zscore", "--bias-sigma", "6",
                "--workers", "1", "--quiet"])
  corrected = cache.Cache.open(tmp_path / "bc")
  plain = prepare.prepare(ds, tmp_path / "plain", Preprocessing(
      sequences=("T1w", "FLAIR"), shape=(16, 16, 16), scaling="zscore"))
  assert corrected.preprocessing.bias_sigma_mm == 6.0 and plain.preprocessing.bias_sigma_mm == 0
  a = np.asarray(corrected.volumes[0], np.float32)
  b = np.asarray(plain.volumes[0], np.float32)
  assert np.abs(a - b).max() > 0.05 and np.array_equal(a == 0, b == 0)
  t1 = _brain(1)
  cube, _ = corrected.preprocess({"T1w": nib.Nifti1Image(t1, AFFINE),
                                  "FLAIR": _flair_on_flipped_grid(t1)}, subject="new")
  np.testing.assert_array_equal(cube, corrected.volumes[1])
  with pytest.raises(ConfigError, match="bias_sigma_mm"):
    Preprocessing(bias_sigma_mm=-1)


def _row_offset(volumes_path, row: int) -> int:
  """Byte offset of a row of an .npy file (its header read by numpy's format module)."""
  with open(volumes_path, "rb") as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                   np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(f)
    return f.tell() + row * int(np.prod(shape[1:])) * np.dtype(dtype).itemsize


def test_checksums_are_written_and_a_garbled_cache_is_refused(dataset, tmp_path):
  out = tmp_path / "cache"
  c = prepare.prepare(bids.read_bids(dataset, "T1w,FLAIR"), out, PREP)
  # Independent reference: zlib's CRC-32 of each row's bytes.
  rows = [zlib.crc32(np.ascontiguousarray(v).tobytes()) for v in np.load(out / "volumes.npy")]
  assert c.index["checksums"] == {"algorithm": "crc32", "rows": rows}
  assert c.index["format_version"] == 2
  assert len(cache.Cache.open(out)) == 3  # Verified once in this process.

  # 4 KiB of garbage inside row 1, size kept (what the hostile test did).
  start = _row_offset(out / "volumes.npy", 1) + 100
  with open(out / "volumes.npy", "r+b") as f:
    f.seek(start)
    original = f.read(4096)
    f.seek(start)
    f.write(bytes(b ^ 0x5A for b in original))
  with pytest.raises(DataError) as e:
    cache.Cache.open(out)
  message = str(e.value)
  assert "\n" not in message and str(out / "volumes.npy") in message
  assert "row 1 (sub-02) fails its checksum (1 of 3 rows bad)" in message
  assert len(cache.Cache.open(out, verify=False)) == 3  # Index-only uses may skip the check.
  with open(out / "volumes.npy", "r+b") as f:
    f.seek(start)
    f.write(original)
  assert cache.Cache.open(out).subject_ids == ["sub-01", "sub-02", "sub-03"]


def test_an_index_without_checksums_is_refused_unless_it_predates_them(dataset, tmp_path):
  out = tmp_path / "cache"
  prepare.prepare(bids.read_bids(dataset, "T1w"), out, Preprocessing(shape=(8, 8, 8)))
  index = json.loads((out / "index.json").read_text())
  for broken in ({k: v for k, v in index.items() if k != "checksums"},
                 {**index, "checksums": {"algorithm": "md5", "rows": index["checksums"]["rows"]}},
                 {**index, "checksums": {"algorithm": "crc32", "rows": [1, 2]}}):
    (out / "index.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match="corrupt cache index"):
      cache.Cache.open(out)
  # A version-1 cache (written before checksums) still opens, unverified, with its own volumes.
  old = {k: v for k, v in index.items() if k != "checksums"}
  (out / "index.json").write_text(json.dumps({**old, "format_version": 1}))
  opened = cache.Cache.open(out)
  np.testing.assert_array_equal(np.asarray(opened.volumes), np.load(out / "volumes.npy"))
  (out / "index.json").write_text(json.dumps({**index, "format_version": 3}))
  with pytest.raises(DataError, match="format version 3, this code reads 1 to 2; re-run"):
    cache.Cache.open(out)


def test_a_row_that_does_not_read_back_is_an_error(dataset, tmp_path, monkeypatch):
  calls = []
  honest = cache.row_checksum

  def lying(row):  # The workers' checksum of sub-02's cube differs from what lands on disk.
    calls.append(1)
    return honest(row) + (1 if len(calls) == 2 else 0)

  monkeypatch.setattr(prepare, "row_checksum", lying)
  with pytest.raises(DataError, match="row 1 \\(sub-02\\) reads back different"):
    prepare.prepare(bids.read_bids(dataset, "T1w"), tmp_path / "c", Preprocessing(
        shape=(8, 8, 8)))
  assert not (tmp_path / "c").exists()


def test_implausible_first_header_does_not_size_the_cube(dataset, tmp_path):
  # A 1e-3 mm voxel once sized a 198000^3 memmap (OSError); NaN crashed default_cube_shape.
  path = dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
  raw = gzip.decompress(path.read_bytes())
  for fields, what in [(dict(pixdim1=1e-3, pixdim2=1e-3, pixdim3=1e-3, sform_code=0, qform_code=1),
                        "implausible voxel size 0.001x0.001x0.001 mm"),
                       (dict(pixdim1=np.nan, sform_code=0, qform_code=1), "invalid voxel size"),
                       (dict(srow_y=np.array([0, np.inf, 0, 0], np.float32)), "not a finite")]:
    path.write_bytes(gzip.compress(with_header(raw, **fields)))
    ds = bids.read_bids(dataset, "T1w")
    with pytest.raises(DataError, match=f"sub-01: {path}: .*{what}"):
      prepare.prepare(ds, tmp_path / "strict", Preprocessing())
    c = prepare.prepare(ds, tmp_path / "skip", Preprocessing(), skip_bad=True)
    assert c.shape == (98, 98, 98) and c.subject_ids == ["sub-02", "sub-03"]
    assert what in c.index["skipped"][0]["reason"]


def test_cli_age_range(dataset, tmp_path, capsys):
  argv = ["--data", dataset, "--out", tmp_path / "c", "--shape", "8", "--workers", "1", "--quiet"]
  with pytest.raises(DataError, match="sub-02: implausible age '47.5' \\(outside 0 to 30 years"):
    _prepare_cli(argv + ["--age-range", "0,30"])
  assert _prepare_cli(argv + ["--age-range", "0,30", "--skip-bad"]) == 0
  assert cache.Cache.open(tmp_path / "c").subject_ids == ["sub-01"]
  assert "skipped" in capsys.readouterr().err
  with pytest.raises(ConfigError, match="age range"):
    _prepare_cli(argv + ["--age-range", "30"])
