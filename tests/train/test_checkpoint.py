"""Orbax checkpoints (latest/best, manifests, shape checks, checksums and fallback to an intact
step) and the TensorBoard writer."""

from __future__ import annotations

import hashlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_brainage import integrity, sharding
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.train import checkpoint as ckpt_lib
from jax_brainage.train.summary import SummaryWriter, encode_png, mid_slices

MANIFEST = {"model": "mrinet", "model_kwargs": {"mean_age": 50.0, "dense_features": 8},
            "image_shape": [16, 16, 16], "sequences": ["T1w"]}


def _state(mesh, scale=1.0):
  rng = np.random.default_rng(0)
  host = {"step": np.int32(7), "params": {"w": rng.normal(size=(3, 4)).astype(np.float32) * scale,
                                          "b": np.arange(4, dtype=np.float32)},
          "rng": np.array([1, 2], np.uint32)}
  return jax.device_put(host, sharding.replicated(mesh)), host


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_latest_and_best_round_trip_exactly_with_shardings(tmp_path):
  mesh = sharding.make_mesh()
  state, host = _state(mesh)
  ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2)
  for step in (1, 2, 3):
    ckpts.save(ckpt_lib.LATEST, step, state, {"progress": {"epoch": step}, "manifest": MANIFEST})
  ckpts.save(ckpt_lib.BEST, 2, state, {"progress": {"epoch": 2}, "manifest": MANIFEST})
  ckpts.wait()
  ckpts.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir()) == ["2", "3"]
  reopened = ckpt_lib.Checkpoints(tmp_path, read_only=True)
  assert reopened.latest_step() == 3 and reopened.latest_step(ckpt_lib.BEST) == 2
  restored, meta = reopened.restore(ckpt_lib.LATEST, _abstract(state), MANIFEST)
  assert meta["progress"] == {"epoch": 3} and meta["step"] == 3
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), b)
    assert a.dtype == b.dtype
  assert restored["params"]["w"].sharding.is_equivalent_to(sharding.replicated(mesh), 2)


def test_checkpoint_of_another_architecture_or_input_is_a_config_error(tmp_path):
  mesh = sharding.make_mesh()
  state, _ = _state(mesh)
  ckpts = ckpt_lib.Checkpoints(tmp_path)
  ckpts.save(ckpt_lib.LATEST, 1, state, {"manifest": MANIFEST})
  ckpts.wait()
  # mean_age only sets an initial bias: not an architecture difference.
  same = dict(MANIFEST, model_kwargs={"mean_age": 61.0, "dense_features": 8})
  ckpts.restore(ckpt_lib.LATEST, _abstract(state), same)
  for changed, what in ((dict(MANIFEST, model="sfcn"), "model is 'mrinet' there"),
                        (dict(MANIFEST, sequences=["FLAIR"]), "sequences is"),
                        (dict(MANIFEST, image_shape=[32, 32, 32]), "image_shape is")):
    with pytest.raises(ConfigError, match=f"holds another architecture: {what}") as info:
      ckpts.restore(ckpt_lib.LATEST, _abstract(state), changed)
    assert "checkpoints/latest/1" in str(info.value) and "\n" not in str(info.value)
  wrong = dict(_abstract(state), params={"w": jax.ShapeDtypeStruct((3, 5), jnp.float32),
                                         "b": jax.ShapeDtypeStruct((4,), jnp.float32)})
  with pytest.raises(ConfigError, match=r"params/w has shape \(3, 4\) there, \(3, 5\) here"):
    ckpts.restore(ckpt_lib.LATEST, wrong, MANIFEST)
  ckpts.close()


def _save_steps(tmp_path, steps, state, keep=1):
  ckpts = ckpt_lib.Checkpoints(tmp_path, keep=keep)
  for step in steps:
    ckpts.save(ckpt_lib.LATEST, step, state, {"progress": {"epoch": step}, "manifest": MANIFEST,
                                              "data_state": {"step": step}})
  ckpts.wait()
  return ckpts


