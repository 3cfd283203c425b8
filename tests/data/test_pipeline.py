"""pipeline: order, coverage, process shards, evaluation padding, resume, workers, device mode."""

from __future__ import annotations

import argparse
import json
import pickle
import zlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_brainage import sharding as shd
from jax_brainage.commands import batches as batches_command
from jax_brainage.data import augment as aug
from jax_brainage.data import pipeline as pl
from jax_brainage.errors import ConfigError, DataError

N, SHAPE = 26, (6, 7, 5, 2)


@pytest.fixture(scope="module")
def cohort():
  rng = np.random.default_rng(0)
  volumes = rng.integers(0, 256, (N,) + SHAPE, dtype=np.uint8)
  ages = rng.uniform(18, 82, N).astype(np.float32)
  return volumes, ages


def _host(cohort, **kw):
  volumes, ages = cohort
  kw.setdefault("batch_size", 4)
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  return pl.HostPipeline(pl.ArraySource(volumes, ages), **kw)


def _indices(batches) -> list[list[int]]:
  return [b["index"].tolist() for b in batches]


def test_order_is_a_permutation_reproducible_per_seed_and_new_each_epoch():
  rows = np.arange(100, 200)
  a0 = pl.epoch_order(rows, seed=3, epoch=0)
  np.testing.assert_array_equal(np.sort(a0), np.arange(100))
  np.testing.assert_array_equal(a0, pl.epoch_order(rows, seed=3, epoch=0))
  assert not np.array_equal(a0, pl.epoch_order(rows, seed=3, epoch=1))
  assert not np.array_equal(a0, pl.epoch_order(rows, seed=4, epoch=0))
  # Depends on the rows, not on how the selection is listed.
  shuffled = rows[::-1]
  np.testing.assert_array_equal(rows[a0], shuffled[pl.epoch_order(shuffled, seed=3, epoch=0)])
  np.testing.assert_array_equal(pl.epoch_order(rows, 3, 0, shuffle=False), np.arange(100))


def test_orders_look_uniformly_random():
  # Position of row 0 over 400 epochs: roughly uniform over 10 slots (chi-square, 9 dof).
  rows = np.arange(10)
  pos = [int(np.flatnonzero(pl.epoch_order(rows, 0, e) == 0)[0]) for e in range(400)]
  counts = np.bincount(pos, minlength=10)
  chi2 = ((counts - 40.0) ** 2 / 40.0).sum()
  assert chi2 < 33.7  # p = 1e-4 for 9 degrees of freedom


def test_batches_follow_the_contract_and_every_example_once_per_epoch(cohort):
  volumes, ages = cohort
  rows = np.arange(2, 26)  # 24 subjects, batch 4 -> 6 full batches per epoch
  batches = list(_host(cohort, rows=rows, seed=1, num_epochs=2))
  assert len(batches) == 12
  b = batches[0]
  assert b["image"].dtype == np.uint8 and b["image"].shape == (4,) + SHAPE
  assert b["age"].dtype == np.float32 and b["index"].dtype == np.int32
  assert b["aug_seed"].dtype == np.uint32 and b["aug_seed"].shape == (4, 2)
  assert b["mask"].dtype == bool and b["mask"].all()
  for batch in batches:
    np.testing.assert_array_equal(batch["image"], volumes[batch["index"]])
    np.testing.assert_array_equal(batch["age"], ages[batch["index"]])
  idx = np.array(_indices(batches))
  for epoch in range(2):
    np.testing.assert_array_equal(np.sort(idx[6 * epoch:6 * (epoch + 1)].ravel()), rows)
  assert not np.array_equal(idx[:6], idx[6:])
  # Same seed, same sequence; another seed, another one.
  assert _indices(_host(cohort, rows=rows, seed=1, num_epochs=2)) == idx.tolist()
  assert _indices(_host(cohort, rows=rows, seed=2, num_epochs=2)) != idx.tolist()


def test_training_drops_the_remainder(cohort):
  batches = list(_host(cohort, batch_size=8, num_epochs=1))  # 26 = 3 * 8 + 2
  idx = np.array(_indices(batches)).ravel()
  assert len(batches) == 3 and len(np.unique(idx)) == 24


