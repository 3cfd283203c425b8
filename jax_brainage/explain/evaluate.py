"""`brainage evaluate-explanations`: score relevance maps against the simulated cohort's truth.

    brainage evaluate-explanations --workdir W --data DIR --out DIR [--methods a,b,...]
        [--subjects N] [--split test|val|train|all] [--patch-mm 16] [--steps 16]
        [--max-fraction 0.5] [--perturbation blur|patch_mean|zero] [--batch-size N] [--seed S]
        [--sanity-check | --no-sanity-check]

The LRP rule-experimentation tool. On a simulated cohort (`brainage simulate`: DIR holds
derivatives/simulation/ with the ground truth) it explains the held-out subjects of a trained
workdir with every method of `explain.maps.METHODS` (the LRP composites and the gradient,
gradient x input, SmoothGrad and Integrated Gradients baselines) and scores each map:

1. against ground-truth masks (relevance mass accuracy and rank accuracy, `lrp.evaluation`):
   - `ageing`: union over the model's sequences of the voxels that ageing changed
     (|image(b) - image(b_ref)| above threshold); `ageing_<seq>` per sequence on disk;
   - narrower effect masks, since the ageing masks cover most of the cortex: `lesions` (the
     white-matter lesion mask), `ventricles` (the subject's lateral ventricles at its brain age,
     dilated by one voxel: enlargement shows at their rim) and `deep_grey` (the lentiform nucleus,
     where iron darkens SWI). Structures are the simulator's atlas carried through the subject's
     own warp (rotation, head size, deformation, ventricle enlargement), re-derived from the
     cohort's seed: the atlas itself sits in template space, not on the subject's anatomy.
   Mask and relevance are compared on the same grid: the masks are carried into the network's
   cube with the subject's `CubeInverse` (reorientation + crop/pad; nearest neighbour if the
   cube was resampled). Voxel relevance is the sum over the input channels; every cube voxel
   counts (relevance outside the brain is relevance outside the mask).
2. by 3D region perturbation (`lrp.evaluation.region_perturbation`): cubic patches of
   `--patch-mm` touching the brain are replaced by a blurred copy of the input (or their own
   mean, or zero) most relevant first (MoRF), least relevant first (LeRF) and in random order
   (shared by all methods), `--steps` steps up to `--max-fraction` of the patches; the predicted
   age (years) after each step. AOPC = mean drop of the predicted age (years); ABPC = mean of
   LeRF - MoRF (years): how well the map's order separates what the model uses from what it
   does not.
3. by the model-parameter randomisation sanity check (`--sanity-check`; default on with an
   accelerator, off on CPU; single-model workdirs): the model's layers are re-drawn at random
   one after another from the output towards the input (cumulatively, the same random models
   for every method), and each method's voxel map of the partly random model is compared with
   its map of the trained model inside the brain (Spearman of |relevance| and of relevance,
   Pearson, IoU of the 5% most relevant voxels; `lrp.evaluation.model_parameter_randomisation`).
   A map that stays similar while the model is destroyed does not explain the model. Reported
   only: it does not enter the choice of the best composite.

Outputs in --out: `scores.tsv` (one row per subject x method x mask), `summary.tsv` (one row per
method: means and standard errors), `evaluation.json` (settings, summary, per-subject values,
curves, the best composite and the criterion), `evaluation.png` (perturbation curves and bar
charts of mass / rank accuracy per method and mask), and with the sanity check `sanity.tsv` (one
row per method x randomisation step: means and standard errors over subjects).

The best composite (`best_composite` in the JSON) is chosen among the LRP composites only, by
the mean rank over three measures (each a mean over subjects): mass accuracy on the `ageing`
mask, rank accuracy on the `ageing` mask, and ABPC; ties go to the higher mass accuracy. The
ground-truth measures say whether relevance lands where ageing was put; ABPC whether it marks
what this model actually uses; a composite must do well on both to be the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_brainage import fileio
from jax_brainage.errors import ConfigError, DataError

SPLITS = ("test", "val", "train", "all")
PERTURBATIONS = ("blur", "patch_mean", "zero")
STRUCTURES = {"ventricles": "lateral_ventricles", "deep_grey": "lentiform_nucleus"}
EFFECT_MASKS = ("lesions", "ventricles", "deep_grey")
PRIMARY_MASK = "ageing"
CRITERION = ("best_composite: among the LRP composites, the lowest mean rank over (1) mean "
             "relevance mass accuracy on the 'ageing' mask, (2) mean relevance rank accuracy on "
             "the 'ageing' mask, (3) mean ABPC (LeRF - MoRF area, years); ties go to the higher "
             "mass accuracy")


# ---------------------------------------------------------------------------------------------
# Ground truth on the network's grid.


def mask_to_cube(mask: np.ndarray, affine: np.ndarray, inverse) -> np.ndarray:
  """A subject-space mask `[x, y, z]` (on the grid `affine`) carried into the network's cube.

  The forward of `prune.to_subject_space`: when the mask is on the subject's original grid and
  the cube was not resampled, an exact index map (reorientation to RAS+, then the cube's
  crop/pad); otherwise nearest-neighbour resampling through world coordinates (mm).

  Returns:
    bool `[*inverse.cube_shape]`.
  """
  from jax_brainage.data import nifti, prune

  mask = np.asarray(mask) != 0
  if not inverse.resampled and nifti.same_grid(mask.shape, affine, inverse.original_shape,
                                                inverse.original_affine):
    grid = nifti.reorient_array(mask, np.asarray(inverse.orientation))
    return prune.crop_or_pad(grid, inverse.offset, inverse.cube_shape).astype(bool)
  out = nifti.resample(mask.astype(np.uint8), affine, inverse.cube_shape, inverse.cube_affine,
                       order=0)
  return out != 0


def subject_labels(cohort, index: int) -> np.ndarray:
  """The cohort atlas's labels on subject `index`'s own anatomy (`Cohort.subject_labels`)."""
  return cohort.subject_labels(index)


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """One subject's masks in cube space (bool `[X, Y, Z]`), by mask name."""

  subject_id: str
  masks: dict[str, np.ndarray]


