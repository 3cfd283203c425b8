"""Fuzz: hostile NIfTI headers and bytes, and hostile participants tables, through
`bids.read_bids` + `prepare.prepare` on a 3-subject 4 mm dataset.

Every case ends in one of three ways, and the test checks which one is allowed:
- a one-line `BrainAgeError` naming the culprit (the file, the subject or the table);
- a reported skip (with `skip_bad`: the subject is left out and its one-line reason recorded);
- a correct result, checked against an independent reading: nibabel's reading of the same file
  (units converted to mm as the NIfTI header says), or the ages the table was written with.
Never another exception type, never a hang (each case runs under a SIGALRM deadline) and never a
silent wrong value: mutations for which every reading is wrong (header bytes read as voxels, a
garbled gzip stream, a background made non-zero, implausible voxel sizes or ages) must be errors.

The NIfTI mutations are a fixed list per header field (pixdim, qform/sform codes and matrices,
xyzt_units, scl_slope/scl_inter, vox_offset, dim, datatype, magic) plus seeded random byte
mutations (truncation, bytes flipped in the header, the voxels and inside the gzip stream): 113
cases, a quarter of them in --skip-bad mode. The tables: 43 cases (missing columns, duplicates,
non-numeric, huge, negative, NaN and non-ASCII ages, unicode ids, CRLF, BOM, NUL, a 200 kB
field, 10 000 rows), each strict and with --skip-bad. ~10 s on 2 cores in all.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jax_brainage.data import bids, prepare
from jax_brainage.data.preprocess import Preprocessing, preprocess_subject
from jax_brainage.errors import BrainAgeError
from tests.data.conftest import with_header

SHAPE = (20, 24, 20)
ZOOM = 4.0
AGES = {"sub-01": 25.0, "sub-02": 47.5, "sub-03": 80.0}
# LAS voxel order, 4 mm, off-centre origin (an ordinary scanner-like header).
AFFINE = np.array([[-ZOOM, 0, 0, 38.0], [0, ZOOM, 0, -50.0], [0, 0, ZOOM, -30.0], [0, 0, 0, 1]])
PREP = Preprocessing()  # Default cube from the voxel size: 50^3 at 4 mm.
DEADLINE_S = 20
# How the mutated file of sub-01 may end: "error" (a one-line BrainAgeError), "same" (success
# with the unmutated cube), "nibabel" (an error, or success matching nibabel's reading).
ERROR, SAME, NIBABEL = "error", "same", "nibabel"


def _brain(seed: int) -> np.ndarray:
  """An ellipsoid 'brain' with smooth random intensities in a zero background, int16."""
  rng = np.random.default_rng(seed)
  ijk = np.indices(SHAPE).astype(float)
  centre = np.array([9.0, 12.0, 9.0]) + rng.uniform(-1, 1, 3)
  radii = np.array([6.0, 8.0, 6.0])
  inside = sum(((ijk[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1
  return np.where(inside, 200 + 600 * rng.random(SHAPE), 0).astype(np.int16)


def _nifti_bytes(data: np.ndarray) -> bytes:
  img = nib.Nifti1Image(data, AFFINE)
  img.set_qform(AFFINE, code=1)
  img.set_sform(AFFINE, code=1)
  img.header.set_xyzt_units("mm", "sec")
  return img.to_bytes()


TABLE = "participant_id\tage\tsex\n" + "".join(
    f"{sid}\t{age:g}\t{'FM'[i % 2]}\n" for i, (sid, age) in enumerate(AGES.items()))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """The unmutated dataset's files and its prepared cache (the reference for "same")."""
  root = tmp_path_factory.mktemp("fuzz") / "base"
  raw = {}
  for i, sid in enumerate(AGES):
    raw[sid] = _nifti_bytes(_brain(i))
    anat = root / sid / "anat"
    anat.mkdir(parents=True)
    (anat / f"{sid}_T1w.nii.gz").write_bytes(gzip.compress(raw[sid], compresslevel=1))
  (root / "participants.tsv").write_text(TABLE)
  prepared = prepare.prepare(bids.read_bids(root), root.parent / "base_cache", PREP)
  assert prepared.subject_ids == list(AGES) and prepared.shape == (50, 50, 50)
  return {"root": root, "raw": raw, "volumes": np.array(prepared.volumes),
          "records": prepared.records}