def test_aug_seed_depends_on_seed_epoch_and_subject_only(cohort):
  seeds = {}
  for bs in (2, 4):
    for epoch, b in enumerate(_host(cohort, batch_size=bs, seed=5, num_epochs=1)):
      for i, s in zip(b["index"], b["aug_seed"]):
        seeds.setdefault(int(i), set()).add(tuple(s))
  assert all(len(v) == 1 for v in seeds.values())  # independent of batch size / position
  words = [next(iter(v)) for v in seeds.values()]
  assert len(set(words)) == len(words)  # distinct per subject
  e0 = list(_host(cohort, batch_size=2, seed=5, num_epochs=2))
  first = {int(i): tuple(s) for b in e0[:13] for i, s in zip(b["index"], b["aug_seed"])}
  second = {int(i): tuple(s) for b in e0[13:] for i, s in zip(b["index"], b["aug_seed"])}
  assert all(first[i] != second[i] for i in first)  # new augmentation every epoch


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_partition_each_global_batch(cohort, count):
  whole = list(_host(cohort, batch_size=8, seed=9, num_epochs=2))
  shards = [list(_host(cohort, batch_size=8, seed=9, num_epochs=2, shard_index=i,
                       shard_count=count)) for i in range(count)]
  assert all(len(s) == len(whole) for s in shards)
  for t, batch in enumerate(whole):
    parts = [s[t]["index"] for s in shards]
    assert all(len(p) == 8 // count for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # no overlap between processes
    np.testing.assert_array_equal(joined, batch["index"])  # same global batch for any count
    np.testing.assert_array_equal(np.concatenate([s[t]["image"] for s in shards]), batch["image"])


def test_evaluation_covers_every_subject_once_with_a_masked_final_batch(cohort):
  volumes, ages = cohort
  rows = np.array([25, 3, 7, 11, 0, 19, 4, 8, 13, 21, 1])  # 11 subjects, batch 4
  for count in (1, 2):
    seen = []
    for shard in range(count):
      batches = list(_host(cohort, rows=rows, shuffle=False, drop_remainder=False,
                           num_epochs=1, shard_index=shard, shard_count=count))
      assert len(batches) == 3
      for b in batches:
        assert b["image"].shape[0] == 4 // count
        seen.extend(b["index"][b["mask"]].tolist())
        assert np.all(b["index"][~b["mask"]] == -1) and not b["image"][~b["mask"]].any()
        np.testing.assert_array_equal(b["image"][b["mask"]], volumes[b["index"][b["mask"]]])
    assert sorted(seen) == sorted(rows.tolist())
    if count == 1:
      assert seen == rows.tolist()  # evaluation keeps the given order


def test_state_resume_gives_the_identical_continuation(cohort):
  full = list(_host(cohort, seed=4, num_epochs=3))
  it = iter(_host(cohort, seed=4, num_epochs=3))
  head = [next(it) for _ in range(8)]  # crosses the epoch boundary (6 steps per epoch)
  state = json.loads(json.dumps(it.get_state()))  # as saved in a checkpoint
  assert state["step"] == 8
  it.close()
  resumed = iter(_host(cohort, seed=4, num_epochs=3))
  resumed.set_state(state)
  tail = list(resumed)
  assert len(head) + len(tail) == len(full)
  for a, b in zip(head + tail, full):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # A state saved by one process count resumes on another (the global step is the state).
  shard = iter(_host(cohort, seed=4, num_epochs=3, batch_size=4, shard_index=1, shard_count=2))
  shard.set_state(state)
  np.testing.assert_array_equal(next(shard)["index"], full[8]["index"][2:])


def test_state_from_another_sequence_is_refused(cohort):
  it = iter(_host(cohort, seed=4, rows=np.arange(20)))
  next(it)
  state = it.get_state()
  with pytest.raises(ConfigError, match="seed"):
    iter(_host(cohort, seed=5, rows=np.arange(20))).set_state(state)
  with pytest.raises(ConfigError, match="rows_crc32"):
    iter(_host(cohort, seed=4, rows=np.arange(1, 21))).set_state(state)
  with pytest.raises(ConfigError):
    iter(_host(cohort, seed=4)).set_state({"position": 3})


def test_worker_processes_deliver_the_same_batches(cohort):
  volumes, ages = cohort
  ref = list(_host(cohort, seed=2, num_epochs=1))
  it = iter(_host(cohort, seed=2, num_epochs=1, worker_count=2))
  got = list(it)
  assert len(got) == len(ref)
  for a, b in zip(got, ref):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("which", ["cohort", "zcohort"])  # uint8 (minmax) and float16 (zscore)
def test_memory_mapped_source_pickles_by_file_name_and_feeds_workers(tmp_path, which, request):
  volumes, ages = request.getfixturevalue(which)
  np.save(tmp_path / "volumes.npy", volumes)
  src = pl.ArraySource(np.load(tmp_path / "volumes.npy", mmap_mode="r"), ages)
  blob = pickle.dumps(src)
  assert len(blob) < volumes.nbytes // 4  # not a copy of the volumes
  back = pickle.loads(blob)
  assert back.volumes.dtype == volumes.dtype
  rows = np.array([5, 1, 17])
  np.testing.assert_array_equal(back.read(rows), volumes[rows])
  kw = dict(batch_size=4, seed=2, num_epochs=1, shard_index=0, shard_count=1)
  ref = list(pl.HostPipeline(pl.ArraySource(volumes, ages), **kw))
  got = list(pl.HostPipeline(src, worker_count=2, **kw))
  assert len(got) == len(ref)
  for a, b in zip(got, ref):
    assert a["image"].dtype == volumes.dtype
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_bad_arguments_are_one_line_errors(cohort):
  volumes, ages = cohort
  with pytest.raises(ConfigError, match="multiple of the 3 processes"):
    _host(cohort, batch_size=4, shard_count=3)
  with pytest.raises(ConfigError, match="exceeds"):
    _host(cohort, batch_size=64)
  with pytest.raises(DataError, match="row 30"):
    _host(cohort, rows=np.array([0, 30]), batch_size=2)
  with pytest.raises(ConfigError, match="duplicates"):
    _host(cohort, rows=np.array([0, 1, 1]), batch_size=2)
  unlabelled = ages.copy()
  unlabelled[3] = np.nan
  with pytest.raises(DataError, match="sub-003"):
    pl.HostPipeline(pl.ArraySource(volumes, unlabelled, [f"sub-{i:03d}" for i in range(N)]),
                    batch_size=2, shard_count=1, shard_index=0)
  pl.HostPipeline(pl.ArraySource(volumes, unlabelled), batch_size=2, shard_count=1,
                  shard_index=0, require_ages=False)  # prediction on unlabelled data is fine


@pytest.mark.parametrize("train", [True, False])
def test_device_resident_equals_host_feed_sharded_over_data(cohort, train):
  volumes, ages = cohort
  # Training on a 4-way 'data' mesh; evaluation on a 2 x 2 ('ensemble', 'data') mesh, where the
  # batch is split over 'data' and repeated over 'ensemble'.
  mesh = shd.make_mesh(ensemble=1 if train else 2)
  assert shd.data_size(mesh) == (4 if train else 2)
  # Augmentation (the costly compile) in the training case only, as in real use.
  cfg = (aug.AugmentConfig(shift_voxels=1, rotate_degrees=8.0, flip_lr=True, noise_std=0.05)
         if train else aug.AugmentConfig())
  kw = dict(batch_size=8, seed=11, rows=np.arange(1, 24), num_epochs=2, shuffle=train,
            drop_remainder=train)
  device = pl.DeviceResidentPipeline(volumes, ages, augment=cfg, mesh=mesh, **kw)
  host = pl.DeviceFeed(iter(pl.HostPipeline(pl.ArraySource(volumes, ages), **kw)), mesh, cfg)
  got, ref = list(device), list(host)
  assert len(got) == len(ref) == (4 if train else 6)
  for a, b in zip(got, ref):
    assert set(a) == set(b) == {"image", "age", "index", "aug_seed", "mask"}
    for k in a:
      assert a[k].sharding.spec == P(shd.DATA_AXIS) and len(a[k].sharding.device_set) == 4
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-6, err_msg=k)
    # Each device holds its 'data' slice of the global batch.
    for shard in a["index"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(a["index"])[shard.index])
  # Same state format: a host checkpoint resumes in device mode.
  it = iter(device)
  it.set_state(host.get_state() | {"step": 2})
  np.testing.assert_array_equal(np.asarray(next(it)["index"]), np.asarray(ref[2]["index"]))
  if not train:
    # Without augmentation the images are the uint8 volumes / 255, padding rows zero.
    for b in got:
      m = np.asarray(b["mask"])
      np.testing.assert_allclose(np.asarray(b["image"])[m],
                                 volumes[np.asarray(b["index"])[m]].astype(np.float64) / 255,
                                 rtol=1e-6)
      assert not np.asarray(b["image"])[~m].any()


