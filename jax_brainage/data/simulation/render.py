"""Rendering one subject: ageing in template space, nuisance warp, contrasts, ground truth.

Ageing is a function of the latent brain age b through the progress p = (b - b_ref) /
(age_max - b_ref), 0 for the young reference brain and 1 at b = age_max (negative below b_ref):
  - ventricles: outward displacement of s = ventricle_expansion_mm * (p + p|p|) / 2 mm around
    the lateral ventricles (accelerating with age, like real ventricular enlargement), on top
    of the individual's own ventricle size (a displacement of either sign at every age);
  - cortex: a fraction L = cortical_thinning * p * (1 + (frontal_weight - 1) * frontal)
    + frontal_risk_thinning * R * p * frontal of the cortical GM turns to CSF (more where sulci
    are, i.e. next to CSF), on top of the individual's own cortical thickness; R (years) is the
    risk factors' brain-age shift, so risk factors accelerate frontal atrophy beyond b alone;
  - white-matter hyperintensities: count ~ Poisson(lesion_rate * ((b - onset)_+ / (age_max -
    onset))^2), drawn by inverse CDF from one uniform per subject so that counts (and lesions, in
    a fixed order) are nested across counterfactual brain ages; placed in periventricular WM;
    bright on FLAIR, dark on T1w;
  - iron: SWI signal in the lentiform nucleus drops by iron_darkening * p.
Nuisance (not age): individual ventricle size and cortical thickness, isotropic head scale
(larger for men), rotation, translation, a smooth random deformation, per-scan smooth bias
field, intensity scale and Gaussian noise. The reference image
is the same individual at p = 0 (no ageing, no lesions) with identical nuisance (same noise
too), so |image - reference| is ageing alone.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage, stats

from jax_brainage.data.anatomy import TemplateAnatomy
from jax_brainage.data.simulation.config import CohortConfig

# Tissue contrasts per sequence, in units of T1w white matter: (GM, WM, CSF, lesion).
CONTRASTS = {
    "T1w": (0.62, 1.0, 0.18, 0.45),
    "FLAIR": (0.80, 0.62, 0.10, 1.70),
    "swi": (0.88, 0.78, 1.0, 0.80),
}
SWI_DEEP_GREY_BASELINE = 0.12  # the lentiform nucleus is darker than cortex on SWI at any age
SCAN_UNIT = 1000.0  # stored intensity of T1w white matter before bias and scale
LESION_MASK_FRACTION = 0.25  # lesion mask: voxels at least this much lesion
MAX_LESIONS = 400


@dataclasses.dataclass(frozen=True)
class Nuisance:
  """Per-subject variation that is not age (drawn from its own random stream)."""

  ventricle_base_mm: float  # individual ventricle size: outward displacement at any age
  cortex_base: float  # individual cortical thickness: GM fraction lost (<0: gained) at any age
  head_scale: float  # isotropic, >1 is a larger head
  rotation_deg: np.ndarray  # [3] about x, y, z
  translation_mm: np.ndarray  # [3]
  deformation: np.ndarray  # [3, gx, gy, gz] control-point displacements (mm)
  bias: dict[str, np.ndarray]  # seq -> [bx, by, bz] log-bias control points
  intensity_scale: dict[str, float]  # seq -> multiplicative scale
  lesion_uniform: float  # inverse-CDF draw of the lesion count
  lesion_draws: np.ndarray  # [MAX_LESIONS, 5] uniforms: position (voxel, jitter x3), radius
  noise_seed: np.ndarray  # entropy for the noise stream


def progress(config: CohortConfig, brain_age: float) -> float:
  """p: 0 at the reference brain age, 1 at age_max (linear in b, negative below the reference)."""
  ref = config.brain_age_reference
  return (brain_age - ref) / (config.age_max - ref)


def lesion_rate(config: CohortConfig, brain_age: float) -> float:
  """Expected number of white-matter lesions at brain age b."""
  x = max(brain_age - config.lesion_onset, 0.0) / (config.age_max - config.lesion_onset)
  return config.lesion_rate * x * x


def _control_axes(shape, r: float, spacing_mm: float):
  """Per axis, Gaussian-RBF interpolation matrices `[n_voxels, n_control]` (rows sum to 1)."""
  mats = []
  for n in shape:
    extent = n * r
    k = max(int(np.ceil(extent / spacing_mm)) + 1, 2)
    ctrl = np.linspace(0.0, extent, k)
    pos = (np.arange(n) + 0.5) * r
    w = np.exp(-0.5 * ((pos[:, None] - ctrl[None]) / spacing_mm) ** 2)
    mats.append((w / w.sum(1, keepdims=True)).astype(np.float32))
  return mats


def _control_shape(shape, r: float, spacing_mm: float) -> tuple[int, ...]:
  return tuple(m.shape[1] for m in _control_axes(shape, r, spacing_mm))


def _expand(coef: np.ndarray, mats) -> np.ndarray:
  """Separable interpolation of control-point values `[gx, gy, gz]` onto the grid `[X, Y, Z]`."""
  bx, by, bz = mats
  out = np.einsum("yj,ijk->iyk", by, coef)  # [gx, Y, gz], small
  out = np.einsum("xi,iyk->xyk", bx, out)  # [X, Y, gz]
  return out @ bz.T  # [X, Y, Z]: the one big product, as a BLAS matmul


def _field_gain(mats) -> float:
  """Standard deviation of an interpolated field with unit-variance control points (grid mean)."""
  g = 1.0
  for m in mats:
    g *= float(np.sqrt((m**2).sum(1)).mean())
  return g


def draw_nuisance(
    config: CohortConfig, anatomy: TemplateAnatomy, male: bool, rng: np.random.Generator
) -> Nuisance:
  """Draws the subject's nuisance variation (fixed order of draws)."""
  r = anatomy.resolution_mm
  sign = 1.0 if male else -1.0
  ventricle_base = float(config.ventricle_size_sd_mm * rng.standard_normal())
  cortex_base = float(config.cortical_thickness_sd * rng.standard_normal())
  log_scale = (config.head_scale_mean + sign * config.head_scale_male
               + config.head_scale_sd * rng.standard_normal())
  head_scale = float(np.exp(log_scale))
  rotation = config.rotation_sd_deg * rng.standard_normal(3)
  translation = config.translation_sd_mm * rng.standard_normal(3)
  dmats = _control_axes(anatomy.shape, r, config.deformation_spacing_mm)
  gshape = tuple(m.shape[1] for m in dmats)
  deformation = config.deformation_sd_mm / _field_gain(dmats) * rng.standard_normal((3, *gshape))
  bmats = _control_axes(anatomy.shape, r, 3 * config.deformation_spacing_mm)
  bshape = tuple(m.shape[1] for m in bmats)
  bias, scale = {}, {}
  for seq in ("T1w", "FLAIR", "swi"):  # always all three: streams do not depend on `sequences`
    bias[seq] = config.bias_field_sd / _field_gain(bmats) * rng.standard_normal(bshape)
    scale[seq] = float(np.exp(config.intensity_scale_sd * rng.standard_normal()))
  lesion_uniform = float(rng.uniform())
  lesion_draws = rng.random((MAX_LESIONS, 5))
  noise_seed = rng.integers(0, 2**32, size=4, dtype=np.uint64)
  return Nuisance(
      ventricle_base_mm=ventricle_base, cortex_base=cortex_base, head_scale=head_scale,
      rotation_deg=rotation, translation_mm=translation,
      deformation=deformation.astype(np.float32), bias=bias, intensity_scale=scale,
      lesion_uniform=lesion_uniform, lesion_draws=lesion_draws, noise_seed=noise_seed,
  )