def _array_file(step_dir):
  """The biggest file of a step's arrays (an ocdbt data file)."""
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def test_two_latest_kept_and_every_step_sealed_with_its_files_digests(tmp_path):
  state, _ = _state(sharding.make_mesh())
  _save_steps(tmp_path, (1, 2, 3), state, keep=1).close()  # keep=1 still keeps two
  latest = tmp_path / "checkpoints" / "latest"
  assert sorted(p.name for p in latest.iterdir()) == ["2", "3"]
  for step_dir in latest.iterdir():
    files = json.loads((step_dir / integrity.RECORD).read_text())["files"]
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}
    # Everything but the record and orbax's own commit records (rewritten at the rename).
    assert set(files) == on_disk - {integrity.RECORD, "_CHECKPOINT_METADATA",
                                    "commit_success.txt"}
    assert "meta/metadata" in files and any(k.startswith("state/") for k in files)
    for name, entry in files.items():  # hashlib over the bytes, independently of the module
      data = (step_dir / name).read_bytes()
      assert entry == {"size": len(data),
                       "digest": hashlib.blake2b(data, digest_size=32).hexdigest()}


def test_damaged_step_is_one_line_naming_the_file(tmp_path):
  state, _ = _state(sharding.make_mesh())
  _save_steps(tmp_path, (1,), state).close()
  step_dir = tmp_path / "checkpoints" / "latest" / "1"
  bad = _array_file(step_dir)
  data = bytearray(bad.read_bytes())
  data[len(data) // 2] ^= 0xFF  # one flipped byte, size kept
  bad.write_bytes(bytes(data))
  ckpts = ckpt_lib.Checkpoints(tmp_path, read_only=True)
  for read in (lambda: ckpts.read_meta(), lambda: ckpts.restore_stored(ckpt_lib.LATEST),
               lambda: ckpts.restore(ckpt_lib.LATEST, _abstract(state), MANIFEST)):
    with pytest.raises(DataError, match="corrupt file of the latest checkpoint") as info:
      read()
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
  # Without its record (a checkpoint saved before checksums) the step is read unverified.
  (step_dir / integrity.RECORD).unlink()
  assert not ckpt_lib.Checkpoints(tmp_path, read_only=True).verify(ckpt_lib.LATEST, 1)


def test_restore_intact_falls_back_with_one_warning_and_the_step_is_saved_anew(tmp_path,
                                                                               capsys):
  mesh = sharding.make_mesh()
  state, host = _state(mesh)
  ckpts = _save_steps(tmp_path, (4, 6), state, keep=2)
  bad = _array_file(tmp_path / "checkpoints" / "latest" / "6")
  bad.write_bytes(bad.read_bytes()[:-7])  # truncated
  restored, meta, step = ckpts.restore_intact(ckpt_lib.LATEST, _abstract(state), MANIFEST)
  assert step == 4 and meta["data_state"] == {"step": 4}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), b)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"warning: {bad}: truncated file"), err
  assert "latest/4 (step 4, data-iterator step 4)" in err[0]
  assert (tmp_path / "checkpoints" / "corrupt" / "latest-6").is_dir()
  assert ckpts.all_steps() == [4]
  # The resumed run saves step 6 again (no "step already exists").
  ckpts.save(ckpt_lib.LATEST, 6, state, {"manifest": MANIFEST})
  ckpts.wait()
  assert ckpts.all_steps() == [6, 4] and ckpts.verify(ckpt_lib.LATEST, 6)
  ckpts.close()
  # Every step damaged: one error line; a best that is not required: None and a warning.
  truncate_all = [_array_file(tmp_path / "checkpoints" / "latest" / s) for s in ("4", "6")]
  for f in truncate_all:
    f.write_bytes(f.read_bytes()[:10])
  fresh = ckpt_lib.Checkpoints(tmp_path)
  with pytest.raises(DataError, match="no intact latest checkpoint in") as info:
    fresh.restore_intact(ckpt_lib.LATEST, _abstract(state), MANIFEST)
  assert "\n" not in str(info.value)
  assert fresh.restore_intact(ckpt_lib.BEST, _abstract(state), MANIFEST, required=False) is None
  fresh.close()