def _read_mask(path: Path, subject_id: str) -> tuple[np.ndarray, np.ndarray]:
  import nibabel as nib

  if not path.is_file():
    raise DataError(f"{path}: {subject_id}: ground-truth mask missing (is --data a simulated "
                    "cohort written by `brainage simulate`?)")
  try:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), np.asarray(img.affine, np.float64)
  except Exception as e:  # noqa: BLE001 - nibabel raises many types for a corrupt file
    raise DataError(f"{path}: {subject_id}: unreadable mask ({type(e).__name__})") from None


def ground_truth(data: Path, cohort, subject_id: str, sequences: Sequence[str],
                 inverse) -> GroundTruth:
  """The masks of one simulated subject, carried into its cube (see the module docstring)."""
  from scipy import ndimage

  from jax_brainage.data import simulate

  anat = simulate.derivatives_dir(data) / subject_id / "anat"
  on_disk = [s for s in simulate.SEQUENCES
             if (anat / f"{subject_id}_{s}_ageingmask.nii.gz").is_file()]
  missing = [s for s in sequences if s not in on_disk]
  if missing:
    _read_mask(anat / f"{subject_id}_{missing[0]}_ageingmask.nii.gz", subject_id)
  masks: dict[str, np.ndarray] = {}
  affine = None
  for s in on_disk:
    m, affine = _read_mask(anat / f"{subject_id}_{s}_ageingmask.nii.gz", subject_id)
    masks[f"ageing_{s}"] = mask_to_cube(m, affine, inverse)
  masks[PRIMARY_MASK] = np.any([masks[f"ageing_{s}"] for s in sequences], axis=0)
  lesion, affine = _read_mask(anat / f"{subject_id}_lesionmask.nii.gz", subject_id)
  masks["lesions"] = mask_to_cube(lesion, affine, inverse)
  index = _cohort_index(cohort, subject_id, data)
  labels = subject_labels(cohort, index)
  names = {v["name"]: k for k, v in cohort.atlas.table.items()}
  ventricles = ndimage.binary_dilation(labels == names[STRUCTURES["ventricles"]]) & (labels > 0)
  masks["ventricles"] = mask_to_cube(ventricles, cohort.affine, inverse)
  masks["deep_grey"] = mask_to_cube(labels == names[STRUCTURES["deep_grey"]], cohort.affine,
                                    inverse)
  return GroundTruth(subject_id, masks)


def _cohort_index(cohort, subject_id: str, data: Path) -> int:
  from jax_brainage.data import simulate

  try:
    index = int(subject_id.split("-", 1)[1]) - 1
  except (IndexError, ValueError):
    index = -1
  if not 0 <= index < len(cohort) or simulate.subject_id(index) != subject_id:
    raise DataError(f"{data}: {subject_id} is not a subject of the simulated cohort "
                    f"({len(cohort)} subjects)")
  return index


def open_cohort(data: Path):
  """The simulated cohort behind a dataset written by `brainage simulate`."""
  from jax_brainage.data import simulate

  path = simulate.derivatives_dir(data) / "config.json"
  if not path.is_file():
    raise DataError(f"--data {data}: no simulation ground truth ({path} missing); "
                    "evaluate-explanations needs a cohort written by `brainage simulate`")
  try:
    config = simulate.CohortConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: unreadable cohort configuration ({type(e).__name__})") from None
  return simulate.Cohort(config)


# ---------------------------------------------------------------------------------------------
# The model: relevance and the explained output.


def _maps():
  from jax_brainage.explain import maps
  return maps


def load_model(workdir: str | os.PathLike, checkpoint: str = "best"):
  """A single-model workdir (`predict.TrainedModel`) or an ensemble workdir (`Ensemble`)."""
  try:
    from jax_brainage.ensemble import store
  except ImportError:
    store = None
  if store is not None and hasattr(store, "is_ensemble_workdir") and \
      store.is_ensemble_workdir(workdir):
    return store.load_ensemble(workdir)
  from jax_brainage import predict
  return predict.load_trained(workdir, checkpoint)


def _is_ensemble(model) -> bool:
  return _maps().is_ensemble(model)


