"""Masking inputs to atlas regions, as the study's regional models need.

An atlas is a label image (integer label per voxel, on any grid: MNI, the simulator's template,
a FreeSurfer aseg) plus, optionally, a BIDS-style table beside it (`<atlas>.tsv` with columns
`index` and `name`, as for BIDS `_dseg.tsv`) so that regions can be named. The label image is
resampled nearest-neighbour into the subject's grid through the two affines (world mm), and
voxels whose label is not in the chosen list are zeroed.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jax_brainage.data import nifti
from jax_brainage.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Atlas:
  """A label image on its own grid.

  Attributes:
    labels: integer labels `[x, y, z]` (0 = background).
    affine: voxel-to-world `[4, 4]` (mm).
    names: label -> region name (from the table beside the atlas; may be empty).
    path: where it was read from ("" for an in-memory atlas).
  """

  labels: np.ndarray
  affine: np.ndarray
  names: dict[int, str] = dataclasses.field(default_factory=dict)
  path: str = ""


def table_path(atlas_path: str | os.PathLike) -> Path:
  """The label table beside an atlas: `x.nii.gz` -> `x.tsv`."""
  p = Path(atlas_path)
  name = p.name
  for ext in (".nii.gz", ".nii", ".mgz", ".mgh"):
    if name.endswith(ext):
      return p.with_name(name[: -len(ext)] + ".tsv")
  return p.with_suffix(".tsv")


def read_label_table(path: str | os.PathLike) -> dict[int, str]:
  """Reads a BIDS `dseg.tsv`-style table (columns `index`, `name`) -> {label: name}."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f, delimiter="\t"))
  except OSError as e:
    raise DataError(f"{path}: cannot read label table ({e.strerror})") from e
  if not rows or "index" not in rows[0] or "name" not in rows[0]:
    raise DataError(f"{path}: label table needs tab-separated columns 'index' and 'name'")
  names = {}
  for line, row in enumerate(rows, start=2):
    try:
      names[int(row["index"])] = row["name"].strip()
    except (TypeError, ValueError):
      raise DataError(f"{path}: line {line}: non-integer index {row['index']!r}") from None
  return names


def load_atlas(path: str | os.PathLike) -> Atlas:
  """Reads a label image (and its table if present); labels must be integers."""
  img = nifti.load_image(path, "atlas", require_brain=False)
  data = np.asanyarray(img.dataobj)
  if not np.any(data):
    raise DataError(f"atlas: {path}: no labelled voxel (every voxel is 0)")
  if data.dtype.kind == "f":
    if not np.array_equal(data, np.round(data)):
      raise DataError(f"atlas: {path}: non-integer labels (is it a label image?)")
  labels = data.astype(np.int32)
  table = table_path(path)
  names = read_label_table(table) if table.exists() else {}
  return Atlas(labels=labels, affine=np.asarray(img.affine, np.float64), names=names,
               path=os.fspath(path))


def parse_labels(spec: str | Sequence[int | str], atlas: Atlas) -> tuple[int, ...]:
  """Region labels from `"1,2,17"`, names `"cerebellum,putamen"` (via the table) or a list.

  Raises:
    ConfigError: naming an unknown region name or a label absent from the atlas.
  """
  items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
  items = [s for s in items if s != ""]
  if not items:
    raise ConfigError("--regions: no region labels given")
  by_name = {name.lower(): label for label, name in atlas.names.items()}
  present = set(np.unique(atlas.labels).tolist())
  labels = []
  for item in items:
    if isinstance(item, (int, np.integer)) or str(item).lstrip("-").isdigit():
      label = int(item)
    elif str(item).lower() in by_name:
      label = by_name[str(item).lower()]
    else:
      known = ", ".join(sorted(atlas.names.values())) or "none: the atlas has no label table"
      raise ConfigError(
          f"--regions: unknown region {item!r} in atlas {atlas.path} (known: {known})")
    if label not in present or label == 0:
      raise ConfigError(f"--regions: label {label} does not occur in atlas {atlas.path}")
    labels.append(label)
  return tuple(sorted(set(labels)))


def region_mask(
    atlas: Atlas,
    labels: Sequence[int],
    shape: Sequence[int],
    affine: np.ndarray,
) -> np.ndarray:
  """Boolean mask `[*shape]` of the voxels of a grid (shape, affine) that lie in `labels`.

  The atlas is resampled nearest-neighbour into the grid via the affines (world mm); grid voxels
  outside the atlas' field of view count as background.
  """
  if nifti.same_grid(atlas.labels.shape, atlas.affine, shape, affine):
    on_grid = atlas.labels
  else:
    on_grid = nifti.resample(atlas.labels, atlas.affine, shape, affine, order=0)
  return np.isin(on_grid, np.asarray(list(labels), dtype=on_grid.dtype))


def apply_mask(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Zeroes the voxels of `[x, y, z]` or `[x, y, z, channel]` outside `mask` `[x, y, z]`."""
  data = np.asarray(data)
  mask = np.asarray(mask, bool)
  return np.where(mask.reshape(mask.shape + (1,) * (data.ndim - 3)), data, np.zeros((), data.dtype))
