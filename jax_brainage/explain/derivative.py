"""Relevance maps of new subjects as a BIDS derivative dataset (what `brainage explain` writes).

    from jax_brainage import predict
    from jax_brainage.explain import derivative, maps
    target = derivative.Target("runs/demo", "best", maps.get_method(maps.DEFAULT_METHOD),
                               batch_size=8, seed=0, levels=derivative.LEVELS)
    dataset = predict.read_dataset(["data/new-bids"], target.required_sequences)
    index = derivative.explain_dataset(target, dataset, "runs/demo/explain")

Subjects are preprocessed exactly as `brainage predict` does (the training cache's
`Preprocessing` record: grid, cube, intensity scaling, region mask) and explained in fixed-size
jitted batches (`maps.ensemble_maps`: every trained model is an ensemble, a single model one of
one). Written under the output directory (every file atomically, so an interrupted run leaves
only complete files):

  dataset_description.json
  sub-<id>/[ses-<s>/]anat/sub-<id>[_ses-<s>]_model-<m>_seq-<seq>_relevance.nii.gz
      the map in the subject's own space: the exact inverse of crop and reorientation, the
      input image's affine and grid (float32, years per voxel; positive = older). <m> is the
      model (e.g. mrinet) of a single-model workdir; for an ensemble "ensemble", each
      sub-ensemble's name and each member's <sub>m<k> (--levels).
  group/group-<g>_value-<v>_model-<m>_seq-<seq>_space-<template|cube>_relevance.nii.gz
      mean map of a group of subjects: everyone (group-all), age bands (--age-band years),
      sex and every participants.tsv column (--groups): columns with few values by value, others
      split at the median (low/high). On the common template grid when every subject's image
      shares one grid (registered data, the simulated cohort), else on the cube grid.
  regions/relevance_regions.tsv, regions/group_regions.tsv
      voxels, sum, mean, positive, negative relevance and positive fraction per atlas label, per
      subject and per group (--atlas, default the simulated cohort's atlas or the training
      cache's region atlas; skipped without one). A row with a session is `sub-<id>_ses-<s>`
      in participant_id (and in the groups), so a subject's sessions stay apart.
  figures/*.png      slice montages over the anatomy (first --figures subjects, every group) and a
                     glass brain of the group-all map; tensorboard/ the same montages.
  explain.json       what was written: method, target, model, subjects (predicted age,
                     relevance sum, maps; with --target gap the reference's predicted age),
                     groups, tables, figures.

`--target gap` (Target(target="gap", reference_design=...)) writes maps against age-matched
training scans (by default the 8 most similar): why this subject's estimate differs from what is
expected at their age; integrated gradients from each reference scan, any other method R(x)
less their mean map (`jax_brainage.explain.reference`). `--reference expected` cuts each path
where the estimate reaches the one expected at the subject's age (explain.json then gives that
expected estimate as reference_predicted_age, and per subject the path fractions t_k and the
number of references walked).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from jax_brainage import fileio, lock, plots, predict
from jax_brainage.data import cache as cache_lib
from jax_brainage.data import bids, nifti, prune, simulate
from jax_brainage.data import regions as atlas_lib
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.explain import figures, maps, reference
from jax_brainage.explain import regions as region_tables
from jax_brainage.explain.groups import GroupMaps, entity, subject_groups
from jax_brainage.train import artifact
from jax_brainage.train.summary import SummaryWriter

INDEX = "explain.json"
LEVELS = ("ensemble", "subs", "members")


# ---------------------------------------------------------------------------------------------
# Names.


def subject_prefix(subject_id: str, session: str | None) -> str:
  """sub-X[_ses-S]: the start of a subject's file names."""
  sid = subject_id if subject_id.startswith("sub-") else f"sub-{subject_id}"
  return sid + (f"_ses-{session}" if session else "")


def map_path(out: Path, subject_id: str, session: str | None, model: str, sequence: str) -> Path:
  """out/sub-X/[ses-S/]anat/sub-X[_ses-S]_model-M_seq-SEQ_relevance.nii.gz"""
  sid = subject_id if subject_id.startswith("sub-") else f"sub-{subject_id}"
  folder = out / sid / (f"ses-{session}" if session else "") / "anat"
  name = (f"{subject_prefix(subject_id, session)}_model-{entity(model)}_seq-{entity(sequence)}"
          "_relevance.nii.gz")
  return folder / name