def output_function(model, of_sub: dict[str, list[int] | None] | None = None):
  """(`f(variables, x [n, X, Y, Z, C] float32) -> [n]` predicted age (years), variables).

  For an ensemble: the multi-level head's effective intercept plus its effective member weights
  times the members' predictions (exactly `head.apply`, before bias correction); x is the one
  cube every sub-ensemble's input is cut from, `of_sub` {sub name: channel indices or None}.
  """
  maps = _maps()
  if not _is_ensemble(model):
    apply = maps.regression_apply(model.model)
    return (lambda v, x: apply(v, x)), jax.tree.map(jnp.asarray, model.variables)
  weights = model.head.member_weights()
  intercept = float(model.head.intercept())
  parts = [(maps.regression_apply(maps._sub_model(sub)), (of_sub or {}).get(sub.name))
           for sub in model.subs]
  variables = [(jax.tree.map(jnp.asarray, sub.variables),
                jnp.asarray(np.asarray(weights[sub.name], np.float32))) for sub in model.subs]

  def f(variables, x):
    total = jnp.full((x.shape[0],), intercept, jnp.float32)
    for (apply, channels), (v, w) in zip(parts, variables):
      xi = x if channels is None else x[..., jnp.asarray(channels)]
      preds = jax.vmap(apply, in_axes=(0, None))(v, xi)  # [M, n] members at once
      total = total + jnp.tensordot(w, preds, axes=1)
    return total

  return f, variables


def model_sequences(model) -> tuple[str, ...]:
  if _is_ensemble(model):
    return tuple(_maps().ensemble_sequences(model))
  return tuple(model.sequences)


# ---------------------------------------------------------------------------------------------
# Subjects.


def _select_subjects(model, dataset, split: str, n: int) -> list:
  """The dataset's subjects in `split` of the workdir's recorded split (W/split.json), first n."""
  subjects = list(dataset.subjects)
  if split != "all":
    workdir = Path(model.workdir)
    path = workdir / "split.json"
    if not path.is_file():
      raise DataError(f"{path}: no recorded split; use --split all to evaluate on any subject")
    try:
      record = json.loads(path.read_text(encoding="utf-8"))
      ids = set(record["subject_ids"][split])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"{path}: unreadable split ({type(e).__name__})") from None
    subjects = [s for s in subjects if s.subject_id in ids]
    if not subjects:
      raise DataError(f"--data {dataset.root}: none of the {split} subjects of {path} is in it "
                      "(use --split all)")
  return subjects[:n] if n > 0 else subjects


@dataclasses.dataclass
class Inputs:
  """Prepared subjects: `relevance_inputs` what `maps.relevance` takes (an array, or {sub name:
  array} for an ensemble), `cube` `[n, X, Y, Z, C]` the one cube the model(s) read (None when the
  sub-ensembles read different cubes: then no region perturbation), `of_sub` channel indices per
  sub-ensemble into `cube`, `inverses` one `CubeInverse` per subject, `sequences` the data's."""

  relevance_inputs: Any
  cube: np.ndarray | None
  of_sub: dict[str, list[int] | None] | None
  inverses: list
  sequences: tuple[str, ...]


def _views(model):
  """{view key: cache view}, {model or sub name: (view key, channels)}, sequences the data must
  provide; prepared as `brainage predict` prepares new data."""
  from jax_brainage import predict

  if _is_ensemble(model):
    inputs = predict.ensemble_inputs(model)
    return dict(inputs.views), dict(inputs.of_sub), tuple(inputs.sequences)
  cache = predict.open_training_cache(model)
  if tuple(cache.shape) != model.image_shape:
    raise DataError(f"{cache.path}: cubes are {tuple(cache.shape)} voxels, the model of "
                    f"{model.workdir} expects {model.image_shape}")
  view, channels = predict.preprocessor_for(model, cache)
  return {"model": view}, {"model": ("model", channels)}, tuple(view.sequences)


def voxel_size_mm(model) -> float:
  """The cube's voxel edge (mm), from the (first) training cache."""
  views, _, _ = _views(model)
  view = next(iter(views.values()))
  size = view.index.get("voxel_size") or view.preprocessing.voxel_size or 1.0
  return float(np.max(np.broadcast_to(np.asarray(size, np.float64), (3,))))


def prepare_subjects(model, subjects) -> Inputs:
  """Every subject prepared exactly as in training, for every input view of the model(s)."""
  views, of_sub, sequences = _views(model)
  cubes: dict[str, list[np.ndarray]] = {k: [] for k in views}
  inverses = []
  for subject in subjects:
    inverse = None
    for key, view in views.items():
      cube, inv = view.preprocess({q: subject.images[q] for q in view.sequences},
                                  subject=subject.subject_id, mask=subject.mask)
      if inverse is not None and inv != inverse:
        raise DataError(f"{subject.subject_id}: the sub-ensembles' inputs were cut from "
                        "different grids; their maps cannot be compared with one mask")
      inverse = inv
      cubes[key].append(cube)
    inverses.append(inverse)
  stacked = {k: np.stack(v) for k, v in cubes.items()}
  per_model = {name: stacked[key] if ch is None else stacked[key][..., ch]
               for name, (key, ch) in of_sub.items()}
  one = len(stacked) == 1
  cube = next(iter(stacked.values())) if one else None
  channels = {name: ch for name, (_, ch) in of_sub.items()} if one else None
  if not _is_ensemble(model):
    return Inputs(per_model["model"], per_model["model"], None, inverses, sequences)
  return Inputs(per_model, cube, channels, inverses, sequences)


# ---------------------------------------------------------------------------------------------
# The evaluation.


@dataclasses.dataclass(frozen=True)
class Settings:
  """Perturbation settings: patch edge (voxels), steps, last fraction, replacement, repeats of
  the random order, relevance batch size, seed (SmoothGrad noise, random orders, ties, random
  layers); `sanity`: run the model-parameter randomisation check (None: with an accelerator
  only, as it costs one attribution per layer and method)."""

  patch_size: int = 4
  steps: int = 16
  max_fraction: float = 0.5
  perturbation: str = "blur"
  random_repeats: int = 4
  batch_size: int = 8
  seed: int = 0
  perturb: bool = True
  sanity: bool | None = None