@contextlib.contextmanager
def _deadline(seconds: int):
  """Fails a case that runs longer than `seconds` (a hang) instead of blocking the suite."""
  def expire(signum, frame):
    raise TimeoutError(f"case still running after {seconds} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _dataset(base, tmp_path, *, sub01: tuple[str, bytes] | None = None,
             table: bytes | None = None) -> Path:
  """A copy of the base dataset with sub-01's T1w replaced by (file name, bytes) and/or another
  participants.tsv."""
  root = tmp_path / "ds"
  shutil.copytree(base["root"], root)
  if sub01 is not None:
    anat = root / "sub-01" / "anat"
    (anat / "sub-01_T1w.nii.gz").unlink()
    (anat / sub01[0]).write_bytes(sub01[1])
  if table is not None:
    (root / "participants.tsv").write_bytes(table)
  return root


def _run(root: Path, out: Path, skip_bad: bool):
  """read_bids + prepare; returns (cache or None, the BrainAgeError or None)."""
  with _deadline(DEADLINE_S):
    try:
      dataset = bids.read_bids(root, skip_bad=skip_bad)
      return prepare.prepare(dataset, out, PREP, skip_bad=skip_bad), dataset, None
    except BrainAgeError as e:
      return None, None, e


def _assert_one_line(error: BaseException, *names: str) -> None:
  message = str(error)
  assert message and "\n" not in message, f"not one line: {message!r}"
  assert any(n in message for n in names), f"{message!r} names none of {names}"


# ---------------------------------------------------------------------------------------------
# NIfTI header mutations.


def _header(raw: bytes) -> nib.Nifti1Header:
  return nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)


def _rotated_sform(raw: bytes, degrees: float) -> bytes:
  """`raw` with its sform (and qform) turned by `degrees` about the world z axis."""
  t = np.radians(degrees)
  rotation = np.eye(4)
  rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
  affine = rotation @ AFFINE
  return with_header(raw, srow_x=affine[0], srow_y=affine[1], srow_z=affine[2])


def _scaled_sform(raw: bytes, row: int, factor: float) -> bytes:
  hdr = _header(raw)
  key = f"srow_{'xyz'[row]}"
  with np.errstate(invalid="ignore", over="ignore"):
    return with_header(raw, **{key: hdr[key] * np.float32(factor)})


PIXDIM_QFORM = [(v, ERROR) for v in (np.nan, 0.0, np.inf, -np.inf, 1e-3, 50.0)] + [
    (-ZOOM, NIBABEL), (ZOOM * 1.0004, NIBABEL)]
PIXDIM_SFORM = [(np.nan, ERROR), (0.0, ERROR), (np.inf, ERROR), (1e-3, NIBABEL), (-ZOOM, SAME)]
SROW = [(np.nan, ERROR), (np.inf, ERROR), (0.0, ERROR), (1e-4, ERROR), (1e4, ERROR),
        (-1.0, NIBABEL), (1.0004, NIBABEL)]
CODES = [((0, 0), ERROR), ((1, 0), SAME), ((0, 1), SAME), ((5, 2), SAME), ((-1, 1), NIBABEL),
         ((300, 300), NIBABEL)]
UNITS = [(0, SAME), (1, ERROR), (2, SAME), (3, ERROR), (4, ERROR), (7, ERROR), (2 + 8, SAME),
         (2 + 24, SAME), (0xFF, ERROR)]
SCALING = [((np.nan, 0.0), ERROR), ((np.inf, 0.0), ERROR), ((-1.0, 0.0), ERROR),
           ((0.0, 0.0), SAME), ((2.0, 0.0), NIBABEL), ((1e30, 0.0), NIBABEL),
           ((1.0, 1e6), ERROR), ((1.0, -5.0), ERROR), ((1.0, np.nan), ERROR),
           ((1.0, np.inf), ERROR)]
