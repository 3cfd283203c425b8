"""A trained model's home: the workdir contract, and the one way to load what was trained.

Every command that uses a trained model (predict, explain, evaluate-explanations, the demo)
loads it here, never through the training loop, and gets an `ensemble.model.Ensemble`: a
single-model workdir is an ensemble of one (one sub-ensemble of one member, an identity head,
no bias correction), so prediction and relevance have one code path.

A training workdir W (written by `brainage train`):

    W/config.json          the experiment (fingerprint + full config); `claim_workdir` writes it
                           and refuses a workdir that holds a different experiment
    W/checkpoints/{latest,best}/<step>/   orbax: state + meta.json whose "manifest"
                           (`model_manifest`) says what the parameters are: model name and
                           fields, input shape, sequences, mean training age, member count;
                           + checksums.json, verified before anything is read (a damaged
                           checkpoint is a one-line DataError naming the file)
    W/split.json, W/metrics.json, W/tensorboard/

An ensemble experiment adds W/sub/<name>/ (one training workdir per sub-ensemble, members
stacked) and the store W/ensemble (`ensemble.store`), which `load` prefers when present.
Checkpoints written before members existed (no member axis) still load: as one member.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from jax_brainage import fileio, models, sharding
from jax_brainage.ensemble import store
from jax_brainage.ensemble.model import Ensemble, SubEnsemble, identity
from jax_brainage.errors import ConfigError
from jax_brainage.train import checkpoint as ckpt_lib
from jax_brainage.train import config as config_lib

EXPERIMENT = "config.json"
CHECKPOINTS = (ckpt_lib.BEST, ckpt_lib.LATEST)
SINGLE = "model"  # the sub-ensemble name of a single trained model


# ---------------------------------------------------------------------------------------------
# Writing: what training records about a model.


def claim_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Stores the experiment in W/config.json, or refuses a workdir holding a different one."""
  workdir = Path(workdir)
  path = workdir / EXPERIMENT
  current = config_lib.fingerprint(config)
  if path.exists():
    try:
      stored = json.loads(path.read_text())["fingerprint"]
    except (ValueError, KeyError) as e:
      raise ConfigError(f"{path}: unreadable experiment record ({e})") from e
    difference = config_lib.fingerprint_difference(stored, current)
    if difference:
      raise ConfigError(f"workdir {workdir} holds a different experiment: {difference}")
  if sharding.is_main_process():
    fileio.write_json(path, {"fingerprint": current,
                             "config": fileio.jsonable(config.to_dict())})


def train_age_scale(config: ml_collections.ConfigDict, data: Any) -> float:
  """The regression output scale (years): the training split's age standard deviation when
  `config.model.scale_output` is on, else 1.0 (the study's raw-years output).

  `data` is a `train.data.TrainingData` (its source's ages and split)."""
  if not config.model.scale_output:
    return 1.0
  ages = np.asarray(data.source.ages, np.float64)[data.split.train]
  sd = float(np.std(ages))
  if not (math.isfinite(sd) and sd > 0):
    raise ConfigError(f"config.model.scale_output: the training ages of {data.name} have no "
                      f"spread (standard deviation {sd} years)")
  return sd


def model_manifest(config: ml_collections.ConfigDict, data: Any,
                   num_params: int) -> dict[str, Any]:
  """What a checkpoint was trained as: enough to rebuild the model (`models.build_model`) and
  check its input. `data` is the `train.data.TrainingData` it was trained on."""
  kwargs = config_lib.model_kwargs(config, data.mean_train_age, train_age_scale(config, data))
  return {"model": config.model.name, "model_kwargs": kwargs,
          "image_shape": list(data.image_shape), "sequences": list(data.sequences),
          "mean_train_age": data.mean_train_age, "num_params": int(num_params),
          "loss": config.loss}


