"""Calibrating a trained model's prediction intervals on held-out labelled scans.

    from jax_brainage import calibration
    from jax_brainage.train import artifact
    model = artifact.load("runs/demo")
    dataset, source = calibration.calibration_dataset(model)       # the validation split
    cal = calibration.calibrate(model, dataset, source=source)
    calibration.save(model.workdir, cal)                          # W/calibration.json

The calibration scans are predicted through the one prediction path (`predict.predict_dataset`,
from their NIfTI files exactly as new data), so their residuals are those of the data the
intervals will be applied to. By default they are the workdir's validation split (W/split.json),
read from the dataset the training cache was prepared from; an imported model, or one whose
validation scans are not representative of the new data, is calibrated on a labelled BIDS
dataset the user gives (`--data`). The validation split also chose the best checkpoint and fit
the ensemble head and bias correction, so its residuals are slightly optimistic; the demo
measures the resulting coverage on the untouched test split. The conformal procedure itself is
`jax_brainage.ensemble.conformal`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jax_brainage import predict
from jax_brainage.data import augment, bids, splits
from jax_brainage.data import cache as cache_lib
from jax_brainage.ensemble import conformal
from jax_brainage.ensemble.model import Ensemble
from jax_brainage.errors import DataError
from jax_brainage.train import artifact


def calibration_dataset(model: Ensemble, data: Sequence[str | os.PathLike] | None = None, *,
                        session: str | None = None) -> tuple[Any, str]:
  """The labelled scans to calibrate on and a few words naming them.

  Args:
    model: `artifact.load(W)`; data: a labelled BIDS dataset (default: W's validation split,
      read from the dataset the first sub-ensemble's training cache was prepared from).
  """
  sequences = predict.model_inputs(model).sequences
  if data:
    dataset = predict.read_dataset(data, sequences, session=session)
    return dataset, " ".join(map(str, data))
  parts = splits.subject_parts(model.workdir)
  val = {s for s, name in parts.items() if name == "val"}
  if not val:
    raise DataError(f"{model.workdir}: records no validation split ({splits.SPLIT_FILE}); "
                    "calibrate on a labelled dataset (--data)")
  cache = cache_lib.Cache.open(Path(model.subs[0].cache_dir), verify=False)
  root = cache.index.get("source")
  if not root or not Path(root).is_dir():
    raise DataError(f"{model.subs[0].cache_dir}: the dataset it was prepared from ({root}) is "
                    "gone; calibrate on a labelled dataset (--data)")
  dataset = bids.read_bids(root, sequences, session=session)
  dataset = dataclasses.replace(dataset, subjects=tuple(s for s in dataset.subjects
                                                        if s.subject_id in val))
  return dataset, f"validation split of {model.workdir} ({root})"


def calibrate(model: Ensemble, dataset, *, source: str, batch_size: int = 8, workers: int = 1,
              normalize: bool | None = None, method: str = conformal.METHOD,
              pose_average: augment.PoseAverage | None = None) -> conformal.Calibration:
  """Predicts the labelled `dataset` and returns its `conformal.Calibration`.

  Args:
    normalize: residuals scaled by the members' spread (default: when the model has several
      members; a single model has no spread).
    method: how coverage is made to hold across ages, `conformal.METHODS` ("smooth": scores
      scaled by smooth functions of age, one quantile; "mondrian": age bins).
    pose_average: test-time augmentation of the calibration scans' predictions; predict with
      the same (it is recorded: `Calibration.pose_average`).
  Raises:
    DataError: a subject without age (named), too few subjects, a non-finite prediction.
  """
  unknown = [s.subject_id for s in dataset.subjects if s.age is None]
  if unknown:
    raise DataError(f"{source}: calibration needs every subject's age; {unknown[0]} has none")
  subjects, prediction, skipped = predict.predict_dataset(model, dataset, batch_size=batch_size,
                                                          workers=workers,
                                                          pose_average=pose_average)
  predict.check_finite(model, subjects, prediction)
  ages = np.asarray([s.age for s in subjects], np.float64)
  if normalize is None:
    normalize = model.n_members > 1
  return conformal.calibration_from_rows(
      [s.subject_id for s in subjects], ages, prediction.ensemble, prediction.corrected(ages),
      prediction.spread, source=source, normalize=normalize, model=artifact.describe(model),
      method=method, pose_average=(pose_average or augment.PoseAverage()).describe())


def save(workdir: str | os.PathLike, cal: conformal.Calibration) -> Path:
  """Stores the calibration in the workdir (W/calibration.json, atomically); its path."""
  path = conformal.calibration_path(workdir)
  conformal.save_calibration(path, cal)
  return path
