"""`brainage explain`: relevance maps, group maps, region tables and figures of new subjects.

    brainage explain --workdir W --data DIR --out DIR [--composite NAME] [--subjects ID ...]
        [--batch-size N] [--checkpoint best|latest] [--atlas FILE] [--age-band YEARS]
        [--groups COL,...] [--levels ensemble,subs,members] [--members-per-call N]
        [--figures N] [--no-glass-brain]
        [--session S] [--workers N] [--skip-bad] [--seed S]

Subjects are preprocessed exactly as `brainage predict` does (the training cache's
`Preprocessing` record: grid, cube, intensity scaling, region mask) and explained in fixed-size
jitted batches (`maps.Explainer`). Written under --out (a BIDS derivative dataset; every file
atomically, so an interrupted run leaves only complete files):

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
      cache's region atlas; skipped without one).
  figures/*.png      slice montages over the anatomy (first --figures subjects, every group) and a
                     glass brain of the group-all map; tensorboard/ the same montages.
  explain.json       what was written: method, model, subjects (predicted age, relevance sum,
                     maps), groups, tables, figures.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from jax_brainage import fileio
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.explain import figures, maps
from jax_brainage.explain import regions as region_tables

INDEX = "explain.json"
LEVELS = ("ensemble", "subs", "members")
MAX_CATEGORIES = 6  # a participants column with at most this many values is grouped by value


# ---------------------------------------------------------------------------------------------
# Names.


def entity(value: Any) -> str:
  """A BIDS entity value: letters and digits only (e.g. "t1_cerebellum" -> "t1cerebellum")."""
  text = re.sub(r"[^A-Za-z0-9]", "", str(value))
  return text or "x"


def subject_prefix(subject_id: str, session: str | None) -> str:
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
# Groups.


def _value_label(v: Any) -> str:
  if isinstance(v, (int, float, np.floating, np.integer)):
    f = float(v)
    return str(int(f)) if f.is_integer() else f"{f:g}"
  return str(v)


def _number(v: Any) -> float | None:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def subject_groups(subjects: Sequence[Any], *, age_band: float = 10.0,
                   columns: Sequence[str] | None = None
                   ) -> tuple[dict[tuple[str, str], list[str]], dict[str, Any]]:
  """Groups of subjects for group-average maps and tables.

  Args:
    subjects: `bids.Subject`s (subject_id, age, sex, covariates).
    age_band: width of the age bands (years; bands [k * w, (k + 1) * w)); 0 = none.
    columns: participants.tsv columns to group by (default: sex and every covariate).
  Returns:
    ({(group, value): participant ids}, {group: how it was formed}), "all" first; values are
    BIDS entity values (letters and digits).
  """
  keys = lambda s: s.subject_id  # noqa: E731
  groups: dict[tuple[str, str], list[str]] = {("all", "all"): [keys(s) for s in subjects]}
  how: dict[str, Any] = {"all": "every subject"}
  if age_band and age_band > 0:
    bands: dict[tuple[float, str], list[str]] = {}
    for s in subjects:
      if s.age is None or not math.isfinite(float(s.age)):
        continue
      lo = math.floor(float(s.age) / age_band) * age_band
      label = f"{_value_label(lo)}to{_value_label(lo + age_band)}"
      bands.setdefault((lo, entity(label)), []).append(keys(s))
    for (_, label), ids in sorted(bands.items()):
      groups[("age", label)] = ids
    how["age"] = f"age bands of {age_band:g} years [lower, upper)"
  table: dict[str, dict[str, Any]] = {}
  for s in subjects:
    row = dict(s.covariates or {})
    if s.sex is not None:
      row["sex"] = s.sex
    table[keys(s)] = row
  available = sorted({c for row in table.values() for c in row})
  if columns is None:
    columns = (["sex"] if "sex" in available else []) + [c for c in available if c != "sex"]
  else:
    unknown = [c for c in columns if c not in available]
    if unknown:
      raise ConfigError(f"--groups: no participants column {unknown[0]!r} (have "
                        f"{', '.join(available) or 'none'})")
  for column in columns:
    values = {sid: row.get(column) for sid, row in table.items()
              if row.get(column) not in (None, "", "n/a")}
    distinct = sorted({_value_label(v) for v in values.values()})
    numbers = {sid: _number(v) for sid, v in values.items()}
    if len(distinct) <= MAX_CATEGORIES or any(n is None for n in numbers.values()):
      for value in distinct:
        ids = [sid for sid, v in values.items() if _value_label(v) == value]
        groups[(entity(column), entity(value))] = ids
      how[entity(column)] = "by value"
    else:  # continuous: split at the median
      median = float(np.median(list(numbers.values())))
      groups[(entity(column), "low")] = [sid for sid, n in numbers.items() if n <= median]
      groups[(entity(column), "high")] = [sid for sid, n in numbers.items() if n > median]
      how[entity(column)] = {"split": "median", "low": f"<= {median:g}", "high": f"> {median:g}"}
  return {k: v for k, v in groups.items() if v}, how


# ---------------------------------------------------------------------------------------------
# What is explained: a single model or an ensemble, with the inputs each part reads.


class Target:
  """The model(s) of a workdir, how new data becomes their inputs, and the compiled explainers.

  Inputs are prepared as `brainage predict` prepares them: `views` maps a key to a cache (view)
  whose `preprocess` makes one cube per subject (one per distinct training cache and sequence
  view), `of_sub` maps each model (a sub-ensemble's name, or "model") to (view key, channel
  indices or None). `levels` are the map families written: ("model",) for a single model; a
  subset of LEVELS for an ensemble.
  """

  def __init__(self, workdir: Path, checkpoint: str, method: maps.Method, *, batch_size: int,
               seed: int, levels: Sequence[str], members_per_call: int = 0):
    from jax_brainage import predict

    self.method = method
    self.members_per_call = members_per_call
    self.batch_size = batch_size
    self.seed = seed
    self.ensemble = None
    self.trained = None
    ensemble = _load_ensemble(workdir)
    if ensemble is not None:
      self.ensemble = ensemble
      self.levels = tuple(levels)
      self.top = "ensemble"
      inputs = predict.ensemble_inputs(ensemble)
      self.views, self.of_sub = dict(inputs.views), dict(inputs.of_sub)
      self.sequences = maps.ensemble_sequences(ensemble)
      self._explainers: dict[str, list] = {}
      self.description = {"kind": "ensemble", "sub_ensembles": {
          s.name: {"sequences": list(s.sequences), "regions": list(s.regions),
                   "members": int(s.members)} for s in ensemble.subs}}
    else:
      trained = predict.load_trained(workdir, checkpoint)
      self.trained = trained
      self.top = str(trained.manifest["model"])
      self.levels = ("model",)
      cache = predict.open_training_cache(trained)
      if tuple(cache.shape) != trained.image_shape:
        raise DataError(f"{cache.path}: cubes are {tuple(cache.shape)} voxels, the model of "
                        f"{workdir} expects {trained.image_shape} (was the cache prepared again "
                        "with another shape?)")
      prep, channels = predict.preprocessor_for(trained, cache)
      self.views, self.of_sub = {"model": prep}, {"model": ("model", channels)}
      self.sequences = trained.sequences
      self.explainer = maps.Explainer(trained.model, trained.variables, method,
                                      batch_size=batch_size, seed=seed)
      self.description = {"kind": "single", "model": self.top, "checkpoint": checkpoint,
                          "step": trained.step, "sequences": list(trained.sequences)}

  @property
  def caches(self) -> list[Any]:
    """The distinct training caches behind the views."""
    out: dict[str, Any] = {}
    for view in self.views.values():
      out.setdefault(str(view.path), view)
    return list(out.values())

  def prepare(self, subject) -> tuple[dict[str, np.ndarray], Any]:
    """One subject's inputs {model: cube [X, Y, Z, C]} and the CubeInverse they share."""
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

  @property
  def required_sequences(self) -> tuple[str, ...]:
    """The sequences new data must provide (union over the views, in order)."""
    out: list[str] = []
    for view in self.views.values():
      out += [q for q in view.sequences if q not in out]
    return tuple(out)

  def explain(self, cubes: Mapping[str, np.ndarray], rows: np.ndarray
              ) -> tuple[dict[str, tuple[np.ndarray, tuple[str, ...]]], np.ndarray]:
    """Maps of one batch: ({model label: (relevance [n, X, Y, Z, C], channel names)}, the top
    level's predicted age [n] (years)); the top level comes first."""
    if self.ensemble is None:
      r, p = self.explainer(cubes["model"], rows)
      return {self.top: (r, self.sequences)}, p
    em = maps.ensemble_maps(self.ensemble, dict(cubes), self.method,
                            batch_size=self.batch_size, seed=self.seed, rows=rows,
                            members_per_call=self.members_per_call,
                            explainers=self._explainers)
    out = {"ensemble": (em.ensemble, em.sequences)}
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