# ---------------------------------------------------------------------------------------------
# What is explained: the trained model of a workdir, with the inputs each part reads.


class Target:
  """The trained model of a workdir (`artifact.load`), how new data becomes its inputs, and the
  compiled explainers.

  Inputs are prepared as `brainage predict` prepares them (`predict.model_inputs`): `views` maps
  a key to a cache (view) whose `preprocess` makes one cube per subject (one per distinct
  training cache and sequence view), `of_sub` maps each sub-ensemble's name to (view key,
  channel indices or None). `levels` are the map families written: ("model",) for a single
  model (its maps are named after its architecture, `top`); a subset of LEVELS for an ensemble.
  """

  def __init__(self, workdir: Path, checkpoint: str, method: maps.Method, *, batch_size: int,
               seed: int, levels: Sequence[str], members_per_call: int = 0,
               target: str = "age", reference_design: str = reference.DEFAULT_DESIGN):
    if target not in reference.TARGETS:
      raise DataError(f"--target {target}: choose one of {', '.join(reference.TARGETS)}")
    paths = reference_design in reference.PATH_DESIGNS
    if target == "gap" and paths and not method.references:
      raise ConfigError(f"--reference {reference_design}: {method.name} explains against its "
                        "own baseline; the paths to the expected age need a method with "
                        "reference paths (integrated_gradients)")
    self.target = target
    self.method = method
    self.members_per_call = members_per_call
    self.batch_size = batch_size
    self.seed = seed
    self.ensemble = artifact.load(workdir, checkpoint)
    inputs = predict.model_inputs(self.ensemble)
    self.views, self.of_sub = dict(inputs.views), dict(inputs.of_sub)
    self.required_sequences: tuple[str, ...] = tuple(inputs.sequences)
    self.sequences = maps.ensemble_sequences(self.ensemble)
    self._explainers: dict[str, list] = {}
    # --target gap: maps less those of age-matched training scans (explain/reference.py).
    self.references = (reference.References(self.ensemble, self.views, self.of_sub,
                                            design=reference_design)
                       if target == "gap" else None)
    if artifact.is_single_model(self.ensemble):
      # One model: its maps only, named after its architecture (no member/sub-ensemble maps).
      sub = self.ensemble.subs[0]
      self.top = str(sub.manifest["model"])
      self.levels = ("model",)
      self.description = {"kind": "single", "model": self.top, "checkpoint": checkpoint,
                          "step": sub.step, "sequences": list(sub.sequences)}
    else:
      self.top = "ensemble"
      self.levels = tuple(levels)
      self.description = {"kind": "ensemble", "sub_ensembles": {
          s.name: {"sequences": list(s.sequences), "regions": list(s.regions),
                   "members": int(s.members)} for s in self.ensemble.subs}}

  @property
  def caches(self) -> list[Any]:
    """The distinct training caches behind the views."""
    out: dict[str, Any] = {}
    for view in self.views.values():
      out.setdefault(str(view.path), view)
    return list(out.values())

  def prepare(self, subject) -> tuple[dict[str, np.ndarray], Any]:
    """One subject's inputs {sub-ensemble: cube [X, Y, Z, C]} and the CubeInverse they share."""
    cubes, inverse = {}, None
    prepared = {}
    for key, view in self.views.items():
      images = {q: subject.images[q] for q in view.sequences}
      prepared[key], inv = view.preprocess(images, subject=subject.subject_id,
                                           mask=subject.mask)
      if inverse is None:
        inverse = inv
      elif inv != inverse:
        raise DataError(f"{subject.subject_id}: the sub-ensembles' inputs were cut from "
                        "different grids (caches with other cube shapes or reference "
                        "sequences); their maps cannot be added")
    for name, (key, channels) in self.of_sub.items():
      cubes[name] = prepared[key] if channels is None else prepared[key][..., channels]
    return cubes, inverse

  def explain(self, cubes: Mapping[str, np.ndarray], rows: np.ndarray,
              ages: Sequence[float] | None = None
              ) -> tuple[dict[str, tuple[np.ndarray, tuple[str, ...]]], np.ndarray]:
    """Maps of one batch: ({model label: (relevance [n, X, Y, Z, C], channel names)}, the top
    level's predicted age [n] (years)); the top level comes first.

    With target "gap", `ages` `[n]` (years) pick each subject's reference set of training scans
    (`reference.References`: its k most similar age-matched scans, or all age-matched ones) and
    the maps are R(x) less the mean map of the set (`self.reference_predicted` then holds the
    set's mean predicted age `[n]`)."""
    self.reference_predicted = None
    self.path_fractions = None
    refs = self.references
    if refs is None:
      return self._levels(dict(cubes), rows)
    if refs.design == "ageing":
      return self._expected_paths(cubes, rows, ages)
    if refs.design in ("nearest", "expected"):
      # Each subject's own k nearest scans (per sub-ensemble input).
      k = refs.size()
      inputs = {name: np.concatenate([refs.volumes(name, refs.rows_for(name, a, cube))
                                      for a, cube in zip(ages, np.asarray(cubes[name]))])
                for name in self.of_sub}
      if refs.design == "expected":
        return self._expected_paths(cubes, rows, ages, inputs)
      if self.method.references:  # the method explains f(x) against the scans themselves
        paths = {name: v.reshape(len(ages), k, *v.shape[1:]) for name, v in inputs.items()}
        levels, predicted = self._levels(dict(cubes), rows, paths)
        ref_pred = np.asarray(self.ensemble.predict(inputs).ensemble, np.float64)
        self.reference_predicted = ref_pred.reshape(len(ages), k).mean(1)
        return levels, predicted
      levels, predicted = self._levels(dict(cubes), rows)
      ref_levels, ref_pred = self._levels(inputs, np.arange(len(ages) * k))
      levels = {name: (r - ref_levels[name][0].reshape(len(ages), k, *r.shape[1:]).mean(1), q)
                for name, (r, q) in levels.items()}
      self.reference_predicted = ref_pred.reshape(len(ages), k).mean(1)
      return levels, predicted
    levels, predicted = self._levels(dict(cubes), rows)
    keys = [refs.key(a) for a in ages]
    for k in dict.fromkeys(keys):
      if k not in refs.maps:  # mean maps of the reference set, once per whole-year age
        while len(refs.maps) >= 16:  # bounded memory at study-sized cubes
          del refs.maps[next(iter(refs.maps))]
        inputs = refs.inputs(k)
        n_ref = len(next(iter(inputs.values())))
        ref_levels, ref_pred = self._levels(inputs, np.arange(n_ref))
        refs.maps[k] = ({name: (r.mean(axis=0), q) for name, (r, q) in ref_levels.items()},
                        float(np.mean(ref_pred)))
    levels = {name: (r - np.stack([refs.maps[k][0][name][0] for k in keys]), q)
              for name, (r, q) in levels.items()}
    self.reference_predicted = np.array([refs.maps[k][1] for k in keys])
    return levels, predicted

  def _expected_paths(self, cubes: Mapping[str, np.ndarray], rows: np.ndarray,
                      ages: Sequence[float], inputs: Mapping[str, np.ndarray] | None = None
                      ) -> tuple[dict[str, tuple[np.ndarray, tuple[str, ...]]], np.ndarray]:
    """Designs "expected" and "ageing": integrated gradients along paths from x, each cut where
    the estimate has dropped by the gap g = f(x) - E(a) (`reference.regula_falsi`:
    `References.refine_steps` steps on f along each path). "expected": towards the k nearest
    scans `inputs` {sub: [n * k, ...]}; "ageing" (`inputs` None): one path towards
    `References.ageing_end` (x moved back along the cohort's ageing direction).
    `self.reference_predicted` is E(a), `self.path_fractions` the fractions `[n, k]`."""
    refs = self.references
    n = len(ages)
    f_x = np.asarray(self.ensemble.predict(dict(cubes)).ensemble, np.float64)
    expected = refs.expected(ages)
    gap = f_x - expected
    if inputs is None:
      inputs = {name: refs.ageing_end(name, ages, np.asarray(cubes[name]), gap)
                for name in self.of_sub}
    k = len(next(iter(inputs.values()))) // n
    f_ref = np.asarray(self.ensemble.predict(inputs).ensemble, np.float64).reshape(n, k)
    differences = f_x[:, None] - f_ref
    paths = {name: v.reshape(n, k, *v.shape[1:]) for name, v in inputs.items()}

    def drop(t: np.ndarray) -> np.ndarray:  # f(x) - f(x + t (x_k - x)), [n, k] years
      starts = reference.path_starts(cubes, paths, t)
      return f_x[:, None] - np.asarray(self.ensemble.predict(starts).ensemble,
                                       np.float64).reshape(n, k)

    fractions = reference.regula_falsi(drop, gap, differences, refs.refine_steps)
    levels, predicted = self._levels(dict(cubes), rows, paths, fractions)
    self.reference_predicted = expected
    self.path_fractions = fractions
    return levels, predicted

  def _levels(self, cubes: Mapping[str, np.ndarray], rows: np.ndarray,
              references: Mapping[str, np.ndarray] | None = None,
              fractions: np.ndarray | None = None
              ) -> tuple[dict[str, tuple[np.ndarray, tuple[str, ...]]], np.ndarray]:
    em = maps.ensemble_maps(self.ensemble, dict(cubes), self.method,
                            batch_size=self.batch_size, seed=self.seed, rows=rows,
                            members_per_call=self.members_per_call,
                            explainers=self._explainers, references=references,
                            fractions=fractions)
    out = {self.top: (em.ensemble, em.sequences)}
    if "subs" in self.levels:
      for name, r in em.subs.items():
        out[name] = (r, em.sub_sequences[name])
    if "members" in self.levels:
      for name, r in em.members.items():
        for k in range(r.shape[0]):
          out[f"{name}m{k}"] = (r[k], em.sub_sequences[name])
    head = self.ensemble.head
    predicted = head.apply({n: np.asarray(p).T for n, p in em.member_predictions.items()})
    return out, np.asarray(predicted, np.float32)