def test_device_order_is_computed_on_device_and_equals_numpy(cohort):
  volumes, ages = cohort
  rows = np.array([20, 2, 9, 14, 5, 0, 11, 25])
  dev = pl.DeviceResidentPipeline(volumes, ages, batch_size=4, seed=2**40 + 7, rows=rows)
  for epoch in (0, 1, 1000):
    order = dev.order(epoch)
    assert isinstance(order, jax.Array)
    np.testing.assert_array_equal(np.asarray(order), pl.epoch_order(rows, 2**40 + 7, epoch))


def test_fits_on_device_uses_memory_stats_or_a_configurable_budget():
  class FakeGPU:
    def memory_stats(self):
      return {"bytes_limit": 80 * 2**30, "bytes_in_use": 10 * 2**30}

  assert pl.fits_on_device(20 * 2**30, FakeGPU())  # the study's cohort on an H100
  assert not pl.fits_on_device(40 * 2**30, FakeGPU())  # more than half of what is free
  assert pl.fits_on_device(40 * 2**30, FakeGPU(), fraction=0.9)
  cpu = jax.devices("cpu")[0]
  assert pl.fits_on_device(2**20, cpu, cpu_bytes=2**21)
  assert not pl.fits_on_device(2**22, cpu, cpu_bytes=2**21)
  assert not pl.fits_on_device(2**62, cpu)