def _load_ensemble(workdir: Path):
  """The ensemble of an ensemble workdir (jax_brainage.ensemble.store), else None."""
  try:
    from jax_brainage.ensemble import store
  except ImportError:
    return None
  if not store.is_ensemble_workdir(workdir):
    return None
  return store.load_ensemble(workdir)


# ---------------------------------------------------------------------------------------------
# Accumulating group maps in one pass.


class GroupMaps:
  """Running sums of the top level's maps per group: on the cube grid always, and on the common
  template grid while every subject shares one image grid."""

  def __init__(self, groups: Mapping[tuple[str, str], Sequence[str]]):
    self.members = {k: set(v) for k, v in groups.items()}
    self.count = collections.Counter()
    self.cube: dict[tuple[str, str], np.ndarray] = {}
    self.anatomy: dict[tuple[str, str], np.ndarray] = {}
    self.template: dict[tuple[str, str], np.ndarray] = {}
    self.template_anatomy: dict[tuple[str, str], np.ndarray] = {}
    self.grid: tuple | None = None
    self.common = True
    self.first_inverse = None

  def add(self, subject_id: str, relevance: np.ndarray, anatomy: np.ndarray, inverse) -> None:
    """relevance `[X, Y, Z, C]`, anatomy `[X, Y, Z]` (the input's first channel)."""
    from jax_brainage.data import prune

    grid = (tuple(inverse.original_shape), inverse.original_affine)
    if self.first_inverse is None:
      self.first_inverse, self.grid = inverse, grid
    elif grid != self.grid or inverse.resampled:
      self.common = False
    self.common = self.common and not inverse.resampled
    on_grid = on_grid_anat = None
    if self.common:
      on_grid = np.asarray(maps.to_subject_space(relevance, inverse).dataobj, np.float32)
      on_grid_anat = np.asarray(prune.to_subject_space(anatomy.astype(np.float32), inverse,
                                                       order=1).dataobj, np.float32)
    for key, ids in self.members.items():
      if subject_id not in ids:
        continue
      self.count[key] += 1
      _accumulate(self.cube, key, relevance)
      _accumulate(self.anatomy, key, anatomy)
      if self.common:
        _accumulate(self.template, key, on_grid)
        _accumulate(self.template_anatomy, key, on_grid_anat)
    if not self.common:
      self.template.clear()
      self.template_anatomy.clear()

  def means(self):
    """{group: (mean relevance [.., C], mean anatomy, affine, space)} of the non-empty groups."""
    out = {}
    for key, n in self.count.items():
      if self.common:
        out[key] = (self.template[key] / n, self.template_anatomy[key] / n,
                    np.asarray(self.grid[1], np.float64), "template")
      else:
        out[key] = (self.cube[key] / n, self.anatomy[key] / n,
                    self.first_inverse.cube_affine, "cube")
    return out


