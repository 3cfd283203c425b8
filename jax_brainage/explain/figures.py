"""Figures of relevance maps as in the study: slice montages over the anatomy, glass brains, and
relevance images in TensorBoard.

Colours (`relevance_cmap`): positive relevance (older) runs black -> red -> yellow ("black-fire-
red"), negative (younger) black -> blue -> cyan; 0 is black. Maps are clipped symmetrically at a
percentile of |relevance| over the nonzero voxels (`symmetric_limit`, default 99.5) so that a few
extreme voxels do not wash out the rest, and scaled to [-1, 1]. Over the anatomy the relevance is
blended with opacity |r| / limit: where relevance is ~0 the anatomy shows through.

Panels show RAS+ volumes upright in the neurological convention: sagittal with anterior to the
right, coronal and axial with the subject's right on the right; superior (sagittal, coronal) and
anterior (axial) at the top.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np

from jax_brainage import fileio
from jax_brainage.data import nifti

DEFAULT_PERCENTILE = 99.5
# (position in [0, 1] for r in [-1, 1], RGB)
_STOPS = ((0.0, (0.0, 1.0, 1.0)),    # -1: cyan
          (0.25, (0.0, 0.0, 1.0)),   # -0.5: blue
          (0.5, (0.0, 0.0, 0.0)),    # 0: black
          (0.75, (1.0, 0.0, 0.0)),   # +0.5: red
          (1.0, (1.0, 1.0, 0.0)))    # +1: yellow (fire)
VIEWS = ("sagittal", "coronal", "axial")


def relevance_cmap():
  """The study's diverging map: blue-cyan (negative) | black (0) | black-fire-red (positive)."""
  from matplotlib.colors import LinearSegmentedColormap

  return LinearSegmentedColormap.from_list("lrp_black_fire_red", list(_STOPS), N=512)


def colorize(normalised: np.ndarray) -> np.ndarray:
  """RGB float `[..., 3]` of relevance already scaled to [-1, 1] (piecewise linear in _STOPS)."""
  t = (np.clip(np.asarray(normalised, np.float64), -1.0, 1.0) + 1.0) / 2.0
  xs = np.array([s[0] for s in _STOPS])
  rgb = np.array([s[1] for s in _STOPS])
  return np.stack([np.interp(t, xs, rgb[:, c]) for c in range(3)], axis=-1)