def _baseline(x, settings: Settings):
  from lrp import evaluation as ev

  p = (settings.patch_size,) * 3
  if settings.perturbation == "blur":
    return ev.blur_baseline(x, sigma=settings.patch_size / 2.0)
  if settings.perturbation == "patch_mean":
    return ev.patch_mean_baseline(x, p)
  return jnp.zeros((), x.dtype)


def _relevance(model, volumes: np.ndarray, method: str, settings: Settings) -> np.ndarray:
  return _maps().relevance(model, volumes, method, batch_size=settings.batch_size,
                           seed=settings.seed)


def score_maps(relevance: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """Mass and rank accuracy of relevance `[n, X, Y, Z, C]` (channels summed) against masks
  {name: bool `[n, X, Y, Z]`}: {name: {mass [n], rank [n], share [n], voxels [n]}} (NaN where a
  subject's mask is empty)."""
  from lrp import evaluation as ev

  voxel = ev.pool_channels(jnp.asarray(relevance))
  out = {}
  for name, m in masks.items():
    m = jnp.asarray(m)
    voxels = np.asarray(jnp.sum(m.reshape(m.shape[0], -1), axis=1))
    mass = np.asarray(ev.relevance_mass_accuracy(voxel, m), np.float64)
    rank = np.asarray(ev.relevance_rank_accuracy(voxel, m), np.float64)
    share = np.asarray(ev.mask_share(m), np.float64)
    empty = voxels == 0
    mass[empty] = rank[empty] = share[empty] = np.nan
    out[name] = {"mass": mass, "rank": rank, "share": share, "voxels": voxels.astype(np.int64)}
  return out


def _mean_se(v) -> tuple[float, float, int]:
  v = np.asarray(v, np.float64)
  v = v[np.isfinite(v)]
  if len(v) == 0:
    return math.nan, math.nan, 0
  se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
  return float(np.mean(v)), se, int(len(v))


def best_composite(summary: dict[str, dict[str, Any]], kinds: dict[str, str]) -> str | None:
  """The LRP composite with the lowest mean rank over mass accuracy, rank accuracy (both on the
  'ageing' mask) and ABPC (see `CRITERION`); None if no composite was evaluated."""
  names = [m for m in summary if kinds.get(m) == "lrp"]
  if not names:
    return None
  measures = [f"{PRIMARY_MASK}_mass_accuracy", f"{PRIMARY_MASK}_rank_accuracy", "abpc"]
  ranks = np.zeros(len(names))
  for key in measures:
    values = np.array([summary[m].get(key, math.nan) for m in names], np.float64)
    if not np.any(np.isfinite(values)):
      continue
    values = np.where(np.isfinite(values), values, -np.inf)
    # rank 0 = best (highest); equal values share the mean rank
    order = (-values).argsort(kind="stable")
    r = np.empty(len(names))
    r[order] = np.arange(len(names))
    for v in np.unique(values):
      same = values == v
      r[same] = r[same].mean()
    ranks += r
  mass = np.array([summary[m].get(measures[0], math.nan) for m in names], np.float64)
  mass = np.where(np.isfinite(mass), mass, -np.inf)
  best = min(range(len(names)), key=lambda i: (ranks[i], -mass[i]))
  return names[best]


def _chunked(fn, n: int, batch: int):
  """fn(slice, chunk number) over batches of subjects, the curves concatenated."""
  from lrp import evaluation as ev

  parts = [fn(slice(s, s + batch), i) for i, s in enumerate(range(0, n, batch))]
  outputs = jnp.concatenate([p.outputs for p in parts])
  return ev.PerturbationCurve(parts[0].fractions, outputs, ev.aopc(outputs))


def _part(curve, sl):
  from lrp import evaluation as ev
  return ev.PerturbationCurve(curve.fractions, curve.outputs[sl], curve.aopc[sl])


def _concat(parts):
  from lrp import evaluation as ev

  def cat(curves):
    return ev.PerturbationCurve(curves[0].fractions,
                                jnp.concatenate([c.outputs for c in curves]),
                                jnp.concatenate([c.aopc for c in curves]))
  return ev.RegionPerturbation(cat([p.morf for p in parts]), cat([p.lerf for p in parts]),
                               cat([p.random for p in parts]),
                               jnp.concatenate([p.abpc for p in parts]))


SANITY_MEASURES = ("spearman_abs", "spearman", "pearson", "top_iou")
SANITY_TOP_FRACTION = 0.05  # share of the brain's voxels in the top set of top_iou


def sanity_check(model, f, variables, x, stored_dtype, support, names: Sequence[str],
                 settings: Settings, progress: bool = False) -> dict[str, Any]:
  """Cascading model-parameter randomisation of one trained single model, for every method.

  Args:
    model: `predict.TrainedModel`; f, variables: `output_function(model)`.
    x: float32 network inputs `[n, X, Y, Z, C]`; stored_dtype: the cache's dtype (ZBox bounds).
    support: bool `[n, X, Y, Z]`, the voxels compared (the brain).
    names: methods of `maps.METHODS`.

  Returns:
    {"layers": [L] randomised in this order (cumulative), "top_fraction", "per_subject":
    {method: {measure: [L][n], "outputs": [L + 1][n] predicted age (years)}}}. Every method
    sees the same random models (one key, from the seed); its random noise (SmoothGrad) is
    drawn per subject as in `maps.relevance`.
  """
  from lrp import evaluation as ev

  maps = _maps()
  # the model's top-level layers, the last applied first (MRInet: age_head, dense1, conv5, ...)
  layers = ev.layer_order(f, variables, x[:1])
  key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), 3)
  base = jax.random.PRNGKey(settings.seed)
  per_method: dict[str, dict[str, Any]] = {}
  for name in names:
    if progress:
      print(f"evaluate-explanations: sanity check {name}", file=sys.stderr)
    method = maps.METHODS[name]
    parts = []
    for start in range(0, len(x), settings.batch_size):  # bounded memory: batches of subjects
      xs = x[start:start + settings.batch_size]
      rows = jnp.arange(start, start + len(xs), dtype=jnp.uint32)
      keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(rows)
      low, high = maps.input_bounds(xs, stored_dtype)

      def attribute(v, u, method=method, keys=keys, low=low, high=high):
        # voxel relevance (channels summed), as every other score of this module
        return ev.pool_channels(method.attribute(f, v, u, keys=keys, low=low, high=high))

      parts.append(ev.model_parameter_randomisation(
          f, variables, xs, attribute, key=key, layers=layers,
          support=support[start:start + settings.batch_size], top_fraction=SANITY_TOP_FRACTION))
    per_method[name] = {
        field: np.concatenate([np.asarray(getattr(p, field), np.float64) for p in parts],
                              axis=1).tolist() for field in (*SANITY_MEASURES, "outputs")}
  return {"layers": list(layers), "top_fraction": SANITY_TOP_FRACTION,
          "per_subject": per_method}


