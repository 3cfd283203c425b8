"""Atomic writes: a failed write leaves the previous file intact and no temporary behind."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pytest

from jax_brainage import fileio


def test_failed_write_keeps_previous_content(tmp_path):
  target = tmp_path / "table.tsv"
  fileio.write_text(target, "old\n")
  with pytest.raises(RuntimeError):
    with fileio.atomic_path(target) as tmp:
      tmp.write_text("half")
      raise RuntimeError("interrupted")
  assert target.read_text() == "old\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["table.tsv"]


def test_written_files_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    fileio.write_json(tmp_path / "a.json", {"x": 1})
  finally:
    os.umask(old)
  assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


@pytest.mark.parametrize("name", ["img.nii", "img.nii.gz"])
def test_save_nifti_round_trips_with_nibabel(tmp_path, name):
  data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  affine = np.diag([2.0, 3.0, 4.0, 1.0])
  fileio.save_nifti(nib.Nifti1Image(data, affine), tmp_path / name)
  back = nib.load(tmp_path / name)
  np.testing.assert_array_equal(back.get_fdata(), data)
  np.testing.assert_array_equal(back.affine, affine)
  assert [p.name for p in tmp_path.iterdir()] == [name]