def symmetric_limit(relevance: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
  """Clipping limit: the `percentile` of |relevance| over nonzero voxels (1.0 if all are 0)."""
  a = np.abs(np.asarray(relevance, np.float64)).ravel()
  a = a[a > 0]
  if a.size == 0:
    return 1.0
  limit = float(np.percentile(a, percentile))
  return limit if limit > 0 else float(a.max())


def overlay(anatomy: np.ndarray, relevance: np.ndarray, limit: float) -> np.ndarray:
  """RGB float `[..., 3]` in [0, 1]: relevance coloured over greyscale anatomy.

  Args:
    anatomy: intensities (any range; scaled by its own max to [0, 1]), shape of relevance.
    relevance: years per voxel; limit: the symmetric clipping limit (> 0).
  """
  anat = np.asarray(anatomy, np.float64)
  top = anat.max() if anat.size and anat.max() > 0 else 1.0
  grey = np.repeat((anat / top)[..., None], 3, axis=-1)
  r = np.clip(np.asarray(relevance, np.float64) / limit, -1.0, 1.0)
  alpha = np.abs(r)[..., None]
  return np.clip(grey * (1.0 - alpha) + colorize(r) * alpha, 0.0, 1.0)


def _panel(volume: np.ndarray, view: str, index: int) -> np.ndarray:
  """One slice of a RAS+ `[X, Y, Z, ...]` volume, upright (superior/anterior at the top)."""
  if view == "sagittal":
    s = volume[index, :, :]
  elif view == "coronal":
    s = volume[:, index, :]
  elif view == "axial":
    s = volume[:, :, index]
  else:
    raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
  return np.swapaxes(s, 0, 1)[::-1]


def slice_positions(anatomy: np.ndarray, view: str, n: int) -> list[int]:
  """`n` evenly spaced slice indices through the brain's (nonzero anatomy's) extent."""
  axis = VIEWS.index(view)
  other = tuple(a for a in range(3) if a != axis)
  hits = np.flatnonzero(np.any(np.asarray(anatomy) != 0, axis=other))
  lo, hi = (int(hits[0]), int(hits[-1])) if hits.size else (0, anatomy.shape[axis] - 1)
  # Interior points of n + 1 equal intervals: the outermost slices hold little brain.
  return [int(round(lo + (hi - lo) * (i + 1) / (n + 1))) for i in range(n)]


def montage_rgb(anatomy: np.ndarray, relevance: np.ndarray, *, views: Sequence[str] = VIEWS,
                n_slices: int = 6, limit: float | None = None,
                percentile: float = DEFAULT_PERCENTILE) -> tuple[np.ndarray, float]:
  """The montage as one RGB array: a row per view, `n_slices` columns.

  Args:
    anatomy, relevance: `[X, Y, Z]` RAS+ (e.g. the input cube's first channel and its map).
    limit: clipping limit (default: `symmetric_limit(relevance, percentile)`).
  Returns:
    (float RGB `[rows, columns, 3]` in [0, 1], the limit used).
  """
  anatomy = np.asarray(anatomy, np.float32)
  relevance = np.asarray(relevance, np.float32)
  if anatomy.shape != relevance.shape or anatomy.ndim != 3:
    raise ValueError(f"anatomy {anatomy.shape} and relevance {relevance.shape} must be the "
                     "same [X, Y, Z]")
  limit = symmetric_limit(relevance, percentile) if limit is None else float(limit)
  side = max(anatomy.shape)
  rows = []
  for view in views:
    panels = []
    for i in slice_positions(anatomy, view, n_slices):
      rgb = overlay(_panel(anatomy, view, i), _panel(relevance, view, i), limit)
      pad = np.zeros((side, side, 3))
      pad[:rgb.shape[0], :rgb.shape[1]] = rgb
      panels.append(pad)
    rows.append(np.concatenate(panels, axis=1))
  return np.concatenate(rows, axis=0), limit


def save_montage(path: str | os.PathLike, anatomy: np.ndarray, relevance: np.ndarray, *,
                 title: str = "", views: Sequence[str] = VIEWS, n_slices: int = 6,
                 limit: float | None = None, percentile: float = DEFAULT_PERCENTILE,
                 dpi: int = 100) -> float:
  """Slice montage PNG with a colour bar (years per voxel); returns the clipping limit."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.cm import ScalarMappable
  from matplotlib.colors import Normalize

  rgb, limit = montage_rgb(anatomy, relevance, views=views, n_slices=n_slices, limit=limit,
                           percentile=percentile)
  height = 1.8 * len(views)
  fig, ax = plt.subplots(figsize=(1.8 * n_slices + 1.2, height + 0.5), facecolor="black")
  try:
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    if title:
      ax.set_title(title, color="white", fontsize=9)
    bar = fig.colorbar(ScalarMappable(Normalize(-limit, limit), relevance_cmap()), ax=ax,
                       fraction=0.03, pad=0.01)
    bar.set_label("relevance (years / voxel)", color="white", fontsize=8)
    bar.ax.tick_params(colors="white", labelsize=7)
    with fileio.atomic_path(path, suffix=".png") as tmp:
      fig.savefig(tmp, format="png", dpi=dpi, facecolor="black", bbox_inches="tight")
  finally:
    plt.close(fig)
  return limit


def save_glass_brain(path: str | os.PathLike, image, *, title: str = "",
                     limit: float | None = None, percentile: float = DEFAULT_PERCENTILE) -> float:
  """Glass-brain projections (nilearn.plotting.plot_glass_brain, signed, both colour halves)
  of a relevance image in world coordinates (a subject-space or cube image); returns the limit.

  nilearn draws the MNI brain outline: for images in another space (the simulator's template,
  native space) the outline is a guide only.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from nilearn import plotting

  data = np.asarray(image.dataobj, np.float32)
  limit = symmetric_limit(data, percentile) if limit is None else float(limit)
  display = plotting.plot_glass_brain(image, display_mode="lyrz", plot_abs=False,
                                      cmap=relevance_cmap(), vmin=-limit, vmax=limit,
                                      colorbar=True, black_bg=True, title=title or None,
                                      threshold=None)
  try:
    with fileio.atomic_path(path, suffix=".png") as tmp:
      # nilearn picks the format from the name: write "<tmp>.png", then move it over the temp.
      real = tmp.with_name(tmp.name[: -len(".tmp")])
      display.savefig(str(real))
      os.replace(real, tmp)
  finally:
    display.close()
    plt.close("all")
  return limit


COLORBAR_LABEL = "LRP relevance (years of predicted age per voxel; + = older)"


def save_stat_map(path: str | os.PathLike, relevance_image, anatomy_image, *, title: str = "",
                  views: str = "xyz", n_cuts: int = 5, limit: float | None = None,
                  percentile: float = DEFAULT_PERCENTILE, dpi: int = 100) -> float:
  """A paper figure of a relevance map over its anatomy (nilearn.plotting.plot_stat_map): a row
  of slices per view (x sagittal, y coronal, z axial), every slice labelled with its world
  coordinate in mm, L and R marked, in the neurological convention (left on the left), and a
  colour bar in years of predicted age per voxel (positive, red-yellow: evidence for an older
  estimate; negative, blue-cyan: younger). Returns the symmetric colour limit.

  Args:
    path: PNG to write (atomically).
    relevance_image, anatomy_image: NIfTI images in world coordinates (mm): the map and the
      anatomy it is shown on (the subject's image, or the template for group maps); the anatomy
      is resampled to the map.
    title: words for a reader (who, which sequence, which method), shown above the panels.
    views: the rows, a subset of "xyz" in that order; n_cuts: slices per view, evenly spaced
      through the brain (nonzero anatomy).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.cm import ScalarMappable
  from matplotlib.colors import Normalize
  from nilearn import image as nimage
  from nilearn import plotting

  data = np.asarray(relevance_image.dataobj, np.float32)
  limit = symmetric_limit(data, percentile) if limit is None else float(limit)
  anatomy = nimage.resample_to_img(anatomy_image, relevance_image, interpolation="continuous",
                                   force_resample=True, copy_header=True)
  anat = np.asarray(anatomy.dataobj, np.float32)
  # Opacity |r| / limit, as in `overlay`: where relevance is ~0 the anatomy shows through.
  opacity = nifti.make_image(np.clip(np.abs(data) / limit, 0.0, 1.0), relevance_image.affine)
  rows = len(views)
  top = 0.3 if title else 0.05  # inches above the panels
  height = 2.0 * rows + top + 0.1
  fig = plt.figure(figsize=(2.0 * n_cuts + 1.3, height), facecolor="black")
  try:
    row_height = 2.0 / height
    for i, axis in enumerate(views):
      bottom = 1.0 - (top / height) - row_height * (i + 1)
      ax = fig.add_axes((0.03, bottom, 0.87, row_height * 0.95))
      cuts = world_cuts(anat, anatomy.affine, "xyz".index(axis), n_cuts)
      plotting.plot_stat_map(relevance_image, bg_img=anatomy, display_mode=axis,
                             cut_coords=cuts, axes=ax, figure=fig, cmap=relevance_cmap(),
                             vmin=-limit, vmax=limit, symmetric_cbar=True, colorbar=False,
                             threshold=None, annotate=True, draw_cross=False, black_bg=True,
                             title=None, resampling_interpolation="nearest",
                             transparency=opacity, transparency_range=[0.0, 1.0])
      fig.text(0.012, bottom + row_height / 2, VIEWS["xyz".index(axis)], color="white",
               fontsize=9, rotation=90, va="center", ha="center")
    bar_ax = fig.add_axes((0.92, 0.08, 0.012, 1.0 - top / height - 0.12))
    bar = fig.colorbar(ScalarMappable(Normalize(-limit, limit), relevance_cmap()), cax=bar_ax)
    bar.set_label(COLORBAR_LABEL if rows > 1 else COLORBAR_LABEL.replace(" (", "\n("),
                  color="white", fontsize=7)
    bar.ax.tick_params(colors="white", labelsize=6)
    if title:
      fig.text(0.5, 1.0 - 0.05 / height, title, color="white", fontsize=10, ha="center",
               va="top")
    with fileio.atomic_path(path, suffix=".png") as tmp:
      fig.savefig(tmp, format="png", dpi=dpi, facecolor="black")
  finally:
    plt.close(fig)
  return limit


def world_cuts(anatomy: np.ndarray, affine: np.ndarray, axis: int, n: int) -> list[float]:
  """`n` world coordinates (mm) along world axis `axis` (0 x, 1 y, 2 z), evenly spaced through
  the brain (nonzero anatomy) of a volume whose affine is diagonal up to a permutation."""
  affine = np.asarray(affine, np.float64)
  voxel_axis = int(np.argmax(np.abs(affine[axis, :3])))
  positions = slice_positions(np.moveaxis(anatomy, voxel_axis, 0), "sagittal", n)
  return [float(affine[axis, voxel_axis] * p + affine[axis, 3]) for p in positions]


def png_bytes(rgb: np.ndarray) -> bytes:
  """PNG of a float RGB image `[h, w, 3]` in [0, 1]."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.image

  buf = io.BytesIO()
  matplotlib.image.imsave(buf, np.clip(rgb, 0.0, 1.0), format="png")
  return buf.getvalue()


def write_tensorboard_image(writer, step: int, tag: str, rgb: np.ndarray) -> None:
  """An RGB image `[h, w, 3]` in [0, 1] (e.g. `montage_rgb`) into a
  `jax_brainage.train.summary.SummaryWriter` (no-op on processes other than 0)."""
  if not getattr(writer, "enabled", False):
    return
  rgb = np.asarray(rgb)
  # matplotlib's PNG writer stores RGBA.
  writer.encoded_image(step, tag, png_bytes(rgb), rgb.shape[0], rgb.shape[1], 4)