def evaluate(model, data: str | os.PathLike, methods: Sequence[str] | None = None, *,
             subjects: int = 8, split: str = "test", settings: Settings | None = None,
             progress: bool = False) -> dict[str, Any]:
  """Explains and scores the held-out simulated subjects with every method.

  Args:
    model: `predict.TrainedModel` or an `Ensemble` (see `load_model`).
    data: the simulated BIDS dataset (with derivatives/simulation/).
    methods: names of `maps.METHODS` (default all).
    subjects: at most this many subjects (0 = all of the split).
    split: which part of the workdir's recorded split ("all": every subject of the data).
    settings: perturbation settings (voxel patch edge etc.).

  Returns:
    a JSON-ready dict: settings, subjects, masks, `summary` {method: {...}}, `per_subject`,
    `curves`, `best_composite`, `criterion`, timings.
  """
  from jax_brainage import predict
  from lrp import evaluation as ev

  maps = _maps()
  settings = settings or Settings()
  if split not in SPLITS:
    raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
  if settings.perturbation not in PERTURBATIONS:
    raise ConfigError(f"--perturbation {settings.perturbation!r}: choose one of "
                      f"{', '.join(PERTURBATIONS)}")
  if settings.patch_size < 1 or settings.steps < 1 or not 0 < settings.max_fraction <= 1:
    raise ConfigError("need a patch of at least 1 voxel, --steps >= 1 and "
                      "0 < --max-fraction <= 1")
  names = list(maps.METHODS) if not methods else [maps.get_method(m).name for m in methods]
  data = Path(data)
  cohort = open_cohort(data)
  sequences = model_sequences(model)
  _, _, data_sequences = _views(model)
  dataset = predict.read_dataset([data], data_sequences)
  chosen = _select_subjects(model, dataset, split, subjects)
  t0 = time.perf_counter()
  inputs = prepare_subjects(model, chosen)
  inverses = inputs.inverses
  truths = [ground_truth(data, cohort, s.subject_id, sequences, inv)
            for s, inv in zip(chosen, inverses)]
  mask_names = [PRIMARY_MASK] + sorted(k for k in truths[0].masks if k.startswith("ageing_")) + [
      m for m in EFFECT_MASKS]
  masks = {k: np.stack([t.masks[k] for t in truths]) for k in mask_names}
  timings = {"prepare_seconds": time.perf_counter() - t0}

  from jax_brainage.data import intensity
  perturb = settings.perturb and inputs.cube is not None
  random = None
  predicted = None
  if inputs.cube is not None:
    x = jnp.asarray(intensity.to_unit_float(np.asarray(inputs.cube)))
    support = jnp.any(x != 0, axis=-1)  # the brain: background is exactly 0 in every channel
    f, variables = output_function(model, inputs.of_sub)
    predicted = np.asarray(jax.jit(f)(variables, x), np.float64)
    patch = (settings.patch_size,) * 3
    key = jax.random.PRNGKey(settings.seed)
    baseline = _baseline(x, settings)

    def baseline_of(sl):
      return baseline[sl] if jnp.ndim(baseline) else baseline

    def kw_of(sl):
      return dict(patch_size=patch, steps=settings.steps, max_fraction=settings.max_fraction,
                  support=support[sl], variables=variables)

  if perturb:
    random = _chunked(lambda sl, i: ev.random_perturbation_curve(
        f, x[sl], baseline_of(sl), key=jax.random.fold_in(jax.random.fold_in(key, 1), i),
        repeats=settings.random_repeats, **kw_of(sl)), len(x), settings.batch_size)

  summary: dict[str, dict[str, Any]] = {}
  per_subject: dict[str, dict[str, Any]] = {}
  curves: dict[str, Any] = {}
  kinds = {m: maps.METHODS[m].kind for m in names}
  for name in names:
    if progress:
      print(f"evaluate-explanations: {name}", file=sys.stderr)
    t1 = time.perf_counter()
    rel = _relevance(model, inputs.relevance_inputs, name, settings)
    t_rel = time.perf_counter() - t1
    scores = score_maps(rel, masks)
    row: dict[str, Any] = {"kind": kinds[name], "summary": maps.METHODS[name].summary,
                           "n": len(chosen), "relevance_seconds": t_rel}
    subj: dict[str, Any] = {}
    for mask, s in scores.items():
      for measure, label in (("mass", "mass_accuracy"), ("rank", "rank_accuracy")):
        mean, se, n = _mean_se(s[measure])
        row[f"{mask}_{label}"], row[f"{mask}_{label}_se"] = mean, se
        subj[f"{mask}_{label}"] = s[measure].tolist()
      row[f"{mask}_share"] = _mean_se(s["share"])[0]
      row[f"{mask}_n"] = _mean_se(s["mass"])[2]
      subj[f"{mask}_share"] = s["share"].tolist()
      subj[f"{mask}_voxels"] = s["voxels"].tolist()
    total = np.sum(rel.reshape(len(rel), -1).astype(np.float64), axis=1)
    subj["relevance_sum"] = total.tolist()
    if perturb:
      parts = []
      for start in range(0, len(x), settings.batch_size):  # bounded memory: batches of subjects
        sl = slice(start, start + settings.batch_size)
        parts.append(ev.region_perturbation(
            f, x[sl], jnp.asarray(rel[sl]), baseline_of(sl),
            key=jax.random.fold_in(jax.random.fold_in(key, 2), start), random=_part(random, sl),
            **kw_of(sl)))
      pert = _concat(parts)
      for label, curve in (("morf", pert.morf), ("lerf", pert.lerf)):
        row[f"aopc_{label}"], row[f"aopc_{label}_se"], _ = _mean_se(np.asarray(curve.aopc))
        subj[f"aopc_{label}"] = np.asarray(curve.aopc, np.float64).tolist()
      row["abpc"], row["abpc_se"], _ = _mean_se(np.asarray(pert.abpc))
      subj["abpc"] = np.asarray(pert.abpc, np.float64).tolist()
      curves[name] = {"morf": np.mean(np.asarray(pert.morf.outputs, np.float64), 0).tolist(),
                      "lerf": np.mean(np.asarray(pert.lerf.outputs, np.float64), 0).tolist()}
    row["seconds"] = time.perf_counter() - t1
    summary[name] = row
    per_subject[name] = subj
  sanity = {"status": "off"}
  # gated like perturbation in the demo: one attribution per layer and method is slow on CPU
  run_sanity = (jax.default_backend() != "cpu" if settings.sanity is None else settings.sanity)
  if run_sanity:
    if _is_ensemble(model):
      sanity = {"status": "skipped: ensembles (run it on a single-model workdir)"}
    else:
      t1 = time.perf_counter()
      sanity = {"status": "done", **sanity_check(
          model, f, variables, x, np.asarray(inputs.cube).dtype, support, names, settings,
          progress)}
      timings["sanity_seconds"] = time.perf_counter() - t1
      # the summary line: mean Spearman of |relevance| once every layer is random
      sanity["final_spearman_abs"] = {
          m: _mean_se(v["spearman_abs"][-1])[0] for m, v in sanity["per_subject"].items()}
  if random is not None:
    curves["random"] = {"random": np.mean(np.asarray(random.outputs, np.float64), 0).tolist()}
    curves["fractions"] = np.asarray(random.fractions, np.float64).tolist()
    rnd = _mean_se(np.asarray(random.aopc))
    timings["aopc_random"] = rnd[0]
  best = best_composite(summary, kinds)
  return {
      "workdir": str(model.workdir),
      "data": str(data),
      "ensemble": _is_ensemble(model),
      "sequences": list(sequences),
      "split": split,
      "subjects": [s.subject_id for s in chosen],
      "ages": [s.age for s in chosen],
      "predicted_ages": None if predicted is None else predicted.tolist(),
      "perturbation_status": ("done" if perturb else "off" if not settings.perturb else
                       "skipped: the sub-ensembles read different input cubes"),
      "masks": mask_names,
      "settings": dataclasses.asdict(settings),
      "patch_mm": float(settings.patch_size * inverses[0].voxel_size[0]),
      "aopc_random": (_mean_se(np.asarray(random.aopc))[0] if random is not None else None),
      "aopc_random_se": (_mean_se(np.asarray(random.aopc))[1] if random is not None else None),
      "summary": summary,
      "per_subject": per_subject,
      "curves": curves,
      "best_composite": best,
      "criterion": CRITERION,
      "sanity_check": sanity,
      "timings": timings,
      "versions": {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind)},
  }


