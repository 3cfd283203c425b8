"""Training an experiment: one model, or an ensemble of sub-ensembles, their head, the correction.

`train(config, workdir)` is what `brainage train` runs: `train_ensemble` when
`config.ensemble.members > 1` or `config.ensemble.sub_ensembles` is set (`is_ensemble`), else the
trainer's single model (`train.trainer.train_and_evaluate`). It holds the workdir's lock
(`jax_brainage.lock`: a second writer is refused in one line; process 0 holds it for a multi-host
run) and runs `check_before_training` (split sizes, batch size, distinct validation ages for the
bias correction) before anything is compiled. `train_ensemble(config, workdir)`:

1. parses the sub-ensemble specs ("NAME=SEQ[+SEQ..][@REGION[+REGION..]]"; none: one "all" over
   `config.data.sequences`, whole brain);
2. derives each sub-ensemble's data from the experiment's: its sequences picked from the cache,
   and for a regional one a cache prepared from the same dataset with the same preprocessing
   but `Preprocessing(regions=...)` masked by the dataset's atlas (the simulated cohort's
   derivatives/simulation/atlas.nii.gz, or atlas_regions.nii.gz for cortical / subcortical /
   cerebellum); every sub-ensemble uses the same subjects and the same train/val/test split;
3. trains each sub-ensemble with the trainer (`config.ensemble.members` members stacked in one
   vmapped step) in W/sub/<name>, one after another; an interrupted experiment resumes the
   unfinished sub-ensemble (finished ones are not trained again);
4. predicts the validation split with every member, fits the multi-level head
   (`config.ensemble.head`, K = `head_folds` cross-validation folds at level 2) and the bias
   correction (`config.ensemble.correction`) on those predictions, and saves the store
   W/ensemble (one orbax checkpoint + manifest, `jax_brainage.ensemble.store`).

Workdir:
    W/config.json     the experiment;  W/split.json  train/val/test rows (shared by every sub)
    W/sub/<name>/     one trainer workdir per sub-ensemble (members stacked)
    W/ensemble/       the ensemble store
    W/metrics.json    per sub-ensemble training results and the ensemble's validation metrics
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jax_brainage import fileio, lock, sharding
from jax_brainage.data import bids
from jax_brainage.data import cache as cache_lib
from jax_brainage.data import pipeline as pipeline_lib
from jax_brainage.data import prepare as prepare_lib
from jax_brainage.data import regions as regions_lib
from jax_brainage.data import splits as splits_lib
from jax_brainage.ensemble import correction as correction_lib
from jax_brainage.ensemble import model as model_lib
from jax_brainage.ensemble import store as store_lib
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.train import artifact
from jax_brainage.train import config as config_lib
from jax_brainage.train import config_checks
from jax_brainage.train import data as data_lib
from jax_brainage.train import trainer

SUB_DIR = "sub"


def sub_workdir(workdir: str | os.PathLike, name: str) -> Path:
  """W/sub/<name>: the trainer workdir of one sub-ensemble."""
  return Path(workdir) / SUB_DIR / name


def sub_config(config: ml_collections.ConfigDict, spec: config_lib.SubEnsembleSpec,
               cache: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
  """The trainer config of one sub-ensemble: the experiment's, with the sub-ensemble's
  sequences, its (regional) cache, and no sub-ensemble specs of its own."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.sequences = tuple(spec.sequences)
  c.ensemble.sub_ensembles = ()
  if cache is not None:
    # A regional cache is prepared by the experiment: the sub-ensemble only reads it.
    c.data.cache = str(cache)
    c.data.simulate.n = 0
    c.data.simulate.out = ""
  c.lock()
  config_checks.validate(c)
  return c