# ---------------------------------------------------------------------------------------------
# Reading.


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """orbax logs a warning per read-only option; inference on a finished run is the normal case."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def read_experiment(workdir: str | os.PathLike) -> dict[str, Any]:
  """The training config stored in W/config.json (a plain dict), with `data.cache` absolute.

  Raises:
    ConfigError: one line naming the workdir when it is missing or holds no trained model.
  """
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise ConfigError(f"--workdir {workdir}: directory not found")
  path = workdir / EXPERIMENT
  if not path.is_file():
    raise ConfigError(f"--workdir {workdir}: no trained model there (no config.json; run "
                      "`brainage train` or `brainage demo` first)")
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
    config = record["config"]
    # The fingerprint holds the cache as an absolute path: a relative config.data.cache was
    # relative to where training ran, not to where the model is used.
    cache = (record.get("fingerprint") or {}).get("data.cache") or config["data"]["cache"]
    return dict(config, data=dict(config["data"], cache=cache))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path}: unreadable experiment record ({type(e).__name__})") from None


def load_members(workdir: str | os.PathLike,
                 which: str = ckpt_lib.BEST) -> tuple[dict[str, Any], Any, int]:
  """(manifest, variables, step) of a trained workdir's `which` checkpoint, as host numpy.

  `variables` is {"params": ..., **model_state} with a leading member axis `[M, ...]` on every
  leaf (M = manifest["members"]; a single-model workdir gets M = 1), ready for a vmapped apply.
  The stored arrays are checked against the manifest's model (one-line ConfigError); a step
  that fails its checksums or cannot be decoded is a one-line DataError naming the file (there
  is no fallback here: predicting from another checkpoint than the one asked for would be a
  silent substitution).
  """
  if which not in CHECKPOINTS:
    raise ConfigError(f"--checkpoint {which!r}: choose one of {', '.join(CHECKPOINTS)}")
  where = ckpt_lib.checkpoint_dir(workdir, which)
  if not where.is_dir():
    raise ConfigError(f"--workdir {workdir}: no {which} checkpoint (training has not "
                      "finished an epoch yet?)")
  with _quiet_orbax():
    checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    step = checkpoints.latest_step(which)
    if step is None:
      raise ConfigError(f"--workdir {workdir}: no {which} checkpoint (training has not "
                        "finished an epoch yet?)")
    manifest = dict(checkpoints.read_meta(which, step).get("manifest") or {})
    if not manifest:
      raise ConfigError(f"{where}/{step}: checkpoint has no model manifest")
    members = manifest.get("members")
    # The parameters must be those of the manifest's model (a one-line error otherwise).
    expected = models.variable_shapes(manifest, None if members is None else int(members))
    stored = checkpoints.stored_metadata(which, step)
    models.check_shapes({"params": stored["params"]}, {"params": expected["params"]},
                          f"{where}/{step}")
    state, meta = checkpoints.restore_stored(which, step)
  finally:
    checkpoints.close()
  variables = jax.tree.map(np.asarray,
                           {"params": state["params"], **dict(state.get("model_state") or {})})
  if members is None:  # a single model: no member axis on disk
    variables = jax.tree.map(lambda x: x[None], variables)
  manifest["members"] = int(members or 1)
  return manifest, variables, int(meta.get("step", step))


def load_sub_ensemble(name: str, workdir: str | os.PathLike, *, regions: Sequence[str] = (),
                      checkpoint: str = ckpt_lib.BEST) -> SubEnsemble:
  """The members of a training workdir as a sub-ensemble: its `checkpoint` ("best": each member
  at its own best validation epoch), the cache it was trained on and that cache's preprocessing.

  A single-model workdir (no member axis) gives a sub-ensemble of one member.
  Raises ConfigError (one line) when the workdir holds no trained model or its arrays do not fit
  the model its manifest describes.
  """
  workdir = Path(workdir)
  cache = Path(read_experiment(workdir)["data"]["cache"])
  manifest, variables, step = load_members(workdir, checkpoint)
  members = int(manifest.pop("members"))
  preprocessing = None
  index = cache / "index.json"
  if index.is_file():
    try:
      preprocessing = json.loads(index.read_text(encoding="utf-8")).get("preprocessing")
    except (OSError, ValueError):
      preprocessing = None
  return SubEnsemble(name=name, sequences=tuple(manifest["sequences"]), regions=tuple(regions),
                     manifest=manifest, members=members, variables=variables,
                     cache_dir=str(cache.resolve()), preprocessing=preprocessing,
                     workdir=str(workdir.resolve()), step=step)


def is_ensemble_workdir(workdir: str | os.PathLike) -> bool:
  """True when W holds an ensemble store (W/ensemble), i.e. an ensemble experiment."""
  return store.is_ensemble_workdir(workdir)


def load(workdir: str | os.PathLike, checkpoint: str = ckpt_lib.BEST) -> Ensemble:
  """The trained model of workdir W, as an `Ensemble`.

  An ensemble experiment's store W/ensemble (every member at its best validation epoch, the
  fitted head and bias correction); else W's own checkpoint `checkpoint` ("best" by validation
  loss, or "latest") as an ensemble of one (`ensemble.model.identity`; its stacked members, if
  W trained several, averaged).

  Raises:
    ConfigError: one line naming the workdir: no trained model, no such checkpoint, arrays that
      do not fit the manifest's model, or "latest" asked of an ensemble store.
  """
  if checkpoint not in CHECKPOINTS:
    raise ConfigError(f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
  if is_ensemble_workdir(workdir):
    if checkpoint != ckpt_lib.BEST:
      raise ConfigError(f"--checkpoint {checkpoint}: the ensemble store of {workdir} holds "
                        "every member at its best validation epoch only")
    with _quiet_orbax():
      return store.load_ensemble(workdir)
  sub = load_sub_ensemble(SINGLE, workdir, checkpoint=checkpoint)
  return identity(sub, workdir=Path(workdir).resolve(), info={"checkpoint": checkpoint})


def describe(ensemble: Ensemble) -> str:
  """A few words for the command lines: "the ensemble of W (2 sub-ensembles, 10 members)" or
  "W (best checkpoint, step 120)"."""
  if is_single_model(ensemble):
    sub = ensemble.subs[0]
    imported = ensemble.info.get("imported")
    if isinstance(imported, dict) and sub.step is None:  # `brainage import`: no training step
      source = (imported.get("weights") or {}).get("file") or imported.get("folder")
      return f"{ensemble.workdir} (imported {imported.get('format')} model, {source})"
    return (f"{ensemble.workdir} ({ensemble.info.get('checkpoint', 'best')} checkpoint, step "
            f"{sub.step})")
  return (f"the ensemble of {ensemble.workdir} ({len(ensemble.subs)} sub-ensembles, "
          f"{ensemble.n_members} members)")


def is_single_model(ensemble: Ensemble) -> bool:
  """Whether `ensemble` holds one trained model (one member, identity head, no correction):
  its outputs then omit the ensemble-only columns (uncertainty, members, corrected gap)."""
  return ensemble.n_members == 1 and ensemble.correction.kind == "none"