def evaluate_methods(workdir: str | os.PathLike, data: str | os.PathLike,
                     methods: Sequence[str] | None = None, *,
                     subjects: int = 8, split: str = "test", perturb: bool = False,
                     seed: int = 0, model=None) -> dict[str, Any]:
  """Mass and rank accuracy on the `ageing` mask of a few methods (default: the default
  method and the gradient baseline).

  Returns:
    {method: {"relevance_mass_accuracy": float, "relevance_rank_accuracy": float,
    "mask_share": float (what an uninformative map scores), "n": subjects, and with perturb
    "abpc" (years)}}.
  """
  model = model if model is not None else load_model(workdir)
  methods = methods or (_maps().DEFAULT_METHOD, "gradient")
  result = evaluate(model, data, methods, subjects=subjects, split=split,
                    settings=Settings(perturb=perturb, seed=seed))
  out = {}
  for name, row in result["summary"].items():
    out[name] = {"relevance_mass_accuracy": row[f"{PRIMARY_MASK}_mass_accuracy"],
                 "relevance_rank_accuracy": row[f"{PRIMARY_MASK}_rank_accuracy"],
                 "mask_share": row[f"{PRIMARY_MASK}_share"], "n": row["n"]}
    if perturb:
      out[name]["abpc"] = row["abpc"]
  return out


