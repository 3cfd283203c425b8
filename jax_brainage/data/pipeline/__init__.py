"""Input pipelines: grain on the host, or the whole cohort resident on the accelerator.

Both modes follow one plan, so they deliver the same examples in the same order with the same
augmentation, and an iterator state saved in one mode resumes in the other:

  plan.py     counter-based hashing (numpy and jnp alike), epoch order, augmentation seeds and
              `BatchPlan`: which rows go into which global batch, on which process.
  sources.py  random-access sources: `ArraySource` (arrays or memory maps), `cache_source` (a
              prepared cache), `SimulatorSource` (the simulator itself, no files).
  host.py     host mode: `HostPipeline` (grain), `BatchIterator`, `DeviceFeed` (host batches ->
              augmented network inputs on the mesh), `HostFeedPipeline`.
  device.py   device-resident mode: `DeviceResidentPipeline` (order, gather, scaling and
              augmentation on the accelerators; the host passes only the step number).
  members.py  ensemble members: `bootstrap_rows`, `MemberPipeline` (one plan per member, batches
              stacked [member, batch, ...]).

Trainers use `make_pipeline(source, mode="host" | "device" | "auto", ...)`: a re-iterable
pipeline (`HostFeedPipeline` or `DeviceResidentPipeline`) whose iterators yield the same
network-ready batches and share one JSON state format (`get_state` / `set_state`), so a checkpoint
resumes in either mode and on any number of processes. `brainage batches`
(`jax_brainage.commands.batches`) iterates it from a cache or straight from the simulator
(`SimulatorSource`) and reports volumes/s.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jax_brainage import sharding as shd
from jax_brainage.data import augment as aug
from jax_brainage.data.pipeline.device import (DeviceResidentIterator, DeviceResidentPipeline,
                                               fits_on_device)
from jax_brainage.data.pipeline.host import (BatchIterator, DeviceFeed, HostFeedPipeline,
                                             HostPipeline)
from jax_brainage.data.pipeline.members import MemberIterator, MemberPipeline, bootstrap_rows
from jax_brainage.data.pipeline.plan import (STATE_VERSION, BatchPlan, aug_seeds, epoch_order,
                                             hash_words)
from jax_brainage.data.pipeline.sources import (ArraySource, SimulatorSource, Source,
                                                cache_source, source_dtype)
from jax_brainage.errors import ConfigError

__all__ = [
    "STATE_VERSION", "hash_words", "aug_seeds", "epoch_order", "BatchPlan", "Source",
    "ArraySource", "source_dtype", "cache_source", "SimulatorSource", "HostPipeline",
    "BatchIterator", "DeviceFeed", "HostFeedPipeline", "fits_on_device", "DeviceResidentPipeline",
    "DeviceResidentIterator", "bootstrap_rows", "MemberPipeline", "MemberIterator",
    "make_pipeline",
]


def make_pipeline(source: Source, *, batch_size: int, mode: str = "auto", mesh: Mesh | None = None,
                  augment: aug.AugmentConfig | None = None, seed: int = 0,
                  rows: np.ndarray | None = None, shuffle: bool = True,
                  drop_remainder: bool = True, num_epochs: int | None = None,
                  worker_count: int = 0, require_ages: bool = True,
                  device_fraction: float = 0.5) -> HostFeedPipeline | DeviceResidentPipeline:
  """A re-iterable pipeline of network-ready global batches, host-fed or device-resident.

  Args:
    mode: "host" (grain), "device" (volumes resident on the accelerators), or "auto": device
      when the platform is an accelerator, the source holds its volumes in an array or memory
      map and the selected volumes fit (`fits_on_device`) on every local device, else host.
    Others: as in `HostPipeline` / `DeviceResidentPipeline`.

  Returns:
    a pipeline with `mode`, `plan` and `steps_per_epoch`; each `iter()` yields dicts of global
    arrays split over 'data' (`image` float32 [B, X, Y, Z, C]: uint8 volumes / 255 or float16
    z-scores as float32 (`intensity.to_unit_float`), augmented,
    `age` float32 [B], `index` int32 [B], `aug_seed` uint32 [B, 2], `mask` bool [B]) and has
    `get_state()` / `set_state(state)`, with the same state in both modes.
  """
  if mode not in ("host", "device", "auto"):
    raise ConfigError(f"pipeline mode {mode!r}: choose host, device or auto")
  mesh = mesh or shd.make_mesh()
  augment = aug.AugmentConfig.from_config(augment)
  n_rows = len(source) if rows is None else len(rows)
  nbytes = n_rows * int(np.prod(source.volume_shape)) * source_dtype(source).itemsize
  volumes = getattr(source, "volumes", None)
  if mode == "auto":
    accelerator = jax.devices()[0].platform != "cpu"
    fits = all(fits_on_device(nbytes, d, fraction=device_fraction) for d in jax.local_devices())
    mode = "device" if accelerator and volumes is not None and fits else "host"
  if mode == "device":
    if volumes is None:
      raise ConfigError("device-resident mode needs volumes in an array or cache (not the "
                        "simulator): use mode='host'")
    return DeviceResidentPipeline(
        volumes, source.ages, batch_size=batch_size, seed=seed, rows=rows, shuffle=shuffle,
        drop_remainder=drop_remainder, num_epochs=num_epochs, augment=augment, mesh=mesh,
        require_ages=require_ages)
  host = HostPipeline(
      source, batch_size=batch_size, seed=seed, rows=rows, shuffle=shuffle,
      drop_remainder=drop_remainder, num_epochs=num_epochs, worker_count=worker_count,
      require_ages=require_ages)
  return HostFeedPipeline(host, mesh, augment)
