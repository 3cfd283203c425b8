"""Scores of relevance maps: ground-truth accuracy, region perturbation, the sanity check, and
the tables, record and plot that report them (`brainage evaluate-explanations`).

1. Against ground-truth masks (`explain.truth`): relevance mass accuracy and rank accuracy
   (`lrp.evaluation`); voxel relevance is the sum over the input channels.
2. By 3D region perturbation (`lrp.evaluation.region_perturbation`): cubic patches touching the
   brain are replaced by a blurred copy of the input (or their own mean, or zero) most relevant
   first (MoRF), least relevant first (LeRF) and in random order (shared by all methods), up to
   a share of the patches; the predicted age (years) after each step. AOPC = mean drop of the
   predicted age (years); ABPC = mean of LeRF - MoRF (years): how well the map's order separates
   what the model uses from what it does not.
3. By the model-parameter randomisation sanity check: the model's layers are re-drawn at random
   one after another from the output towards the input (cumulatively, the same random models
   for every method), and each method's voxel map of the partly random model is compared with
   its map of the trained model inside the brain (Spearman of |relevance| and of relevance,
   Pearson, IoU of the 5% most relevant voxels; `lrp.evaluation.model_parameter_randomisation`).
   A map that stays similar while the model is destroyed does not explain the model. Reported
   only: it does not enter the choice of the best composite.

Outputs (`write_outputs`): `scores.tsv` (one row per subject x method x mask), `summary.tsv`
(one row per method: means and standard errors), `evaluation.json` (settings, summary,
per-subject values, curves, the best composite and the criterion), `evaluation.png`
(perturbation curves and bar charts of mass / rank accuracy per method and mask), and with the
sanity check `sanity.tsv` (one row per method x randomisation step: means and standard errors
over subjects).

The best composite (`best_composite`) is chosen among the LRP composites only, by the mean rank
over three measures (each a mean over subjects): mass accuracy on the `ageing` mask, rank
accuracy on the `ageing` mask, and ABPC; ties go to the higher mass accuracy. The ground-truth
measures say whether relevance lands where ageing was put; ABPC whether it marks what this model
actually uses; a composite must do well on both to be the default.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_brainage import fileio
from jax_brainage.explain import maps
from jax_brainage.explain.truth import PRIMARY_MASK
from lrp import evaluation as ev

PERTURBATIONS = ("blur", "patch_mean", "zero")
CRITERION = ("best_composite: among the LRP composites, the lowest mean rank over (1) mean "
             "relevance mass accuracy on the 'ageing' mask, (2) mean relevance rank accuracy on "
             "the 'ageing' mask, (3) mean ABPC (LeRF - MoRF area, years); ties go to the higher "
             "mass accuracy")
SANITY_MEASURES = ("spearman_abs", "spearman", "pearson", "top_iou")
SANITY_TOP_FRACTION = 0.05  # share of the brain's voxels in the top set of top_iou


# ---------------------------------------------------------------------------------------------
# Ground truth.


def score_maps(relevance: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """Mass and rank accuracy of relevance `[n, X, Y, Z, C]` (channels summed) against masks
  {name: bool `[n, X, Y, Z]`}: {name: {mass [n], rank [n], share [n], voxels [n]}} (NaN where a
  subject's mask is empty)."""
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


def mean_se(v) -> tuple[float, float, int]:
  """(mean, standard error, count) of the finite values of `v` (NaN where undefined)."""
  v = np.asarray(v, np.float64)
  v = v[np.isfinite(v)]
  if len(v) == 0:
    return math.nan, math.nan, 0
  se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
  return float(np.mean(v)), se, int(len(v))


def mask_summary(scores: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
  """`score_maps` output as (summary entries: per mask the means and standard errors of mass and
  rank accuracy, the mean share and the subjects counted; per-subject entries: lists)."""
  row: dict[str, Any] = {}
  subj: dict[str, Any] = {}
  for mask, s in scores.items():
    for measure, label in (("mass", "mass_accuracy"), ("rank", "rank_accuracy")):
      mean, se, _ = mean_se(s[measure])
      row[f"{mask}_{label}"], row[f"{mask}_{label}_se"] = mean, se
      subj[f"{mask}_{label}"] = s[measure].tolist()
    row[f"{mask}_share"] = mean_se(s["share"])[0]
    row[f"{mask}_n"] = mean_se(s["mass"])[2]
    subj[f"{mask}_share"] = s["share"].tolist()
    subj[f"{mask}_voxels"] = s["voxels"].tolist()
  return row, subj


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


# ---------------------------------------------------------------------------------------------
# Region perturbation.


def perturbation_baseline(x: jax.Array, perturbation: str, patch_size: int):
  """What replaces a patch of network inputs x `[n, X, Y, Z, C]`: a blurred copy (sigma half the
  patch edge, voxels), each patch's mean, or zero (a scalar)."""
  if perturbation == "blur":
    return ev.blur_baseline(x, sigma=patch_size / 2.0)
  if perturbation == "patch_mean":
    return ev.patch_mean_baseline(x, (patch_size,) * 3)
  return jnp.zeros((), x.dtype)


@dataclasses.dataclass(frozen=True)
class Perturber:
  """Region perturbation of one model's inputs, in batches of subjects (bounded memory).

  Attributes:
    f, variables: `f(variables, x) -> [n]` predicted age (years), e.g. `evaluate.output_function`.
    x: float32 network inputs `[n, X, Y, Z, C]`; baseline: `perturbation_baseline(x, ...)`.
    support: bool `[n, X, Y, Z]`, the voxels whose patches may be replaced (the brain).
    key: the run's key (random orders and ties are folded in from it).
    patch_size: patch edge (voxels); steps; max_fraction: share replaced at the last step.
    batch_size: subjects per call.
  """

  f: Callable
  variables: Any
  x: jax.Array
  baseline: Any
  support: jax.Array
  key: jax.Array
  patch_size: int
  steps: int
  max_fraction: float
  batch_size: int

  def _baseline(self, sl: slice):
    return self.baseline[sl] if jnp.ndim(self.baseline) else self.baseline

  def _kw(self, sl: slice) -> dict[str, Any]:
    return dict(patch_size=(self.patch_size,) * 3, steps=self.steps,
                max_fraction=self.max_fraction, support=self.support[sl],
                variables=self.variables)

  def _slices(self) -> list[slice]:
    return [slice(s, s + self.batch_size) for s in range(0, len(self.x), self.batch_size)]

  def random(self, repeats: int) -> ev.PerturbationCurve:
    """The random-order curve of every subject (mean over `repeats` orders), shared by all
    methods."""
    parts = [ev.random_perturbation_curve(
        self.f, self.x[sl], self._baseline(sl),
        key=jax.random.fold_in(jax.random.fold_in(self.key, 1), i), repeats=repeats,
        **self._kw(sl)) for i, sl in enumerate(self._slices())]
    outputs = jnp.concatenate([p.outputs for p in parts])
    return ev.PerturbationCurve(parts[0].fractions, outputs, ev.aopc(outputs))

  def region(self, relevance: np.ndarray, random: ev.PerturbationCurve
             ) -> ev.RegionPerturbation:
    """MoRF and LeRF curves of one method's relevance `[n, X, Y, Z, C]`, with the shared random
    curve (`random`)."""
    parts = []
    for sl in self._slices():
      part = ev.PerturbationCurve(random.fractions, random.outputs[sl], random.aopc[sl])
      parts.append(ev.region_perturbation(
          self.f, self.x[sl], jnp.asarray(relevance[sl]), self._baseline(sl),
          key=jax.random.fold_in(jax.random.fold_in(self.key, 2), sl.start), random=part,
          **self._kw(sl)))

    def cat(curves):
      return ev.PerturbationCurve(curves[0].fractions,
                                  jnp.concatenate([c.outputs for c in curves]),
                                  jnp.concatenate([c.aopc for c in curves]))

    return ev.RegionPerturbation(cat([p.morf for p in parts]), cat([p.lerf for p in parts]),
                                 cat([p.random for p in parts]),
                                 jnp.concatenate([p.abpc for p in parts]))


def perturbation_summary(pert: ev.RegionPerturbation
                         ) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[float]]]:
  """(summary entries: AOPC of MoRF and LeRF and ABPC, means and standard errors in years;
  per-subject entries; the mean MoRF and LeRF curves over subjects)."""
  row: dict[str, Any] = {}
  subj: dict[str, Any] = {}
  for label, curve in (("morf", pert.morf), ("lerf", pert.lerf)):
    row[f"aopc_{label}"], row[f"aopc_{label}_se"], _ = mean_se(np.asarray(curve.aopc))
    subj[f"aopc_{label}"] = np.asarray(curve.aopc, np.float64).tolist()
  row["abpc"], row["abpc_se"], _ = mean_se(np.asarray(pert.abpc))
  subj["abpc"] = np.asarray(pert.abpc, np.float64).tolist()
  curves = {"morf": np.mean(np.asarray(pert.morf.outputs, np.float64), 0).tolist(),
            "lerf": np.mean(np.asarray(pert.lerf.outputs, np.float64), 0).tolist()}
  return row, subj, curves


