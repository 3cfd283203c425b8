"""Template anatomy for the simulated cohort: tissue maps, the structures ageing acts on, an atlas.

Everything here lives in MNI152 2009 template space (RAS+, the grid nilearn ships at 1, 2, 3 or
4 mm) and is computed once per resolution (`load_anatomy` is cached in-process), so that a
simulated subject costs only its own warps and contrasts.

Base maps (nilearn, offline): grey- and white-matter probability maps and the brain mask;
CSF = mask - GM - WM, clipped at 0 (GM + WM is rescaled where it exceeds the mask so that the three
fractions sum to the mask exactly; the renderer relies on this to derive CSF after warping).

Structures, from the probability maps and MNI coordinates (mm). These are geometric
approximations that serve a simulation, not a neuroanatomical parcellation:
- lateral ventricles: CSF-dominant voxels >= 12 mm deep inside the brain in a central box,
  large connected components only;
- brainstem: |x| < 14, -42 < y < -12, z < -10; cerebellum: y < -40 below a tent-shaped
  tentorium z < -8 - 0.35 |x|;
- deep grey nuclei: GM >= 0.35 within ellipsoids around putamen + pallidum (the lentiform
  nucleus, where iron accumulates); other subcortical grey: caudate and thalamus ellipsoids;
- cerebral white matter: WM-dominant voxels, split into periventricular (within 10 mm of the
  ventricles: where white-matter hyperintensities are placed) and deep white matter;
- cortex: the rest of the cerebrum (cortical GM and the sulcal CSF next to it), split into lobes
  by planes: occipital y < -70; temporal z < 5, y < 20, |x| > 28; frontal in front of a slanted
  central plane y > -10 - 0.35 z; parietal otherwise.

The atlas labels every brain voxel once; its table groups labels into the study's regional-model
regions (`cortical`, `subcortical`, `cerebellum`) and gives the lobe of each cortical label.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from jax_brainage import fileio
from jax_brainage.errors import ConfigError

RESOLUTIONS_MM = (1, 2, 3, 4)

# Atlas: label -> (name, region for regional models, lobe or "").
ATLAS_LABELS = {
    1: ("frontal_cortex", "cortical", "frontal"),
    2: ("parietal_cortex", "cortical", "parietal"),
    3: ("temporal_cortex", "cortical", "temporal"),
    4: ("occipital_cortex", "cortical", "occipital"),
    5: ("deep_white_matter", "subcortical", ""),
    6: ("periventricular_white_matter", "subcortical", ""),
    7: ("lateral_ventricles", "subcortical", ""),
    8: ("lentiform_nucleus", "subcortical", ""),
    9: ("caudate_thalamus", "subcortical", ""),
    10: ("brainstem", "subcortical", ""),
    11: ("cerebellum", "cerebellum", ""),
}
REGIONS = ("cortical", "subcortical", "cerebellum")

# Ventricle-enlargement field: decay length (mm) outside the ventricles, and the distance (mm)
# beyond which it is exactly zero, so that ageing never moves the brain's outline.
VENTRICLE_DECAY_MM = 8.0
VENTRICLE_REACH_MM = 28.0
PERIVENTRICULAR_MM = 10.0


@dataclasses.dataclass(frozen=True, eq=False)
class Atlas:
  """A region atlas on the template grid.

  Attributes:
    labels: int16 `[X, Y, Z]`, 0 outside the brain, else a key of `table`.
    affine: `[4, 4]` voxel -> MNI mm (RAS+).
    table: label -> {"name", "region", "lobe"}; regions are `cortical`, `subcortical`,
      `cerebellum` (the study's regional models).
  """

  labels: np.ndarray
  affine: np.ndarray
  table: dict[int, dict[str, str]]

  def region_mask(self, region: str) -> np.ndarray:
    """Boolean `[X, Y, Z]` mask of all labels in `region` (cortical/subcortical/cerebellum)."""
    if region not in REGIONS:
      raise ConfigError(f"unknown atlas region {region!r}; expected one of {', '.join(REGIONS)}")
    keep = [k for k, v in self.table.items() if v["region"] == region]
    return np.isin(self.labels, keep)

  def region_labels(self) -> np.ndarray:
    """int16 `[X, Y, Z]`: 1 cortical, 2 subcortical, 3 cerebellum, 0 outside the brain."""
    out = np.zeros(self.labels.shape, np.int16)
    for value, region in enumerate(REGIONS, start=1):
      out[self.region_mask(region)] = value
    return out

  @staticmethod
  def region_table_tsv() -> str:
    """TSV table (index, name) of `region_labels`."""
    return "index\tname\n" + "".join(f"{i}\t{r}\n" for i, r in enumerate(REGIONS, start=1))

  def table_tsv(self) -> str:
    """The table as TSV text (index, name, region, lobe), as BIDS derivatives write it."""
    rows = ["index\tname\tregion\tlobe"]
    for k in sorted(self.table):
      v = self.table[k]
      rows.append(f"{k}\t{v['name']}\t{v['region']}\t{v['lobe'] or 'n/a'}")
    return "\n".join(rows) + "\n"


@dataclasses.dataclass(frozen=True, eq=False)
class TemplateAnatomy:
  """The template's tissue maps and structures at one resolution; all arrays `[X, Y, Z]`.

  Attributes:
    resolution_mm: voxel size (mm), isotropic.
    affine: `[4, 4]` voxel -> MNI mm (RAS+).
    brain: float32 brain mask (0/1).
    gm, wm, csf: float32 tissue fractions; gm + wm + csf == brain.
    ventricles: bool lateral ventricles.
    cortex_weight: float32 in [0, 1], how much of a voxel's GM is cortex that thins with age
      (1 in the cerebrum, 0.5 in the cerebellum, 0 in deep grey and brainstem).
    frontal: float32 in [0, 1], frontal-lobe weight of the cortex (smooth at the border).
    sulcal_csf: float32 in [0, 1], smoothed CSF fraction: cortex next to CSF thins first.
    periventricular_wm: bool, where white-matter lesions are placed.
    deep_grey: float32 in [0, 1], lentiform-nucleus weight (iron accumulation on SWI).
    ventricle_field: float32 `[3, X, Y, Z]`, outward displacement per mm of ventricle
      enlargement (mm/mm); zero beyond `VENTRICLE_REACH_MM` from the ventricles.
    centre_mm: `[3]` brain centre of mass (MNI mm), the centre of head-size scaling and rotation.
    atlas: the region atlas.
  """

  resolution_mm: int
  affine: np.ndarray
  brain: np.ndarray
  gm: np.ndarray
  wm: np.ndarray
  csf: np.ndarray
  ventricles: np.ndarray
  cortex_weight: np.ndarray
  frontal: np.ndarray
  sulcal_csf: np.ndarray
  periventricular_wm: np.ndarray
  deep_grey: np.ndarray
  ventricle_field: np.ndarray
  centre_mm: np.ndarray
  atlas: Atlas

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.brain.shape)

  @property
  def voxel_volume_ml(self) -> float:
    return float(self.resolution_mm) ** 3 / 1000.0


def cache_dir() -> Path:
  """Where template maps are cached on disk: $JAX_BRAINAGE_CACHE, else ~/.cache/jax_brainage."""
  root = os.environ.get("JAX_BRAINAGE_CACHE")
  if root:
    return Path(root)
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jax_brainage"


def _load_nilearn_maps(resolution_mm: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """Affine `[4, 4]` and GM, WM, brain-mask maps `[X, Y, Z]` from nilearn, cached on disk.

  nilearn takes seconds to import and resample; the cache makes worker processes start fast.
  The file name carries the nilearn version, so a new template release is picked up.
  """
  version = importlib.metadata.version("nilearn")
  path = cache_dir() / f"mni152_2009_{resolution_mm}mm_nilearn-{version}.npz"
  try:
    with np.load(path) as f:
      return f["affine"], [f["gm"], f["wm"], f["brain"]]
  except (OSError, KeyError, ValueError):
    pass  # absent or unreadable: rebuild below
  from nilearn import datasets

  with warnings.catch_warnings():
    # nilearn warns about resampling and future defaults; none of it concerns us here.
    warnings.simplefilter("ignore")
    gm_img = datasets.load_mni152_gm_template(resolution=resolution_mm)
    wm_img = datasets.load_mni152_wm_template(resolution=resolution_mm)
    mask_img = datasets.load_mni152_brain_mask(resolution=resolution_mm)
  affine = np.asarray(mask_img.affine, dtype=np.float64)
  maps = [np.asarray(im.get_fdata(dtype=np.float32)) for im in (gm_img, wm_img, mask_img)]
  try:
    with fileio.atomic_path(path, suffix=".npz") as tmp:
      with open(tmp, "wb") as fh:
        np.savez(fh, affine=affine, gm=maps[0], wm=maps[1], brain=maps[2])
  except OSError:
    pass  # a read-only home only costs speed
  return affine, maps


def _ellipsoid(x, y, z, centre, radii):
  cx, cy, cz = centre
  rx, ry, rz = radii
  return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0


def _bilateral(x, y, z, centre, radii):
  cx, cy, cz = centre
  return _ellipsoid(x, y, z, (cx, cy, cz), radii) | _ellipsoid(x, y, z, (-cx, cy, cz), radii)


def _smooth(a: np.ndarray, sigma_mm: float, r: float) -> np.ndarray:
  return ndimage.gaussian_filter(a.astype(np.float32), sigma_mm / r, mode="constant")


@functools.lru_cache(maxsize=4)
def load_anatomy(resolution_mm: int) -> TemplateAnatomy:
  """The template anatomy at `resolution_mm` (1, 2, 3 or 4), computed once per process."""
  if resolution_mm not in RESOLUTIONS_MM:
    raise ConfigError(f"resolution_mm={resolution_mm!r} not available; expected 1, 2, 3 or 4")
  r = float(resolution_mm)
  affine, (gm, wm, brain) = _load_nilearn_maps(resolution_mm)
  brain = (brain > 0.5).astype(np.float32)
  gm = np.clip(gm, 0.0, 1.0) * brain
  wm = np.clip(wm, 0.0, 1.0) * brain
  over = np.maximum(gm + wm, 1.0)  # rescale where GM + WM > 1 so that fractions sum to the mask
  gm, wm = gm / over, wm / over
  csf = np.clip(brain - gm - wm, 0.0, 1.0)
  gm = brain - wm - csf  # exact partition (float rounding)

  shape = brain.shape
  ijk = np.indices(shape, dtype=np.float32)
  x, y, z = (affine[a, a] * ijk[a] + affine[a, 3] for a in range(3))
  inside = brain > 0.5
  depth = ndimage.distance_transform_edt(inside, sampling=r)

  # Lateral ventricles: deep, central, CSF-dominant, large connected pieces.
  candidate = (
      inside & (csf > 0.5) & (depth >= 12.0) & (np.abs(x) < 35) & (y > -55) & (y < 40) & (z > -12)
      & (z < 40)
  )
  comp, ncomp = ndimage.label(candidate)
  sizes = ndimage.sum_labels(candidate, comp, index=np.arange(1, ncomp + 1)) * r**3
  ventricles = np.isin(comp, 1 + np.flatnonzero(sizes >= 300.0))  # mm^3
  if not ventricles.any():  # coarse grids: fall back on all candidates
    ventricles = candidate

  brainstem = inside & (np.abs(x) < 14) & (y > -42) & (y < -12) & (z < -10)
  cerebellum = inside & ~brainstem & (y < -40) & (z < -8 - 0.35 * np.abs(x))
  hindbrain = brainstem | cerebellum

  lentiform = inside & ~hindbrain & (gm >= 0.35) & _bilateral(x, y, z, (23, 2, 0), (10, 16, 11))
  caudate_thal = (
      inside & ~hindbrain & ~lentiform & (gm >= 0.35)
      & (_bilateral(x, y, z, (13, 12, 10), (6, 12, 10))  # caudate
         | _bilateral(x, y, z, (11, -18, 6), (9, 12, 9)))  # thalamus
  )
  deep = lentiform | caudate_thal

  dist_ventricle = ndimage.distance_transform_edt(~ventricles, sampling=r)
  wm_dominant = (wm > gm) & (wm >= csf)
  cerebral = inside & ~hindbrain & ~ventricles & ~deep
  white = cerebral & wm_dominant
  periventricular = white & (dist_ventricle <= PERIVENTRICULAR_MM)
  cortex = cerebral & ~white

  occipital = y < -70
  temporal = ~occipital & (z < 5) & (y < 20) & (np.abs(x) > 28)
  frontal = ~occipital & ~temporal & (y > -10 - 0.35 * z)
  parietal = ~occipital & ~temporal & ~frontal

  labels = np.zeros(shape, np.int16)
  for value, region in (
      (1, cortex & frontal), (2, cortex & parietal), (3, cortex & temporal),
      (4, cortex & occipital), (5, white & ~periventricular), (6, periventricular),
      (7, ventricles), (8, lentiform), (9, caudate_thal), (10, brainstem), (11, cerebellum),
  ):
    labels[region] = value
  table = {k: {"name": n, "region": g, "lobe": lobe} for k, (n, g, lobe) in ATLAS_LABELS.items()}
  atlas = Atlas(labels=labels, affine=affine.copy(), table=table)

  # Soft weights, so that effects have no voxel-sized steps at structure borders.
  # Cerebellar cortex thins at half the cerebral rate.
  cortical_gm = (inside & ~hindbrain & ~deep).astype(np.float32) + 0.5 * cerebellum
  cortex_weight = np.clip(_smooth(cortical_gm, 1.0, r), 0, 1) * (cortical_gm > 0)
  frontal_w = np.clip(_smooth((frontal & inside).astype(np.float32), 4.0, r), 0, 1)
  sulcal = np.clip(_smooth(csf * (~ventricles), 2.0, r), 0, 1)
  deep_grey = np.clip(_smooth(lentiform.astype(np.float32), 1.0, r), 0, 1) * (gm > 0.2)

  # Outward unit-ish field around the ventricles: gradient of a smoothed signed distance, scaled
  # by exp(-d / decay) outside, tapered to exactly zero at VENTRICLE_REACH_MM.
  d_out = dist_ventricle
  d_in = ndimage.distance_transform_edt(ventricles, sampling=r)
  signed = np.where(ventricles, -d_in, d_out).astype(np.float32)
  signed = ndimage.gaussian_filter(signed, max(1.0, 1.5 / r))
  grad = np.stack(np.gradient(signed, r), axis=0)
  norm = np.sqrt((grad**2).sum(0))
  grad = grad / np.maximum(norm, 1.0)  # unit length off the medial axis, shorter on it
  profile = np.where(signed <= 0, 1.0, np.exp(-np.maximum(signed, 0) / VENTRICLE_DECAY_MM))
  taper = np.clip((VENTRICLE_REACH_MM - d_out) / (0.25 * VENTRICLE_REACH_MM), 0.0, 1.0)
  field = (grad * (profile * taper * inside)[None]).astype(np.float32)

  centre = np.array([(w * brain).sum() / brain.sum() for w in (x, y, z)], np.float64)
  f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
  return TemplateAnatomy(
      resolution_mm=int(resolution_mm), affine=affine, brain=f32(brain), gm=f32(gm), wm=f32(wm),
      csf=f32(csf), ventricles=ventricles, cortex_weight=f32(cortex_weight), frontal=f32(frontal_w),
      sulcal_csf=f32(sulcal), periventricular_wm=periventricular, deep_grey=f32(deep_grey),
      ventricle_field=f32(field), centre_mm=centre, atlas=atlas,
  )
