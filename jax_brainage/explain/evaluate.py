"""The LRP rule-experimentation tool: explain held-out simulated subjects with every method and
score the maps against the cohort's ground truth (`brainage evaluate-explanations`).

    from jax_brainage.explain import evaluate, scoring
    from jax_brainage.train import artifact
    model = artifact.load("runs/demo")                      # any trained workdir
    result = evaluate.evaluate(model, "data/sim", ["epsilon_alpha2_beta1", "gradient"])
    scoring.write_outputs("runs/demo/evaluation", result)

On a simulated cohort (`brainage simulate`: the dataset holds derivatives/simulation/ with the
ground truth) the subjects of the workdir's recorded split are prepared exactly as in training
(`predict.model_inputs`), explained with every method of `explain.maps.METHODS` (the LRP
composites and the gradient, gradient x input, SmoothGrad and Integrated Gradients baselines;
`maps.relevance`, every member of an ensemble weighted by the head) and each map is scored
(`explain.scoring`): against the ground-truth masks carried into the cube (`explain.truth`), by
3D region perturbation of the one input cube the model reads (`--patch-mm` cubes, `--steps`
steps up to `--max-fraction` of the patches), and by the model-parameter randomisation sanity
check (`--sanity-check`; default on with an accelerator, off on CPU; single models only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_brainage import lock, predict
from jax_brainage.data import intensity
from jax_brainage.ensemble.model import Ensemble
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.explain import maps, scoring, truth
from jax_brainage.explain.truth import PRIMARY_MASK
from jax_brainage.train import artifact

SPLITS = ("test", "val", "train", "all")


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


# ---------------------------------------------------------------------------------------------
# The model's explained output.


def output_function(model: Ensemble, of_sub: dict[str, list[int] | None] | None = None):
  """(`f(variables, x [n, X, Y, Z, C] float32) -> [n]` predicted age (years), variables).

  The multi-level head's effective intercept plus its effective member weights times the
  members' predictions (exactly `head.apply`, before bias correction; a single model's own
  prediction); x is the one cube every sub-ensemble's input is cut from, `of_sub` {sub name:
  channel indices or None}.
  """
  weights = model.head.member_weights()
  intercept = float(model.head.intercept())
  parts = [(maps.regression_apply(sub.model), (of_sub or {}).get(sub.name))
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


# ---------------------------------------------------------------------------------------------
# Subjects.


def _select_subjects(model: Ensemble, dataset, split: str, n: int) -> list:
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
  """Prepared subjects: `relevance_inputs` what `maps.relevance` takes ({sub name: array}),
  `cube` `[n, X, Y, Z, C]` the one cube the model reads (None when the sub-ensembles read
  different cubes: then no region perturbation), `of_sub` channel indices per sub-ensemble into
  `cube` (None: all of it), `inverses` one `CubeInverse` per subject, `sequences` the data's."""

  relevance_inputs: Any
  cube: np.ndarray | None
  of_sub: dict[str, list[int] | None] | None
  inverses: list
  sequences: tuple[str, ...]


def voxel_size_mm(model: Ensemble, inputs: predict.ModelInputs | None = None) -> float:
  """The cube's voxel edge (mm), from the (first) training cache."""
  inputs = inputs or predict.model_inputs(model)
  view = next(iter(inputs.views.values()))
  size = view.index.get("voxel_size") or view.preprocessing.voxel_size or 1.0
  return float(np.max(np.broadcast_to(np.asarray(size, np.float64), (3,))))


def prepare_subjects(model: Ensemble, subjects, inputs: predict.ModelInputs | None = None
                     ) -> Inputs:
  """Every subject prepared exactly as in training, for every input view of the model."""
  inputs = inputs or predict.model_inputs(model)
  cubes: dict[str, list[np.ndarray]] = {k: [] for k in inputs.views}
  inverses = []
  for subject in subjects:
    inverse = None
    for key, view in inputs.views.items():
      cube, inv = view.preprocess({q: subject.images[q] for q in view.sequences},
                                  subject=subject.subject_id, mask=subject.mask)
      if inverse is not None and inv != inverse:
        raise DataError(f"{subject.subject_id}: the sub-ensembles' inputs were cut from "
                        "different grids; their maps cannot be compared with one mask")
      inverse = inv
      cubes[key].append(cube)
    inverses.append(inverse)
  stacked = {k: np.stack(v) for k, v in cubes.items()}
  per_sub = inputs.volumes(model, stacked)
  cube, channels = None, None
  if len(stacked) == 1:
    cube = next(iter(stacked.values()))
    channels = {name: ch for name, (_, ch) in inputs.of_sub.items()}
    picked = {tuple(ch) if ch is not None else None for ch in channels.values()}
    if len(picked) == 1 and None not in picked:
      # every sub-ensemble reads the same channels: perturb (and find the brain in) those only
      cube = next(iter(per_sub.values()))
      channels = {name: None for name in channels}
  return Inputs(per_sub, cube, channels, inverses, tuple(inputs.sequences))