def _rotation(deg: np.ndarray) -> np.ndarray:
  ax, ay, az = np.deg2rad(deg)
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def template_coordinates(
    config: CohortConfig, anatomy: TemplateAnatomy, nuisance: Nuisance
) -> np.ndarray:
  """For each subject voxel, the template voxel it shows: float32 `[3, X, Y, Z]` (voxel units).

  Subject position x (mm) comes from template position y = c + Rot^T (x - c - t) / scale + D(x),
  c the brain centre, D the smooth random deformation (mm).
  """
  r = float(anatomy.resolution_mm)
  aff = anatomy.affine
  shape = anatomy.shape
  c = anatomy.centre_mm
  m = _rotation(nuisance.rotation_deg).T / nuisance.head_scale  # [3, 3]
  # Affine part in voxel units: y_vox = M x_vox + o (the template grid is axis-aligned).
  origin = aff[:3, 3]
  o = (m @ (origin - c - nuisance.translation_mm) + c - origin) / r
  dmats = _control_axes(shape, r, config.deformation_spacing_mm)
  axes = [np.arange(n, dtype=np.float32) for n in shape]
  out = np.empty((3, *shape), np.float32)
  for a in range(3):
    out[a] = (
        m[a, 0] * axes[0][:, None, None] + m[a, 1] * axes[1][None, :, None]
        + m[a, 2] * axes[2][None, None, :] + o[a]
    )
    out[a] += _expand(nuisance.deformation[a], dmats) / r
  return out


