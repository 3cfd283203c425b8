"""Shardings on the 4 fake CPU devices (tests/conftest.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_brainage import sharding
from jax_brainage.errors import ConfigError


def test_mesh_covers_all_devices_with_named_axes():
  mesh = sharding.make_mesh()
  assert jax.device_count() == 4
  assert mesh.axis_names == ("ensemble", "data")
  assert dict(mesh.shape) == {"ensemble": 1, "data": 4}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  mesh2 = sharding.make_mesh(ensemble=2)
  assert dict(mesh2.shape) == {"ensemble": 2, "data": 2}


def test_mesh_rejects_ensemble_axis_that_does_not_divide_devices():
  with pytest.raises(ConfigError, match="ensemble axis of size 3"):
    sharding.make_mesh(ensemble=3)


def test_global_batch_splits_examples_over_data_axis():
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  local = {"image": rng.integers(0, 256, (8, 4, 4, 4, 1), dtype=np.uint8),
           "age": rng.uniform(18, 82, 8).astype(np.float32)}
  batch = sharding.global_batch(mesh, local)
  assert batch["image"].shape == (8, 4, 4, 4, 1) and batch["image"].dtype == jnp.uint8
  # Each device holds 2 consecutive examples, in order.
  for shard in batch["age"].addressable_shards:
    rows = shard.index[0]
    np.testing.assert_array_equal(np.asarray(shard.data), local["age"][rows])
    assert rows.stop - rows.start == 2
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def test_member_batches_split_over_both_axes():
  mesh = sharding.make_mesh(ensemble=2)
  x = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)
  arr = sharding.global_batch(mesh, {"age": x}, members=True)["age"]
  for shard in arr.addressable_shards:
    assert shard.data.shape == (1, 3)
    np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])


def test_state_shardings_replicate_one_model_and_split_stacked_members():
  mesh = sharding.make_mesh(ensemble=2)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32),
           "w": jax.ShapeDtypeStruct((2, 3, 5), jnp.float32)}
  single = sharding.state_shardings(mesh, state)
  assert all(s.is_fully_replicated for s in jax.tree.leaves(single))
  stacked = sharding.state_shardings(mesh, state, members=True)
  assert stacked["step"].is_fully_replicated
  w = jax.device_put(np.ones((2, 3, 5), np.float32), stacked["w"])
  assert {s.data.shape for s in w.addressable_shards} == {(1, 3, 5)}


@pytest.mark.parametrize("batch_size", [0, 6])
def test_batch_size_must_divide_over_devices(batch_size):
  with pytest.raises(ConfigError, match=f"config.batch_size={batch_size}"):
    sharding.check_batch_size(batch_size, sharding.make_mesh())


def test_jit_with_shardings_gives_numpy_result():
  mesh = sharding.make_mesh()
  x = np.linspace(0, 1, 16, dtype=np.float32).reshape(8, 2)
  batch = sharding.global_batch(mesh, {"x": x})
  f = jax.jit(lambda b: jnp.mean(b["x"] ** 2), out_shardings=sharding.replicated(mesh))
  np.testing.assert_allclose(sharding.to_host(f(batch)), np.mean(x ** 2), rtol=1e-6)