# ---------------------------------------------------------------------------------------------
# Output.


def _fmt(v: Any) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, (float, np.floating)):
    return "n/a" if not math.isfinite(v) else f"{v:.6g}"
  return str(v)


def scores_tsv(result: dict[str, Any]) -> str:
  """One row per subject x method x mask: mass and rank accuracy, mask share and size."""
  cols = ["participant_id", "method", "kind", "mask", "mass_accuracy", "rank_accuracy",
          "mask_share", "mask_voxels"]
  lines = ["\t".join(cols)]
  for method, subj in result["per_subject"].items():
    kind = result["summary"][method]["kind"]
    for mask in result["masks"]:
      for i, sid in enumerate(result["subjects"]):
        lines.append("\t".join(_fmt(v) for v in (
            sid, method, kind, mask, subj[f"{mask}_mass_accuracy"][i],
            subj[f"{mask}_rank_accuracy"][i], subj[f"{mask}_share"][i],
            subj[f"{mask}_voxels"][i])))
  return "\n".join(lines) + "\n"


def summary_tsv(result: dict[str, Any]) -> str:
  """One row per method: means (and standard errors) over subjects."""
  cols = ["method", "kind", "n"]
  for mask in result["masks"]:
    cols += [f"{mask}_mass_accuracy", f"{mask}_mass_accuracy_se", f"{mask}_rank_accuracy",
             f"{mask}_rank_accuracy_se", f"{mask}_share"]
  if result["curves"]:
    cols += ["aopc_morf", "aopc_morf_se", "aopc_lerf", "aopc_lerf_se", "abpc", "abpc_se"]
  cols += ["relevance_seconds"]
  lines = ["\t".join(cols)]
  for method, row in result["summary"].items():
    lines.append("\t".join(_fmt(method if c == "method" else row.get(c)) for c in cols))
  return "\n".join(lines) + "\n"


def sanity_tsv(result: dict[str, Any]) -> str:
  """One row per method x randomisation step (layer randomised at that step, the ones before it
  still random): means and standard errors over subjects of the similarity to the trained
  model's map, and the mean absolute change of the predicted age (years)."""
  cols = ["method", "kind", "step", "layer", "n"]
  for measure in SANITY_MEASURES:
    cols += [measure, f"{measure}_se"]
  cols += ["prediction_change"]
  sanity = result["sanity_check"]
  lines = ["\t".join(cols)]
  for method, values in sanity["per_subject"].items():
    outputs = np.asarray(values["outputs"], np.float64)
    for step, layer in enumerate(sanity["layers"]):
      row = {"method": method, "kind": result["summary"][method]["kind"], "step": step + 1,
             "layer": layer, "prediction_change": float(np.mean(np.abs(
                 outputs[step + 1] - outputs[0])))}
      for measure in SANITY_MEASURES:
        row[measure], row[f"{measure}_se"], row["n"] = _mean_se(values[measure][step])
      lines.append("\t".join(_fmt(row[c]) for c in cols))
  return "\n".join(lines) + "\n"


def plot(path: str | os.PathLike, result: dict[str, Any]) -> None:
  """Perturbation curves (MoRF per method, random order) and bar charts of mass / rank accuracy
  per method and mask, with each mask's share (an uninformative map's score) marked."""
  import matplotlib

  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure

  methods = list(result["summary"])
  masks = [m for m in result["masks"] if not m.startswith("ageing_")]
  perturb = bool(result["curves"])
  ncols = 3 if perturb else 2
  fig = Figure(figsize=(6.0 * ncols, 5.0), dpi=110)
  axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
  colours = matplotlib.colormaps["tab10"]
  if perturb:
    ax = axes[0]
    fr = np.asarray(result["curves"]["fractions"])
    for i, m in enumerate(methods):
      style = "-" if result["summary"][m]["kind"] == "lrp" else "--"
      ax.plot(fr, result["curves"][m]["morf"], style, color=colours(i % 10), label=m, lw=1.4)
    ax.plot(fr, result["curves"]["random"]["random"], ":", color="k", lw=2, label="random order")
    ax.set_xlabel(f"share of brain patches replaced ({result['patch_mm']:g} mm cubes, "
                  f"{result['settings']['perturbation']})")
    ax.set_ylabel("predicted age (years), mean over subjects")
    ax.set_title("Region perturbation, most relevant first", fontsize=10)
    ax.legend(fontsize=7)
  width = 0.8 / max(1, len(methods))
  for ax, measure, title in ((axes[-2], "mass_accuracy", "Relevance mass accuracy"),
                             (axes[-1], "rank_accuracy", "Relevance rank accuracy")):
    pos = np.arange(len(masks))
    for i, m in enumerate(methods):
      row = result["summary"][m]
      vals = [row.get(f"{k}_{measure}", math.nan) for k in masks]
      errs = [row.get(f"{k}_{measure}_se", math.nan) for k in masks]
      errs = [0.0 if not np.isfinite(e) else e for e in errs]
      ax.bar(pos + (i - (len(methods) - 1) / 2) * width, vals, width, yerr=errs,
             color=colours(i % 10), label=m)
    share = [result["summary"][methods[0]].get(f"{k}_share", math.nan) for k in masks]
    ax.scatter(pos, share, marker="_", s=900, color="k", zorder=3, label="mask share (chance)")
    ax.set_xticks(pos)
    ax.set_xticklabels(masks, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title + f" (n = {len(result['subjects'])} subjects)", fontsize=10)
    if not perturb and measure == "mass_accuracy":
      ax.legend(fontsize=7)
  fig.suptitle(f"Explanations against ground truth: {result['workdir']}"
               + (f"; best composite {result['best_composite']}" if result["best_composite"]
                  else ""), fontsize=10)
  fig.tight_layout()
  with fileio.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png")