# ---------------------------------------------------------------------------------------------
# The sanity check.


def sanity_check(model, variables, x, stored_dtype, support, names: Sequence[str], *,
                 batch_size: int, seed: int, progress=None) -> dict[str, Any]:
  """Cascading model-parameter randomisation of one trained model, for every method.

  Args:
    model: the flax module (a regression model); variables: its own (unstacked) variables.
    x: float32 network inputs `[n, X, Y, Z, C]`; stored_dtype: the cache's dtype (ZBox bounds).
    support: bool `[n, X, Y, Z]`, the voxels compared (the brain).
    names: methods of `maps.METHODS`.
    batch_size: subjects per call; seed: the random layers' and the random methods' seed.
    progress: a tqdm bar advanced by one per method (None: silent).

  Returns:
    {"layers": [L] randomised in this order (cumulative), "top_fraction", "per_subject":
    {method: {measure: [L][n], "outputs": [L + 1][n] predicted age (years)}}}. Every method
    sees the same random models (one key, from the seed); its random noise (SmoothGrad) is
    drawn per subject as in `maps.relevance`.
  """
  apply = maps.regression_apply(model)
  f = lambda v, u: apply(v, u)  # noqa: E731
  variables = jax.tree.map(jnp.asarray, variables)
  # the model's top-level layers, the last applied first (MRInet: age_head, dense1, conv5, ...)
  layers = ev.layer_order(f, variables, x[:1])
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 3)
  base = jax.random.PRNGKey(seed)
  per_method: dict[str, dict[str, Any]] = {}
  for name in names:
    if progress is not None:
      progress.set_postfix_str(f"sanity check {name}")
    method = maps.METHODS[name]
    parts = []
    for start in range(0, len(x), batch_size):  # bounded memory: batches of subjects
      xs = x[start:start + batch_size]
      rows = jnp.arange(start, start + len(xs), dtype=jnp.uint32)
      keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(rows)
      low, high = maps.input_bounds(xs, stored_dtype)

      def attribute(v, u, method=method, keys=keys, low=low, high=high):
        # voxel relevance (channels summed), as every other score of this module
        return ev.pool_channels(method.attribute(f, v, u, keys=keys, low=low, high=high))

      parts.append(ev.model_parameter_randomisation(
          f, variables, xs, attribute, key=key, layers=layers,
          support=support[start:start + batch_size], top_fraction=SANITY_TOP_FRACTION))
    per_method[name] = {
        field: np.concatenate([np.asarray(getattr(p, field), np.float64) for p in parts],
                              axis=1).tolist() for field in (*SANITY_MEASURES, "outputs")}
    if progress is not None:
      progress.update(1)
  return {"layers": list(layers), "top_fraction": SANITY_TOP_FRACTION,
          "per_subject": per_method}


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
        row[measure], row[f"{measure}_se"], row["n"] = mean_se(values[measure][step])
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
  fileio.write_json(paths["json"], fileio.jsonable(result))
  plot(paths["plot"], result)
  return paths
