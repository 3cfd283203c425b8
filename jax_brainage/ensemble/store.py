"""The ensemble store: an `Ensemble` saved as ONE orbax checkpoint W/ensemble.

Layout (inside an experiment workdir W, see `jax_brainage.train.experiment`):

    W/ensemble/                 one orbax checkpoint (written to a temporary name, then renamed)
      variables/                {sub-ensemble name: stacked variables, every leaf [M, ...]}
      manifest/metadata         JSON manifest (MANIFEST_KIND, FORMAT_VERSION): per sub-ensemble
                                its name, sequences, regions, model manifest, member count, the
                                cache (and its preprocessing record) it was trained on, and the
                                head weights (both levels, effective member weights) and the
                                bias correction
      checksums.json            size and BLAKE2b digest of every file (`jax_brainage.integrity`)

Loading a store whose arrays do not fit its models is a one-line ConfigError naming the store;
a store whose files fail their checksums (truncated, overwritten, a garbled manifest) or cannot
be decoded is a one-line DataError naming the file. The record is written into W/ensemble.tmp
before the rename, so a complete store always carries it; stores written before it existed load
unverified.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jax_brainage import fileio, integrity, models
from jax_brainage.ensemble import correction as correction_lib
from jax_brainage.ensemble import head as head_lib
from jax_brainage.ensemble.model import Ensemble, SubEnsemble
from jax_brainage.errors import BrainAgeError, ConfigError

STORE = "ensemble"
MANIFEST_KIND = "jax_brainage.ensemble"
FORMAT_VERSION = 1


def store_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir).resolve() / STORE


def is_ensemble_workdir(workdir: str | os.PathLike) -> bool:
  """True when W holds an ensemble store (W/ensemble with its manifest)."""
  return (store_dir(workdir) / "manifest" / "metadata").is_file()


def _handler():
  return ocp.CompositeCheckpointHandler(variables=ocp.StandardCheckpointHandler(),
                                        manifest=ocp.JsonCheckpointHandler())


def manifest_of(ensemble: Ensemble) -> dict[str, Any]:
  """The JSON manifest of an ensemble (what `save_ensemble` writes beside the arrays)."""
  subs = []
  for s in ensemble.subs:
    subs.append({
        "name": s.name, "sequences": list(s.sequences), "regions": list(s.regions),
        "members": s.members, "model_manifest": fileio.jsonable(dict(s.manifest)),
        "cache_dir": None if s.cache_dir is None else str(s.cache_dir),
        "preprocessing": fileio.jsonable(s.preprocessing),
        "workdir": None if s.workdir is None else str(s.workdir),
        "member_weights": [float(w) for w in ensemble.member_weights()[s.name]],
    })
  return {"kind": MANIFEST_KIND, "format_version": FORMAT_VERSION,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "n_members": ensemble.n_members, "sub_ensembles": subs,
          "head": ensemble.head.to_dict(), "correction": ensemble.correction.to_dict(),
          "info": fileio.jsonable(dict(ensemble.info))}


def save_ensemble(workdir: str | os.PathLike, ensemble: Ensemble) -> Path:
  """Saves the ensemble as ONE orbax checkpoint W/ensemble (arrays + JSON manifest).

  Written to W/ensemble.tmp first and renamed into place, so W/ensemble is always either the
  previous complete store or the new complete one. Returns the store's path.
  """
  path = store_dir(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp, old = path.with_name(STORE + ".tmp"), path.with_name(STORE + ".old")
  main = jax.process_index() == 0
  if main:
    shutil.rmtree(tmp, ignore_errors=True)
  variables = {s.name: jax.tree.map(np.asarray, s.variables) for s in ensemble.subs}
  with ocp.Checkpointer(_handler()) as ckptr:
    ckptr.save(tmp, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                            manifest=ocp.args.JsonSave(manifest_of(ensemble))))
  if main:
    integrity.seal(tmp)  # last, inside the directory that is renamed into place
    if path.exists():
      shutil.rmtree(old, ignore_errors=True)
      os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jax_brainage.ensemble.save")
  return path


def read_manifest(workdir: str | os.PathLike) -> dict[str, Any]:
  """The store's JSON manifest (ConfigError if W holds no readable ensemble store)."""
  path = store_dir(workdir) / "manifest" / "metadata"
  if not path.is_file():
    raise ConfigError(f"--workdir {workdir}: no ensemble store (no {STORE}/manifest)")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: unreadable ensemble manifest ({type(e).__name__})") from None
  if manifest.get("kind") != MANIFEST_KIND:
    raise ConfigError(f"{path}: not an ensemble manifest (kind {manifest.get('kind')!r})")
  if int(manifest.get("format_version", -1)) > FORMAT_VERSION:
    raise ConfigError(f"{path}: ensemble store format {manifest.get('format_version')} is newer "
                      f"than this jax_brainage reads ({FORMAT_VERSION})")
  return manifest


def load_ensemble(workdir: str | os.PathLike) -> Ensemble:
  """Restores the ensemble saved in W/ensemble.

  Raises:
    ConfigError: one line naming the store when it is missing, or its arrays do not fit the
      models its manifest describes.
    DataError: one line naming the file when the store fails its checksums or cannot be
      decoded (nothing is restored from a damaged store).
  """
  path = store_dir(workdir)
  if is_ensemble_workdir(workdir):
    integrity.verify(path, "ensemble store")
  manifest = read_manifest(workdir)
  try:
    specs = manifest["sub_ensembles"]
    head = head_lib.MultiLevelHead.from_dict(manifest["head"])
    fitted = correction_lib.Correction.from_dict(manifest["correction"])
    expected = {s["name"]: models.variable_shapes(s["model_manifest"], int(s["members"]))
                for s in specs}
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"{path}: incomplete ensemble manifest ({type(e).__name__}: {e})") from None
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)
  error = None
  try:
    with ocp.Checkpointer(_handler()) as ckptr:
      stored = ckptr.metadata(path).item_metadata["variables"]
      stored = getattr(stored, "tree", stored)
      models.check_shapes(stored, expected, path)
      device = jax.local_devices()[0]
      abstract = jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(device)),
          expected)
      restored = ckptr.restore(path, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(abstract)))["variables"]
  except BrainAgeError:
    raise
  except Exception as e:  # noqa: BLE001 -- orbax/tensorstore errors of an unsealed, damaged store
    error = integrity.decoding_error(path / "variables", "ensemble store arrays", e)
  finally:
    absl.setLevel(level)
  if error is not None:
    integrity.collect_quietly()  # outside `except`: the failed reads can be collected
    raise error
  subs = tuple(SubEnsemble(
      name=s["name"], sequences=tuple(s["sequences"]), regions=tuple(s.get("regions", ())),
      manifest=s["model_manifest"], members=int(s["members"]),
      variables=jax.tree.map(np.asarray, restored[s["name"]]), cache_dir=s.get("cache_dir"),
      preprocessing=s.get("preprocessing"), workdir=s.get("workdir")) for s in specs)
  return Ensemble(subs, head, fitted, Path(workdir).resolve(), manifest.get("info") or {})