# ---------------------------------------------------------------------------------------------
# The evaluation.


def evaluate(model: Ensemble, data: str | os.PathLike, methods: Sequence[str] | None = None, *,
             subjects: int = 8, split: str = "test", settings: Settings | None = None,
             progress: bool = False) -> dict[str, Any]:
  """Explains and scores the held-out simulated subjects with every method.

  Args:
    model: the trained model (`artifact.load`: an `Ensemble`, of one for a single model).
    data: the simulated BIDS dataset (with derivatives/simulation/).
    methods: names of `maps.METHODS` (default all).
    subjects: at most this many subjects (0 = all of the split).
    split: which part of the workdir's recorded split ("all": every subject of the data).
    settings: perturbation settings (voxel patch edge etc.).

  Returns:
    a JSON-ready dict: settings, subjects, masks, `summary` {method: {...}}, `per_subject`,
    `curves`, `best_composite`, `criterion`, timings.
  """
  settings = settings or Settings()
  if split not in SPLITS:
    raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
  if settings.perturbation not in scoring.PERTURBATIONS:
    raise ConfigError(f"--perturbation {settings.perturbation!r}: choose one of "
                      f"{', '.join(scoring.PERTURBATIONS)}")
  if settings.patch_size < 1 or settings.steps < 1 or not 0 < settings.max_fraction <= 1:
    raise ConfigError("need a patch of at least 1 voxel, --steps >= 1 and "
                      "0 < --max-fraction <= 1")
  names = list(maps.METHODS) if not methods else [maps.get_method(m).name for m in methods]
  data = Path(data)
  cohort = truth.open_cohort(data)
  sequences = maps.ensemble_sequences(model)
  model_inputs = predict.model_inputs(model)
  dataset = predict.read_dataset([data], model_inputs.sequences)
  chosen = _select_subjects(model, dataset, split, subjects)
  # One bar over the stages (preparing the subjects, each method, each sanity check): the
  # demo spends minutes here on a CPU.
  run_sanity = (jax.default_backend() != "cpu" if settings.sanity is None else settings.sanity)
  bar = tqdm(total=1 + len(names) * (2 if run_sanity else 1), desc="evaluate explanations",
             unit="stage", disable=not progress, file=sys.stderr, dynamic_ncols=True)
  bar.set_postfix_str(f"prepare {len(chosen)} subjects")
  t0 = time.perf_counter()
  inputs = prepare_subjects(model, chosen, model_inputs)
  inverses = inputs.inverses
  truths = [truth.ground_truth(data, cohort, s.subject_id, sequences, inv)
            for s, inv in zip(chosen, inverses)]
  mask_names, masks = truth.stacked_masks(truths)
  timings = {"prepare_seconds": time.perf_counter() - t0}
  bar.update(1)

  perturb = settings.perturb and inputs.cube is not None
  perturber = random = predicted = None
  if inputs.cube is not None:
    x = jnp.asarray(intensity.to_unit_float(np.asarray(inputs.cube)))
    support = jnp.any(x != 0, axis=-1)  # the brain: background is exactly 0 in every channel
    f, variables = output_function(model, inputs.of_sub)
    predicted = np.asarray(jax.jit(f)(variables, x), np.float64)
    perturber = scoring.Perturber(
        f, variables, x, scoring.perturbation_baseline(x, settings.perturbation,
                                                       settings.patch_size),
        support, jax.random.PRNGKey(settings.seed), settings.patch_size, settings.steps,
        settings.max_fraction, settings.batch_size)
  if perturb:
    random = perturber.random(settings.random_repeats)

  summary: dict[str, dict[str, Any]] = {}
  per_subject: dict[str, dict[str, Any]] = {}
  curves: dict[str, Any] = {}
  kinds = {m: maps.METHODS[m].kind for m in names}
  for name in names:
    bar.set_postfix_str(name)
    t1 = time.perf_counter()
    rel = maps.relevance(model, inputs.relevance_inputs, name, batch_size=settings.batch_size,
                         seed=settings.seed)
    t_rel = time.perf_counter() - t1
    row: dict[str, Any] = {"kind": kinds[name], "summary": maps.METHODS[name].summary,
                           "n": len(chosen), "relevance_seconds": t_rel}
    mask_row, subj = scoring.mask_summary(scoring.score_maps(rel, masks))
    row.update(mask_row)
    total = np.sum(rel.reshape(len(rel), -1).astype(np.float64), axis=1)
    subj["relevance_sum"] = total.tolist()
    if perturb:
      pert_row, pert_subj, curves[name] = scoring.perturbation_summary(
          perturber.region(rel, random))
      row.update(pert_row)
      subj.update(pert_subj)
    row["seconds"] = time.perf_counter() - t1
    summary[name] = row
    per_subject[name] = subj
    bar.update(1)
  sanity = {"status": "off"}
  # gated like perturbation in the demo (run_sanity): one attribution per layer and method is
  # slow on CPU
  if run_sanity:
    if not artifact.is_single_model(model):
      sanity = {"status": "skipped: ensembles (run it on a single-model workdir)"}
    else:
      t1 = time.perf_counter()
      sub = model.subs[0]
      sanity = {"status": "done", **scoring.sanity_check(
          sub.model, sub.member_variables(0), x, np.asarray(inputs.cube).dtype, support, names,
          batch_size=settings.batch_size, seed=settings.seed, progress=bar)}
      timings["sanity_seconds"] = time.perf_counter() - t1
      # the summary line: mean Spearman of |relevance| once every layer is random
      sanity["final_spearman_abs"] = {
          m: scoring.mean_se(v["spearman_abs"][-1])[0] for m, v in sanity["per_subject"].items()}
  if random is not None:
    curves["random"] = {"random": np.mean(np.asarray(random.outputs, np.float64), 0).tolist()}
    curves["fractions"] = np.asarray(random.fractions, np.float64).tolist()
    timings["aopc_random"] = scoring.mean_se(np.asarray(random.aopc))[0]
  bar.close()
  best = scoring.best_composite(summary, kinds)
  return {
      "workdir": str(model.workdir),
      "data": str(data),
      "ensemble": not artifact.is_single_model(model),
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
      "aopc_random": (scoring.mean_se(np.asarray(random.aopc))[0] if random is not None
                      else None),
      "aopc_random_se": (scoring.mean_se(np.asarray(random.aopc))[1] if random is not None
                         else None),
      "summary": summary,
      "per_subject": per_subject,
      "curves": curves,
      "best_composite": best,
      "criterion": scoring.CRITERION,
      "sanity_check": sanity,
      "timings": timings,
      "versions": {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind)},
  }


