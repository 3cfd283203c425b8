"""`brainage predict`: brain age of new subjects from a trained workdir.

    brainage predict --workdir W --data DIR --out preds.tsv [--checkpoint best|latest]
        [--sequences T1w,...] [--batch-size N] [--workers N] [--session S] [--skip-bad]

The model (its architecture and input from the checkpoint's manifest) and its parameters come
from W/checkpoints/{best,latest}; the preprocessing is the `Preprocessing` record of the cache
the model was trained on (W/config.json names it): the same cube shape, voxel size, sequences,
intensity scaling and region mask, applied by `Cache.preprocess`, so a subject gets exactly the
input it would have had in training. `--data` is a BIDS dataset (participants.tsv ages are used
when present) or a list of NIfTI files (one subject each, no age).

Subjects are preprocessed in a thread pool and predicted in fixed-size batches by one jitted,
data-parallel function (padding rows are dropped), so the model sees whole batches, never a
Python loop per subject. The TSV (written atomically) has one row per subject:

    participant_id  session  age  predicted_age  brain_age_gap

ages in years; brain_age_gap = predicted_age - age ("n/a" where the age is unknown).

On an ensemble workdir (one holding an ensemble store W/ensemble, `jax_brainage.ensemble`),
every sub-ensemble's input is prepared with the preprocessing of the cache it was trained on (a
cache shared by several sub-ensembles is applied once per subject), all members of a
sub-ensemble run in one jitted, vmapped call per batch, and the TSV gains the bias-corrected
estimate, the uncertainty and every sub-ensemble's and member's prediction:

    participant_id  session  age  predicted_age  brain_age_gap  predicted_age_corrected
    brain_age_gap_corrected  uncertainty  pred_<sub>...  pred_<sub>_m<k>...

predicted_age is the multi-level ensemble's estimate; the corrected columns remove the gap's age
dependence fit on validation data (they need the age: "n/a" where it is unknown); uncertainty is
the standard deviation of all members' estimates (years); members are numbered from 0 (member k
was trained with seed + k).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_brainage import fileio, models, sharding
from jax_brainage.errors import ConfigError, DataError

CHECKPOINTS = ("best", "latest")
COLUMNS = ("participant_id", "session", "age", "predicted_age", "brain_age_gap")


# ---------------------------------------------------------------------------------------------
# The trained model.


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedModel:
  """A trained model restored from a workdir, ready for inference.

  Attributes:
    workdir: the training workdir.
    checkpoint: "best" or "latest"; step: its training step.
    manifest: what the checkpoint was trained as (model, model_kwargs, image_shape, sequences,
      mean_train_age, ...; see `train.trainer.model_manifest`).
    model: the flax module.
    variables: {"params": ..., **model_state} as host numpy arrays.
    config: the training config as stored in W/config.json (a plain dict; data.cache made
      absolute).
  """

  workdir: Path
  checkpoint: str
  step: int
  manifest: dict[str, Any]
  model: Any
  variables: Any
  config: dict[str, Any]

  @property
  def sequences(self) -> tuple[str, ...]:
    return tuple(self.manifest["sequences"])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(s) for s in self.manifest["image_shape"])

  @property
  def cache_dir(self) -> Path:
    """The cache the model was trained on (its preprocessing is applied to new data)."""
    return Path(self.config["data"]["cache"])


def load_trained(workdir: str | os.PathLike, checkpoint: str = "best") -> TrainedModel:
  """Restores the `checkpoint` ("best" by validation loss, or "latest") of a training workdir.

  Raises:
    ConfigError: one line naming the workdir when it holds no trained model or checkpoint.
  """
  from jax_brainage.train import checkpoint as ckpt_lib
  from jax_brainage.train import trainer

  workdir = Path(workdir)
  if checkpoint not in CHECKPOINTS:
    raise ConfigError(f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
  config_path = workdir / "config.json"
  if not workdir.is_dir():
    raise ConfigError(f"--workdir {workdir}: directory not found")
  if not config_path.is_file():
    raise ConfigError(f"--workdir {workdir}: no trained model there (no config.json; run "
                      "`brainage train` or `brainage demo` first)")
  try:
    record = json.loads(config_path.read_text(encoding="utf-8"))
    config = record["config"]
    # The fingerprint holds the cache as an absolute path: a relative config.data.cache was
    # relative to where training ran, not to where predict runs.
    cache = (record.get("fingerprint") or {}).get("data.cache") or config["data"]["cache"]
    config = dict(config, data=dict(config["data"], cache=cache))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{config_path}: unreadable experiment record ({type(e).__name__})") from None
  if not (workdir / "checkpoints" / checkpoint).is_dir():
    raise ConfigError(f"--workdir {workdir}: no {checkpoint} checkpoint (training has not "
                      "finished an epoch yet?)")
  # orbax logs a warning per read-only option; inference on a finished run is the normal case.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  finally:
    absl_logger.setLevel(level)
  try:
    step = ckpts.latest_step(checkpoint)
    if step is None:
      raise ConfigError(f"--workdir {workdir}: no {checkpoint} checkpoint (training has not "
                        "finished an epoch yet?)")
    meta = ckpts.read_meta(checkpoint, step)
    manifest = meta.get("manifest")
    if not manifest:
      raise ConfigError(f"{ckpt_lib.checkpoint_dir(workdir, checkpoint)}/{step}: checkpoint has "
                        "no model manifest")
    model = trainer.build_model(manifest)
    stored = ckpts.stored_metadata(checkpoint, step)
    # The parameters must be those of the manifest's model (a one-line error otherwise).
    channels = len(manifest["sequences"])
    expected = jax.eval_shape(
        lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                           jnp.zeros((1, *manifest["image_shape"], channels), jnp.float32),
                           train=False))
    ckpt_lib.check_shapes({"params": stored["params"]}, {"params": expected["params"]},
                          f"{ckpt_lib.checkpoint_dir(workdir, checkpoint)}/{step}")
    # Onto this process's first device: inference needs no training layout.
    restored, _ = ckpts.restore_stored(checkpoint, step)
  finally:
    ckpts.close()
  variables = {"params": restored["params"], **dict(restored.get("model_state") or {})}
  variables = jax.tree.map(np.asarray, variables)
  return TrainedModel(workdir=workdir, checkpoint=checkpoint, step=int(step), manifest=manifest,
                      model=model, variables=variables, config=config)


# ---------------------------------------------------------------------------------------------
# Batched inference.


class Predictor:
  """Jitted, data-parallel predicted age of batches of cubes.

  Args:
    trained: the restored model.
    batch_size: volumes per model call (rounded up to a multiple of the devices).
    devices: devices to split a batch over (default: this process's devices).
  """

  def __init__(self, trained: TrainedModel, batch_size: int = 8,
               devices: Sequence[jax.Device] | None = None):
    from jax_brainage.data import intensity

    self.trained = trained
    self.mesh = sharding.make_mesh(devices=list(devices or jax.local_devices()))
    n = sharding.data_size(self.mesh)
    self.batch_size = max(n, int(math.ceil(max(1, batch_size) / n)) * n)
    self._batch_sharding = sharding.batch_sharding(self.mesh)
    self._variables = sharding.put_replicated(self.mesh, trained.variables)
    model = models.lowering.for_inference(trained.model)  # im2col convs on CPU: same numbers

    def apply(variables, images):
      x = intensity.to_unit_float(images)  # uint8 -> float32 / 255, as in training
      outputs = model.apply(variables, x, train=False)
      return models.predicted_age(model, outputs)

    self._apply = jax.jit(apply, out_shardings=sharding.replicated(self.mesh))

  def check(self, volumes_shape: Sequence[int], where: str) -> None:
    """DataError unless volumes `[n, X, Y, Z, C]` are the model's input shape."""
    shape, channels = self.trained.image_shape, len(self.trained.sequences)
    if tuple(volumes_shape[1:4]) != shape or volumes_shape[4] != channels:
      raise DataError(f"{where}: volumes are {tuple(volumes_shape[1:4])} voxels x "
                      f"{volumes_shape[4]} channels, the model expects {shape} x {channels} "
                      f"({', '.join(self.trained.sequences)})")

  def __call__(self, volumes: np.ndarray) -> np.ndarray:
    """Predicted age (years) float32 `[n]` of volumes `[n, X, Y, Z, C]` (uint8 or float16)."""
    volumes = np.asarray(volumes)
    self.check(volumes.shape, "input")
    out = []
    for start in range(0, len(volumes), self.batch_size):
      out.append(self._batch(volumes[start:start + self.batch_size]))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def _batch(self, chunk: np.ndarray) -> np.ndarray:
    k = len(chunk)
    if k < self.batch_size:  # one compiled shape: pad the last batch with zero volumes
      pad = np.zeros((self.batch_size - k, *chunk.shape[1:]), chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    images = jax.device_put(np.ascontiguousarray(chunk), self._batch_sharding)
    return np.asarray(jax.device_get(self._apply(self._variables, images)))[:k]


# ---------------------------------------------------------------------------------------------
# New data, preprocessed as in training.


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One subject's result (ages in years; age and gap None when the age is unknown)."""

  participant_id: str
  session: str | None
  age: float | None
  predicted_age: float

  @property
  def brain_age_gap(self) -> float | None:
    return None if self.age is None else self.predicted_age - self.age


def open_training_cache(trained: TrainedModel):
  """The cache the model was trained on; a one-line DataError if it is gone."""
  from jax_brainage.data import cache as cache_lib

  path = trained.cache_dir
  if not (path / cache_lib.INDEX).is_file():
    raise DataError(f"{path}: the training cache of {trained.workdir} is missing; its "
                    "preprocessing record is needed to prepare new data as in training")
  return cache_lib.Cache.open(path)


def preprocessor_for(trained: TrainedModel, cache):
  """A `Cache` whose `preprocess` makes exactly the model's input channels.

  The cache may hold more sequences than the model reads. If the model's first sequence is the
  cache's reference (it fixes the grid and the brain box; each channel is scaled on its own),
  only the model's sequences are needed; otherwise every cache sequence is prepared and the
  model's channels picked: returns (cache, channel indices) instead of (view, None).
  """
  if trained.sequences == cache.sequences:
    return cache, None
  missing = [s for s in trained.sequences if s not in cache.sequences]
  if missing:
    raise DataError(f"{cache.path}: has no sequence {missing[0]!r} that the model of "
                    f"{trained.workdir} reads")
  if trained.sequences[0] == cache.sequences[0]:
    view = copy.copy(cache)
    view.preprocessing = dataclasses.replace(cache.preprocessing, sequences=trained.sequences)
    view.sequences = trained.sequences
    return view, None
  return cache, [cache.sequences.index(s) for s in trained.sequences]


def required_sequences(trained: TrainedModel, cache) -> tuple[str, ...]:
  """The sequences new data must provide: the model's, or all of the cache's when the model
  does not read the cache's reference sequence."""
  return tuple(preprocessor_for(trained, cache)[0].sequences)


def read_dataset(data: Sequence[str | os.PathLike], sequences: Sequence[str], *,
                 session: str | None = None, skip_bad: bool = False):
  """A BIDS dataset directory (ages optional) or a list of image files (one sequence)."""
  from jax_brainage.data import bids

  data = [str(d) for d in data]
  if len(data) == 1 and bids.split_image_name(Path(data[0]).name) is None:
    return bids.read_bids(data[0], sequences, session=session, require_age=False,
                          skip_bad=skip_bad)
  if len(sequences) != 1:
    raise DataError(f"a list of image files gives one sequence, the model reads "
                    f"{len(sequences)} ({', '.join(sequences)}); pass a BIDS dataset")
  return bids.read_image_list(data, sequences[0], skip_bad=skip_bad)


def predict_dataset(trained: TrainedModel, dataset, *, batch_size: int = 8, workers: int = 1,
                    skip_bad: bool = False, predictor: Predictor | None = None,
                    cache=None) -> tuple[list[Prediction], list[tuple[str, str]]]:
  """Preprocesses (as in training) and predicts every subject of `dataset`.

  Args:
    trained: the model; dataset: from `read_dataset` with `required_sequences`.
    batch_size: volumes per model call; workers: threads preprocessing subjects.
    skip_bad: report subjects whose images fail instead of stopping.
    cache: the training cache (default: opened from the workdir's config).
  Returns:
    (predictions in dataset order, skipped (subject id, reason)).
  """
  cache = cache if cache is not None else open_training_cache(trained)
  if tuple(cache.shape) != trained.image_shape:
    raise DataError(f"{cache.path}: cubes are {tuple(cache.shape)} voxels, the model of "
                    f"{trained.workdir} expects {trained.image_shape} (was the cache prepared "
                    "again with another shape?)")
  prep_cache, channels = preprocessor_for(trained, cache)
  if tuple(dataset.sequences) != tuple(prep_cache.sequences):
    raise DataError(f"{dataset.root or 'data'}: has sequences {list(dataset.sequences)}, the "
                    f"model of {trained.workdir} needs {list(prep_cache.sequences)}")
  predictor = predictor or Predictor(trained, batch_size)
  skipped: list[tuple[str, str]] = list(dataset.skipped)
  results: list[Prediction] = []

  def prepare(subject):
    cube, _ = prep_cache.preprocess(subject.images, subject=subject.subject_id,
                                    mask=subject.mask)
    return {"x": cube if channels is None else cube[..., channels]}

  for subjects, cubes in prepared_batches(dataset, prepare, predictor.batch_size, workers=workers,
                                          skip_bad=skip_bad, skipped=skipped):
    predictor.check(cubes["x"].shape, subjects[0].subject_id)
    for subject, a in zip(subjects, predictor(cubes["x"])):
      results.append(Prediction(subject.subject_id, subject.session, subject.age, float(a)))
  return results, skipped


def prepared_batches(dataset, prepare, batch_size: int, *, workers: int = 1,
                     skip_bad: bool = False, skipped: list[tuple[str, str]] | None = None
                     ) -> Iterator[tuple[list[Any], dict[str, np.ndarray]]]:
  """Subjects of `dataset` prepared in a thread pool, in order, in batches of `batch_size`.

  Args:
    prepare: subject -> {key: cube `[X, Y, Z, C]`} (e.g. one key per model input).
    skip_bad: a subject whose preparation raises DataError is appended to `skipped` (subject
      id, reason) instead of stopping.
  Yields:
    (subjects, {key: stacked cubes `[b, X, Y, Z, C]`}) with b <= batch_size.
  """
  def run(subject):
    try:
      return subject, prepare(subject), None
    except DataError as e:
      if not skip_bad:
        raise
      return subject, None, str(e)

  done: list[tuple[Any, dict[str, np.ndarray]]] = []

  def batch():
    subjects = [s for s, _ in done]
    cubes = {k: np.stack([c[k] for _, c in done]) for k in done[0][1]}
    done.clear()
    return subjects, cubes

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for subject, cubes, error in _ordered_map(pool, run, dataset.subjects, ahead=2 * batch_size):
      if error is not None:
        if skipped is not None:
          skipped.append((subject.subject_id, error))
        continue
      done.append((subject, cubes))
      if len(done) == batch_size:
        yield batch()
    if done:
      yield batch()


def _ordered_map(pool, fn, items: Iterable[Any], ahead: int) -> Iterator[Any]:
  """pool.map in order with at most `ahead` items in flight (bounded memory)."""
  pending: list[concurrent.futures.Future] = []
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= ahead:
      yield pending.pop(0).result()
  for f in pending:
    yield f.result()


# ---------------------------------------------------------------------------------------------
# Ensembles (a workdir with an ensemble store, jax_brainage.ensemble.store).


@dataclasses.dataclass(frozen=True)
class _ModelInput:
  """What `preprocessor_for` needs of a model: its sequences, and a name for messages."""

  sequences: tuple[str, ...]
  workdir: str


@dataclasses.dataclass(frozen=True)
class EnsembleInputs:
  """How new data becomes every sub-ensemble's input.

  Attributes:
    views: key -> cache (view) whose `preprocess` makes a cube; one per distinct training cache
      and sequence view, so a cache shared by several sub-ensembles runs once per subject.
    of_sub: sub-ensemble name -> (key of its view, channel indices into that cube or None).
    sequences: the sequences the data must provide (union over sub-ensembles, in order).
  """

  views: dict[str, Any]
  of_sub: dict[str, tuple[str, list[int] | None]]
  sequences: tuple[str, ...]


def ensemble_inputs(ensemble) -> EnsembleInputs:
  """Opens every sub-ensemble's training cache and checks it still prepares its input (shape,
  sequences, preprocessing incl. regions); a one-line DataError naming the cache otherwise."""
  from jax_brainage.data import cache as cache_lib
  from jax_brainage.ensemble import store

  opened: dict[str, Any] = {}
  views: dict[str, Any] = {}
  of_sub: dict[str, tuple[str, list[int] | None]] = {}
  sequences: list[str] = []
  for sub in ensemble.subs:
    if sub.cache_dir is None:
      raise DataError(f"{store.store_dir(ensemble.workdir or '.')}: sub-ensemble {sub.name} "
                      "records no training cache; its preprocessing is needed for new data")
    path = Path(sub.cache_dir)
    if not (path / cache_lib.INDEX).is_file():
      raise DataError(f"{path}: the training cache of sub-ensemble {sub.name} is missing; its "
                      "preprocessing record is needed to prepare new data as in training")
    if str(path) not in opened:
      opened[str(path)] = cache_lib.Cache.open(path)
    cache = opened[str(path)]
    store.check_cache(sub, cache)
    view, channels = preprocessor_for(_ModelInput(sub.sequences, f"sub-ensemble {sub.name}"),
                                      cache)
    key = f"{path}:{'+'.join(view.sequences)}"
    views.setdefault(key, view)
    of_sub[sub.name] = (key, channels)
    sequences += [q for q in view.sequences if q not in sequences]
  return EnsembleInputs(views, of_sub, tuple(sequences))


def predict_ensemble_dataset(ensemble, dataset, *, batch_size: int = 8, workers: int = 1,
                             skip_bad: bool = False, inputs: EnsembleInputs | None = None,
                             members_per_call: int = 0):
  """Preprocesses (as in training, per sub-ensemble) and predicts every subject of `dataset`.

  Returns:
    (subjects in dataset order, `ensemble.store.EnsemblePrediction` of them, skipped (subject
    id, reason)).
  """
  inputs = inputs or ensemble_inputs(ensemble)
  if tuple(dataset.sequences) != tuple(inputs.sequences):
    raise DataError(f"{dataset.root or 'data'}: has sequences {list(dataset.sequences)}, the "
                    f"ensemble of {ensemble.workdir} needs {list(inputs.sequences)}")
  skipped: list[tuple[str, str]] = list(dataset.skipped)

  def prepare(subject):
    out = {}
    for key, view in inputs.views.items():
      images = {q: subject.images[q] for q in view.sequences}
      out[key], _ = view.preprocess(images, subject=subject.subject_id, mask=subject.mask)
    return out

  subjects: list[Any] = []
  members: dict[str, list[np.ndarray]] = {s.name: [] for s in ensemble.subs}
  for batch_subjects, cubes in prepared_batches(dataset, prepare, batch_size, workers=workers,
                                                skip_bad=skip_bad, skipped=skipped):
    volumes = {}
    for sub in ensemble.subs:
      key, channels = inputs.of_sub[sub.name]
      volumes[sub.name] = cubes[key] if channels is None else cubes[key][..., channels]
      sub.check_inputs(volumes[sub.name].shape, batch_subjects[0].subject_id)
    for name, p in ensemble.predict_members(volumes, batch_size,
                                            members_per_call=members_per_call).items():
      members[name].append(p)
    subjects.extend(batch_subjects)
  stacked = {name: (np.concatenate(p) if p else np.zeros((0, ensemble.sub(name).members)))
             for name, p in members.items()}
  return subjects, ensemble.combine(stacked), skipped


def ensemble_columns(ensemble) -> tuple[str, ...]:
  """The ensemble TSV's columns (see the module docstring)."""
  cols = list(COLUMNS) + ["predicted_age_corrected", "brain_age_gap_corrected", "uncertainty"]
  cols += [f"pred_{s.name}" for s in ensemble.subs]
  cols += [f"pred_{s.name}_m{k}" for s in ensemble.subs for k in range(s.members)]
  return tuple(cols)


def ensemble_tsv(ensemble, subjects: Sequence[Any], prediction) -> str:
  """The ensemble predictions as TSV text (ages in years, "n/a" for unknown)."""
  lines = ["\t".join(ensemble_columns(ensemble))]
  for i, subject in enumerate(subjects):
    age = subject.age
    p = float(prediction.ensemble[i])
    if age is None:
      corrected = gap_c = None
    else:
      corrected = float(prediction.correction.apply(np.array([p]), np.array([age]))[0])
      gap_c = corrected - age
    row = [subject.subject_id, subject.session or "n/a", _fmt(age), _fmt(p),
           _fmt(None if age is None else p - age), _fmt(corrected), _fmt(gap_c),
           _fmt(float(prediction.spread[i]))]
    row += [_fmt(float(prediction.subs[s.name][i])) for s in ensemble.subs]
    row += [_fmt(float(prediction.members[s.name][i, k])) for s in ensemble.subs
            for k in range(s.members)]
    lines.append("\t".join(row))
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Output.


def _fmt(x: float | None, digits: int = 4) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def predictions_tsv(predictions: Sequence[Prediction]) -> str:
  """The predictions as TSV text (`COLUMNS`, ages in years, "n/a" for unknown)."""
  lines = ["\t".join(COLUMNS)]
  for p in predictions:
    lines.append("\t".join([p.participant_id, p.session or "n/a", _fmt(p.age),
                            _fmt(p.predicted_age), _fmt(p.brain_age_gap)]))
  return "\n".join(lines) + "\n"


def write_predictions(path: str | os.PathLike, predictions: Sequence[Prediction]) -> None:
  """Writes the predictions TSV atomically."""
  fileio.write_text(path, predictions_tsv(predictions))


def summary_metrics(ages: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
  """MAE, RMSE (years), Pearson r and mean brain-age gap of predictions with known ages."""
  ages = np.asarray(ages, np.float64)
  predicted = np.asarray(predicted, np.float64)
  gap = predicted - ages
  r = float(np.corrcoef(ages, predicted)[0, 1]) if len(ages) > 1 and np.std(predicted) > 0 else (
      math.nan)
  return {"mae": float(np.mean(np.abs(gap))), "rmse": float(np.sqrt(np.mean(gap ** 2))),
          "r": r, "mean_gap": float(np.mean(gap)), "n": int(len(ages))}


# ---------------------------------------------------------------------------------------------
# Command line.


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Adds `brainage predict`."""
  p = subparsers.add_parser(
      "predict", help="predicted age and brain-age gap of new subjects from a trained workdir",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, type=Path,
                 help="training workdir (brainage train): one model, or an ensemble experiment")
  p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                 help="BIDS dataset directory, or NIfTI files (one subject each, no age)")
  p.add_argument("--out", required=True, type=Path, metavar="TSV", help="predictions to write")
  p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                 help="best by validation loss (default) or latest (single-model workdirs)")
  p.add_argument("--sequences", default=None,
                 help="comma-separated sequences of the data (default: the model's); must be "
                      "the model's")
  p.add_argument("--session", default=None, help="use images of ses-SESSION only")
  p.add_argument("--batch-size", type=int, default=8, help="volumes per model call (8)")
  p.add_argument("--members-per-call", type=int, default=0, metavar="N",
                 help="ensembles: members evaluated per call (0 = all of a sub-ensemble at "
                      "once; fewer bound device memory)")
  p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                 help="threads preprocessing subjects")
  p.add_argument("--skip-bad", action="store_true",
                 help="report and skip subjects with bad data instead of stopping")
  p.set_defaults(func=run)
  return p


def run(args: argparse.Namespace) -> int:
  from jax_brainage.data import bids

  if args.batch_size < 1:
    raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
  from jax_brainage.ensemble import store

  if store.is_ensemble_workdir(args.workdir):
    return run_ensemble(args)
  trained = load_trained(args.workdir, args.checkpoint)
  cache = open_training_cache(trained)
  sequences = required_sequences(trained, cache)
  if args.sequences is not None:
    given = bids.parse_sequences(args.sequences)
    if given != sequences:
      raise DataError(f"--sequences {','.join(given)}: the model of {args.workdir} needs "
                      f"{','.join(sequences)} (in that order)")
  dataset = read_dataset(args.data, sequences, session=args.session, skip_bad=args.skip_bad)
  predictions, skipped = predict_dataset(trained, dataset, batch_size=args.batch_size,
                                         workers=args.workers, skip_bad=args.skip_bad,
                                         cache=cache)
  for sid, why in skipped:
    print(f"skipped {sid}: {why}", file=sys.stderr)
  if not predictions:
    raise DataError(f"{' '.join(map(str, args.data))}: no subject could be predicted")
  write_predictions(args.out, predictions)
  known = [p for p in predictions if p.age is not None]
  line = (f"predicted {len(predictions)} subjects with {args.workdir} ({trained.checkpoint} "
          f"checkpoint, step {trained.step}) -> {args.out}")
  if len(known) > 1:
    m = summary_metrics(np.array([p.age for p in known]),
                        np.array([p.predicted_age for p in known]))
    line += f"; MAE {m['mae']:.2f} years, r {m['r']:.3f} over {m['n']} with known age"
  print(line)
  return 0


def run_ensemble(args: argparse.Namespace) -> int:
  """`brainage predict` on an ensemble workdir (see the module docstring)."""
  from jax_brainage.data import bids
  from jax_brainage.ensemble import correction as correction_lib
  from jax_brainage.ensemble import store

  if args.checkpoint != "best":
    raise ConfigError(f"--checkpoint {args.checkpoint}: the ensemble store of {args.workdir} "
                      "holds every member at its best validation epoch only")
  ensemble = store.load_ensemble(args.workdir)
  inputs = ensemble_inputs(ensemble)
  if args.sequences is not None:
    given = bids.parse_sequences(args.sequences)
    if given != inputs.sequences:
      raise DataError(f"--sequences {','.join(given)}: the ensemble of {args.workdir} needs "
                      f"{','.join(inputs.sequences)} (in that order)")
  dataset = read_dataset(args.data, inputs.sequences, session=args.session,
                         skip_bad=args.skip_bad)
  subjects, prediction, skipped = predict_ensemble_dataset(
      ensemble, dataset, batch_size=args.batch_size, workers=args.workers,
      skip_bad=args.skip_bad, inputs=inputs, members_per_call=args.members_per_call)
  for sid, why in skipped:
    print(f"skipped {sid}: {why}", file=sys.stderr)
  if not subjects:
    raise DataError(f"{' '.join(map(str, args.data))}: no subject could be predicted")
  fileio.write_text(args.out, ensemble_tsv(ensemble, subjects, prediction))
  line = (f"predicted {len(subjects)} subjects with the ensemble of {args.workdir} "
          f"({len(ensemble.subs)} sub-ensembles, {ensemble.n_members} members) -> {args.out}")
  known = np.array([i for i, s in enumerate(subjects) if s.age is not None], int)
  if len(known) > 1:
    ages = np.array([subjects[i].age for i in known], np.float64)
    m = correction_lib.gap_metrics(ages, prediction.ensemble[known],
                                   prediction.correction.apply(prediction.ensemble[known], ages))
    line += (f"; MAE {m['mae']:.2f} years ({m['mae_corrected']:.2f} {ensemble.correction.kind}"
             f"-corrected), gap-age Spearman {m['spearman_gap_age']:.2f} "
             f"({m['spearman_gap_age_corrected']:.2f} corrected), mean uncertainty "
             f"{float(np.mean(prediction.spread)):.2f} over {m['n']} with known age")
  print(line)
  return 0