# ---------------------------------------------------------------------------------------------
# The whole run.


def find_atlas(data: Sequence[str | os.PathLike], target: Target) -> Path | None:
  """Default atlas: the simulated cohort's (DATA/derivatives/simulation/atlas.nii.gz), else the
  training cache's region atlas; None if neither exists."""
  if len(data) == 1:
    candidate = simulate.derivatives_dir(data[0]) / "atlas.nii.gz"
    if candidate.is_file():
      return candidate
  for cache in target.caches:
    candidate = Path(cache.path) / cache_lib.ATLAS
    if candidate.is_file():
      return candidate
  return None


def select_subjects(dataset, wanted: Sequence[str] | None):
  """The dataset's subjects, or those named (with or without "sub-"), in the order given; a
  subject id names all its sessions, `sub-01_ses-2` one."""
  if not wanted:
    return list(dataset.subjects)
  by_id: dict[str, list[Any]] = {}
  by_row = {bids.row_id(s.subject_id, s.session): s for s in dataset.subjects}
  for s in dataset.subjects:
    by_id.setdefault(s.subject_id, []).append(s)
  chosen = []
  for w in wanted:
    row = next((by_row[r] for r in (w, f"sub-{w}") if "_ses-" in w and r in by_row), None)
    if row is not None:
      chosen.append(row)
      continue
    sid = w if w.startswith("sub-") else f"sub-{w}"
    if sid not in by_id and w in by_id:
      sid = w
    if sid not in by_id:
      raise DataError(f"--subjects {w}: no such subject in {dataset.root or 'the data'}")
    chosen += by_id.pop(sid)
  return chosen