def _fake_cache(tmp_path, volumes, ages):
  (tmp_path / "cache").mkdir()
  np.save(tmp_path / "cache" / "volumes.npy", volumes)
  scaling = "zscore" if volumes.dtype == np.float16 else "minmax"
  index = dict(format="jax-brainage-cache", format_version=2, shape=list(volumes.shape[1:4]),
               sequences=["T1w", "FLAIR"], dtype=volumes.dtype.name, scaling=scaling,
               preprocessing=dict(sequences=["T1w", "FLAIR"]),
               subjects=[dict(subject_id=f"sub-{i:03d}", age=float(a), inverse={})
                         for i, a in enumerate(ages)],
               checksums=dict(algorithm="crc32", rows=[
                   zlib.crc32(np.ascontiguousarray(v).tobytes()) for v in volumes]))
  (tmp_path / "cache" / "index.json").write_text(json.dumps(index))
  return tmp_path / "cache"


def test_cache_source_and_batches_command(tmp_path, cohort, capsys):
  volumes, ages = cohort
  path = _fake_cache(tmp_path, volumes, ages)
  src = pl.cache_source(path)
  np.testing.assert_array_equal(src.read(np.array([4, 2])), volumes[[4, 2]])
  np.testing.assert_allclose(src.ages, ages)
  for mode in ("host", "device"):
    rc = _batches(["--cache", str(path), "--batch-size", "4", "--epochs", "2", "--mode", mode])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert f"mode {mode}" in out[0] and "26 subjects" in out[0]
    steps = [line for line in out if line.startswith("epoch ")]
    assert len(steps) == 12 and "float32 (4, 6, 7, 5, 2)" in steps[0]
    assert "sub-" in steps[0] and "volumes/s" in out[-1]
  with pytest.raises(DataError, match="missing"):
    _batches(["--cache", str(tmp_path / "missing"), "--quiet"])


def _batches(argv: list[str]) -> int:
  # The sub-command on its own parser (jax_brainage.cli imports every command's module).
  parser = argparse.ArgumentParser()
  batches_command.add_parser(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["batches", *argv])
  return args.func(args)


