"""The ensemble as a model: sub-ensembles of stacked members, the head over them, the bias
correction of the gap, and their jitted forward pass.

A single trained model is an ensemble of one: one sub-ensemble of one member, an identity head
and no correction (`artifact.load` builds it), so prediction and relevance have one path.

A sub-ensemble's members share one architecture and input (its sequences, its regions), so their
parameters stack along a leading member axis and one `jax.vmap` over that axis evaluates them
all in one jitted call; batches of subjects are split over the devices ('data' axis). Applying it
to inputs of other sequences, shape or regions is a one-line DataError naming the culprit.
Saving and loading is `jax_brainage.ensemble.store`; building one from training workdirs is
`jax_brainage.train.artifact`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from jax_brainage import fileio, models, sharding
from jax_brainage.data import augment, intensity
from jax_brainage.data.preprocess import Preprocessing
from jax_brainage.ensemble import correction as correction_lib
from jax_brainage.ensemble import head as head_lib
from jax_brainage.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------------------
# Sub-ensembles and the ensemble.


@dataclasses.dataclass(frozen=True, eq=False)
class SubEnsemble:
  """M members of one architecture and input, parameters stacked along a leading member axis.

  Attributes:
    name: identifier (W/sub/<name>, TSV column pred_<name>).
    sequences: input channels, in order (e.g. ("T1w",)).
    regions: atlas regions the input is restricted to (names or labels); () = whole brain.
    manifest: the model's manifest (`artifact.model_manifest`: model,
      model_kwargs, image_shape, sequences, mean_train_age, ...).
    members: M.
    variables: {"params": ..., **model_state}, every leaf `[M, ...]` (host numpy arrays).
    cache_dir: the cache the members were trained on (its preprocessing prepares new data).
    preprocessing: that cache's `Preprocessing` record (dict) at training time, to detect a
      cache prepared again differently; None if unknown.
    workdir: the sub-ensemble's training workdir, if any (provenance only).
    step: the training step of its checkpoint, if known (provenance only).
  """

  name: str
  sequences: tuple[str, ...]
  regions: tuple[str, ...]
  manifest: Mapping[str, Any]
  members: int
  variables: Any
  cache_dir: str | os.PathLike | None = None
  preprocessing: Mapping[str, Any] | None = None
  workdir: str | os.PathLike | None = None
  step: int | None = None
  # Built model, jitted forward and device-placed variables (not copied by dataclasses.replace).
  _compiled: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "sequences", tuple(self.sequences))
    object.__setattr__(self, "regions", tuple(str(r) for r in self.regions))
    object.__setattr__(self, "members", int(self.members))
    if tuple(self.manifest.get("sequences", ())) != self.sequences:
      raise ConfigError(f"sub-ensemble {self.name}: sequences {list(self.sequences)} differ from "
                        f"its model's {list(self.manifest.get('sequences', ()))}")
    for leaf in jax.tree.leaves(self.variables):
      if np.ndim(leaf) < 1 or np.shape(leaf)[0] != self.members:
        raise ConfigError(f"sub-ensemble {self.name}: variables must be stacked [members="
                          f"{self.members}, ...], a leaf has shape {np.shape(leaf)}")

  @property
  def model(self):
    if "model" not in self._compiled:
      self._compiled["model"] = models.build_model(self.manifest)
    return self._compiled["model"]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(int(s) for s in self.manifest["image_shape"])

  @property
  def input_shape(self) -> tuple[int, int, int, int]:
    """`[X, Y, Z, C]` of one subject's input."""
    return (*self.image_shape, len(self.sequences))

  def member_variables(self, m: int) -> Any:
    """Member m's own (unstacked) variables."""
    return jax.tree.map(lambda a: a[m], self.variables)

  def check_inputs(self, shape: Sequence[int], where: str = "input") -> None:
    """DataError unless `shape` is `[n, X, Y, Z, C]` of this sub-ensemble's input."""
    if len(shape) != 5 or tuple(shape[1:]) != self.input_shape:
      expects = ", ".join(map(str, self.input_shape))
      raise DataError(f"{where}: sub-ensemble {self.name} expects [n, {expects}] "
                      f"({'+'.join(self.sequences)}"
                      f"{' @ ' + '+'.join(self.regions) if self.regions else ''}), got "
                      f"{list(shape)}")

  def forward(self, pose_average: augment.PoseAverage | None = None) -> Callable:
    """Jitted `(stacked variables, volumes [n, X, Y, Z, C]) -> predicted ages [n, M]` (years).

    Volumes are uint8 (scaled / 255 as in training) or floating (used as they are). With a
    `pose_average` every member's estimate is its mean over the poses (test-time augmentation).
    """
    pose_average = pose_average or augment.PoseAverage()
    key = ("forward", pose_average)
    if key not in self._compiled:
      model = models.lowering.for_inference(self.model)  # im2col convs on CPU: same numbers

      def apply(variables, volumes):
        def ages(x):
          def one(v):  # one member on the whole batch
            return models.predicted_age(model, model.apply(v, x, train=False))

          return jax.vmap(one)(variables).T  # [M, n] -> [n, M]

        return pose_average.average(ages, intensity.to_unit_float(volumes))

      self._compiled[key] = jax.jit(apply)
    return self._compiled[key]

  def member_groups(self, members_per_call: int = 0) -> list[slice]:
    """Member slices evaluated per call: all at once (0, the default) or groups of
    `members_per_call` (to bound device memory, which grows with members x batch)."""
    width = self.members if members_per_call <= 0 else min(int(members_per_call), self.members)
    return [slice(a, min(a + width, self.members)) for a in range(0, self.members, width)]

  def predict(self, volumes: Any, batch_size: int = 8,
              devices: Sequence[jax.Device] | None = None, *,
              members_per_call: int = 0,
              pose_average: augment.PoseAverage | None = None) -> np.ndarray:
    """Every member's predicted age `[n, M]` (years, float32) of volumes `[n, X, Y, Z, C]`.

    Fixed-size batches (the last one padded: one compiled shape) split over `devices` (default:
    this process's); all members in the same call unless `members_per_call` > 0 (groups of
    members one after another, for memory); averaged over the poses of `pose_average`
    (test-time augmentation, `augment.PoseAverage`) when given.
    """
    volumes = np.asarray(volumes) if not isinstance(volumes, np.ndarray) else volumes
    self.check_inputs(volumes.shape)
    mesh = sharding.make_mesh(devices=list(devices or jax.local_devices()))
    d = sharding.data_size(mesh)
    batch_size = max(d, int(math.ceil(max(1, batch_size) / d)) * d)
    groups = self.member_groups(members_per_call)
    # The members' variables are placed on the devices once per device set and grouping.
    key = ("placed", tuple(mesh.devices.flat), tuple((g.start, g.stop) for g in groups))
    if key not in self._compiled:
      self._compiled[key] = [sharding.put_replicated(mesh, jax.tree.map(lambda a: a[g],
                                                                        self.variables))
                             for g in groups]
    placed = self._compiled[key]
    batch = sharding.batch_sharding(mesh)
    forward = self.forward(pose_average)
    out = []
    for start in range(0, len(volumes), batch_size):
      chunk = np.ascontiguousarray(volumes[start:start + batch_size])
      k = len(chunk)
      if k < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - k, *chunk.shape[1:]),
                                                chunk.dtype)])
      x = jax.device_put(chunk, batch)
      # Dispatch is asynchronous: the next chunk is read and sent while this one computes;
      # the small [batch, M] results are fetched once at the end.
      out.append(([forward(v, x) for v in placed], k))
    if not out:
      return np.zeros((0, self.members), np.float32)
    return np.concatenate([np.concatenate([np.asarray(a) for a in parts], axis=1)[:k]
                           for parts, k in jax.device_get(out)]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class EnsemblePrediction:
  """An ensemble's predictions of n subjects (years).

  Attributes:
    members: {sub name: `[n, M_name]`} every member's predicted age.
    subs: {sub name: `[n]`} each sub-ensemble's (level-1 head) prediction.
    ensemble: `[n]` the multi-level ensemble's prediction.
    spread: `[n]` uncertainty: standard deviation of all members' predictions.
    correction: the bias correction fit on validation data.
  """

  members: Mapping[str, np.ndarray]
  subs: Mapping[str, np.ndarray]
  ensemble: np.ndarray
  spread: np.ndarray
  correction: correction_lib.Correction

  def gap(self, age: Any) -> np.ndarray:
    """Brain-age gap `[n]` = ensemble - age (years)."""
    return self.ensemble - np.asarray(age, np.float64)

  def corrected(self, age: Any) -> np.ndarray:
    """Bias-corrected predicted age `[n]` (years) given chronological ages `[n]`."""
    return self.correction.apply(self.ensemble, age)

  def corrected_gap(self, age: Any) -> np.ndarray:
    return self.correction.corrected_gap(self.ensemble, age)


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
  """Sub-ensembles, the multi-level head over them and the bias correction of the gap.

  Attributes:
    subs: the sub-ensembles, in the head's (level-2) order.
    head: `head.MultiLevelHead` fit on validation predictions.
    correction: `correction.Correction` fit on validation predictions.
    workdir: the experiment workdir (the store is workdir/ensemble), or None.
    info: extra JSON-able record kept in the manifest (e.g. validation metrics, split).
  """

  subs: tuple[SubEnsemble, ...]
  head: head_lib.MultiLevelHead
  correction: correction_lib.Correction
  workdir: str | os.PathLike | None = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "subs", tuple(self.subs))
    names = tuple(s.name for s in self.subs)
    if len(set(names)) != len(names):
      raise ConfigError(f"ensemble: sub-ensemble names repeat: {list(names)}")
    if names != tuple(self.head.names):
      raise ConfigError(f"ensemble: head is over {list(self.head.names)}, sub-ensembles are "
                        f"{list(names)}")
    for s in self.subs:
      if self.head.level1[s.name].k != s.members:
        raise ConfigError(f"ensemble: head of {s.name} weighs {self.head.level1[s.name].k} "
                          f"members, the sub-ensemble has {s.members}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.subs)

  @property
  def n_members(self) -> int:
    return sum(s.members for s in self.subs)

  def sub(self, name: str) -> SubEnsemble:
    for s in self.subs:
      if s.name == name:
        return s
    raise ConfigError(f"ensemble: no sub-ensemble {name!r} (have {', '.join(self.names)})")

  def member_weights(self) -> dict[str, np.ndarray]:
    """{sub name: `[M]`} each member's effective weight in the ensemble prediction."""
    return self.head.member_weights()

  def _inputs(self, inputs: Mapping[str, Any] | Any) -> dict[str, Any]:
    if not isinstance(inputs, Mapping):
      if len(self.subs) != 1:
        raise DataError(f"ensemble: give inputs per sub-ensemble ({', '.join(self.names)})")
      inputs = {self.subs[0].name: inputs}
    missing = [n for n in self.names if n not in inputs]
    if missing:
      raise DataError(f"ensemble: no input volumes for sub-ensemble {missing[0]!r}")
    counts = {s: len(inputs[s]) for s in self.names}
    if len(set(counts.values())) != 1:
      raise DataError("ensemble: sub-ensembles' inputs hold different numbers of subjects ("
                      + ", ".join(f"{s}: {n}" for s, n in counts.items()) + ")")
    return {s: inputs[s] for s in self.names}

  def predict_members(self, inputs: Mapping[str, Any], batch_size: int = 8, *,
                      members_per_call: int = 0,
                      pose_average: augment.PoseAverage | None = None) -> dict[str, np.ndarray]:
    """{sub name: volumes `[n, X, Y, Z, C]`} -> {sub name: members' predicted ages `[n, M]`}.

    A single-sub-ensemble ensemble also takes the volumes array itself. `members_per_call`,
    `pose_average`: see `SubEnsemble.predict` (0: every member of a sub-ensemble in one call;
    None: no test-time augmentation).
    """
    inputs = self._inputs(inputs)
    return {s.name: s.predict(inputs[s.name], batch_size, members_per_call=members_per_call,
                              pose_average=pose_average)
            for s in self.subs}

  def predict(self, inputs: Mapping[str, Any], batch_size: int = 8, *,
              members_per_call: int = 0,
              pose_average: augment.PoseAverage | None = None) -> EnsemblePrediction:
    """Member, sub-ensemble and ensemble predictions with their spread (years)."""
    members = self.predict_members(inputs, batch_size, members_per_call=members_per_call,
                                   pose_average=pose_average)
    return self.combine(members)

  def combine(self, members: Mapping[str, np.ndarray]) -> EnsemblePrediction:
    """The head and spread applied to member predictions {sub name: `[n, M]`}."""
    return EnsemblePrediction(
        members=dict(members), subs=self.head.sub_predictions(members),
        ensemble=self.head.apply(members), spread=head_lib.member_spread(members),
        correction=self.correction)


def identity(sub: SubEnsemble, *, workdir: str | os.PathLike | None = None,
             info: Mapping[str, Any] | None = None) -> "Ensemble":
  """An ensemble of one sub-ensemble whose prediction is its members' mean (one member: the
  model itself), with no bias correction: how a single trained model is held."""
  level1 = {sub.name: head_lib.mean_head(sub.members)}
  head = head_lib.MultiLevelHead(level1, head_lib.LinearHead(np.ones(1), 0.0, "identity"),
                                 (sub.name,), kind="identity")
  return Ensemble((sub,), head, correction_lib.Correction("none"), workdir, dict(info or {}))


# ---------------------------------------------------------------------------------------------
# Fitting the head and correction on validation data.


def fit_ensemble(subs: Sequence[SubEnsemble], inputs: Mapping[str, Any], ages: Any, *,
                 head: str = "linear", folds: int = 5, correction: str = "linear",
                 seed: int = 0, batch_size: int = 8, workdir: str | os.PathLike | None = None,
                 info: Mapping[str, Any] | None = None) -> Ensemble:
  """Predicts validation volumes with every member, fits the multi-level head and the bias
  correction on them (ages in years), and returns the ensemble.

  Args:
    inputs: {sub name: validation volumes `[n, X, Y, Z, C]`}; ages: `[n]`.
    head: "linear" | "nonnegative" | "mean"; folds: K of the level-2 cross-validation.
    correction: "none" | "linear" | "poly3".
  """
  ages = np.asarray(ages, np.float64)
  members = {s.name: s.predict(inputs[s.name], batch_size) for s in subs}
  return fit_ensemble_from_predictions(subs, members, ages, head=head, folds=folds,
                                       correction=correction, seed=seed, workdir=workdir,
                                       info=info)


def fit_ensemble_from_predictions(subs: Sequence[SubEnsemble], members: Mapping[str, Any],
                                  ages: Any, *, head: str = "linear", folds: int = 5,
                                  correction: str = "linear", seed: int = 0,
                                  workdir: str | os.PathLike | None = None,
                                  info: Mapping[str, Any] | None = None) -> Ensemble:
  """As `fit_ensemble`, from members' validation predictions {sub name: `[n, M]`} (years)."""
  ages = np.asarray(ages, np.float64)
  ordered = {s.name: np.asarray(members[s.name], np.float64) for s in subs}
  multilevel = head_lib.fit_multilevel(ordered, ages, kind=head, folds=folds, seed=seed)
  fitted = correction_lib.fit_correction(correction, ages, multilevel.apply(ordered))
  record = dict(info or {})
  record.setdefault("validation", validation_metrics(multilevel, fitted, ordered, ages))
  return Ensemble(tuple(subs), multilevel, fitted, workdir, record)


def validation_metrics(head: head_lib.MultiLevelHead, correction: correction_lib.Correction,
                       members: Mapping[str, np.ndarray], ages: np.ndarray) -> dict[str, Any]:
  """MAEs (years) of members, sub-ensembles and the ensemble on the data the head was fit on
  (in-sample for the head; the level-2 cross-validated MAE is `head.oof_mae`)."""
  ages = np.asarray(ages, np.float64)
  ens = head.apply(members)
  subs = head.sub_predictions(members)
  out = dict(correction_lib.gap_metrics(ages, ens, correction.apply(ens, ages)))
  out["mae_cross_validated"] = head.oof_mae
  out["mae_subs"] = {n: float(np.mean(np.abs(p - ages))) for n, p in subs.items()}
  out["mae_members"] = {n: [float(v) for v in np.mean(np.abs(p - ages[:, None]), axis=0)]
                        for n, p in members.items()}
  return fileio.jsonable(out)



def check_cache(sub: SubEnsemble, cache, who: str | None = None) -> None:
  """DataError unless `cache` (a `data.cache.Cache`) prepares this sub-ensemble's input: the
  same cube shape, the sub-ensemble's sequences, and the preprocessing (incl. regions) it was
  trained with. `who` names the model in errors (default "sub-ensemble NAME")."""
  who = who or f"sub-ensemble {sub.name}"
  where = f"{cache.path}"
  if tuple(int(s) for s in cache.shape) != sub.image_shape:
    raise DataError(f"{where}: cubes are {tuple(cache.shape)} voxels, {who} "
                    f"expects {sub.image_shape} (was the cache prepared again with another "
                    "shape?)")
  missing = [q for q in sub.sequences if q not in cache.sequences]
  if missing:
    raise DataError(f"{where}: has no sequence {missing[0]!r} that {who} reads")
  if sub.preprocessing is not None:
    now = fileio.jsonable(cache.preprocessing.to_dict())
    # A record written before a preprocessing option existed meant that option's default.
    recorded = {**fileio.jsonable(Preprocessing().to_dict()), **sub.preprocessing}
    for key in sorted(set(now) | set(recorded)):
      a, b = fileio.jsonable(recorded.get(key)), now.get(key)
      if a != b:
        raise DataError(f"{where}: preprocessing {key} is {b!r} now, {who} "
                        f"was trained with {a!r} (was the cache prepared again?)")


# ---------------------------------------------------------------------------------------------
# Held-out metrics.


def ensemble_metrics(ensemble: Ensemble, inputs: Mapping[str, Any], ages: Any, *,
                     batch_size: int = 8) -> dict[str, Any]:
  """The demo's ensemble summary on held-out subjects (ages in years).

  Returns:
    mae_ensemble, mae_best_member (the lowest MAE of any member on these subjects: the
    strictest comparison for the ensemble), mae_member_best_on_validation (these subjects' MAE
    of the member with the best validation MAE, None if the store has no validation record),
    mae_corrected (after the validation-fit bias correction), spearman_gap_age and
    spearman_gap_age_corrected (rank correlation of the gap with age), mean_spread (years),
    n_members, mae_subs {name: MAE}.
  """
  return prediction_metrics(ensemble, ensemble.predict(inputs, batch_size), ages)


def prediction_metrics(ensemble: Ensemble, pred: EnsemblePrediction, ages: Any) -> dict[str, Any]:
  """`ensemble_metrics` of predictions already made (e.g. by `brainage predict`'s path)."""
  ages = np.asarray(ages, np.float64)
  metrics = correction_lib.gap_metrics(ages, pred.ensemble, pred.corrected(ages))
  member_mae = np.concatenate([np.mean(np.abs(p - ages[:, None]), axis=0)
                               for p in pred.members.values()])
  # The member a user would have picked without the test data: best validation MAE.
  val = (ensemble.info.get("validation") or {}).get("mae_members") or {}
  val_mae = np.concatenate([np.asarray(val.get(s.name) or [np.nan] * s.members, np.float64)
                            for s in ensemble.subs])
  by_val = (float(member_mae[int(np.nanargmin(val_mae))])
            if len(val_mae) == len(member_mae) and np.isfinite(val_mae).any() else None)
  return fileio.jsonable({
      "mae_ensemble": metrics["mae"], "mae_best_member": float(member_mae.min()),
      "mae_member_best_on_validation": by_val,
      "mae_corrected": metrics["mae_corrected"],
      "spearman_gap_age": metrics["spearman_gap_age"],
      "spearman_gap_age_corrected": metrics["spearman_gap_age_corrected"],
      "mean_spread": float(np.mean(pred.spread)) if len(ages) else math.nan,
      "n_members": ensemble.n_members,
      "mae_subs": {n: float(np.mean(np.abs(p - ages))) for n, p in pred.subs.items()},
  })