def _accumulate(store: dict, key, value: np.ndarray) -> None:
  if key in store:
    store[key] += value
  else:
    store[key] = np.array(value, np.float64)


# ---------------------------------------------------------------------------------------------
# The whole run.


def _ordered_map(pool, fn, items: Iterable[Any], ahead: int) -> Iterator[Any]:
  """pool.map in order with at most `ahead` items in flight (bounded memory)."""
  pending: list[concurrent.futures.Future] = []
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= ahead:
      yield pending.pop(0).result()
  for f in pending:
    yield f.result()


def find_atlas(data: Sequence[str | os.PathLike], target: Target) -> Path | None:
  """Default atlas: the simulated cohort's (DATA/derivatives/simulation/atlas.nii.gz), else the
  training cache's region atlas; None if neither exists."""
  from jax_brainage.data import cache as cache_lib

  if len(data) == 1:
    candidate = Path(data[0]) / "derivatives" / "simulation" / "atlas.nii.gz"
    if candidate.is_file():
      return candidate
  for cache in target.caches:
    candidate = Path(cache.path) / cache_lib.ATLAS
    if candidate.is_file():
      return candidate
  return None


def select_subjects(dataset, wanted: Sequence[str] | None):
  """The dataset's subjects, or those named (with or without "sub-"), in the order given."""
  if not wanted:
    return list(dataset.subjects)
  by_id: dict[str, list[Any]] = {}
  for s in dataset.subjects:
    by_id.setdefault(s.subject_id, []).append(s)
  chosen = []
  for w in wanted:
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
  """Explains every (chosen) subject of `dataset` and writes maps, tables, figures and index.

  Returns:
    the index written to out/explain.json.
  """
  from jax_brainage.data import regions as atlas_lib
  from jax_brainage.train.summary import SummaryWriter

  out = Path(out)
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
      "units": "years of predicted age per voxel (positive: older)",
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "subjects": [], "skipped": [], "groups": [], "tables": {}, "figures": []}
  accumulators = GroupMaps(groups)
  region_rows: list[dict] = []
  writer = SummaryWriter(out / "tensorboard")
  skipped: list[tuple[str, str]] = list(dataset.skipped)

  def prepare(subject):
    try:
      cubes, inverse = target.prepare(subject)
      return subject, cubes, inverse, None
    except DataError as e:
      if not skip_bad:
        raise
      return subject, None, None, str(e)

  done: list[tuple[Any, dict, Any]] = []
  n_done = 0

  def flush():
    nonlocal n_done
    if not done:
      return
    cubes = {name: np.stack([d[1][name] for d in done]) for name in done[0][1]}
    rows = np.arange(n_done, n_done + len(done))
    levels, predicted = target.explain(cubes, rows)
    first_input = cubes[next(iter(target.of_sub))]
    for j, (subject, _, inverse) in enumerate(done):
      entry = {"participant_id": subject.subject_id, "session": subject.session,
               "age": subject.age, "predicted_age": float(predicted[j]), "maps": {}}
      labels = region_tables.atlas_in_cube(atlas, inverse) if atlas is not None else None
      for level, (rel, seqs) in levels.items():
        r = rel[j]
        entry["maps"][level] = []
        for c, seq in enumerate(seqs):
          path = map_path(out, subject.subject_id, subject.session, level, seq)
          save(maps.to_subject_space(r[..., c], inverse), path)
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
                [subject.subject_id], {k: v[None] for k, v in stats.items()}, ids, atlas.names,
                model=level, sequence=seq))
      top, top_seqs = levels[target.top]
      anatomy = _anatomy(first_input[j])
      accumulators.add(subject.subject_id, top[j], anatomy, inverse)
      if len(index["subjects"]) < n_figures:
        entry["figures"] = _subject_figures(out, writer, subject, anatomy, top[j], top_seqs,
                                            target.top)
        index["figures"] += entry["figures"]
      index["subjects"].append(entry)
    n_done += len(done)
    if not quiet:
      print(f"explained {n_done}/{len(chosen)} subjects", file=sys.stderr)
    done.clear()

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
      concurrent.futures.ThreadPoolExecutor(max(1, workers)) as writers:
    writes: collections.deque = collections.deque()

    def save(img, path):
      # Compressing NIfTI maps is the slow part of writing: it overlaps the next batch. At most
      # a few batches of maps wait in memory.
      writes.append(writers.submit(fileio.save_nifti, img, path))
      while len(writes) > 4 * target.batch_size:
        writes.popleft().result()

    for subject, cubes, inverse, error in _ordered_map(pool, prepare, chosen,
                                                       ahead=2 * target.batch_size):
      if error is not None:
        skipped.append((subject.subject_id, error))
        continue
      done.append((subject, cubes, inverse))
      if len(done) == target.batch_size:
        flush()
    flush()
    while writes:  # raises the first failed write
      writes.popleft().result()
  index["skipped"] = [{"participant_id": s, "reason": why} for s, why in skipped]
  if not index["subjects"]:
    raise DataError(f"{dataset.root or 'data'}: no subject could be explained")

  # Group maps, their figures, and the group region table.
  from jax_brainage.data import nifti

  means = accumulators.means()
  for (group, value), (rel, anat, affine, space) in means.items():
    record = {"group": group, "value": value, "n": int(accumulators.count[(group, value)]),
              "space": space, "maps": []}
    for c, seq in enumerate(target.sequences):
      name = (f"group-{group}_value-{value}_model-{entity(target.top)}_seq-{entity(seq)}"
              f"_space-{space}_relevance.nii.gz")
      fileio.save_nifti(nifti.make_image(rel[..., c].astype(np.float32), affine),
                        out / "group" / name)
      record["maps"].append(f"group/{name}")
      stem = name[: -len("_relevance.nii.gz")]
      png = out / "figures" / f"{stem}_montage.png"
      figures.save_montage(png, _canonical(anat, affine), _canonical(rel[..., c], affine),
                           title=f"{group} = {value} (n = {record['n']}), {seq}, "
                                 f"{target.method.name}")
      rgb, _ = figures.montage_rgb(_canonical(anat, affine), _canonical(rel[..., c], affine))
      figures.write_tensorboard_image(writer, 0, f"groups/{group}={value}/{seq}", rgb)
      record.setdefault("figures", []).append(str(png.relative_to(out)))
      if glass_brain and group == "all":
        glass = out / "figures" / f"{stem}_glassbrain.png"
        figures.save_glass_brain(glass, nifti.make_image(rel[..., c].astype(np.float32), affine),
                                 title=f"all subjects, {seq}")
        record["figures"].append(str(glass.relative_to(out)))
    index["figures"] += record.get("figures", [])
    index["groups"].append(record)
  index["group_definitions"] = how
  writer.close()

  if atlas is not None:
    region_tables.write_table(out / "regions" / "relevance_regions.tsv", region_rows,
                              region_tables.SUBJECT_COLUMNS)
    region_tables.write_table(out / "regions" / "group_regions.tsv",
                              region_tables.group_rows(region_rows, groups),
                              region_tables.GROUP_COLUMNS)
    index["tables"] = {"subjects": "regions/relevance_regions.tsv",
                       "groups": "regions/group_regions.tsv", "atlas": str(atlas_path),
                       "labels": {int(i): atlas.names.get(int(i), str(int(i))) for i in ids}}
  fileio.write_json(out / INDEX, index)
  return index