VOX_OFFSET = [(v, ERROR) for v in (0.0, 100.0, 348.0, 351.0, 353.0, 368.0, 1e9, np.nan, -352.0)]
DATATYPE = [(2, NIBABEL), (4, SAME), (8, ERROR), (16, ERROR), (32, ERROR), (64, ERROR),
            (128, ERROR), (256, NIBABEL), (512, NIBABEL), (1024, ERROR), (2304, ERROR), (0, ERROR),
            (999, ERROR)]


def _dims(*values) -> np.ndarray:
  dim = np.ones(8, np.int16)
  dim[: len(values)] = values
  return dim


DIMS = [(_dims(4, *SHAPE, 1), SAME), (_dims(4, *SHAPE, 2), ERROR), (_dims(2, 20, 24), ERROR),
        (_dims(3, 0, 24, 20), ERROR), (_dims(3, -1, 24, 20), ERROR),
        (_dims(3, 30000, 30000, 30000), ERROR), (_dims(9, *SHAPE), ERROR),
        (_dims(3, 19, 24, 20), NIBABEL), (_dims(0, *SHAPE), ERROR)]


def _header_cases():
  """(id, mutate(raw) -> (file name, bytes), expectation)."""
  nii = "sub-01_T1w.nii"
  cases = []

  def add(name, make, expect, gz=False):
    def mutate(raw, make=make, gz=gz):
      data = make(raw)
      return (nii + ".gz", gzip.compress(data, compresslevel=1)) if gz else (nii, data)
    cases.append((name, mutate, expect))

  for i, (v, expect) in enumerate(PIXDIM_QFORM):
    add(f"pixdim{1 + i % 3}={v:g},qform", lambda r, v=v, i=i: with_header(
        r, sform_code=0, **{f"pixdim{1 + i % 3}": v}), expect, gz=i % 2 == 0)
  for i, (v, expect) in enumerate(PIXDIM_SFORM):
    add(f"pixdim{1 + i % 3}={v:g},sform", lambda r, v=v, i=i: with_header(
        r, **{f"pixdim{1 + i % 3}": v}), expect)
  for i, (v, expect) in enumerate(SROW):
    add(f"srow_{'xyz'[i % 3]}*{v:g}", lambda r, v=v, i=i: _scaled_sform(r, i % 3, v), expect,
        gz=i % 2 == 1)
  for degrees in (0.01, 5.0, 30.0, 90.0, 180.0):
    add(f"sform_rotated_{degrees:g}deg", lambda r, d=degrees: _rotated_sform(r, d),
        SAME if degrees == 0.01 else NIBABEL)
  add("sform_nan_with_qform_code_1", lambda r: with_header(
      r, srow_x=np.array([np.nan, 0, 0, 0], np.float32)), ERROR)
  add("qform_quatern_nan,sform_code_0", lambda r: with_header(
      r, sform_code=0, quatern_b=np.nan), ERROR)
  add("qform_quatern_nan,sform_used", lambda r: with_header(r, quatern_b=np.nan), SAME)
  add("qform_quatern_b=2,sform_code_0", lambda r: with_header(r, sform_code=0, quatern_b=2.0),
      NIBABEL)
  add("qoffset_1e30,sform_code_0", lambda r: with_header(r, sform_code=0, qoffset_x=1e30),
      NIBABEL)
  add("pixdim0_qfac=-1,sform_code_0", lambda r: with_header(r, sform_code=0, pixdim0=-1.0),
      NIBABEL)
  for (q, s), expect in CODES:
    add(f"codes_q{q}_s{s}", lambda r, q=q, s=s: with_header(r, qform_code=q, sform_code=s),
        expect)
  for units, expect in UNITS:
    add(f"xyzt_units={units}", lambda r, u=units: with_header(r, xyzt_units=u), expect,
        gz=units % 2 == 0)
  for (slope, inter), expect in SCALING:
    add(f"scl={slope:g},{inter:g}", lambda r, s=slope, i=inter: with_header(
        r, scl_slope=s, scl_inter=i), expect)
  for offset, expect in VOX_OFFSET:
    add(f"vox_offset={offset:g}", lambda r, o=offset: with_header(r, vox_offset=o), expect,
        gz=offset == 0.0)
  for code, expect in DATATYPE:
    add(f"datatype={code}", lambda r, c=code: with_header(r, datatype=c), expect)
  for dim, expect in DIMS:
    add(f"dim={','.join(map(str, dim[:dim[0] + 1 if 0 < dim[0] < 8 else 4]))}",
        lambda r, d=dim: with_header(r, dim=d), expect)
  add("magic=ni1", lambda r: with_header(r, magic=b"ni1"), NIBABEL)
  add("magic=garbage", lambda r: with_header(r, magic=b"xyz"), NIBABEL)
  add("sizeof_hdr=0", lambda r: with_header(r, sizeof_hdr=0), NIBABEL)
  return cases


