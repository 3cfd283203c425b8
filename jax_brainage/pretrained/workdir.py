"""Pretrained models as workdirs: import (a published file, or an exported folder), export, and
an ensemble of imported models with a head fitted on the user's labelled scans.

An imported workdir W is what `train.artifact.load(W)` reads as any trained one:

    W/ensemble/        the ensemble store (`ensemble.store`): one sub-ensemble "model" of one
                       member, identity head, no bias correction -- a single model, so predict and
                       explain treat it as one; its manifest's info holds the import record
    W/preprocessing/   a cache of no subjects (`data.prepare.write_record`): the `Preprocessing`
                       that prepares new data for the model (cube shape, voxel size, scaling)
    W/import.json      the import record: format, the source project and what it was trained
                       with (orientation, intensity scaling, age range), the weights file's name,
                       size and sha256

An export folder (`export`) is self-describing and needs nothing of W:

    DIR/weights.npz    every sub-ensemble's stacked variables, keys "<sub>/<collection>/<layer>/
                       <name>" (float32; np.load(allow_pickle=False))
    DIR/manifest.json  kind "jax_brainage.export", format version, per sub-ensemble the model
                       manifest, sequences, regions, member count and preprocessing record (with
                       the cube's voxel size), the head and bias correction, provenance (import
                       record or training workdir and step), and the sha256 of weights.npz

`import_export(DIR, W)` reads it back into a workdir whose predictions equal the original's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jax_brainage import fileio, models, predict
from jax_brainage.data import cache as cache_lib
from jax_brainage.data import prepare as prepare_lib
from jax_brainage.data.preprocess import Preprocessing
from jax_brainage.ensemble import correction as correction_lib
from jax_brainage.ensemble import head as head_lib
from jax_brainage.ensemble import store
from jax_brainage.ensemble.model import (Ensemble, SubEnsemble, fit_ensemble_from_predictions,
                                         identity)
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.pretrained import sources
from jax_brainage.train import artifact

IMPORT_RECORD = "import.json"
PREPROCESSING = "preprocessing"
EXPORT_KIND = "jax_brainage.export"
EXPORT_VERSION = 1
EXPORT_WEIGHTS = "weights.npz"
EXPORT_MANIFEST = "manifest.json"


def sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file (streamed in 1 MiB blocks)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _claim(workdir: Path) -> None:
  """Refuses a workdir that already holds something (a trained model would be overwritten)."""
  if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
    raise ConfigError(f"--workdir {workdir}: exists and is not empty (import into a new "
                      "directory)")


def _write(workdir: Path, subs: Sequence[SubEnsemble], head: head_lib.MultiLevelHead | None,
           correction: correction_lib.Correction | None, info: Mapping[str, Any]) -> Ensemble:
  if head is None:
    ensemble = identity(subs[0], workdir=workdir.resolve(), info=info)
  else:
    ensemble = Ensemble(tuple(subs), head, correction or correction_lib.Correction("none"),
                        workdir.resolve(), dict(info))
  store.save_ensemble(workdir, ensemble)
  return ensemble


def _preprocessing_record(workdir: Path, name: str, prep: Preprocessing, source: str) -> Path:
  where = workdir / PREPROCESSING / name
  prepare_lib.write_record(where, prep, source=source)
  return where.resolve()


def import_model(format: str, weights: str | os.PathLike, workdir: str | os.PathLike, *,
                 sequences: Sequence[str] = ("T1w",), image_shape: Sequence[int] | None = None,
                 age_range: Sequence[float] | None = None,
                 voxel_size: float | None = None) -> Ensemble:
  """Converts a published weights file (`sources.SOURCES`) into workdir W; returns the model.

  Args:
    format: "mrinet-keras", "sfcn-torch" or "pyment-keras".
    weights: the file as published (Keras `.h5`, PyTorch state dict).
    sequences: the input channel(s) (e.g. ("FLAIR",) for the study's FLAIR model).
    image_shape: input array shape in the source's orientation (default: the source's).
    age_range: sfcn-torch: (first bin start, ignored end) years; pyment-keras: the output range
      (sfcn-reg) or the integer ages of the classes (sfcn-sm).
    voxel_size: mm of the cube new data are resampled to (default: the source's, 1 mm).
  Raises:
    DataError naming the file (and the first mismatching layer); ConfigError for a non-empty W.
  """
  workdir, weights = Path(workdir), Path(weights)
  _claim(workdir)
  options: dict[str, Any] = {"sequences": tuple(sequences), "image_shape": image_shape}
  if format == "sfcn-torch" and age_range is not None:
    options["age_start"] = float(age_range[0])
  elif format == "pyment-keras":
    options["age_range"] = age_range
  imported = sources.import_weights(format, weights, **options)
  source = imported.source
  manifest = imported.manifest
  prep = Preprocessing(sequences=tuple(sequences), shape=tuple(manifest["image_shape"]),
                       voxel_size=float(voxel_size or source.voxel_size),
                       scaling=source.scaling,
                       ceiling_percentile=source.ceiling_percentile,
                       mean_over_voxels=source.mean_over_voxels)
  record = {"format": format, "imported": _now(), "source": source.record(),
            "weights": {"file": weights.name, "path": str(weights.resolve()),
                        "bytes": weights.stat().st_size, "sha256": sha256(weights)},
            "model": manifest["model"], "model_kwargs": manifest["model_kwargs"],
            "input_shape_ras": manifest["image_shape"], "sequences": list(sequences),
            "preprocessing": prep.to_dict()}
  workdir.mkdir(parents=True, exist_ok=True)
  where = _preprocessing_record(workdir, artifact.SINGLE, prep, f"import of {weights.name}")
  sub = SubEnsemble(name=artifact.SINGLE, sequences=tuple(sequences), regions=(),
                    manifest=manifest, members=1,
                    variables=jax.tree.map(lambda a: a[None], imported.variables),
                    cache_dir=str(where), preprocessing=prep.to_dict(),
                    workdir=str(workdir.resolve()))
  ensemble = _write(workdir, [sub], None, None, {"imported": record})
  fileio.write_json(workdir / IMPORT_RECORD, record)
  return ensemble


# ---------------------------------------------------------------------------------------------
# Export and import of self-describing folders.


def _flat(tree: Any, prefix: str) -> dict[str, np.ndarray]:
  if isinstance(tree, Mapping):
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
      if "/" in str(k):
        raise ConfigError(f"layer name {k!r} contains '/': cannot be exported")
      out.update(_flat(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}


def _unflat(arrays: Mapping[str, np.ndarray], name: str) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in arrays.items():
    parts = key.split("/")
    if parts[0] != name:
      continue
    node = tree
    for p in parts[1:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = np.asarray(value)
  return tree


def _voxel_size(sub: SubEnsemble) -> list[float] | None:
  index = Path(sub.cache_dir or "") / cache_lib.INDEX
  if sub.cache_dir and index.is_file():
    try:
      return json.loads(index.read_text(encoding="utf-8")).get("voxel_size")
    except (OSError, ValueError):
      return None
  return None


def export(workdir: str | os.PathLike, out: str | os.PathLike,
           checkpoint: str = "best") -> Path:
  """Writes the trained or imported model of W as a self-describing folder OUT (module
  docstring); written under a temporary name and renamed, so OUT is complete or absent."""
  model = artifact.load(workdir, checkpoint)
  out = Path(out)
  if out.exists():
    raise ConfigError(f"--out {out}: exists (export into a new directory)")
  subs = []
  arrays: dict[str, np.ndarray] = {}
  for sub in model.subs:
    prep = sub.preprocessing
    if prep is None and sub.cache_dir and (Path(sub.cache_dir) / cache_lib.INDEX).is_file():
      prep = cache_lib.Cache.open(sub.cache_dir, verify=False).preprocessing.to_dict()
    if prep is None:
      raise DataError(f"{workdir}: sub-ensemble {sub.name} records no preprocessing (its "
                      "training cache is gone): nothing tells a user how to prepare data for it")
    if (prep or {}).get("regions"):
      raise ConfigError(f"{workdir}: sub-ensemble {sub.name} reads atlas regions; exporting "
                        "region-masked models (the atlas) is not supported")
    arrays.update(_flat(sub.variables, sub.name))
    subs.append({"name": sub.name, "sequences": list(sub.sequences),
                 "regions": list(sub.regions), "members": sub.members,
                 "model_manifest": fileio.jsonable(dict(sub.manifest)),
                 "preprocessing": fileio.jsonable(dict(prep)),
                 "voxel_size": _voxel_size(sub), "step": sub.step})
  info = dict(model.info)
  provenance = {"workdir": str(model.workdir), "exported": _now(),
                "imported": info.get("imported"), "checkpoint": checkpoint}
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    with open(tmp / EXPORT_WEIGHTS, "wb") as f:
      np.savez(f, **{k: v.astype(np.float32) if v.dtype.kind == "f" else v
                     for k, v in arrays.items()})
    manifest = {"kind": EXPORT_KIND, "format_version": EXPORT_VERSION, "sub_ensembles": subs,
                "head": model.head.to_dict(), "correction": model.correction.to_dict(),
                "single_model": artifact.is_single_model(model), "provenance": provenance,
                "files": {EXPORT_WEIGHTS: {"sha256": sha256(tmp / EXPORT_WEIGHTS),
                                           "bytes": (tmp / EXPORT_WEIGHTS).stat().st_size}}}
    fileio.write_json(tmp / EXPORT_MANIFEST, fileio.jsonable(manifest))
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def read_export(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(manifest, arrays) of an export folder, its checksum verified.

  Raises DataError naming the file when the manifest is missing or unreadable, or weights.npz is
  missing, truncated or altered (sha256 differs)."""
  folder = Path(folder)
  path = folder / EXPORT_MANIFEST
  if not path.is_file():
    raise DataError(f"{folder}: not an exported model (no {EXPORT_MANIFEST})")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable manifest ({type(e).__name__})") from None
  if not isinstance(manifest, dict) or manifest.get("kind") != EXPORT_KIND:
    raise DataError(f"{path}: not a jax_brainage export manifest")
  if int(manifest.get("format_version", 0)) > EXPORT_VERSION:
    raise DataError(f"{path}: export format {manifest.get('format_version')} is newer than this "
                    f"jax_brainage reads ({EXPORT_VERSION})")
  weights = folder / EXPORT_WEIGHTS
  if not weights.is_file():
    raise DataError(f"{weights}: missing")
  want = ((manifest.get("files") or {}).get(EXPORT_WEIGHTS) or {}).get("sha256")
  if want != sha256(weights):
    raise DataError(f"{weights}: checksum differs from {EXPORT_MANIFEST} (truncated or altered)")
  try:
    with np.load(weights, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise DataError(f"{weights}: unreadable ({type(e).__name__})") from None
  return manifest, arrays


def import_export(folder: str | os.PathLike, workdir: str | os.PathLike) -> Ensemble:
  """An export folder back into workdir W (`brainage import --format jax-brainage`)."""
  folder, workdir = Path(folder), Path(workdir)
  _claim(workdir)
  manifest, arrays = read_export(folder)
  subs = []
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    for s in manifest["sub_ensembles"]:
      prep = Preprocessing.from_dict(s["preprocessing"])
      if prep.voxel_size is None and s.get("voxel_size"):
        # A cache without resampling fixed the voxel size through its data: keep that check.
        prep = Preprocessing.from_dict({**prep.to_dict(), "voxel_size": s["voxel_size"][0]})
      where = _preprocessing_record(workdir, s["name"], prep, f"export {folder.name}")
      subs.append(SubEnsemble(
          name=s["name"], sequences=tuple(s["sequences"]), regions=tuple(s["regions"]),
          manifest=s["model_manifest"], members=int(s["members"]),
          variables=_unflat(arrays, s["name"]), cache_dir=str(where),
          preprocessing=prep.to_dict(), workdir=str(workdir.resolve()), step=s.get("step")))
    head = head_lib.MultiLevelHead.from_dict(manifest["head"])
    correction = correction_lib.Correction.from_dict(manifest["correction"])
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{folder / EXPORT_MANIFEST}: incomplete manifest ({type(e).__name__}: "
                    f"{e})") from None
  info = {"imported": {"format": "jax-brainage", "folder": str(folder.resolve()),
                       "provenance": manifest.get("provenance")}}
  for s in subs:  # the arrays must be those of the manifest's model
    models.check_shapes(s.variables, models.variable_shapes(s.manifest, s.members),
                              folder / EXPORT_WEIGHTS)
  ensemble = _write(workdir, subs, head, correction, info)
  fileio.write_json(workdir / IMPORT_RECORD, info["imported"])
  return ensemble


# ---------------------------------------------------------------------------------------------
# Several imported (or trained single-model) workdirs as one ensemble.


def ensemble_of(members: Sequence[str | os.PathLike], data: Sequence[str | os.PathLike],
                workdir: str | os.PathLike, *, head: str = "linear", folds: int = 5,
                correction: str = "linear", batch_size: int = 4) -> Ensemble:
  """Single-model workdirs (e.g. the study's T1w, FLAIR and SWI MRInets) as one multi-level
  ensemble in W, its head and bias correction fitted on labelled scans `data` (a BIDS dataset
  with ages in participants.tsv, holding every member's sequences). Each member is predicted on
  the subjects it can read; the head is fitted on the subjects every member predicted."""
  workdir = Path(workdir)
  _claim(workdir)
  if len(members) < 2:
    raise ConfigError("--members: an ensemble needs at least two workdirs")
  subs: list[SubEnsemble] = []
  predictions: dict[str, dict[str, np.ndarray]] = {}
  ages: dict[str, float] = {}
  for w in members:
    model = artifact.load(w)
    if not artifact.is_single_model(model):
      raise ConfigError(f"--members {w}: holds an ensemble; give single-model workdirs")
    sub = model.subs[0]
    name = Path(w).resolve().name
    if name in predictions:
      raise ConfigError(f"--members {w}: two members are named {name} (directory names)")
    inputs = predict.model_inputs(model)
    dataset = predict.read_dataset(data, inputs.sequences)
    done, prediction, _ = predict.predict_dataset(model, dataset, batch_size=batch_size,
                                                  inputs=inputs)
    key = lambda s: f"{s.subject_id}/{s.session or ''}"
    predictions[name] = {key(s): np.asarray(p, np.float64)
                         for s, p in zip(done, prediction.members[sub.name])}
    ages.update({key(s): s.age for s in done if s.age is not None})
    subs.append(SubEnsemble(name=name, sequences=sub.sequences, regions=sub.regions,
                            manifest=sub.manifest, members=sub.members, variables=sub.variables,
                            cache_dir=sub.cache_dir, preprocessing=sub.preprocessing,
                            workdir=str(Path(w).resolve()), step=sub.step))
  common = sorted(set.intersection(*(set(p) for p in predictions.values())) & set(ages))
  if len(common) < max(3, folds):
    raise DataError(f"{' '.join(map(str, data))}: {len(common)} subjects with an age that every "
                    f"member can read; the head needs at least {max(3, folds)}")
  stacked = {name: np.stack([p[k] for k in common])
             for name, p in predictions.items()}
  fitted = fit_ensemble_from_predictions(subs, stacked, np.array([ages[k] for k in common]),
                                         head=head, folds=folds, correction=correction,
                                         workdir=workdir.resolve(),
                                         info={"members_of": [str(Path(w).resolve())
                                                              for w in members],
                                               "calibration": [str(d) for d in data],
                                               "calibration_subjects": len(common)})
  workdir.mkdir(parents=True, exist_ok=True)
  store.save_ensemble(workdir, fitted)
  return fitted