def _anatomy(cube: np.ndarray) -> np.ndarray:
  """The first channel of an input cube as float32 `[X, Y, Z]` (figure background)."""
  return np.asarray(cube[..., 0], np.float32)


def _canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """A volume on any grid reoriented to RAS+ (figure panels assume RAS+)."""
  from jax_brainage.data import nifti

  return nifti.reorient_array(np.asarray(volume), nifti.canonical_orientation(affine))


def _subject_figures(out: Path, writer, subject, anatomy: np.ndarray, relevance: np.ndarray,
                     sequences: Sequence[str], model: str) -> list[str]:
  paths = []
  for c, seq in enumerate(sequences):
    png = out / "figures" / (f"{subject_prefix(subject.subject_id, subject.session)}_model-"
                             f"{entity(model)}_seq-{entity(seq)}_montage.png")
    age = "" if subject.age is None else f", age {float(subject.age):.1f}"
    figures.save_montage(png, anatomy, relevance[..., c],
                         title=f"{subject.subject_id}{age}, {seq}")
    rgb, _ = figures.montage_rgb(anatomy, relevance[..., c])
    figures.write_tensorboard_image(writer, 0, f"subjects/{subject.subject_id}/{seq}", rgb)
    paths.append(str(png.relative_to(out)))
  return paths