def _byte_cases(seed: int = 19):
  """Seeded random byte mutations: (id, mutate(raw) -> (file name, bytes), expectation)."""
  rng = np.random.default_rng(seed)
  nii, gz = "sub-01_T1w.nii", "sub-01_T1w.nii.gz"
  cases = []
  for k in range(4):  # Truncated files, uncompressed and gzipped.
    cut = int(rng.integers(1, 352 + 2 * int(np.prod(SHAPE)) - 1))
    cases.append((f"truncated_nii_at_{cut}", lambda r, c=cut: (nii, r[:c]), ERROR))
    cases.append((f"truncated_gz_at_{k}", lambda r, f=rng.uniform(0.05, 0.999): (
        gz, (lambda z: z[: int(len(z) * f)])(gzip.compress(r, compresslevel=6))), ERROR))
  for level in (0, 6):  # Bytes flipped inside the deflate stream: the CRC must catch them.
    for _ in range(3):
      where = float(rng.uniform(0.02, 0.98))

      def garbled(r, level=level, where=where):
        z = bytearray(gzip.compress(r, compresslevel=level))
        pos = 10 + int(where * (len(z) - 18))  # Past the 10-byte gzip header.
        z[pos] ^= 0xFF
        return gz, bytes(z)
      cases.append((f"gzip_l{level}_flipped_at_{where:.2f}", garbled, ERROR))
  cases.append(("gzip_header_mtime_changed", lambda r: (gz, (lambda z: z[:4] + b"\x01\x02\x03\x04"
                                                             + z[8:])(gzip.compress(r))), SAME))
  cases.append(("gzip_trailing_garbage", lambda r: (gz, gzip.compress(r) + b"garbage"), NIBABEL))
  cases.append(("gzip_two_members", lambda r: (gz, gzip.compress(r) + gzip.compress(b"x" * 99)),
                NIBABEL))
  for _ in range(4):  # A byte flipped in the header: anything but a traceback.
    pos = int(rng.integers(0, 348))
    cases.append((f"header_byte_{pos}_flipped", lambda r, p=pos: (
        nii, r[:p] + bytes([r[p] ^ 0xFF]) + r[p + 1:]), NIBABEL))
  for _ in range(2):  # A voxel byte flipped: undetectable in NIfTI, so nibabel's reading.
    pos = 352 + int(rng.integers(0, 2 * int(np.prod(SHAPE))))
    cases.append((f"voxel_byte_{pos}_flipped", lambda r, p=pos: (
        nii, r[:p] + bytes([r[p] ^ 0x55]) + r[p + 1:]), NIBABEL))
  return cases


NIFTI_CASES = _header_cases() + _byte_cases()


def _nibabel_reading(path: Path) -> nib.Nifti1Image | None:
  """The independent reference: nibabel's voxels and affine, units converted to mm."""
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    affine = np.array(img.affine, np.float64)
  except Exception:
    return None
  units = int(img.header["xyzt_units"]) & 7 if hasattr(img.header, "get_xyzt_units") else 0
  affine[:3] *= {1: 1000.0, 3: 1e-3}.get(units, 1.0)
  return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize("name,mutate,expect", NIFTI_CASES, ids=[c[0] for c in NIFTI_CASES])