def is_ensemble(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is an ensemble experiment: stacked members (`config.ensemble.members > 1`)
  or sub-ensembles (`config.ensemble.sub_ensembles`)."""
  return config.ensemble.members > 1 or bool(config.ensemble.sub_ensembles)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, quiet: bool = False,
          max_steps: int | None = None,
          data: data_lib.TrainingData | None = None) -> dict[str, Any]:
  """Trains (or resumes) the experiment `config` in `workdir`: what `brainage train` runs.

  An ensemble experiment (`is_ensemble`: sub-ensembles of stacked members, head, correction,
  store) with `train_ensemble`, else one model with `trainer.train_and_evaluate`; either way
  inside the workdir's lock (`workdir_lock`) and after `check_before_training`.

  Args:
    config: a checked config (`config_loading.load_config`, overrides applied).
    workdir: the experiment directory W.
    quiet: no progress bars.
    max_steps: stop (resumably) after this global step.
    data: the experiment's data (default: opened from `config.data`).
  Returns:
    `train_ensemble`'s summary (stopped, subs and, when done, ensemble) for an ensemble, else
    `trainer.train_and_evaluate`'s result (stopped, step, epoch, best_val_mae (years),
    best_step, ...).
  Raises:
    ConfigError: another process writes `workdir` (one line: its pid, host and command); a
      split or batch size, or the validation ages, cannot work (see `check_before_training`).
  """
  config_checks.validate(config)
  with workdir_lock(workdir, "brainage train"):
    if is_ensemble(config):
      return train_ensemble(config, workdir, quiet=quiet, max_steps=max_steps, data=data)
    # Claimed before the data is opened (a simulated cohort takes minutes): a workdir of another
    # experiment is refused first. The trainer claims it again (the same record).
    artifact.claim_workdir(config, workdir)
    data = data_lib.open_training_data(config) if data is None else data
    check_before_training(config, data)
    return trainer.train_and_evaluate(config, workdir, data=data, quiet=quiet,
                                      max_steps=max_steps)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, command: str) -> Iterator[None]:
  """`lock.hold(workdir, command)` on process 0; on a multi-host run the others learn whether
  it was refused (and raise the same one-line ConfigError) instead of waiting for it at the
  next barrier."""
  with contextlib.ExitStack() as stack:
    refused: ConfigError | None = None
    if sharding.is_main_process():
      try:
        stack.enter_context(lock.hold(workdir, command))
      except ConfigError as e:
        refused = e
    if jax.process_count() > 1:
      flag = multihost_utils.broadcast_one_to_all(np.int32(refused is not None))
      if int(flag) and refused is None:
        refused = ConfigError(f"{workdir} is in use by another writer (process 0 was refused "
                              "its lock; see its error)")
    if refused is not None:
      raise refused
    yield


def check_before_training(config: ml_collections.ConfigDict, data: data_lib.TrainingData) -> None:
  """The checks that would otherwise fail after training, run before anything is compiled.

  - `config.init_from`, when set, is a directory (the workdir whose parameters start training);
  - the training split holds at least one global batch (`config.batch_size`) and the
    validation split at least one subject (early stopping and the best checkpoint need it);
  - an ensemble's validation split can fit what is fit on it after training: a level-2 head
    (`ensemble.head` linear or nonnegative over several sub-ensembles) needs >= 2 subjects for
    its cross-validation (`ensemble.head_folds` folds, at most one per subject), and the bias
    correction `ensemble.correction` needs more subjects and more distinct ages (years) than
    its degree (linear: 2, poly3: 4).

  Raises:
    ConfigError: one line naming the config key, the split and the numbers.
  """
  if config.init_from and not os.path.isdir(config.init_from):
    raise ConfigError(f"config.init_from={config.init_from!r}: no such workdir")
  split = data.split
  n_train, n_val = len(split.train), len(split.val)
  if n_train == 0:
    raise ConfigError(f"{data.name}: the training split is empty ({len(data.source)} subjects, "
                      f"config.data.split_seed={config.data.split_seed}); more subjects needed")
  if int(config.batch_size) > n_train:
    raise ConfigError(f"config.batch_size={config.batch_size} exceeds the {n_train} training "
                      f"subjects of {data.name}")
  if n_val == 0:
    raise ConfigError(f"{data.name}: the validation split is empty ({len(data.source)} "
                      "subjects); validation (early stopping, best checkpoint) needs at least 1")
  if not is_ensemble(config):
    return
  specs = config_lib.parse_sub_ensembles(config)
  if len(specs) > 1 and config.ensemble.head != "mean" and n_val < 2:
    raise ConfigError(f"config.ensemble.head={config.ensemble.head!r}: its level-2 "
                      f"cross-validation (head_folds={config.ensemble.head_folds}) needs at "
                      f"least 2 validation subjects, {data.name} has {n_val}")
  degree = correction_lib.CORRECTIONS.get(config.ensemble.correction, -1)
  if degree > 0:
    ages = np.asarray(data.source.ages, np.float64)[np.asarray(split.val)]
    distinct = len(np.unique(ages[np.isfinite(ages)]))
    if n_val <= degree or distinct <= degree:
      raise ConfigError(
          f"config.ensemble.correction={config.ensemble.correction!r}: a degree-{degree} fit "
          f"needs at least {degree + 1} distinct validation ages, the {n_val} validation "
          f"subjects of {data.name} have {distinct}; use more subjects, another "
          "config.data.split_seed, or a lower-degree correction")


def train_ensemble(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                   quiet: bool = False, max_steps: int | None = None,
                   data: data_lib.TrainingData | None = None) -> dict[str, Any]:
  """Trains (or resumes) every sub-ensemble, then fits and saves the ensemble.

  Args:
    config: a checked experiment config (`config.ensemble.*`).
    workdir: the experiment directory W (layout in the module docstring).
    quiet: no progress bars.
    max_steps: stop each sub-ensemble's training (resumably) after this global step; the
      experiment then stops at the first sub-ensemble that has not finished.
    data: the experiment's data over `config.data.sequences` (default: opened from
      `config.data`); regional sub-ensembles need `config.data.cache` (the dataset and its
      atlas are found through it).
  Returns:
    dict with stopped ("done", or "max_steps" when a sub-ensemble is unfinished), subs
    {name: trainer result without history}, and when done `ensemble` (validation metrics of
    the fitted ensemble: MAE, corrected MAE, Spearman gap-age, per sub and member MAEs).
  Raises:
    ConfigError: a sub-ensemble names a sequence not in `config.data.sequences`, a region not
      in the atlas, or the workdir holds another experiment; `check_before_training` fails
      (checked before any sub-ensemble trains).
    DataError: no atlas for a regional sub-ensemble; a regional cache whose subjects differ.
  """
  workdir = Path(workdir)
  config_checks.validate(config)
  specs = config_lib.parse_sub_ensembles(config)
  for spec in specs:
    missing = [s for s in spec.sequences if s not in tuple(config.data.sequences)]
    if missing:
      raise ConfigError(f"config.ensemble.sub_ensembles: {spec.spec()!r} reads {missing[0]!r}, "
                        f"which is not in config.data.sequences={tuple(config.data.sequences)}")
  artifact.claim_workdir(config, workdir)
  base = data_lib.open_training_data(config) if data is None else data
  base.check_against(config.data.sequences, config.data.image_shape)
  check_before_training(config, base)
  if sharding.is_main_process():
    splits_lib.save_split(workdir / "split.json", base.split,
                          getattr(base.source, "subject_ids", None),
                          seed=int(config.data.split_seed), source=base.name)

  results: dict[str, Any] = {}
  sub_data: dict[str, data_lib.TrainingData] = {}
  stopped = "done"
  for spec in specs:
    if spec.regions:
      cache_dir = regional_cache(config, spec.regions, base)
      sub_data[spec.name] = _cache_data(cache_dir, spec, base)
      cfg = sub_config(config, spec, cache_dir)
    else:
      sub_data[spec.name] = data_lib.TrainingData(
          data_lib.select_sequences(base.source, base.sequences, spec.sequences, base.name),
          base.split, tuple(spec.sequences), base.name)
      cfg = sub_config(config, spec)
    if not quiet and sharding.is_main_process():
      print(f"sub-ensemble {spec.spec()}: {cfg.ensemble.members} member(s) in "
            f"{sub_workdir(workdir, spec.name)}", flush=True)
    result = trainer.train_and_evaluate(cfg, sub_workdir(workdir, spec.name),
                                        data=sub_data[spec.name], quiet=quiet,
                                        max_steps=max_steps)
    results[spec.name] = {k: v for k, v in result.items() if k != "history"}
    if result["stopped"] == "max_steps":
      stopped = "max_steps"
      break

  summary: dict[str, Any] = {"stopped": stopped, "subs": results,
                             "sub_ensembles": [s.spec() for s in specs]}
  if stopped == "done":
    subs = [artifact.load_sub_ensemble(s.name, sub_workdir(workdir, s.name), regions=s.regions)
            for s in specs]
    val = np.asarray(base.split.val)
    # Every sub-ensemble's own input of the validation subjects (uint8, as in training).
    inputs = {s.name: sub_data[s.name].source.read(val) for s in specs}
    ages = np.asarray(base.source.ages, np.float64)[val]
    ensemble = model_lib.fit_ensemble(
        subs, inputs, ages, head=config.ensemble.head, folds=int(config.ensemble.head_folds),
        correction=config.ensemble.correction, seed=int(config.seed),
        batch_size=int(config.eval_batch_size or config.batch_size), workdir=workdir,
        info={"sub_ensembles": [s.spec() for s in specs], "split_seed":
              int(config.data.split_seed), "n_validation": int(len(val))})
    # Every process calls it: orbax writes collectively, process 0 renames into place.
    store_lib.save_ensemble(workdir, ensemble)
    summary["ensemble"] = dict(ensemble.info.get("validation") or {},
                               n_members=ensemble.n_members,
                               member_weights={k: [float(w) for w in v] for k, v in
                                               ensemble.member_weights().items()})
  if sharding.is_main_process():
    fileio.write_json(workdir / "metrics.json", fileio.jsonable(summary))
  return summary


# ---------------------------------------------------------------------------------------------
# Regional caches.
# ---------------------------------------------------------------------------------------------


def find_atlas(dataset_root: str | os.PathLike, regions: tuple[str, ...]):
  """(atlas, labels) for region names/labels: the dataset's derivatives/simulation/atlas.nii.gz
  (its structures, e.g. cerebellum, brainstem), else atlas_regions.nii.gz (cortical,
  subcortical, cerebellum).

  Raises:
    DataError: the dataset has no atlas.
    ConfigError: a region is in neither atlas (names the region and the known ones).
  """
  folder = Path(dataset_root) / "derivatives" / "simulation"
  candidates = [folder / "atlas.nii.gz", folder / "atlas_regions.nii.gz"]
  present = [p for p in candidates if p.is_file()]
  if not present:
    raise DataError(f"{dataset_root}: no atlas for regional sub-ensembles (expected "
                    f"{candidates[0]})")
  error: ConfigError | None = None
  for path in present:
    atlas = regions_lib.load_atlas(path)
    try:
      return atlas, regions_lib.parse_labels(list(regions), atlas)
    except ConfigError as e:
      error = error or e
  raise error


def regional_cache(config: ml_collections.ConfigDict, regions: tuple[str, ...],
                   base: data_lib.TrainingData) -> Path:
  """A cache of the experiment's dataset restricted to atlas `regions` (prepared once, then
  reused): `<data.cache>-regions/<regions>-<digest>`, same sequences, cube shape, voxel size
  and scaling as `config.data.cache`, voxels outside the regions zeroed.

  Raises:
    ConfigError: no `config.data.cache` to derive it from.
    DataError: the prepared cache's subjects differ from the experiment's.
  """
  if not config.data.cache or not (Path(config.data.cache) / "index.json").is_file():
    raise ConfigError(f"config.data.cache={config.data.cache!r}: regional sub-ensembles "
                      f"({'+'.join(regions)}) are prepared from the experiment's cache")
  source_cache = cache_lib.Cache.open(config.data.cache)
  root = source_cache.index.get("source") or config.data.simulate.out
  if not root or not Path(root).is_dir():
    raise DataError(f"{config.data.cache}: the dataset it was prepared from ({root!r}) is not "
                    "there; regional caches are prepared from it")
  atlas, labels = find_atlas(root, regions)
  prep = dataclasses.replace(source_cache.preprocessing, regions=labels,
                             shape=tuple(int(s) for s in source_cache.shape))
  digest = hashlib.sha1(json.dumps([prep.to_dict(), atlas.path], sort_keys=True,
                                   default=str).encode()).hexdigest()[:8]
  out = Path(f"{os.path.realpath(config.data.cache)}-regions") / f"{'+'.join(regions)}-{digest}"
  if not (out / "index.json").is_file():
    dataset = bids.read_bids(root, prep.sequences)
    if sharding.is_main_process():
      prepare_lib.prepare(dataset, out, prep, atlas=atlas,
                        workers=max(1, int(config.data.workers)))
  prepared = cache_lib.Cache.open(out)
  ids = getattr(base.source, "subject_ids", None)
  if ids is not None and list(prepared.subject_ids) != list(ids):
    raise DataError(f"{out}: its subjects differ from the experiment's ({config.data.cache}); "
                    "remove it to prepare it again")
  return out


def _cache_data(cache_dir: Path, spec: config_lib.SubEnsembleSpec,
                base: data_lib.TrainingData) -> data_lib.TrainingData:
  """A sub-ensemble's TrainingData from its regional cache, on the experiment's split."""
  cache = cache_lib.Cache.open(cache_dir)
  source = pipeline_lib.ArraySource(cache.volumes, cache.ages, cache.subject_ids)
  if len(source) != len(base.source):
    raise DataError(f"{cache_dir}: {len(source)} subjects, the experiment has "
                    f"{len(base.source)}")
  return data_lib.TrainingData(
      data_lib.select_sequences(source, cache.sequences, spec.sequences, str(cache_dir)),
      base.split, tuple(spec.sequences), str(cache_dir))
