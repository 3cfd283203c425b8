"""bids.py: reading and validating BIDS-like datasets; one-line errors; skip mode; file lists."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from jax_brainage.data import bids
from jax_brainage.errors import ConfigError, DataError


def _img(value=1.0):
  return nib.Nifti1Image(np.full((4, 4, 4), value, np.float32), np.eye(4))


def _dataset(make_bids, **extra):
  subjects = {
      "sub-01": {"age": 34.5, "sex": "F", "T1w": _img(), "FLAIR": _img()},
      "sub-02": {"age": 71, "sex": "male", "T1w": _img(), "FLAIR": _img()},
      "sub-03": {"age": 18, "sex": "n/a", "T1w": _img(), "FLAIR": _img()},
  }
  subjects.update(extra)
  return make_bids(subjects)


def _fails(exc, fn, *args, names=(), **kw) -> str:
  with pytest.raises(exc) as e:
    fn(*args, **kw)
  message = str(e.value)
  assert "\n" not in message, message
  for name in names:
    assert str(name) in message, (name, message)
  return message


def test_reads_subjects_in_table_order(make_bids):
  root = _dataset(make_bids)
  ds = bids.read_bids(root, "T1w,FLAIR")
  assert ds.sequences == ("T1w", "FLAIR")
  assert [s.subject_id for s in ds.subjects] == ["sub-01", "sub-02", "sub-03"]
  assert [s.age for s in ds.subjects] == [34.5, 71.0, 18.0]
  assert [s.sex for s in ds.subjects] == ["F", "M", None]
  first = ds.subjects[0]
  assert first.images == {"T1w": str(root / "sub-01/anat/sub-01_T1w.nii.gz"),
                          "FLAIR": str(root / "sub-01/anat/sub-01_FLAIR.nii.gz")}
  assert first.session is None and ds.skipped == ()


def test_case_insensitive_suffixes_extensions_and_covariates(tmp_path):
  root = tmp_path / "ds"
  (root / "sub-A1" / "anat").mkdir(parents=True)
  (root / "sub-B2" / "anat").mkdir(parents=True)
  nib.save(_img(), root / "sub-A1/anat/sub-A1_t1w.nii")
  nib.save(nib.MGHImage(np.ones((4, 4, 4), np.float32), np.eye(4)),
           root / "sub-B2/anat/sub-B2_acq-mprage_T1W.mgz")
  nib.save(_img(), root / "sub-B2/anat/sub-B2_SWI.nii.gz")
  (root / "sub-A1/anat/.sub-A1_T1w.nii.gz.abc.tmp").write_bytes(b"half written")
  (root / "participants.tsv").write_text(
      "participant_id\tAge\tSex\tdiabetes\tsite\n"
      "A1\t40\tm\t1\tleipzig\n"
      "sub-B2\t55.25\tF\tn/a\tberlin\n")
  ds = bids.read_bids(root, ["t1W"])
  assert [s.subject_id for s in ds.subjects] == ["sub-A1", "sub-B2"]
  assert ds.subjects[1].images["T1w"].endswith("sub-B2_acq-mprage_T1W.mgz")
  assert ds.subjects[0].covariates == {"diabetes": 1.0, "site": "leipzig"}
  assert ds.subjects[1].covariates == {"diabetes": None, "site": "berlin"}
  assert ds.subjects[0].sex == "M" and ds.subjects[1].age == 55.25
  swi = bids.read_bids(root, "swi", skip_bad=True)
  assert [s.subject_id for s in swi.subjects] == ["sub-B2"]
  assert swi.skipped[0][0] == "sub-A1"


def test_sessions(tmp_path):
  root = tmp_path / "ds"
  for ses in ("1", "2"):
    anat = root / "sub-01" / f"ses-{ses}" / "anat"
    anat.mkdir(parents=True)
    nib.save(_img(), anat / f"sub-01_ses-{ses}_T1w.nii.gz")
  (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t50\n")
  # Every session is a row (tests/data/test_layouts.py has ages per session).
  ds = bids.read_bids(root, "T1w")
  assert [(s.subject_id, s.session, s.age) for s in ds.subjects] == [
      ("sub-01", "1", 50.0), ("sub-01", "2", 50.0)]
  ds = bids.read_bids(root, "T1w", session="2")
  assert ds.subjects[0].session == "2"
  assert ds.subjects[0].images["T1w"].endswith("sub-01_ses-2_T1w.nii.gz")


def test_missing_table_and_columns(tmp_path, make_bids):
  _fails(DataError, bids.read_bids, tmp_path / "nowhere", names=("nowhere", "not found"))
  (tmp_path / "empty").mkdir()
  _fails(DataError, bids.read_bids, tmp_path / "empty",
         names=("participants.tsv", "not found"))
  root = make_bids({"sub-01": {"T1w": _img()}}, name="noage", header=["participant_id", "x", "y"])
  _fails(DataError, bids.read_bids, root, names=("participants.tsv", "'age'"))
  assert bids.read_bids(root, require_age=False).subjects[0].age is None
  bad = tmp_path / "noid"
  bad.mkdir()
  (bad / "participants.tsv").write_text("subject\tage\n01\t30\n")
  _fails(DataError, bids.read_bids, bad, names=("participants.tsv", "participant_id"))


def test_unknown_sequence_is_config_error(make_bids):
  root = _dataset(make_bids)
  _fails(ConfigError, bids.read_bids, root, "T1w,T1", names=("'T1'", "T1w, T2w, FLAIR"))
  _fails(ConfigError, bids.parse_sequences, "T1w,t1w", names=("twice",))


def test_subject_without_images(make_bids):
  root = _dataset(make_bids, **{"sub-04": {"age": 60, "T1w": _img(), "FLAIR": None}})
  _fails(DataError, bids.read_bids, root, "T1w,FLAIR",
         names=("sub-04", "no FLAIR image", str(root / "sub-04" / "anat"), "line 5"))
  ds = bids.read_bids(root, "T1w,FLAIR", skip_bad=True)
  assert [s.subject_id for s in ds.subjects] == ["sub-01", "sub-02", "sub-03"]
  assert ds.skipped[0][0] == "sub-04" and "no FLAIR image" in ds.skipped[0][1]
  assert len(bids.read_bids(root, "T1w")) == 4


def test_images_without_a_row(make_bids):
  root = _dataset(make_bids, **{"sub-09": {"row": False, "T1w": _img()}})
  _fails(DataError, bids.read_bids, root, "T1w",
         names=("sub-09", "without a row", "sub-09_T1w.nii.gz", "participants.tsv"))
  ds = bids.read_bids(root, "T1w", skip_bad=True)
  assert len(ds) == 3 and ds.skipped[0][0] == "sub-09"
  # A FLAIR-only analysis does not care about a stray T1w.
  assert len(bids.read_bids(root, "FLAIR")) == 3


def test_duplicated_ids(make_bids):
  root = _dataset(make_bids, **{"sub-02": {"age": 71, "T1w": _img()}})
  root2 = make_bids({"sub-01": {"age": 30, "T1w": _img()}, "sub-02": {"age": 31, "T1w": _img()}},
                    name="dup", rows=["02\t33\tF"])
  _fails(DataError, bids.read_bids, root2, names=("sub-02", "duplicated", "line 4", "line 3"))
  ds = bids.read_bids(root2, skip_bad=True)
  assert [s.subject_id for s in ds.subjects] == ["sub-01"]
  assert [sid for sid, _ in ds.skipped] == ["sub-02"]
  assert len(bids.read_bids(root)) == 3


@pytest.mark.parametrize("age,what", [("n/a", "missing age"), ("", "missing age"),
                                      ("forty", "non-numeric"), ("-3", "implausible"),
                                      ("inf", "non-numeric"), ("999", "implausible"),
                                      ("4_7", "non-numeric"), ("\uff14\uff17", "non-numeric")])
def test_bad_ages(make_bids, age, what):
  root = _dataset(make_bids, **{"sub-05": {"age": age, "T1w": _img(), "FLAIR": _img()}})
  _fails(DataError, bids.read_bids, root, names=("sub-05", what, "participants.tsv", "line 5"))
  ds = bids.read_bids(root, skip_bad=True)
  assert len(ds) == 3 and ds.skipped[0][0] == "sub-05"
  assert bids.read_bids(root, require_age=False, skip_bad=True).subjects  # prediction path


def test_age_range(make_bids):
  root = _dataset(make_bids, **{"sub-05": {"age": 121, "T1w": _img(), "FLAIR": _img()},
                                "sub-06": {"age": 0, "T1w": _img(), "FLAIR": _img()}})
  message = _fails(DataError, bids.read_bids, root, names=("sub-05", "participants.tsv",
                                                           "line 5", "0 to 120"))
  assert "implausible age '121'" in message
  ds = bids.read_bids(root, skip_bad=True)  # 0 (a newborn) is inside the default range.
  assert [s.subject_id for s in ds.subjects] == ["sub-01", "sub-02", "sub-03", "sub-06"]
  assert [sid for sid, _ in ds.skipped] == ["sub-05"]
  wide = bids.read_bids(root, age_range="0,150")
  assert [s.age for s in wide.subjects] == [34.5, 71.0, 18.0, 121.0, 0.0]
  _fails(DataError, bids.read_bids, root, age_range=(18, 80), names=("sub-05", "18 to 80"))
  for bad in ("10", "50,10", "a,b", "0,inf", (1, 2, 3)):
    _fails(ConfigError, bids.read_bids, root, age_range=bad, names=("age range",))


def test_ragged_table_row(tmp_path):
  root = tmp_path / "ds"
  (root / "sub-01" / "anat").mkdir(parents=True)
  nib.save(_img(), root / "sub-01/anat/sub-01_T1w.nii.gz")
  (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\textra\n")
  _fails(DataError, bids.read_bids, root, names=("participants.tsv", "line 2"))


def test_every_subject_bad_is_an_error_even_when_skipping(make_bids):
  root = make_bids({"sub-01": {"age": "x", "T1w": _img()}})
  _fails(DataError, bids.read_bids, root, skip_bad=True, names=("no usable subject", "sub-01"))


def test_mask_suffix(tmp_path):
  root = tmp_path / "ds"
  anat = root / "sub-01" / "anat"
  anat.mkdir(parents=True)
  nib.save(_img(), anat / "sub-01_T1w.nii.gz")
  nib.save(_img(), anat / "sub-01_desc-brain_mask.nii.gz")
  (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t50\n")
  ds = bids.read_bids(root, "T1w", mask_suffix="mask")
  assert ds.subjects[0].mask.endswith("sub-01_desc-brain_mask.nii.gz")
  assert set(ds.subjects[0].images) == {"T1w"}


def test_image_list(tmp_path):
  paths = []
  for name in ("sub-07_ses-2_T1w.nii.gz", "patient_x.nii", "scan.mgz"):
    path = tmp_path / name
    img = _img() if not name.endswith(".mgz") else nib.MGHImage(
        np.ones((4, 4, 4), np.float32), np.eye(4))
    nib.save(img, path)
    paths.append(path)
  ds = bids.read_image_list(paths)
  assert [(s.subject_id, s.session) for s in ds.subjects] == [
      ("sub-07", "2"), ("patient_x", None), ("scan", None)]
  assert all(s.age is None for s in ds.subjects)
  assert ds.subjects[1].images == {"T1w": str(paths[1])}
  _fails(DataError, bids.read_image_list, paths + [tmp_path / "gone.nii.gz"],
         names=("gone.nii.gz", "not found"))
  (tmp_path / "other").mkdir()
  nib.save(_img(), tmp_path / "other" / "patient_x.nii")
  # Same name in two folders: the folder tells them apart (never one id for two files).
  ds = bids.read_image_list(paths + [tmp_path / "other" / "patient_x.nii"])
  assert [s.subject_id for s in ds.subjects][1:] == [
      f"{tmp_path.name}_patient_x", "scan", "other_patient_x"]
  _fails(DataError, bids.read_image_list, paths + [paths[1]], names=("patient_x", "duplicated"))
  ds = bids.read_image_list(paths + [tmp_path / "gone.nii.gz"], skip_bad=True)
  assert len(ds) == 3 and ds.skipped[0][0] == "gone"
