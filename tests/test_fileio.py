"""Atomic writes: a failed write leaves the previous file intact and no temporary behind."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# Leftovers of a killed writer.

# A writer killed (SIGKILL, no clean-up) at the rename that would have put its file in place:
# what a run killed in the middle of any write leaves behind.
KILLED_WRITE = """
import os, signal, sys
import nibabel as nib
import numpy as np
from jax_brainage import fileio
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
target = sys.argv[1]
if target.endswith((".nii", ".nii.gz")):
  fileio.save_nifti(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)), target)
else:
  fileio.write_json(target, {"x": 1})
"""


def kill_while_writing(target: Path) -> list[str]:
  """Runs a writer of `target` in a child process that is killed at its rename; returns the
  names it left beside `target`."""
  before = set(os.listdir(target.parent)) if target.parent.is_dir() else set()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(Path(fileio.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
  done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], env=env,
                        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
  assert done.returncode == -signal.SIGKILL, done.stderr
  return sorted(set(os.listdir(target.parent)) - before)


@pytest.mark.parametrize("name", ["sub-1_relevance.nii.gz", "img.nii", "config.json"])
def test_a_killed_writers_leftovers_are_ours_and_cleaned(tmp_path, name):
  left = kill_while_writing(tmp_path / name)
  assert left and not (tmp_path / name).exists()
  if name.endswith(".nii.gz"):
    # As the issue saw them: the file nibabel wrote and mkstemp's placeholder.
    assert {re.sub(r"\.[a-z0-9_]{8}\.", ".XXXX.", n) for n in left} == {
        f".{name}.XXXX.nii.gz", f".{name}.XXXX.nii.gz.tmp"}
  assert all(fileio.is_temp_name(n) for n in left)
  removed = fileio.clean_stale_temps(tmp_path, older_than=time.time() + 1)
  assert sorted(p.name for p in removed) == left
  assert os.listdir(tmp_path) == []


def test_clean_stale_temps_removes_our_names_only(tmp_path):
  ours = [".a.json.abcdefgh.tmp", ".scan.nii.gz.k3x9_a0q.nii.gz.tmp",
          ".scan.nii.gz.k3x9_a0q.nii.gz", ".fig.png.0123abcd.png.tmp", "sub/.x.tsv.zz_99aaa.tmp"]
  users = ["scan.nii.gz.tmp", ".notes.tmp", ".a.json.ABCDEFGH.tmp", ".a.json.abcdefg.tmp",
           ".scan.nii.gz.k3x9_a0q.nii", ".x.abcdefgh.nii.gz", ".a.json.abcdefgh.png.tmp",
           "a.json", ".hidden", "sub/table.tsv", "sub/.x.tsv.zz_99aaa.tmp.bak"]
  for name in ours + users:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("x")
  # A directory and a link with our names are not files of ours.
  (tmp_path / ".d.json.abcdefgh.tmp").mkdir()
  outside = tmp_path.parent / f"{tmp_path.name}-outside"
  outside.mkdir()
  (outside / ".o.json.abcdefgh.tmp").write_text("x")
  (tmp_path / "link").symlink_to(outside, target_is_directory=True)
  (tmp_path / ".l.json.abcdefgh.tmp").symlink_to(tmp_path / "a.json")
  # A newer file (a live writer's) stays; a skipped folder is not entered.
  (tmp_path / "kept").mkdir()
  (tmp_path / "kept" / ".k.json.abcdefgh.tmp").write_text("x")
  fresh = tmp_path / ".f.json.abcdefgh.tmp"
  fresh.write_text("x")
  cutoff = time.time() - 100
  for name in ours:
    os.utime(tmp_path / name, (cutoff - 1, cutoff - 1))
  os.utime(tmp_path / "kept" / ".k.json.abcdefgh.tmp", (cutoff - 1, cutoff - 1))
  removed = fileio.clean_stale_temps(tmp_path, older_than=cutoff,
                                     skip=lambda d: d.name == "kept")
  assert sorted(str(p.relative_to(tmp_path)) for p in removed) == sorted(ours)
  for name in users + [".l.json.abcdefgh.tmp", "kept/.k.json.abcdefgh.tmp", fresh.name]:
    assert os.path.lexists(tmp_path / name), name
  assert (tmp_path / ".d.json.abcdefgh.tmp").is_dir()
  assert (outside / ".o.json.abcdefgh.tmp").exists()  # links are not followed
  assert fileio.clean_stale_temps(tmp_path / "missing") == []