def explain_dataset(target: Target, dataset, out: str | os.PathLike, *,
                    subjects: Sequence[str] | None = None, workers: int = 1,
                    skip_bad: bool = False, atlas_path: str | os.PathLike | None = None,
                    age_band: float = 10.0, group_columns: Sequence[str] | None = None,
                    n_figures: int = 4, glass_brain: bool = True,
                    quiet: bool = False) -> dict[str, Any]:
  """Explains every (chosen) subject of `dataset` and writes maps, tables, figures and index
  (see the module docstring), holding the lock of `out` (`jax_brainage.lock`: a second writer
  of `out` is refused in one line; temporaries a killed run left in `out` are removed first).

  Args:
    target: the model and method (`Target`); dataset: `predict.read_dataset` with
      `target.required_sequences`.
    subjects: participant ids to explain, in this order (default all).
    workers: threads preparing subjects (and compressing maps); skip_bad: report subjects whose
      images fail instead of stopping.
    atlas_path: label image for the region tables (None: no tables).
    age_band: width of the age-band groups (years; 0: none); group_columns: participants.tsv
      columns to group by (default sex and every covariate).
    n_figures: subjects with montages; glass_brain: a glass brain of the group-all map.
  Returns:
    the index written to out/explain.json.
  Raises:
    ConfigError: another process writes `out`.
  """
  with lock.hold(out, "brainage explain"):
    return _write_derivative(target, dataset, Path(out), subjects=subjects, workers=workers,
                             skip_bad=skip_bad, atlas_path=atlas_path, age_band=age_band,
                             group_columns=group_columns, n_figures=n_figures,
                             glass_brain=glass_brain, quiet=quiet)