def test_nifti_mutation(base, tmp_path, name, mutate, expect):
  file_name, data = mutate(base["raw"]["sub-01"])
  root = _dataset(base, tmp_path, sub01=(file_name, data))
  path = root / "sub-01" / "anat" / file_name
  skip_bad = sum(map(ord, name)) % 4 == 0  # A quarter of the cases in --skip-bad mode.
  prepared, _, error = _run(root, tmp_path / "cache", skip_bad)

  if error is not None:
    assert expect != SAME, f"{name}: refused a harmless change: {error}"
    _assert_one_line(error, str(path), "sub-01")
    return
  rows = dict(zip(prepared.subject_ids, range(len(prepared))))
  for sid in ("sub-02", "sub-03"):  # The untouched subjects are prepared as always.
    np.testing.assert_array_equal(prepared.volumes[rows[sid]],
                                  base["volumes"][list(AGES).index(sid)])
  if "sub-01" not in rows:
    assert skip_bad and expect != SAME, f"{name}: sub-01 left out without --skip-bad"
    (reason,) = [s["reason"] for s in prepared.index["skipped"] if s["subject_id"] == "sub-01"]
    _assert_one_line(reason, str(path), "sub-01")
    return
  assert expect != ERROR, f"{name}: accepted a file every reading of which is wrong"
  cube = prepared.volumes[rows["sub-01"]]
  if expect == SAME:
    np.testing.assert_array_equal(cube, base["volumes"][0])
    return
  reference = _nibabel_reading(path)
  assert reference is not None, f"{name}: read a file nibabel cannot read"
  expected, inverse = preprocess_subject({"T1w": reference}, prepared.preprocessing,
                                               subject="sub-01")
  np.testing.assert_array_equal(cube, expected)
  np.testing.assert_allclose(prepared.inverse(rows["sub-01"]).original_affine,
                             inverse.original_affine, rtol=1e-12)


def test_oblique_sform_is_not_the_unrotated_cube(base, tmp_path):
  """The 30-degree case above matches nibabel's reading; here: it differs from the unrotated
  scan's cube (before the fix both gave the same cube), and its cube grid is axis-aligned."""
  raw = _rotated_sform(base["raw"]["sub-01"], 30.0)
  prepared, _, error = _run(_dataset(base, tmp_path, sub01=("sub-01_T1w.nii", raw)),
                            tmp_path / "cache", False)
  assert error is None
  inverse = prepared.inverse(0)
  assert inverse.resampled
  assert np.degrees(np.max(nib.affines.obliquity(inverse.cube_affine))) < 1e-9
  assert not np.array_equal(prepared.volumes[0], base["volumes"][0])


# ---------------------------------------------------------------------------------------------
# participants.tsv mutations.


def _table(rows: list[list[str]], header=("participant_id", "age", "sex"), eol="\n") -> bytes:
  return (eol.join("\t".join(r) for r in [list(header)] + rows) + eol).encode("utf-8")


def _rows(**ages) -> list[list[str]]:
  """The base rows with some ages replaced (sub_02="abc")."""
  out = []
  for i, (sid, age) in enumerate(AGES.items()):
    out.append([sid, ages.get(sid.replace("-", "_"), f"{age:g}"), "FM"[i % 2]])
  return out


# Age strings for sub-02 -> the age they mean, or None for "must be refused".
AGE_VALUES = {
    "47.5": 47.5, "+47.5": 47.5, "4.75e1": 47.5, "0": 0.0, "120": 120.0, "47.": 47.0,
    "abc": None, "12y": None, "1,5": None, "0x1F": None, "4_7": None, "inf": None,
    "-inf": None, "nan": None, "NaN": None, "n/a": None, "": None, "1e400": None, "-5": None,
    "999": None, "120.5": None, "1e308": None, "\u0664\u0667": None, "\uff14\uff17": None,
}


