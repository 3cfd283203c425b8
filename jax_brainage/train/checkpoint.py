"""Orbax checkpoints of a training run: the latest (to resume) and the best by validation loss.

Layout under a workdir:

    W/checkpoints/latest/<step>/   state (params, model_state, opt_state, step, rng) + meta.json
    W/checkpoints/best/<step>/     the same, for the lowest validation loss so far

An ensemble run (`config.ensemble.members = M > 1`) stores the members stacked: every leaf of
params, model_state, opt_state and rng has a leading member axis `[M, ...]`, the manifest says
`"members": M`, and `best` holds each member at its own best validation epoch.

`meta` is JSON: the loop's position (epoch, data-iterator state, early-stopping counters) and a
manifest of the model (name, fields, input shape, sequences, parameter count), so that loading a
checkpoint into a different architecture, or onto data it was not trained for, is a one-line
ConfigError rather than a shape error deep inside orbax. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never replaces a good checkpoint;
in a multi-process run every process calls these functions and orbax writes collectively.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_brainage import models
from jax_brainage.errors import ConfigError

LATEST, BEST = "latest", "best"
FORMAT_VERSION = 1


def checkpoint_dir(workdir: str | Path, which: str = LATEST) -> Path:
  return Path(workdir).resolve() / "checkpoints" / which


class Checkpoints:
  """The two checkpoint managers of one workdir.

  Args:
    workdir: the experiment's directory.
    keep: how many latest checkpoints to keep (the best is kept separately).
    read_only: open existing checkpoints without creating directories (inference, init_from).
  """

  def __init__(self, workdir: str | Path, keep: int = 1, read_only: bool = False):
    self.workdir = Path(workdir)
    self._managers = {
        which: ocp.CheckpointManager(
            checkpoint_dir(workdir, which),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep if which == LATEST else 1, create=not read_only,
                read_only=read_only,
                # Multi-host: 'best' and 'latest' save the same step at the end of an epoch;
                # orbax names its barriers by step, so without a prefix they collide.
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=which)),
            # Named handlers let a fresh manager read metadata before restoring (shape checks).
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        for which in (LATEST, BEST)
    }

  def latest_step(self, which: str = LATEST) -> int | None:
    return self._managers[which].latest_step()

  def save(self, which: str, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays) and `meta` (JSON) as `which`/<step>, in the
    background; `wait()` blocks until it is on disk."""
    meta = dict(meta, format_version=FORMAT_VERSION, step=int(step))
    self._managers[which].save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(meta)),
        force=True)

  def read_meta(self, which: str = LATEST, step: int | None = None) -> dict[str, Any]:
    manager = self._managers[which]
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ConfigError(f"no {which} checkpoint in {checkpoint_dir(self.workdir, which)}")
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, which: str, abstract_state: Any, manifest: dict[str, Any],
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores the state saved as `which`/<step> (default: newest) onto `abstract_state`'s
    shapes, dtypes and shardings (from `jax.eval_shape` + `sharding.state_shardings`).

    Raises ConfigError, naming the checkpoint, if it was written for another model or input
    (its manifest differs from `manifest`) or its arrays do not fit `abstract_state`.
    """
    manager = self._managers[which]
    step = manager.latest_step() if step is None else step
    where = checkpoint_dir(self.workdir, which) / str(step)
    if step is None:
      raise ConfigError(f"no {which} checkpoint in {checkpoint_dir(self.workdir, which)}")
    meta = self.read_meta(which, step)
    check_manifest(meta.get("manifest", {}), manifest, where)
    stored = manager.item_metadata(step)["state"]
    models.check_shapes(stored, abstract_state, where)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], meta

  def stored_metadata(self, which: str, step: int) -> Any:
    """Shapes and dtypes of the state saved as `which`/<step> (orbax array metadata)."""
    return self._managers[which].item_metadata(step)["state"]

  def restore_stored(self, which: str = BEST, step: int | None = None,
                     device: jax.Device | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint as stored (its own shapes and dtypes) onto one device, for
    inference and export: no training layout or abstract state needed. Returns (state, meta)."""
    manager = self._managers[which]
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ConfigError(f"no {which} checkpoint in {checkpoint_dir(self.workdir, which)}")
    device = device or jax.local_devices()[0]
    stored = manager.item_metadata(step)["state"]
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)),
        stored, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    return restored, self.read_meta(which, step)

  def wait(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()


# The parts of a manifest that decide whether parameters fit: name and fields of the model, the
# input it was built for. (mean_age only sets an initial bias, so it may differ.)
_ARCHITECTURE_KEYS = ("model", "model_kwargs", "image_shape", "sequences", "members")


def check_manifest(stored: dict[str, Any], expected: dict[str, Any], where: Path | str) -> None:
  """ConfigError naming the checkpoint if its model or input differs from `expected`."""
  for key in _ARCHITECTURE_KEYS:
    a, b = stored.get(key), expected.get(key)
    if key == "members":  # stacked ensemble members; a single model has no member axis
      a, b = int(a or 1), int(b or 1)
    if key == "model_kwargs":  # the mean age and the conv lowering leave the parameters as they are
      a = {k: v for k, v in (a or {}).items() if k not in ("mean_age", "conv_lowering")}
      b = {k: v for k, v in (b or {}).items() if k not in ("mean_age", "conv_lowering")}
    if _plain(a) != _plain(b):
      raise ConfigError(f"checkpoint {where} holds another architecture: {key} is {a!r} there, "
                        f"{b!r} here")


def _plain(x: Any) -> Any:
  """JSON-like normal form (tuples as lists) so stored and fresh manifests compare equal."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x