def _write_derivative(target: Target, dataset, out: Path, *, subjects, workers, skip_bad,
                      atlas_path, age_band, group_columns, n_figures, glass_brain,
                      quiet) -> dict[str, Any]:
  """`explain_dataset`'s work, inside the lock of `out`."""
  chosen = select_subjects(dataset, subjects)
  groups, how = subject_groups(chosen, age_band=age_band, columns=group_columns)
  atlas = atlas_lib.load_atlas(atlas_path) if atlas_path is not None else None
  ids = region_tables.label_ids(atlas) if atlas is not None else None
  fileio.write_json(out / "dataset_description.json", {
      "Name": "jax-brainage relevance maps", "BIDSVersion": "1.9.0",
      "DatasetType": "derivative",
      "GeneratedBy": [{"Name": "jax-brainage explain", "Description":
                       f"{target.method.name}: {target.method.summary}"}]})
  index: dict[str, Any] = {
      "method": target.method.name, "method_kind": target.method.kind,
      "method_summary": target.method.summary, "model": target.description,
      "levels": list(target.levels), "sequences": list(target.sequences),
      "target": target.target,
      "reference": None if target.references is None else target.references.design,
      "units": ("years of predicted age per voxel (positive: older)" if target.target == "age"
                else "years of predicted age above the age-matched reference brain per voxel "
                     "(positive: older than expected at this age)"),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "subjects": [], "skipped": [], "groups": [], "tables": {}, "figures": [], "captions": {}}
  accumulators = GroupMaps(groups)
  region_rows: list[dict] = []
  writer = SummaryWriter(out / "tensorboard")
  skipped: list[tuple[str, str]] = list(dataset.skipped)
  inverses: dict[int, Any] = {}  # id(subject) -> its CubeInverse (set by the preparing threads)

  def prepare(subject):
    cubes, inverses[id(subject)] = target.prepare(subject)
    return cubes

  n_done = 0
  # A bar over subjects (the demo explains for a minute on a CPU); --quiet silences it.
  bar = tqdm(total=len(chosen), desc="explain", unit="subject", disable=quiet, file=sys.stderr,
             dynamic_ncols=True)

  def explain_batch(batch: list[Any], cubes: dict[str, np.ndarray]) -> None:
    nonlocal n_done
    rows = np.arange(n_done, n_done + len(batch))
    ages = reference.ages_of(batch) if target.target == "gap" else None
    levels, predicted = target.explain(cubes, rows, ages)
    first_input = cubes[next(iter(target.of_sub))]
    for j, subject in enumerate(batch):
      inverse = inverses.pop(id(subject))
      row_id = bids.row_id(subject.subject_id, subject.session)  # group and table key
      entry = {"participant_id": subject.subject_id, "session": subject.session,
               "age": subject.age, "predicted_age": float(predicted[j]), "maps": {}}
      if target.references is not None:
        entry["reference_predicted_age"] = float(target.reference_predicted[j])
      if target.path_fractions is not None:  # --reference expected: E(a), paths it walked
        entry["reference_paths"] = int(np.sum(target.path_fractions[j] > 0))
        entry["path_fractions"] = [float(t) for t in target.path_fractions[j]]
      labels = region_tables.atlas_in_cube(atlas, inverse) if atlas is not None else None
      for level, (rel, seqs) in levels.items():
        r = rel[j]
        entry["maps"][level] = []
        for c, seq in enumerate(seqs):
          path = map_path(out, subject.subject_id, subject.session, level, seq)
          save(maps.to_subject_space(r[..., c], inverse, method=target.method.name), path)
          entry["maps"][level].append(str(path.relative_to(out)))
        if level == target.top:
          entry["relevance_sum"] = float(np.sum(r, dtype=np.float64))
          entry["relevance_positive"] = float(np.sum(np.maximum(r, 0), dtype=np.float64))
        if labels is not None:
          parts = [(seq, r[..., c]) for c, seq in enumerate(seqs)]
          if len(seqs) > 1:
            parts.append(("all", r.sum(axis=-1)))
          for seq, rc in parts:
            stats = region_tables.region_statistics(rc, labels, ids)
            region_rows.extend(region_tables.subject_rows(
                [row_id], {k: v[None] for k, v in stats.items()}, ids, atlas.names,
                model=level, sequence=seq))
      top, top_seqs = levels[target.top]
      anatomy = _anatomy(first_input[j])
      accumulators.add(row_id, top[j], anatomy, inverse)
      if len(index["subjects"]) < n_figures:
        entry["figures"] = _subject_figures(out, writer, subject, anatomy, top[j], top_seqs,
                                            target.top, inverse, target.method.name,
                                            index.setdefault("captions", {}))
        index["figures"] += entry["figures"]
      index["subjects"].append(entry)
    n_done += len(batch)
    bar.update(len(batch))

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as writers:
    writes: collections.deque = collections.deque()

    def save(img, path):
      # Compressing NIfTI maps is the slow part of writing: it overlaps the next batch. At most
      # a few batches of maps wait in memory.
      writes.append(writers.submit(fileio.save_nifti, img, path))
      while len(writes) > 4 * target.batch_size:
        writes.popleft().result()

    for batch, cubes in predict.prepared_batches(
        dataclasses.replace(dataset, subjects=tuple(chosen)), prepare, target.batch_size,
        workers=workers, skip_bad=skip_bad, skipped=skipped):
      explain_batch(batch, cubes)
    while writes:  # raises the first failed write
      writes.popleft().result()
  bar.close()
  index["skipped"] = [{"participant_id": s, "reason": why} for s, why in skipped]
  if not index["subjects"]:
    raise DataError(f"{dataset.root or 'data'}: no subject could be explained")
  _group_maps(out, writer, target, accumulators, index, glass_brain)
  index["group_definitions"] = how
  writer.close()

  if atlas is not None:
    region_tables.write_table(out / "regions" / "relevance_regions.tsv", region_rows,
                              region_tables.SUBJECT_COLUMNS)
    region_tables.write_table(out / "regions" / "group_regions.tsv",
                              region_tables.group_rows(region_rows, groups),
                              region_tables.GROUP_COLUMNS)
    _region_chart(out, target, region_rows, groups, index)
    index["tables"] = {"subjects": "regions/relevance_regions.tsv",
                       "groups": "regions/group_regions.tsv", "atlas": str(atlas_path),
                       "labels": {int(i): atlas.names.get(int(i), str(int(i))) for i in ids}}
  fileio.write_json(out / INDEX, index)
  return index