def _tsv_cases():
  """(id, table bytes, {subject: age} expected or None for an error/skip of sub-02)."""
  base_rows = _rows()
  cases = [(f"age={value!r}", _table(_rows(sub_02=value)),
            None if age is None else {**AGES, "sub-02": age}) for value, age in AGE_VALUES.items()]
  cases += [
      ("crlf", _table(base_rows, eol="\r\n"), AGES),
      ("bom", b"\xef\xbb\xbf" + _table(base_rows), AGES),
      ("Age_column_capitalised", _table(base_rows, header=("participant_id", "Age", "sex")),
       AGES),
      ("ids_without_sub_prefix", _table([[r[0][4:]] + r[1:] for r in base_rows]), AGES),
      ("padded_cells", _table([[f" {c} " for c in r] for r in base_rows]), AGES),
      ("quoted_ids", _table([[f'"{r[0]}"'] + r[1:] for r in base_rows]), AGES),
      ("extra_covariates", _table([r + ["nan", "\u00fc", "1e400"] for r in base_rows],
                                  header=("participant_id", "age", "sex", "a", "b", "c")), AGES),
      ("no_age_column", _table([[r[0], r[2]] for r in base_rows], ("participant_id", "sex")),
       "error"),
      ("no_id_column", _table([r[1:] for r in base_rows], ("age", "sex")), "error"),
      ("duplicated_sub_02", _table(base_rows + [base_rows[1]]), None),
      ("unicode_subject_without_images", _table(base_rows + [["sub-\u00fc\u00df", "30", "F"]]),
       "extra"),
      ("ragged_row", _table(base_rows[:2] + [base_rows[2] + ["x"]]), "error"),
      ("lone_quote", _table([['"sub-01'] + base_rows[0][1:]] + base_rows[1:]), "error"),
      ("invalid_utf8", _table(base_rows)[:-3] + b"\xff\xfe\n", "error"),
      ("nul_byte", _table(base_rows).replace(b"sub-03", b"sub-\x0003"), "any"),
      ("empty_file", b"", "error"),
      ("header_only", _table([]), "error"),
      ("huge_field", _table(base_rows + [["sub-04", "3" * 200_000, "F"]]), "error"),
      ("ten_thousand_rows_without_images",
       _table(base_rows + [[f"sub-x{i:05d}", "50", "M"] for i in range(10_000)]), "extra"),
  ]
  return cases


TSV_CASES = _tsv_cases()


@pytest.mark.parametrize("name,table,expected", TSV_CASES, ids=[c[0] for c in TSV_CASES])
@pytest.mark.parametrize("skip_bad", [False, True], ids=["strict", "skip_bad"])
def test_participants_mutation(base, tmp_path, name, table, expected, skip_bad):
  root = _dataset(base, tmp_path, table=table)
  tsv = str(root / "participants.tsv")
  prepared, dataset, error = _run(root, tmp_path / "cache", skip_bad)
  if error is not None:
    assert expected in ("error", "any") or (expected in (None, "extra") and not skip_bad), (
        f"{name}: refused a correct table: {error}")
    _assert_one_line(error, tsv, str(root), "sub-")
    return
  assert expected not in ("error",), f"{name}: accepted a broken table"
  ages = dict(zip(prepared.subject_ids, prepared.ages.tolist()))
  if expected == "any":
    assert set(ages) <= set(AGES) and all(ages[s] == AGES[s] for s in ages)
    return
  if expected in (None, "extra"):
    # Only with skip_bad: the bad rows are reported, everything else is as written.
    assert skip_bad, f"{name}: accepted a bad row without --skip-bad"
    assert dataset.skipped and all(_assert_one_line(why, tsv, str(root)) is None
                                   for _, why in dataset.skipped)
    want = {s: a for s, a in AGES.items() if expected == "extra" or s != "sub-02"}
  else:
    want = expected
  assert ages == pytest.approx(want)
  assert [r["age"] for r in prepared.records] == pytest.approx([want[s] for s in ages])