def render_lesions(
    config: CohortConfig, anatomy: TemplateAnatomy, nuisance: Nuisance, count: int
) -> np.ndarray:
  """Lesion fraction `[X, Y, Z]` in template space: soft spheres in periventricular WM."""
  r = float(anatomy.resolution_mm)
  out = np.zeros(anatomy.shape, np.float32)
  if count == 0:
    return out
  sites = np.argwhere(anatomy.periventricular_wm)
  lo, hi = np.log(config.lesion_radius_mm[0]), np.log(config.lesion_radius_mm[1])
  shape = np.array(anatomy.shape)
  for u in nuisance.lesion_draws[:count]:
    site = sites[min(int(u[0] * len(sites)), len(sites) - 1)]
    centre = site + (u[1:4] - 0.5)  # voxel units, jittered within the voxel
    radius = float(np.exp(lo + u[4] * (hi - lo))) / r  # voxel units
    reach = int(np.ceil(radius + 1))
    lo_i = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi_i = np.minimum(np.floor(centre).astype(int) + reach + 2, shape)
    grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo_i, hi_i))]
    dist = np.sqrt(sum((g - cc) ** 2 for g, cc in zip(grid, centre)))
    frac = np.clip(radius - dist + 0.5, 0.0, 1.0)  # linear partial volume across one voxel
    box = tuple(slice(a, b) for a, b in zip(lo_i, hi_i))
    np.maximum(out[box], frac, out=out[box])
  return out