def test_make_pipeline_is_reiterable_and_picks_host_on_cpu(cohort):
  volumes, ages = cohort
  source = pl.ArraySource(volumes, ages)
  pipe = pl.make_pipeline(source, batch_size=8, mode="auto", shuffle=False,
                          drop_remainder=False, num_epochs=1)
  assert pipe.mode == "host" and pipe.steps_per_epoch == 4  # no accelerator here
  first, second = list(pipe), list(pipe)  # evaluation runs every epoch on the same pipeline
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a["index"]), np.asarray(b["index"]))
  seen = np.concatenate([np.asarray(b["index"])[np.asarray(b["mask"])] for b in first])
  np.testing.assert_array_equal(seen, np.arange(N))
  device = pl.make_pipeline(source, batch_size=8, mode="device", shuffle=False,
                            drop_remainder=False, num_epochs=1)
  assert device.mode == "device"
  for a, b in zip(first, device):
    np.testing.assert_allclose(np.asarray(a["image"]), np.asarray(b["image"]), rtol=1e-6)

  class Generated:  # a source without an array of volumes (like the simulator)
    def __init__(self):
      self.ages, self.volume_shape = ages, SHAPE

    def __len__(self):
      return N

    def read(self, rows):
      return volumes[rows]

  with pytest.raises(ConfigError, match="mode='host'"):
    pl.make_pipeline(Generated(), batch_size=8, mode="device")
  with pytest.raises(ConfigError, match="gpu"):
    pl.make_pipeline(source, batch_size=8, mode="gpu")


@pytest.mark.parametrize("scaling", ["minmax", "zscore"])
def test_simulator_source_equals_the_simulated_then_prepared_cache(tmp_path, scaling):
  from jax_brainage.data import bids, prepare, simulate
  from jax_brainage.data.preprocess import Preprocessing
  from jax_brainage.data.simulation.config import CohortConfig

  cfg = CohortConfig(seed=3, n=2, resolution_mm=4, sequences=("T1w", "FLAIR"))
  simulate.write_cohort(tmp_path / "bids", cfg, workers=1)
  prep = Preprocessing(sequences=cfg.sequences, scaling=scaling)
  prepared = prepare.prepare(bids.read_bids(tmp_path / "bids", sequences=cfg.sequences),
                             tmp_path / "cache", prep)
  src = pl.SimulatorSource(cfg, None if scaling == "minmax" else prep)
  assert src.dtype == prepared.volumes.dtype == (np.uint8 if scaling == "minmax" else np.float16)
  assert src.read(np.array([0])).dtype == src.dtype
  assert src.subject_ids == prepared.subject_ids
  np.testing.assert_allclose(src.ages, prepared.ages, atol=1e-3)  # participants.tsv precision
  np.testing.assert_array_equal(src.read(np.array([1, 0])), np.asarray(prepared.volumes)[[1, 0]])
  assert src.volume_shape == prepared.volumes.shape[1:]
  back = pickle.loads(pickle.dumps(src))  # what a grain worker receives
  np.testing.assert_array_equal(back.read(np.array([1])), np.asarray(prepared.volumes)[[1]])


# ---------------------------------------------------------------------------------------------
# Z-scored caches: float16 volumes in, float32(stored values) out; uint8 unchanged.


@pytest.fixture(scope="module")
def zcohort():
  """float16 volumes as `prepare --scaling zscore` stores them: z-scores (many below 0 and
  above 1) inside a brain, 0 outside."""
  rng = np.random.default_rng(1)
  brain = rng.random((N,) + SHAPE[:3] + (1,)) < 0.7
  volumes = np.where(brain, rng.normal(0.0, 1.5, (N,) + SHAPE), 0.0).astype(np.float16)
  ages = rng.uniform(18, 82, N).astype(np.float32)
  return volumes, ages


