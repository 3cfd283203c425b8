"""Orbax checkpoints of a training run: the latest (to resume) and the best by validation loss.

Layout under a workdir:

    W/checkpoints/latest/<step>/   state (params, model_state, opt_state, step, rng) + meta.json
                                   + checksums.json (`jax_brainage.integrity`)
    W/checkpoints/best/<step>/     the same, for the lowest validation loss so far
    W/checkpoints/corrupt/         checkpoints that failed verification at resume, moved aside

An ensemble run (`config.ensemble.members = M > 1`) stores the members stacked: every leaf of
params, model_state, opt_state and rng has a leading member axis `[M, ...]`, the manifest says
`"members": M`, and `best` holds each member at its own best validation epoch.

`meta` is JSON: the loop's position (epoch, data-iterator state, early-stopping counters) and a
manifest of the model (name, fields, input shape, sequences, parameter count), so that loading a
checkpoint into a different architecture, or onto data it was not trained for, is a one-line
ConfigError rather than a shape error deep inside orbax. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never replaces a good checkpoint;
in a multi-process run every process calls these functions and orbax writes collectively.

Integrity: every step is sealed with a checksum record (size and BLAKE2b digest of each file),
written by process 0 inside orbax's temporary directory once all processes have written and
before the rename (orbax's post-finalisation callback), so the record is part of the atomic save.
Every read verifies it first: a truncated, overwritten or missing file, or garbled metadata JSON,
is a one-line DataError naming the file, never a tensorstore or JSON traceback nor a silent
restore. Steps saved before records existed (FORMAT_VERSION 1) load without verification.
At least two latest and two best steps are kept, so that resuming (`restore_intact`) can fall
back to the newest intact one, with a one-line warning on stderr naming the bad one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jax_brainage import integrity, models
from jax_brainage.errors import BrainAgeError, ConfigError, DataError

LATEST, BEST = "latest", "best"
FORMAT_VERSION = 2  # 2: steps carry a checksum record (integrity.RECORD)
MIN_KEEP = 2  # latest and best steps kept at least: one to fall back to if the newest is corrupt
QUARANTINE = "corrupt"
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax's temporary step directory: <step>.orbax-...
# orbax rewrites its step record (commit timestamp) after the callback: not sealed, not needed to
# restore (a damaged one is still a one-line DataError from the decoding step).
_UNSEALED = ("_CHECKPOINT_METADATA",)


def checkpoint_dir(workdir: str | Path, which: str = LATEST) -> Path:
  return Path(workdir).resolve() / "checkpoints" / which


def warn(line: str) -> None:
  """A one-line warning on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(f"warning: {line}", file=sys.stderr, flush=True)