def aged_tissue(
    config: CohortConfig, anatomy: TemplateAnatomy, brain_age: float, risk_shift: float,
    nuisance: Nuisance, lesions: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """Template-space tissue fractions of this individual at `brain_age`, and the effects' sizes.

  The individual's own cortical thickness (`nuisance.cortex_base`) applies at every age; the
  effects are ageing's share only. `lesions=False` leaves lesions out (the reference image).
  Returns ({"gm", "wm", "csf", "lesion"} float32 `[X, Y, Z]` summing to the brain mask, effects).
  """
  p = progress(config, brain_age)
  frontal = anatomy.frontal
  base = config.cortical_thinning * p
  risk = config.frontal_risk_thinning * risk_shift * p
  regional = nuisance.cortex_base + base * (1 + (config.frontal_weight - 1) * frontal)
  regional = regional + risk * frontal
  loss = anatomy.cortex_weight * regional
  loss = loss * (0.75 + 0.5 * anatomy.sulcal_csf)  # sulci widen: cortex next to CSF goes first
  gm, csf = anatomy.gm, anatomy.csf
  # Positive loss: GM -> CSF; negative (younger than the reference): CSF -> GM while CSF lasts.
  moved = np.where(loss >= 0, np.minimum(loss, 0.95) * gm, -np.minimum(-loss * gm, csf))
  gm_a = gm - moved
  csf_a = csf + moved

  lam = lesion_rate(config, brain_age)
  count = int(stats.poisson.ppf(nuisance.lesion_uniform, lam)) if lam > 0 else 0
  count = min(count, MAX_LESIONS) if lesions else 0
  lesion_frac = render_lesions(config, anatomy, nuisance, count)
  lesion = anatomy.wm * lesion_frac  # lesions replace white matter only
  wm_a = anatomy.wm - lesion

  effects = {
      "ventricle_expansion_mm": config.ventricle_expansion_mm * 0.5 * (p + p * abs(p)),
      "cortical_thinning": base,  # nominal GM fraction lost outside the frontal lobe
      "frontal_thinning": base * config.frontal_weight + risk,
      "frontal_risk_thinning": risk,
      "lesion_count": count,
      "lesion_volume_ml": float(lesion.sum()) * anatomy.voxel_volume_ml,
      "iron_darkening": config.iron_darkening * p,
  }
  return {"gm": gm_a, "wm": wm_a, "csf": csf_a, "lesion": lesion}, effects


def _sample(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
  """Trilinear samples of `volume` at voxel coordinates `[3, n]` (0 outside): float32 `[n]`."""
  return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0,
                                 output=np.float32, prefilter=False)


def _support_box(volume: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray] | None:
  """Voxel bounds (lo, hi) of the non-zero part of `volume`, widened by `margin` voxels."""
  nz = [np.flatnonzero(np.any(volume != 0, axis=tuple(b for b in range(3) if b != a)))
        for a in range(3)]
  if any(len(v) == 0 for v in nz):
    return None
  lo = np.array([v[0] for v in nz], np.float32) - 1 - margin
  hi = np.array([v[-1] for v in nz], np.float32) + 1 + margin
  return lo, hi


@functools.lru_cache(maxsize=8)
def _anatomy_boxes(anatomy: TemplateAnatomy) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
  """Support boxes of the template's sparse maps, once per anatomy (hashed by identity)."""
  return {
      "brain": _support_box(anatomy.brain, 0.0),
      "ventricle_field": _support_box(np.any(anatomy.ventricle_field != 0, axis=0), 0.0),
      "deep_grey": _support_box(anatomy.deep_grey, 0.0),
  }


def _sample_sparse(volume: np.ndarray, coords: np.ndarray, box) -> np.ndarray:
  """`_sample`, computed only for coordinates inside `box` (the rest is 0 by construction)."""
  out = np.zeros(coords.shape[1], np.float32)
  if box is None:
    return out
  lo, hi = box
  inside = np.all((coords >= lo[:, None]) & (coords <= hi[:, None]), axis=0)
  sel = np.flatnonzero(inside)
  if len(sel):
    out[sel] = _sample(volume, coords[:, sel])
  return out


def _intensity(
    seq: str, tissue: dict[str, np.ndarray], deep: np.ndarray, iron: float
) -> np.ndarray:
  """Noise-free intensity (T1w-WM units) from tissue fractions at the sampled voxels `[n]`."""
  c_gm, c_wm, c_csf, c_les = CONTRASTS[seq]
  total = tissue["gm"] + tissue["wm"] + tissue["csf"] + tissue["lesion"]
  value = (c_gm * tissue["gm"] + c_wm * tissue["wm"] + c_csf * tissue["csf"]
           + c_les * tissue["lesion"])
  value = value / np.maximum(total, 1e-3)  # fractions of the brain part of the voxel
  if seq == "swi":
    value = value * np.clip(1.0 - deep * (SWI_DEEP_GREY_BASELINE + iron), 0.05, None)
  return value


@dataclasses.dataclass(frozen=True)
class Rendered:
  images: dict[str, np.ndarray]  # seq -> float32 [X, Y, Z], integer-valued
  reference_images: dict[str, np.ndarray]
  ageing_masks: dict[str, np.ndarray]  # seq -> bool
  mask_thresholds: dict[str, float]  # seq -> intensity units
  lesion_mask: np.ndarray  # bool
  brain_mask: np.ndarray  # bool
  effects: dict[str, float]


def render(
    config: CohortConfig, anatomy: TemplateAnatomy, brain_age: float, risk_shift: float,
    nuisance: Nuisance, ground_truth: bool = True,
) -> Rendered:
  """Images of one subject at `brain_age`, its young reference and the ground-truth masks.

  `ground_truth=False` skips the reference images and ageing masks (empty dicts): images only,
  about 40% faster, for serving subjects straight to training.
  """
  r = float(anatomy.resolution_mm)
  shape = anatomy.shape
  coords = template_coordinates(config, anatomy, nuisance).reshape(3, -1)
  boxes = _anatomy_boxes(anatomy)
  brain = _sample_sparse(anatomy.brain, coords, boxes["brain"])
  idx = np.flatnonzero(brain >= 0.5)  # the subject's brain mask; everything else stays 0
  yv = coords[:, idx]

  tissue_a, effects = aged_tissue(config, anatomy, brain_age, risk_shift, nuisance)
  # The reference: the same individual at the reference brain age, without lesions. Same code
  # path as the aged image, so rendering at the reference age reproduces it bit for bit.
  tissue_r = aged_tissue(
      config, anatomy, config.brain_age_reference, risk_shift, nuisance, lesions=False
  )[0] if ground_truth else None
  s_a = nuisance.ventricle_base_mm + effects["ventricle_expansion_mm"]
  s_r = nuisance.ventricle_base_mm
  if s_a != 0.0 or s_r != 0.0:
    # Sparse structures are sampled only where they can be non-zero (a speed-up, same result).
    disp = np.stack([
        _sample_sparse(anatomy.ventricle_field[a], yv, boxes["ventricle_field"]) for a in range(3)
    ])
  else:
    disp = np.zeros_like(yv)
  deep_box = boxes["deep_grey"]
  sampled = []
  for tissue, shift in ((tissue_a, s_a), (tissue_r, s_r))[: 2 if ground_truth else 1]:
    # Pull tissue from nearer the ventricles: they grow outward by `shift` mm.
    y = yv - (shift / r) * disp if shift != 0.0 else yv
    margin = abs(shift) / r + 1
    out = {k: _sample(tissue[k], y) for k in ("gm", "wm", "csf")}
    out["lesion"] = _sample_sparse(tissue["lesion"], y, _support_box(tissue["lesion"], margin))
    deep = _sample_sparse(anatomy.deep_grey, y, (deep_box[0] - margin, deep_box[1] + margin))
    sampled.append((out, deep))
  aged, deep_a = sampled[0]
  ref, deep_r = sampled[1] if ground_truth else (None, None)

  n = anatomy.brain.size
  x_idx = np.unravel_index(idx, shape)
  bmats = _control_axes(shape, r, 3 * config.deformation_spacing_mm)
  noise_rng = np.random.default_rng(np.random.SeedSequence(nuisance.noise_seed.tolist()))
  images, references, masks, thresholds = {}, {}, {}, {}
  for seq in ("T1w", "FLAIR", "swi"):
    # Draw every sequence's noise so that streams do not depend on which sequences are asked for.
    noise = noise_rng.standard_normal(len(idx), dtype=np.float32) * np.float32(config.noise_sd)
    if seq not in config.sequences:
      continue
    unit = SCAN_UNIT * nuisance.intensity_scale[seq]
    gain = (unit * np.exp(_expand(nuisance.bias[seq], bmats)[x_idx])).astype(np.float32)
    out = {}
    for name, tissue, deep, iron in (
        ("aged", aged, deep_a, effects["iron_darkening"]),
        ("ref", ref, deep_r, 0.0),
    )[: 2 if ground_truth else 1]:
      value = _intensity(seq, tissue, deep, iron) * gain + np.float32(unit) * noise
      flat = np.zeros(n, np.float32)
      flat[idx] = np.clip(np.rint(value), 0, 32767)  # integer-valued: stored exactly as int16
      out[name] = flat.reshape(shape)
    images[seq] = out["aged"]
    thresholds[seq] = float(config.mask_threshold * unit)
    if ground_truth:
      references[seq] = out["ref"]
      masks[seq] = np.abs(out["aged"] - out["ref"]) > thresholds[seq]

  lesion_total = aged["gm"] + aged["wm"] + aged["csf"] + aged["lesion"]
  lesion_mask = np.zeros(n, bool)
  lesion_mask[idx] = aged["lesion"] >= LESION_MASK_FRACTION * np.maximum(lesion_total, 1e-3)
  brain_mask = np.zeros(n, bool)
  brain_mask[idx] = True
  return Rendered(
      images=images, reference_images=references, ageing_masks=masks, mask_thresholds=thresholds,
      lesion_mask=lesion_mask.reshape(shape), brain_mask=brain_mask.reshape(shape), effects=effects,
  )