# ---------------------------------------------------------------------------------------------
# Command line.


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage explain`."""
  p = subparsers.add_parser(
      "explain", help="relevance maps (subject space), group maps, region tables and figures",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, type=Path,
                 help="training workdir (brainage train) or ensemble workdir")
  p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                 help="BIDS dataset directory, or NIfTI files (one subject each)")
  p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
  p.add_argument("--composite", default=maps.DEFAULT_METHOD, metavar="NAME",
                 help=f"LRP composite or baseline ({', '.join(maps.METHODS)}; default "
                      f"{maps.DEFAULT_METHOD})")
  p.add_argument("--subjects", nargs="+", default=None, metavar="ID",
                 help="explain only these subjects (default: all)")
  p.add_argument("--batch-size", type=int, default=8, help="volumes per jitted call (8)")
  p.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                 help="single-model workdirs: best by validation loss (default) or latest")
  p.add_argument("--atlas", type=Path, default=None,
                 help="label image for region tables (default: the simulated cohort's atlas or "
                      "the training cache's region atlas)")
  p.add_argument("--age-band", type=float, default=10.0,
                 help="width of the age bands of the group maps, years (10; 0 = none)")
  p.add_argument("--groups", default=None, metavar="COL,...",
                 help="participants.tsv columns to group by (default: sex and all covariates)")
  p.add_argument("--levels", default=",".join(LEVELS),
                 help="ensembles: which maps to write per subject (ensemble,subs,members)")
  p.add_argument("--members-per-call", type=int, default=0, metavar="N",
                 help="ensembles: members explained per jitted call (0 = all of a sub-ensemble; "
                      "fewer bound device memory at study-sized volumes)")
  p.add_argument("--figures", type=int, default=4, metavar="N",
                 help="slice montages of the first N subjects (4); groups always get one")
  p.add_argument("--no-glass-brain", action="store_true", help="skip the glass-brain figure")
  p.add_argument("--seed", type=int, default=0, help="seed of SmoothGrad's noise (0)")
  p.add_argument("--session", default=None, help="use images of ses-SESSION only")
  p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                 help="threads preprocessing subjects")
  p.add_argument("--skip-bad", action="store_true",
                 help="report and skip subjects with bad data instead of stopping")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  from jax_brainage import predict

  if args.batch_size < 1:
    raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
  if args.figures < 0:
    raise ConfigError(f"--figures {args.figures} must be at least 0")
  if args.age_band < 0 or not math.isfinite(args.age_band):
    raise ConfigError(f"--age-band {args.age_band} must be a non-negative number of years")
  levels = tuple(s.strip() for s in args.levels.split(",") if s.strip())
  bad = [s for s in levels if s not in LEVELS]
  if bad or "ensemble" not in levels:
    raise ConfigError(f"--levels {args.levels}: choose from {', '.join(LEVELS)} (ensemble "
                      "always included)")
  method = maps.get_method(args.composite)
  if args.members_per_call < 0:
    raise ConfigError(f"--members-per-call {args.members_per_call} must be 0 (all) or more")
  target = Target(args.workdir, args.checkpoint, method, batch_size=args.batch_size,
                  seed=args.seed, levels=levels, members_per_call=args.members_per_call)
  dataset = predict.read_dataset(args.data, target.required_sequences, session=args.session,
                                 skip_bad=args.skip_bad)
  atlas = args.atlas if args.atlas is not None else find_atlas(args.data, target)
  if args.atlas is not None and not args.atlas.is_file():
    raise DataError(f"--atlas {args.atlas}: file not found")
  columns = None if args.groups is None else [c.strip() for c in args.groups.split(",")
                                              if c.strip()]
  index = explain_dataset(target, dataset, args.out, subjects=args.subjects,
                          workers=args.workers, skip_bad=args.skip_bad, atlas_path=atlas,
                          age_band=args.age_band, group_columns=columns,
                          n_figures=args.figures, glass_brain=not args.no_glass_brain,
                          quiet=args.quiet)
  for s in index["skipped"]:
    print(f"skipped {s['participant_id']}: {s['reason']}", file=sys.stderr)
  print(f"explained {len(index['subjects'])} subjects with {args.workdir} ({method.name}) -> "
        f"{args.out} ({len(index['groups'])} group maps"
        f"{', region tables' if index['tables'] else ''}; index {args.out / INDEX})")
  return 0
