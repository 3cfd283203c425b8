"""Fixtures for the NIfTI layer: real files other projects ship, and small BIDS datasets."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIBABEL_DATA

NILEARN_DATA = Path(__import__("nilearn.datasets", fromlist=["x"]).__file__).parent / "data"
MNI_T1 = NILEARN_DATA / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def real_image(name: str) -> nib.Nifti1Image | nib.MGHImage:
  """A real image shipped with nibabel ("nibabel:x") or nilearn ("nilearn:x")."""
  source, _, file = name.partition(":")
  root = Path(NIBABEL_DATA) if source == "nibabel" else NILEARN_DATA
  return nib.load(root / file)


def all_orientations():
  """The 48 axis permutations x flips, as nibabel `ornt` arrays [3, 2]."""
  for perm in itertools.permutations(range(3)):
    for flips in itertools.product((1, -1), repeat=3):
      yield np.array([[p, f] for p, f in zip(perm, flips)], dtype=float)


def oriented_affine(ornt: np.ndarray, zooms=(1.5, 2.0, 3.0), origin=(-10.0, 7.0, 3.0)):
  """A voxel-to-world affine whose voxel axis i maps to world axis ornt[i, 0], flipped if -1."""
  affine = np.zeros((4, 4))
  for i, (axis, flip) in enumerate(ornt):
    affine[int(axis), i] = flip * zooms[i]
  affine[:3, 3] = origin
  affine[3, 3] = 1
  return affine


def blob(shape, seed=0, dtype=np.int16, margin=(1, 2, 3)):
  """A random nonzero 'brain' inside a zero background, off-centre so cropping is tested."""
  rng = np.random.default_rng(seed)
  data = np.zeros(shape, dtype)
  inner = tuple(slice(m, s - m - 1) for m, s in zip(margin, shape))
  data[inner] = rng.integers(1, 1000, size=data[inner].shape)
  return data


@pytest.fixture
def make_bids(tmp_path):
  """Builds a BIDS dataset under tmp_path; returns a function (subjects, ...) -> root.

  `subjects`: {subject id: {"age": ..., "sex": ..., sequences...}} where each sequence maps to
  an image (nibabel) or None (no file). Extra keys become participants.tsv columns.
  """

  def build(subjects: dict, name: str = "ds", ext: str = ".nii.gz", rows=None, header=None):
    root = tmp_path / name
    root.mkdir()
    columns = header or ["participant_id", "age", "sex"]
    lines = ["\t".join(columns)]
    for sid, spec in subjects.items():
      for key, img in spec.items():
        if key in ("age", "sex", "row"):
          continue
        anat = root / sid / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        if img is not None:
          nib.save(img, anat / f"{sid}_{key}{ext}")
      if spec.get("row", True):
        lines.append("\t".join([sid, str(spec.get("age", "n/a")), str(spec.get("sex", "n/a"))]))
    for row in rows or []:
      lines.append(row)
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return root

  return build


def one_line(message: str) -> bool:
  return "\n" not in message and len(message) > 0


def save(img, path: os.PathLike) -> Path:
  nib.save(img, path)
  return Path(path)


def with_header(raw: bytes, **fields) -> bytes:
  """A single-file NIfTI-1 `raw` with header fields replaced as stored on disk (nibabel's image
  header is a working copy, so this edits the bytes); `pixdimN=v` sets one pixdim item."""
  hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
  for key, value in fields.items():
    if key.startswith("pixdim") and key != "pixdim":
      pixdim = hdr["pixdim"].copy()
      pixdim[int(key[len("pixdim"):])] = value
      hdr["pixdim"] = pixdim
    else:
      hdr[key] = value
  return hdr.binaryblock + raw[len(hdr.binaryblock):]