def _json_ready(obj):
  if isinstance(obj, dict):
    return {k: _json_ready(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_ready(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def write_outputs(out: str | os.PathLike, result: dict[str, Any]) -> dict[str, Path]:
  """scores.tsv, summary.tsv, evaluation.json, evaluation.png and, when the sanity check ran,
  sanity.tsv in `out`; returns their paths."""
  out = Path(out)
  paths = {"scores": out / "scores.tsv", "summary": out / "summary.tsv",
           "json": out / "evaluation.json", "plot": out / "evaluation.png"}
  fileio.write_text(paths["scores"], scores_tsv(result))
  fileio.write_text(paths["summary"], summary_tsv(result))
  if result.get("sanity_check", {}).get("status") == "done":
    paths["sanity"] = out / "sanity.tsv"
    fileio.write_text(paths["sanity"], sanity_tsv(result))
  fileio.write_json(paths["json"], _json_ready(result))
  plot(paths["plot"], result)
  return paths


# ---------------------------------------------------------------------------------------------
# Command line.


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage evaluate-explanations`."""
  p = subparsers.add_parser(
      "evaluate-explanations",
      help="score relevance maps of every LRP composite and baseline against the simulated "
           "cohort's ground truth (mass/rank accuracy, region perturbation)",
      description=__doc__.split("\n\n")[1])
  p.add_argument("--workdir", required=True, type=Path, help="trained workdir (single or ensemble)")
  p.add_argument("--data", required=True, type=Path, help="simulated cohort (brainage simulate)")
  p.add_argument("--out", required=True, type=Path, help="directory for the tables and plot")
  p.add_argument("--methods", default=None,
                 help="comma-separated methods (default: every composite and baseline)")
  p.add_argument("--subjects", type=int, default=8, help="at most N subjects (0 = whole split)")
  p.add_argument("--split", choices=SPLITS, default="test",
                 help="subjects of the workdir's recorded split (default test; all = any)")
  p.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  p.add_argument("--patch-mm", type=float, default=16.0,
                 help="edge of the perturbed cubes in mm (16; rounded to whole voxels)")
  p.add_argument("--steps", type=int, default=16, help="perturbation steps (16)")
  p.add_argument("--max-fraction", type=float, default=0.5,
                 help="share of brain patches replaced at the last step (0.5)")
  p.add_argument("--perturbation", choices=PERTURBATIONS, default="blur",
                 help="what replaces a patch: blurred input (default), its mean, or zero")
  p.add_argument("--random-repeats", type=int, default=4, help="random orders averaged (4)")
  p.add_argument("--no-perturbation", action="store_true",
                 help="mass and rank accuracy only (no region perturbation)")
  p.add_argument("--batch-size", type=int, default=8, help="volumes per relevance call (8)")
  p.add_argument("--seed", type=int, default=0,
                 help="SmoothGrad noise, random orders, ties, randomised layers")
  p.add_argument("--sanity-check", action=argparse.BooleanOptionalAction, default=None,
                 help="model-parameter randomisation check per method, layers randomised from "
                      "the output to the input (sanity.tsv; default: on with an accelerator, "
                      "off on CPU)")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  if args.batch_size < 1:
    raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
  if args.random_repeats < 1:
    raise ConfigError(f"--random-repeats {args.random_repeats} must be at least 1")
  if args.patch_mm <= 0:
    raise ConfigError(f"--patch-mm {args.patch_mm} must be positive")
  methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
  model = load_model(args.workdir, args.checkpoint)
  voxel = voxel_size_mm(model)
  settings = Settings(patch_size=max(1, int(round(args.patch_mm / voxel))), steps=args.steps,
                      max_fraction=args.max_fraction, perturbation=args.perturbation,
                      random_repeats=args.random_repeats, batch_size=args.batch_size,
                      seed=args.seed, perturb=not args.no_perturbation,
                      sanity=args.sanity_check)
  result = evaluate(model, args.data, methods, subjects=args.subjects, split=args.split,
                    settings=settings, progress=sys.stderr.isatty())
  paths = write_outputs(args.out, result)
  best = result["best_composite"]
  line = (f"evaluated {len(result['summary'])} methods on {len(result['subjects'])} "
          f"{args.split} subjects -> {paths['summary']}")
  if best:
    row = result["summary"][best]
    line += (f"; best composite {best} (ageing mass accuracy "
             f"{row[f'{PRIMARY_MASK}_mass_accuracy']:.3f}, share "
             f"{row[f'{PRIMARY_MASK}_share']:.3f})")
  print(line)
  return 0