def test_non_finite_parameters_are_refused_at_restore(tmp_path):
  mesh = sharding.make_mesh()
  state, _ = _state(mesh, scale=np.nan)
  ckpts = _save_steps(tmp_path, (1,), state)
  with pytest.raises(DataError, match="latest/1: checkpoint holds non-finite parameters"):
    ckpts.restore(ckpt_lib.LATEST, _abstract(state), MANIFEST)
  ckpts.close()


def test_no_checkpoint_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="no best checkpoint in"):
    ckpt_lib.Checkpoints(tmp_path).read_meta(ckpt_lib.BEST)


def test_png_encoder_decodes_with_pillow():
  from PIL import Image

  image = np.random.default_rng(0).integers(0, 256, (7, 11)).astype(np.uint8)
  decoded = np.asarray(Image.open(io.BytesIO(encode_png(image))))
  np.testing.assert_array_equal(decoded, image)


def test_mid_slices_window_z_scores_per_channel():
  volume = np.zeros((4, 6, 8, 2), np.float32)
  volume[2, :, :, 0] = np.linspace(-3.0, 5.0, 8)  # channel 0 spans -3..5 on its sagittal slice
  volume[2, 0, 0, 1] = -1.0
  volume[2, 0, 1, 1] = 0.5
  image = mid_slices(volume, window=None)
  side = 8
  sagittal0 = image[:side, :side]  # rows: z from the top (z = 7) down, columns: y
  np.testing.assert_array_equal(sagittal0[0, :6], 255)
  np.testing.assert_array_equal(sagittal0[7, :6], 0)
  np.testing.assert_array_equal(sagittal0[:, 0], np.rint(np.linspace(255, 0, 8)))
  sagittal1 = image[side:, :side]
  # channel 1 on its own range [-1, 0.5]: background 0 is 2/3 of the way up.
  assert (sagittal1[7, 0], sagittal1[6, 0], sagittal1[0, 0]) == (0, 255, 170)
  # The default window (0, 1) would blacken every negative z-score (3 of 8 here): hence None.
  assert (mid_slices(volume)[:side, :side][:, 0] == 0).sum() == 3


def test_mid_slices_show_each_plane_upright():
  volume = np.zeros((4, 6, 8, 2), np.float32)
  volume[2, :, 7, 0] = 1.0   # top (superior) row of the sagittal mid-slice, channel 0
  volume[:, 3, 0, 1] = 0.5   # bottom (inferior) row of the coronal mid-slice, channel 1
  image = mid_slices(volume)
  side = 8
  assert image.shape == (2 * side, 3 * side) and image.dtype == np.uint8
  sagittal = image[:side, :side]
  np.testing.assert_array_equal(sagittal[0, :6], 255)  # z = 7 is the top row
  assert sagittal[1:].max() == 0
  coronal_c1 = image[side:, side:2 * side]
  np.testing.assert_array_equal(coronal_c1[7, :4], 128)  # z = 0 is the bottom row
  assert coronal_c1[:7].max() == 0


def test_summary_writer_scalars_and_images_read_back(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  writer = SummaryWriter(tmp_path, enabled=True)
  writer.scalars(3, {"train/loss": 2.5, "train/learning_rate": 5e-4})
  writer.scalars(5, {"train/loss": 1.5})
  writer.image(0, "inputs/0", np.full((4, 9), 200, np.uint8))
  writer.close()
  off = SummaryWriter(tmp_path / "off", enabled=False)
  off.scalars(1, {"x": 1.0})
  assert not (tmp_path / "off").exists()
  events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 2.5), (5, 1.5)]
  np.testing.assert_allclose(events.Scalars("train/learning_rate")[0].value, 5e-4, rtol=1e-6)
  image = events.Images("inputs/0")[0]
  assert (image.height, image.width) == (4, 9)