def evaluate_explanations(workdir: str | os.PathLike, data: str | os.PathLike,
                          out: str | os.PathLike, methods: Sequence[str] | None = None, *,
                          checkpoint: str = "best", patch_mm: float = 16.0,
                          settings: Settings | None = None, subjects: int = 8,
                          split: str = "test", progress: bool = False
                          ) -> tuple[dict[str, Any], dict[str, Path]]:
  """Loads workdir's trained model, evaluates `methods` on the simulated dataset `data` and
  writes the tables, record and plot to `out` (`scoring.write_outputs`).

  Args:
    patch_mm: edge of the perturbed cubes (mm), rounded to whole voxels of the model's cube
      (replaces `settings.patch_size`).
    settings, subjects, split, progress: as for `evaluate`.
  Returns:
    (the result of `evaluate`, {output: path}).
  Raises:
    ConfigError: another process writes `out` (its lock, `jax_brainage.lock`, is held from the
      start, so the refusal comes before the evaluation's minutes, not after them).
  """
  with lock.hold(out, "brainage evaluate-explanations"):
    model = artifact.load(workdir, checkpoint)
    voxel = voxel_size_mm(model)
    settings = dataclasses.replace(settings or Settings(),
                                   patch_size=max(1, int(round(patch_mm / voxel))))
    result = evaluate(model, data, methods, subjects=subjects, split=split, settings=settings,
                      progress=progress)
    return result, scoring.write_outputs(out, result)


def evaluate_methods(workdir: str | os.PathLike, data: str | os.PathLike,
                     methods: Sequence[str] | None = None, *,
                     subjects: int = 8, split: str = "test", perturb: bool = False,
                     seed: int = 0, model: Ensemble | None = None) -> dict[str, Any]:
  """Mass and rank accuracy on the `ageing` mask of a few methods (default: the default
  method and the gradient baseline).

  Returns:
    {method: {"relevance_mass_accuracy": float, "relevance_rank_accuracy": float,
    "mask_share": float (what an uninformative map scores), "n": subjects, and with perturb
    "abpc" (years)}}.
  """
  model = model if model is not None else artifact.load(workdir)
  methods = methods or (maps.DEFAULT_METHOD, "gradient")
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