def _eval_images(pipe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  batches = list(pipe)
  return (np.concatenate([np.asarray(b["image"]) for b in batches]),
          np.concatenate([np.asarray(b["index"]) for b in batches]),
          np.concatenate([np.asarray(b["mask"]) for b in batches]))


@pytest.mark.parametrize("mode", ["host", "device"])
def test_zscore_batches_are_float32_of_the_stored_values(zcohort, mode):
  volumes, ages = zcohort
  # Host batches carry the stored float16, as read from the cache.
  raw = list(pl.HostPipeline(pl.ArraySource(volumes, ages), batch_size=8, rows=np.arange(1, 24),
                             shuffle=False, drop_remainder=False, num_epochs=1, shard_index=0,
                             shard_count=1))
  for b in raw:
    assert b["image"].dtype == np.float16
    np.testing.assert_array_equal(b["image"][b["mask"]], volumes[b["index"][b["mask"]]])
    assert not b["image"][~b["mask"]].any()
  pipe = pl.make_pipeline(pl.ArraySource(volumes, ages), batch_size=8, mode=mode,
                          rows=np.arange(1, 24), shuffle=False, drop_remainder=False,
                          num_epochs=1)
  assert pipe.mode == mode
  image, index, mask = _eval_images(pipe)
  assert image.dtype == np.float32 and mask.sum() == 23
  # numpy reference: the z-scores themselves, neither / 255 nor clipped to [0, 1].
  np.testing.assert_array_equal(image[mask], volumes[index[mask]].astype(np.float32))
  assert image.min() < -1 and image.max() > 2
  assert not image[~mask].any()


@pytest.mark.parametrize("mode", ["host", "device"])
def test_uint8_network_inputs_are_unchanged_bit_for_bit(cohort, mode):
  volumes, ages = cohort
  pipe = pl.make_pipeline(pl.ArraySource(volumes, ages), batch_size=8, mode=mode,
                          shuffle=False, drop_remainder=False, num_epochs=1)
  image, index, mask = _eval_images(pipe)
  stored = volumes[index[mask]]
  # numpy reference: uint8 times the float32 reciprocal of 255 ...
  np.testing.assert_array_equal(image[mask], stored.astype(np.float32) * np.float32(1 / 255))
  # ... which is what the pipelines computed before float16 caches (`x / 255` under jit).
  before = jax.jit(lambda x: x.astype(np.float32) / np.float32(255.0))
  np.testing.assert_array_equal(image[mask], np.asarray(before(stored)))


def test_zscore_device_mode_equals_host_mode_with_augmentation(zcohort):
  volumes, ages = zcohort
  mesh = shd.make_mesh()
  cfg = aug.AugmentConfig(shift_voxels=1, rotate_degrees=8.0, flip_lr=True, noise_std=0.05)
  kw = dict(batch_size=8, seed=11, rows=np.arange(1, 24), num_epochs=1)
  device = list(pl.DeviceResidentPipeline(volumes, ages, augment=cfg, mesh=mesh, **kw))
  host = list(pl.DeviceFeed(iter(pl.HostPipeline(pl.ArraySource(volumes, ages), **kw)), mesh,
                            cfg))
  assert len(device) == len(host) == 2
  for a, b in zip(device, host):
    for k in a:
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-5,
                                 err_msg=k)
    image = np.asarray(a["image"])
    assert image.min() < -1 and image.max() > 2  # augmentation does not clip z-scores


def test_zscore_cache_through_the_batches_command(tmp_path, zcohort, capsys):
  volumes, ages = zcohort
  path = _fake_cache(tmp_path, volumes, ages)
  src = pl.cache_source(path)
  assert src.dtype == np.float16
  np.testing.assert_array_equal(src.read(np.array([4, 2])), volumes[[4, 2]])
  for mode in ("host", "device"):
    rc = _batches(["--cache", str(path), "--batch-size", "4", "--mode", mode, "--augment"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert "volumes (6, 7, 5, 2) float16" in out[0] and f"mode {mode}" in out[0]
    assert "float32 (4, 6, 7, 5, 2)" in [line for line in out if line.startswith("epoch ")][0]


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint16])
def test_other_dtypes_are_a_one_line_error_naming_the_dtype(cohort, dtype):
  volumes, ages = cohort
  bad = volumes.astype(dtype)
  name = np.dtype(dtype).name
  for make in (lambda: pl.ArraySource(bad, ages),
               lambda: pl.DeviceResidentPipeline(bad, ages, batch_size=4)):
    with pytest.raises(DataError, match=rf"volumes .*are {name}; expected uint8") as e:
      make()
    assert "\n" not in str(e.value)