class Checkpoints:
  """The two checkpoint managers of one workdir.

  Args:
    workdir: the experiment's directory.
    keep: how many latest checkpoints to keep (at least MIN_KEEP; the best are kept apart,
      MIN_KEEP of them).
    read_only: open existing checkpoints without creating directories (inference, init_from).
  """

  def __init__(self, workdir: str | Path, keep: int = 1, read_only: bool = False):
    self.workdir = Path(workdir)
    self.read_only = read_only
    self._saving: dict[str, int] = {}  # which -> step of the save in flight (to seal)
    self._verified: dict[tuple[str, int], bool] = {}
    self._managers = {
        which: ocp.CheckpointManager(
            checkpoint_dir(workdir, which),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(int(keep), MIN_KEEP) if which == LATEST else MIN_KEEP,
                create=not read_only, read_only=read_only,
                # Multi-host: 'best' and 'latest' save the same step at the end of an epoch;
                # orbax names its barriers by step, so without a prefix they collide.
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=which),
                # Seals the step on process 0 after every process wrote it, before the rename.
                async_options=None if read_only else ocp.options.AsyncOptions(
                    post_finalization_callback=lambda which=which: self._seal_saving(which))),
            # Named handlers let a fresh manager read metadata before restoring (shape checks).
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        for which in (LATEST, BEST)
    }

  def latest_step(self, which: str = LATEST) -> int | None:
    return self._managers[which].latest_step()

  def all_steps(self, which: str = LATEST) -> list[int]:
    """The steps of `which` on disk, newest first."""
    return sorted(self._managers[which].all_steps(), reverse=True)

  def step_dir(self, which: str, step: int) -> Path:
    return checkpoint_dir(self.workdir, which) / str(step)

  # --- Saving. ---------------------------------------------------------------------------------

  def save(self, which: str, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves `state` (a pytree of arrays) and `meta` (JSON) as `which`/<step>, sealed with a
    checksum record, in the background; `wait()` blocks until it is on disk.

    A step that already exists (written by an interrupted run that this run resumed before it)
    is replaced: the run that resumed recomputed it.
    """
    manager = self._managers[which]
    manager.wait_until_finished()  # the previous save of `which` is sealed and renamed
    self._seal_unsealed(which)
    if int(step) in manager.all_steps():
      manager.delete(int(step))
    meta = dict(meta, format_version=FORMAT_VERSION, step=int(step))
    self._saving[which] = int(step)
    manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(meta)),
        force=True)

  def _seal_saving(self, which: str) -> None:
    """orbax's post-finalisation callback (process 0, background thread): seals the step in
    flight in its temporary directory, so the record is renamed into place with it."""
    step = self._saving.get(which)
    if step is None:
      return
    tmp = sorted(checkpoint_dir(self.workdir, which).glob(f"{step}{_ORBAX_TMP}*"))
    if len(tmp) == 1 and tmp[0].is_dir():
      integrity.seal(tmp[0], exclude=_UNSEALED)

  def _seal_unsealed(self, which: str) -> None:
    """Seals the finished save of `which` if the callback found no temporary directory (a
    storage where orbax commits in place): the record is then written just after the save."""
    step = self._saving.pop(which, None)
    if step is None or jax.process_index() != 0:
      return
    where = self.step_dir(which, step)
    if where.is_dir() and not integrity.has_record(where):
      integrity.seal(where, exclude=_UNSEALED)

  # --- Verifying and reading. ------------------------------------------------------------------

  def verify(self, which: str, step: int) -> bool:
    """Checks `which`/<step> against its checksum record (once per step and instance).

    Returns True when verified, False for a step without a record (saved before records
    existed, or by a run killed between orbax's save and the record). Raises DataError naming
    the first bad file.
    """
    key = (which, int(step))
    if key not in self._verified:
      self._verified[key] = integrity.verify(self.step_dir(which, step), f"{which} checkpoint")
    return self._verified[key]

  def _step(self, which: str, step: int | None) -> int:
    step = self._managers[which].latest_step() if step is None else step
    if step is None:
      raise ConfigError(f"no {which} checkpoint in {checkpoint_dir(self.workdir, which)}")
    return int(step)

  def read_meta(self, which: str = LATEST, step: int | None = None) -> dict[str, Any]:
    """The JSON saved beside `which`/<step> (default: newest), verified first.

    Raises DataError naming the file when the step is corrupt or its JSON unreadable.
    """
    step = self._step(which, step)
    self.verify(which, step)
    where = self.step_dir(which, step) / "meta"
    try:
      meta = self._managers[which].restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except BrainAgeError:
      raise
    except Exception as e:  # noqa: BLE001 -- orbax/json errors of a damaged file
      raise integrity.decoding_error(where, "checkpoint metadata", e) from None
    if not isinstance(meta, dict):
      raise DataError(f"{where}: checkpoint metadata is not a JSON object")
    return meta

  def stored_metadata(self, which: str, step: int) -> Any:
    """Shapes and dtypes of the state saved as `which`/<step> (orbax array metadata)."""
    self.verify(which, step)
    try:
      return self._managers[which].item_metadata(step)["state"]
    except BrainAgeError:
      raise
    except Exception as e:  # noqa: BLE001
      raise integrity.decoding_error(self.step_dir(which, step) / "state", "array metadata",
                                     e) from None

  def _restore_state(self, which: str, step: int, abstract: Any) -> Any:
    try:
      return self._managers[which].restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except BrainAgeError:
      raise
    except Exception as e:  # noqa: BLE001 -- tensorstore errors of truncated/garbled arrays
      error = integrity.decoding_error(self.step_dir(which, step) / "state",
                                       "checkpoint arrays", e)
    integrity.collect_quietly()  # raised outside `except`: the failed reads can be collected
    raise error

  def restore(self, which: str, abstract_state: Any, manifest: dict[str, Any],
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores the state saved as `which`/<step> (default: newest) onto `abstract_state`'s
    shapes, dtypes and shardings (from `jax.eval_shape` + `sharding.state_shardings`).

    Raises:
      ConfigError: naming the checkpoint, if it was written for another model or input (its
        manifest differs from `manifest`) or its arrays do not fit `abstract_state`.
      DataError: naming the file, if the step fails verification, cannot be decoded, or holds
        non-finite parameters (the training loop never saves those).
    """
    step = self._step(which, step)
    where = self.step_dir(which, step)
    meta = self.read_meta(which, step)
    check_manifest(meta.get("manifest", {}), manifest, where)
    models.check_shapes(self.stored_metadata(which, step), abstract_state, where)
    state = self._restore_state(which, step, abstract_state)
    check_finite_state(state, where)
    return state, meta

  def restore_stored(self, which: str = BEST, step: int | None = None,
                     device: jax.Device | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint as stored (its own shapes and dtypes) onto one device, for
    inference and export: no training layout or abstract state needed. Returns (state, meta).
    Raises DataError naming the file when the step is corrupt."""
    step = self._step(which, step)
    device = device or jax.local_devices()[0]
    stored = self.stored_metadata(which, step)
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)),
        stored, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    return self._restore_state(which, step, abstract), self.read_meta(which, step)

  # --- Resuming from the newest intact step. -----------------------------------------------

  def restore_intact(self, which: str, abstract_state: Any, manifest: dict[str, Any], *,
                     max_step: int | None = None, required: bool = True,
                     none_left: str = "no intact one is left"
                     ) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest intact `which` step (at most `max_step`): (state, meta, step).

    A step that fails verification, decoding or the finiteness check is moved aside to
    W/checkpoints/corrupt/ (unless read-only) and the next older one is tried; one warning line
    on stderr names the bad step(s) and the one resumed from with its data-iterator position.
    A step without a checksum record (an old run's, or one killed between orbax's save and the
    record) is restored unverified, with a warning when it should have had one.

    Returns None when `which` has no step (at most `max_step`) at all, or (not `required`)
    when none is intact: the bad ones are then named in one warning line ending `none_left`.
    Raises:
      DataError: `required` and every step is corrupt (the newest's reason; moved aside).
      ConfigError: a step of another architecture (not corruption: nothing is moved).
    """
    steps = [s for s in self.all_steps(which) if max_step is None or s <= max_step]
    if not steps:
      return None
    bad: list[str] = []
    for step in steps:
      try:
        state, meta = self.restore(which, abstract_state, manifest, step)
      except DataError as e:
        bad.append(f"{e} [{self.quarantine(which, step)}]")
        continue
      where = self.step_dir(which, step)
      if not self.verify(which, step) and int(meta.get("format_version", 1)) >= 2:
        warn(f"{where}: no checksum record (the run was killed right after saving it?); "
             "restored unverified")
      if bad:
        data_state = meta.get("data_state")
        position = data_state.get("step", step) if isinstance(data_state, dict) else step
        warn(f"{'; '.join(bad)}; {'resuming from' if which == LATEST else 'using'} the {which} "
             f"checkpoint {where} (step {step}, data-iterator step {position})")
      return state, meta, step
    if not required:
      warn(f"{'; '.join(bad)}; {none_left}")
      return None
    raise DataError(f"no intact {which} checkpoint in {checkpoint_dir(self.workdir, which)}: "
                    f"{bad[0]}")

  def newest_intact(self, which: str, *, max_step: int | None = None,
                    none_left: str = "no intact one is left"
                    ) -> tuple[int, dict[str, Any]] | None:
    """(step, meta) of the newest `which` step (at most `max_step`) whose files verify and
    whose metadata reads, without restoring its arrays (for the best step of a one-model run,
    which resuming does not load); bad steps are moved aside with one warning line (ending
    `none_left` when no step is intact). None when no step is intact."""
    bad: list[str] = []
    for step in [s for s in self.all_steps(which) if max_step is None or s <= max_step]:
      try:
        self.stored_metadata(which, step)
        meta = self.read_meta(which, step)
      except DataError as e:
        bad.append(f"{e} [{self.quarantine(which, step)}]")
        continue
      if bad:
        warn(f"{'; '.join(bad)}; the {which} checkpoint is now {self.step_dir(which, step)}")
      return step, meta
    if bad:
      warn(f"{'; '.join(bad)}; {none_left}")
    return None

  def quarantine(self, which: str, step: int) -> str:
    """Moves `which`/<step> to W/checkpoints/corrupt/<which>-<step> (process 0; all processes
    wait), so that resuming does not meet it again and a re-run may save that step anew.
    Returns a few words saying where it went (or that it stayed, when read-only)."""
    source = self.step_dir(which, step)
    if self.read_only:
      return "left in place"
    target = checkpoint_dir(self.workdir, QUARANTINE) / f"{which}-{step}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      n = 1
      while target.exists():
        n += 1
        target = target.with_name(f"{which}-{step}.{n}")
      shutil.move(str(source), str(target))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jax_brainage.checkpoint.quarantine.{which}.{step}")
    self._managers[which].reload()
    self._verified.pop((which, int(step)), None)
    return f"moved to {target}"

  def wait(self) -> None:
    for which, manager in self._managers.items():
      manager.wait_until_finished()
      self._seal_unsealed(which)

  def close(self) -> None:
    for which, manager in self._managers.items():
      manager.close()
      self._seal_unsealed(which)


def check_finite_state(state: Any, where: Path | str) -> None:
  """DataError naming the checkpoint if a floating parameter or model-state value is NaN/Inf
  (the loop never saves such a state, so the file was damaged without a record to tell)."""
  trees = {k: state[k] for k in ("params", "model_state") if isinstance(state, dict) and k in state}
  leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return
  finite = jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves)
  if not bool(np.asarray(jax.device_get(finite.addressable_data(0)))):
    raise DataError(f"{where}: checkpoint holds non-finite parameters (damaged file?)")


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