def _region_chart(out: Path, target: Target, region_rows: list[dict], groups,
                  index: dict[str, Any]) -> str | None:
  """figures/regions_ranked.png: the 20 regions with the most relevance in the top-level map
  (channels summed), mean over all explained subjects with SD whiskers; None without rows."""
  every = region_tables.group_rows(region_rows, {("all", "all"): groups[("all", "all")]}) \
      if ("all", "all") in groups else []
  sequence = "all" if len(target.sequences) > 1 else target.sequences[0]
  ranked = region_tables.ranked_regions(every, model=target.top, sequence=sequence)
  if not ranked:
    return None
  n = int(ranked[0]["n"])
  path = out / "figures" / "regions_ranked.png"
  seqs = " + ".join(target.sequences)
  plots.region_bars(
      path, [r["region"] for r in ranked], np.array([r["positive_mean"] for r in ranked]),
      np.array([r["positive_sd"] for r in ranked]), np.array([r["negative_mean"] for r in ranked]),
      np.array([r["negative_sd"] for r in ranked]),
      title=f"Relevance per atlas region\n{group_words('all', 'all', n)}, {seqs}")
  rel = str(path.relative_to(out))
  index["figures"].append(rel)
  index["captions"][rel] = (
      f"Atlas regions ranked by total relevance ({target.method.name}, {seqs} summed): mean "
      f"positive (red, evidence for an older estimate) and negative (blue, younger) relevance "
      f"per region over the {n} explained subjects, whiskers one SD; top {len(ranked)} regions. "
      "Every region and group: regions/group_regions.tsv.")
  return rel


def group_words(group: str, value: str, n: int) -> str:
  """A group of subjects in words with its n: "all subjects (n = 4)", "age 40 to 50 years
  (n = 2)", "diabetes = 1 (n = 3)"."""
  if group == "all":
    return f"all explained subjects (n = {n})"
  if group in ("age", "age_band"):
    words = value.replace("to", " to ") if "to" in value else value
    return f"age {words} years (n = {n})"
  return f"{group} = {value} (n = {n})"


