"""Brain age of new subjects from a trained model, preprocessed exactly as in training.

    from jax_brainage import predict
    from jax_brainage.train import artifact
    model = artifact.load("runs/demo")                     # any trained workdir
    dataset = predict.read_dataset(["data/new-bids"], predict.model_inputs(model).sequences)
    subjects, prediction, skipped = predict.predict_dataset(model, dataset)
    predict.write_predictions("preds.tsv", model, subjects, prediction)

Every trained model is an `ensemble.model.Ensemble` (a single model is an ensemble of one). Each
sub-ensemble's input is prepared with the `Preprocessing` record of the cache it was trained on
(the same cube shape, voxel size, sequences, intensity scaling and region mask, applied by
`Cache.preprocess`; a cache shared by several sub-ensembles runs once per subject), subjects are
preprocessed in a thread pool and predicted in fixed-size batches by one jitted, data-parallel,
member-vmapped call per sub-ensemble (padding rows dropped): never a Python loop per subject.
`--data` is any layout of `jax_brainage.data.layouts`: a BIDS dataset (every session a row;
participants.tsv / sessions.tsv ages used when present), fMRIPrep derivatives, a FreeSurfer or
FastSurfer SUBJECTS_DIR, or a list of image files (one subject each, no age).

With `qc=[]`, every scan is also measured against the conformity gate of the training cache
(`jax_brainage.data.conformity`: skull, tilt, voxel size, intensities, field of view...), and the
TSV gets a last column `qc_flags` (the reasons a scan is outside the training data, ";"-joined;
empty when none); `qc_table` is the per-scan measures table (`brainage predict` writes both).

The TSV (written atomically) has one row per subject and session (`session` "n/a" without one):

    participant_id  session  age  predicted_age  brain_age_gap

ages in years; brain_age_gap = predicted_age - age ("n/a" where the age is unknown). A model with
a bias correction adds `predicted_age_corrected  brain_age_gap_corrected` (the gap's age
dependence fit on validation data removed; they need the age), and an ensemble of several
members adds `uncertainty` (the standard deviation of all members' estimates, years), every
sub-ensemble's prediction `pred_<sub>` and every member's `pred_<sub>_m<k>` (member k was trained
with seed + k).

With `pose_average` (`brainage predict --tta N`, `augment.PoseAverage`) every estimate is the mean
over N small rigid poses of the input: for native-space scans after `--align template`.

With a calibration (`brainage calibrate`: W/calibration.json, `jax_brainage.ensemble.conformal`)
the TSV adds calibrated intervals at `interval_level` (default 0.9): `predicted_age_low
predicted_age_high` (split-conformal, conditional on the chronological age; on the predicted age
where the age is unknown), `brain_age_gap_low brain_age_gap_high` around the bias-corrected gap
(the gap of a model without correction) and `gap_excludes_zero` (yes/no: the gap lies outside
the range of 90% of the calibration scans of that age); "inf"/"-inf" where the calibration (or
a Mondrian age bin) had too few scans.
With the training workdir's split (W/split.json) it adds `split`: train, val or test for subjects
whose participant id the model was trained, validated or tested on, none otherwise (predictions
of train and val subjects are optimistic).

A predicted age that is NaN or infinite (a damaged model, a head or correction gone wrong) is
never written: `check_finite` raises a one-line DataError naming the subjects and the member,
sub-ensemble, head or correction that produced it, and `write_predictions` calls it first.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from jax_brainage import fileio
from jax_brainage.data import augment, conformity, layouts
from jax_brainage.data import cache as cache_lib
from jax_brainage.ensemble import conformal
from jax_brainage.ensemble.model import Ensemble, EnsemblePrediction, check_cache
from jax_brainage.errors import DataError
from jax_brainage.train import artifact

COLUMNS = ("participant_id", "session", "age", "predicted_age", "brain_age_gap")
CORRECTED_COLUMNS = ("predicted_age_corrected", "brain_age_gap_corrected")
INTERVAL_COLUMNS = ("interval_level", "predicted_age_low", "predicted_age_high",
                    "brain_age_gap_low", "brain_age_gap_high", "gap_excludes_zero")


# ---------------------------------------------------------------------------------------------
# New data, preprocessed as in training.


def preprocessor_for(sequences: Sequence[str], cache, who: str):
  """A `Cache` whose `preprocess` makes exactly the input channels `sequences` of a model.

  The cache may hold more sequences than the model reads. If the model's first sequence is the
  cache's reference (it fixes the grid and the brain box; each channel is scaled on its own),
  only the model's sequences are needed; otherwise every cache sequence is prepared and the
  model's channels picked: returns (cache, channel indices) instead of (view, None).
  `who` names the model in errors.
  """
  sequences = tuple(sequences)
  if sequences == tuple(cache.sequences):
    return cache, None
  missing = [s for s in sequences if s not in cache.sequences]
  if missing:
    raise DataError(f"{cache.path}: has no sequence {missing[0]!r} that {who} reads")
  if sequences[0] == cache.sequences[0]:
    view = copy.copy(cache)
    view.preprocessing = dataclasses.replace(cache.preprocessing, sequences=sequences)
    view.sequences = sequences
    return view, None
  return cache, [cache.sequences.index(s) for s in sequences]


@dataclasses.dataclass(frozen=True)
class ModelInputs:
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

  def volumes(self, model: Ensemble, cubes: dict[str, np.ndarray], where: str = "input"
              ) -> dict[str, np.ndarray]:
    """{view key: cubes `[n, X, Y, Z, C]`} -> {sub name: its input `[n, X, Y, Z, C_sub]`}."""
    out = {}
    for sub in model.subs:
      key, channels = self.of_sub[sub.name]
      out[sub.name] = cubes[key] if channels is None else cubes[key][..., channels]
      sub.check_inputs(out[sub.name].shape, where)
    return out


def model_inputs(model: Ensemble, align: str | None = None) -> ModelInputs:
  """Opens every sub-ensemble's training cache and checks it still prepares its input (shape,
  sequences, preprocessing incl. regions); a one-line DataError naming the cache otherwise.
  `align` ("affine" / "rigid"): register new scans to the template first (`data.align`), for
  scans as acquired when the training cache was template-space."""
  opened: dict[str, Any] = {}
  views: dict[str, Any] = {}
  of_sub: dict[str, tuple[str, list[int] | None]] = {}
  sequences: list[str] = []
  single = artifact.is_single_model(model)
  for sub in model.subs:
    who = f"the model of {model.workdir}" if single else f"sub-ensemble {sub.name}"
    if sub.cache_dir is None:
      raise DataError(f"{model.workdir}: {who} records no training cache; its preprocessing "
                      "is needed for new data")
    path = Path(sub.cache_dir)
    if not (path / cache_lib.INDEX).is_file():
      raise DataError(f"{path}: the training cache of {who} is missing; its preprocessing "
                      "record is needed to prepare new data as in training")
    if str(path) not in opened:
      opened[str(path)] = cache_lib.Cache.open(path)
    cache = opened[str(path)]
    check_cache(sub, cache, who)
    view, channels = preprocessor_for(sub.sequences, cache, who)
    if align is not None:
      view = copy.copy(view)
      view.preprocessing = dataclasses.replace(view.preprocessing, align=align)
    key = f"{path}:{'+'.join(view.sequences)}"
    views.setdefault(key, view)
    of_sub[sub.name] = (key, channels)
    sequences += [q for q in view.sequences if q not in sequences]
  return ModelInputs(views, of_sub, tuple(sequences))


def read_dataset(data: Sequence[str | os.PathLike], sequences: Sequence[str], *,
                 session: str | None = None, skip_bad: bool = False,
                 entities: str | None = None, participants: str | os.PathLike | None = None):
  """Rows of `--data`, ages optional: a BIDS or fMRIPrep dataset, a FreeSurfer/FastSurfer
  SUBJECTS_DIR or a list of image files (`jax_brainage.data.layouts.read_dataset`)."""
  return layouts.read_dataset(data, sequences, require_age=False, session=session,
                              entities=entities, participants=participants, skip_bad=skip_bad)


def predict_dataset(model: Ensemble, dataset, *, batch_size: int = 8, workers: int = 1,
                    skip_bad: bool = False, inputs: ModelInputs | None = None,
                    members_per_call: int = 0, qc: list | None = None,
                    pose_average: augment.PoseAverage | None = None
                    ) -> tuple[list[Any], EnsemblePrediction, list[tuple[str, str]]]:
  """Preprocesses (as in training, per sub-ensemble) and predicts every subject of `dataset`.

  Args:
    model: the trained model (`artifact.load`); dataset: from `read_dataset` with
      `model_inputs(model).sequences`.
    batch_size: volumes per model call; workers: threads preprocessing subjects.
    skip_bad: report subjects whose images fail instead of stopping.
    inputs: `model_inputs(model)` (opened here when not given).
    members_per_call: members evaluated per call (0: every member of a sub-ensemble at once).
    qc: when a list, one `conformity.Assessment` per predicted subject is appended to it (in the
      order of the returned subjects): the scan against the conformity gate of the first
      sub-ensemble's training cache (`Cache.conformity`).
    pose_average: test-time augmentation (`augment.PoseAverage`): every estimate is the mean
      over small rigid poses of the input (for native-space scans after `--align template`).
  Returns:
    (subjects in dataset order, their `EnsemblePrediction`, skipped (subject id, reason)).
  """
  inputs = inputs or model_inputs(model)
  if tuple(dataset.sequences) != tuple(inputs.sequences):
    raise DataError(f"{dataset.root or 'data'}: has sequences {list(dataset.sequences)}, "
                    f"{artifact.describe(model)} needs {list(inputs.sequences)}")
  skipped: list[tuple[str, str]] = list(dataset.skipped)

  gate_key = inputs.of_sub[model.subs[0].name][0]
  # A model imported without its training scans has nothing to compare a scan with.
  has_reference = len(getattr(inputs.views[gate_key], "subject_ids", ())) > 0
  scan_measures: dict[int, dict[str, float]] = {}

  def prepare(subject):
    out = {}
    for key, view in inputs.views.items():
      images = {q: subject.images[q] for q in view.sequences}
      measures: dict[str, float] | None = {} if qc is not None and key == gate_key else None
      out[key], _ = view.preprocess(images, subject=subject.subject_id, mask=subject.mask,
                                    measures=measures)
      if measures is not None:
        scan_measures[id(subject)] = measures
    return out

  subjects: list[Any] = []
  members: dict[str, list[np.ndarray]] = {s.name: [] for s in model.subs}
  for batch_subjects, cubes in prepared_batches(dataset, prepare, batch_size, workers=workers,
                                                skip_bad=skip_bad, skipped=skipped):
    volumes = inputs.volumes(model, cubes, batch_subjects[0].subject_id)
    if qc is not None and not has_reference:
      scan_measures.clear()
      qc += [NO_REFERENCE] * len(batch_subjects)
    elif qc is not None:
      qc += conformity.assess_cubes(cubes[gate_key],
                                    [scan_measures.pop(id(s)) for s in batch_subjects],
                                    inputs.views[gate_key].conformity)
    for name, p in model.predict_members(volumes, batch_size, members_per_call=members_per_call,
                                         pose_average=pose_average).items():
      members[name].append(p)
    subjects.extend(batch_subjects)
  stacked = {name: (np.concatenate(p) if p else np.zeros((0, model.sub(name).members)))
             for name, p in members.items()}
  return subjects, model.combine(stacked), skipped


# The gate's answer where the training cache holds no scans (an imported model): unchecked.
NO_REFERENCE = conformity.Assessment(
    measures={m.name: math.nan for m in conformity.MEASURES}, flags=("unchecked",),
    details=("no training scans to compare with (a model imported without its training data)",))


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
# Output.


def columns(model: Ensemble, *, intervals: bool = False, split: bool = False,
            qc: bool = False) -> tuple[str, ...]:
  """The predictions TSV's columns (see the module docstring); `intervals` with a calibration,
  `split` with the training workdir's split, `qc` (last) with the conformity gate's flags."""
  cols = list(COLUMNS)
  if model.correction.kind != "none":
    cols += CORRECTED_COLUMNS
  if model.n_members > 1:
    cols += ["uncertainty"]
    cols += [f"pred_{s.name}" for s in model.subs]
    cols += [f"pred_{s.name}_m{k}" for s in model.subs for k in range(s.members)]
  if intervals:
    cols += INTERVAL_COLUMNS
  if split:
    cols += ["split"]
  if qc:
    cols += ["qc_flags"]
  return tuple(cols)


def _fmt(x: float | None, digits: int = 4) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _bound(x: float) -> str:
  return ("inf" if x > 0 else "-inf") if math.isinf(x) else _fmt(x)


def intervals(prediction: EnsemblePrediction, subjects: Sequence[Any],
              calibration: conformal.Calibration, level: float = conformal.LEVEL
              ) -> dict[str, np.ndarray]:
  """`calibration.intervals` of the predicted subjects (ages from `subjects`, NaN unknown)."""
  ages = np.array([np.nan if s.age is None else s.age for s in subjects], np.float64)
  with np.errstate(invalid="ignore"):
    corrected = prediction.correction.apply(np.asarray(prediction.ensemble, np.float64), ages)
  return calibration.intervals(prediction.ensemble, ages, corrected, prediction.spread, level)


def predictions_tsv(model: Ensemble, subjects: Sequence[Any], prediction: EnsemblePrediction,
                    *, calibration: conformal.Calibration | None = None,
                    level: float = conformal.LEVEL, parts: dict[str, str] | None = None,
                    qc: Sequence[Any] | None = None) -> str:
  """The predictions as TSV text (`columns(model)`, ages in years, "n/a" for unknown).

  Args:
    calibration: adds the calibrated intervals at `level`; parts: {participant id: split
      name} of the training workdir (`splits.subject_parts`) adds the `split` column;
    qc: the assessments `predict_dataset(qc=...)` made add a last column `qc_flags`: the
      reasons joined by ";", empty for a scan like the training data."""
  cols = columns(model, intervals=calibration is not None, split=parts is not None,
                 qc=qc is not None)
  bounds = intervals(prediction, subjects, calibration, level) if calibration else None
  lines = ["\t".join(cols)]
  for i, subject in enumerate(subjects):
    age = subject.age
    p = float(prediction.ensemble[i])
    row = [subject.subject_id, subject.session or "n/a", _fmt(age), _fmt(p),
           _fmt(None if age is None else p - age)]
    if CORRECTED_COLUMNS[0] in cols:
      corrected = (None if age is None else
                   float(prediction.correction.apply(np.array([p]), np.array([age]))[0]))
      row += [_fmt(corrected), _fmt(None if corrected is None else corrected - age)]
    if "uncertainty" in cols:
      row += [_fmt(float(prediction.spread[i]))]
      row += [_fmt(float(prediction.subs[s.name][i])) for s in model.subs]
      row += [_fmt(float(prediction.members[s.name][i, k])) for s in model.subs
              for k in range(s.members)]
    if bounds is not None:
      excludes = bounds["gap_excludes_zero"][i]
      row += [f"{level:g}"] + [_bound(float(bounds[c][i])) for c in INTERVAL_COLUMNS[1:5]]
      row += ["n/a" if math.isnan(excludes) else ("yes" if excludes else "no")]
    if parts is not None:
      row += [parts.get(subject.subject_id, "none")]
    if qc is not None:
      row += [qc[i].text]
    lines.append("\t".join(row))
  return "\n".join(lines) + "\n"


def _listed(names: Sequence[str], at_most: int = 5) -> str:
  shown = ", ".join(names[:at_most])
  return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def check_finite(model: Ensemble, subjects: Sequence[Any],
                 prediction: EnsemblePrediction) -> None:
  """DataError unless every predicted age (members, sub-ensembles, the ensemble, and the
  bias-corrected age where the age is known) is finite.

  The one line names the subjects (participant ids, the first five) and where the non-finite
  value first appears: a member ("sub-ensemble NAME member K", or "the model of W" for a single
  model), else the head, else the bias correction.
  """
  n = len(subjects)
  bad = np.zeros(n, bool)
  culprits: list[str] = []
  single = artifact.is_single_model(model)
  for sub in model.subs:
    values = np.asarray(prediction.members[sub.name], np.float64).reshape(n, -1)
    wrong = ~np.isfinite(values)
    bad |= wrong.any(axis=1)
    for k in np.flatnonzero(wrong.any(axis=0)):
      culprits.append(f"the model of {model.workdir}" if single
                      else f"sub-ensemble {sub.name} member {k}")
  ensemble = np.asarray(prediction.ensemble, np.float64)
  head = ~np.isfinite(ensemble) & ~bad
  if head.any():
    culprits.append(f"the ensemble head of {model.workdir}")
    bad |= head
  known = np.array([s.age is not None for s in subjects], bool)
  if model.correction.kind != "none" and known.any():
    ages = np.array([s.age if s.age is not None else np.nan for s in subjects], np.float64)
    corrected = np.full(n, np.nan)
    corrected[known] = prediction.corrected(ages[known])
    wrong = known & ~np.isfinite(corrected) & ~bad
    if wrong.any():
      culprits.append(f"the {model.correction.kind} bias correction of {model.workdir}")
      bad |= wrong
  if bad.any():
    ids = [f"{s.subject_id}" + (f" ses-{s.session}" if s.session else "")
           for s, b in zip(subjects, bad) if b]
    raise DataError(f"non-finite predicted age for {len(ids)} of {n} subjects ({_listed(ids)}) "
                    f"from {_listed(culprits, 3)}")


def write_predictions(path: str | os.PathLike, model: Ensemble, subjects: Sequence[Any],
                      prediction: EnsemblePrediction, qc: Sequence[Any] | None = None,
                      **options: Any) -> None:
  """Writes the predictions TSV atomically (`qc` and `options`: predictions_tsv's qc,
  calibration, level, parts); nothing when a prediction is not finite (`check_finite`'s
  DataError)."""
  check_finite(model, subjects, prediction)
  fileio.write_text(path, predictions_tsv(model, subjects, prediction, qc=qc, **options))


def qc_table(subjects: Sequence[Any], qc: Sequence[Any]) -> str:
  """The QC table of predicted subjects (`conformity.qc_tsv`: measures and flags per scan)."""
  return conformity.qc_tsv([s.subject_id for s in subjects], [s.session for s in subjects], qc)


def summary_metrics(ages: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
  """MAE, RMSE (years), Pearson r and mean brain-age gap of predictions with known ages."""
  ages = np.asarray(ages, np.float64)
  predicted = np.asarray(predicted, np.float64)
  gap = predicted - ages
  r = float(np.corrcoef(ages, predicted)[0, 1]) if len(ages) > 1 and np.std(predicted) > 0 else (
      math.nan)
  return {"mae": float(np.mean(np.abs(gap))), "rmse": float(np.sqrt(np.mean(gap ** 2))),
          "r": r, "mean_gap": float(np.mean(gap)), "n": int(len(ages))}