def _group_maps(out: Path, writer, target: Target, accumulators: GroupMaps,
                index: dict[str, Any], glass_brain: bool) -> None:
  """Writes every group's mean map (NIfTI) and its figures; records them in `index` (with a
  caption in words per figure in index["captions"])."""
  captions = index.setdefault("captions", {})
  for (group, value), (rel, anat, affine, space) in accumulators.means().items():
    record = {"group": group, "value": value, "n": int(accumulators.count[(group, value)]),
              "space": space, "maps": []}
    who = group_words(group, value, record["n"])
    for c, seq in enumerate(target.sequences):
      name = (f"group-{group}_value-{value}_model-{entity(target.top)}_seq-{entity(seq)}"
              f"_space-{space}_relevance.nii.gz")
      image = maps.relevance_image(rel[..., c], affine, target.method.name)
      fileio.save_nifti(image, out / "group" / name)
      record["maps"].append(f"group/{name}")
      stem = name[: -len("_relevance.nii.gz")]
      png = out / "figures" / f"{stem}_montage.png"
      # Every group in the paper figure's style; all subjects in three views, the others (age
      # bands, risk groups) in one axial row, a third of the drawing time.
      figures.save_stat_map(png, image, nifti.make_image(anat.astype(np.float32), affine),
                            title=f"Mean relevance, {who}, {seq}, {target.method.name}",
                            views="xyz" if group == "all" else "z")
      captions[str(png.relative_to(out))] = (
          f"Mean relevance map of {who}, {seq} input ({target.method.name}) on the "
          f"{'template' if space == 'template' else 'input cube'}'s anatomy; slice positions "
          "in mm. Red-yellow: evidence for an older brain-age estimate; blue-cyan: younger.")
      rgb, _ = figures.montage_rgb(_canonical(anat, affine), _canonical(rel[..., c], affine))
      figures.write_tensorboard_image(writer, 0, f"groups/{group}={value}/{seq}", rgb)
      record.setdefault("figures", []).append(str(png.relative_to(out)))
      if glass_brain and group == "all":
        glass = out / "figures" / f"{stem}_glassbrain.png"
        figures.save_glass_brain(glass, image, title=f"{who}, {seq}")
        record["figures"].append(str(glass.relative_to(out)))
        captions[str(glass.relative_to(out))] = (
            f"Glass-brain projections of the mean relevance of {who}, {seq} input (MNI outline "
            "as a guide). Red-yellow: older; blue-cyan: younger.")
    index["figures"] += record.get("figures", [])
    index["groups"].append(record)


def _anatomy(cube: np.ndarray) -> np.ndarray:
  """The first channel of an input cube as float32 `[X, Y, Z]` (figure background)."""
  return np.asarray(cube[..., 0], np.float32)


def _canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """A volume on any grid reoriented to RAS+ (figure panels assume RAS+)."""
  return nifti.reorient_array(np.asarray(volume), nifti.canonical_orientation(affine))


def _subject_figures(out: Path, writer, subject, anatomy: np.ndarray, relevance: np.ndarray,
                     sequences: Sequence[str], model: str, inverse, method: str,
                     captions: dict[str, str]) -> list[str]:
  """The subject's relevance over its own first input image, in its own space (world mm)."""
  paths = []
  anatomy_image = prune.to_subject_space(anatomy.astype(np.float32), inverse, order=1)
  for c, seq in enumerate(sequences):
    png = out / "figures" / (f"{subject_prefix(subject.subject_id, subject.session)}_model-"
                             f"{entity(model)}_seq-{entity(seq)}_montage.png")
    age = "" if subject.age is None else f", age {float(subject.age):.1f} years"
    figures.save_stat_map(png, maps.to_subject_space(relevance[..., c], inverse, method=method),
                          anatomy_image, title=f"{subject.subject_id}{age}, {seq}, {method}")
    captions[str(png.relative_to(out))] = (
        f"Relevance map of {subject.subject_id}{age}, {seq} input ({method}), in the subject's "
        "own space over its first input image; slice positions in mm. Red-yellow: evidence "
        "for an older brain-age estimate; blue-cyan: younger.")
    rgb, _ = figures.montage_rgb(anatomy, relevance[..., c])
    figures.write_tensorboard_image(writer, 0, f"subjects/{subject.subject_id}/{seq}", rgb)
    paths.append(str(png.relative_to(out)))
  return paths
