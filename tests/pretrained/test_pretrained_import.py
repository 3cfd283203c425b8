"""`brainage import` of published weights: each format's architecture is built in its own
framework (Keras 3 on JAX, PyTorch), saved as its project saves it, imported, and the imported
workdir's predictions (through `artifact.load`, the one path every command uses) must equal the
source framework's forward pass on the same inputs (relative 1e-4, float32). Bad files are one
line naming the file and the first layer that does not fit."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")

from jax_brainage.errors import BrainAgeError, ConfigError, DataError  # noqa: E402
from jax_brainage.models import orientation  # noqa: E402
from jax_brainage.pretrained import sources  # noqa: E402
from jax_brainage.pretrained import workdir as pretrained  # noqa: E402
from jax_brainage.train import artifact  # noqa: E402

HERE = Path(__file__).resolve().parent
RTOL = 1e-4


def _nets():
  name = "_pretrained_source_nets"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, HERE / "source_nets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


nets = _nets()


def _volumes(n: int, shape=(32, 32, 32), seed: int = 1) -> np.ndarray:
  """uint8 cubes `[n, X, Y, Z, 1]` in RAS+ (what `brainage predict` feeds: / 255)."""
  return np.random.default_rng(seed).integers(0, 256, (n, *shape, 1), dtype=np.uint8)


def _in(x_uint8: np.ndarray, codes: str) -> np.ndarray:
  """The source's input: the same voxels / 255 in the source's array orientation."""
  x = x_uint8.astype(np.float32) / np.float32(255)
  return np.asarray(orientation.from_ras(jnp.asarray(x), codes))


@pytest.fixture(scope="module")
def keras_mrinet():
  pytest.importorskip("keras", reason="keras is not installed (requirements-dev.txt)")
  return nets.keras_mrinet((32, 32, 32), seed=0)


def test_mrinet_keras_matches_keras(keras_mrinet, tmp_path):
  path = tmp_path / "m.weights.h5"
  keras_mrinet.save_weights(path)
  w = tmp_path / "W"
  pretrained.import_model("mrinet-keras", path, w, image_shape=(32, 32, 32))
  x = _volumes(3)
  expected = nets.keras_forward(keras_mrinet, _in(x, "LIA"))[:, 0]
  model = artifact.load(w)
  assert artifact.is_single_model(model)
  got = model.predict({"model": x}, batch_size=2).ensemble
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  assert np.ptp(expected) > 1e-3  # a constant net would prove nothing
  record = json.loads((w / pretrained.IMPORT_RECORD).read_text())
  assert record["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert record["source"]["orientation"] == "LIA" and record["preprocessing"]["shape"] == [32] * 3


@pytest.mark.parametrize("layout", ["keras3-legacy", "keras2"])
def test_mrinet_keras_layouts(keras_mrinet, layout, tmp_path):
  """The other layouts give the arrays Keras holds (the forward pass is checked above)."""
  path = tmp_path / "t1_model.h5"
  if layout == "keras3-legacy":
    keras_mrinet.save(path)
  else:
    nets.save_keras2_layout(keras_mrinet, path)
  imported = sources.mrinet_from_keras(path, image_shape=(32, 32, 32))
  ours = [imported.variables["params"][layer][name]
          for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "dense1", "age_head")
          for name in ("kernel", "bias")]
  theirs = keras_mrinet.get_weights()
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)


def test_sfcn_torch_dataparallel_matches_torch(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is not installed")
  net = nets.torch_sfcn(seed=0, bins=40, channels=(4, 6, 8, 8, 8, 4))  # widths from the file
  path = tmp_path / "run_20190719_00_epoch_best_mae.p"
  torch.save(torch.nn.DataParallel(net).state_dict(), path)
  assert next(iter(torch.load(path, weights_only=True))).startswith("module.")
  w = tmp_path / "W"
  pretrained.import_model("sfcn-torch", path, w, image_shape=(32, 32, 32))
  x = _volumes(2, seed=2)
  source = torch.from_numpy(np.moveaxis(_in(x, "LAS"), -1, 1).copy())
  with torch.no_grad():
    log_probs = net(source).numpy()
  expected = np.exp(log_probs) @ (42.5 + np.arange(40))  # Peng's bin centres, 42-82 y
  got = artifact.load(w).predict({"model": x}, batch_size=2).ensemble
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  # New scans are divided by the mean of the 182x218x182 MNI volume, as Peng et al. did.
  prep = json.loads((w / "import.json").read_text())["preprocessing"]
  assert prep["scaling"] == "mean" and prep["mean_over_voxels"] == 182 * 218 * 182


@pytest.mark.parametrize("classes", [0, 11])
def test_pyment_keras_matches_keras(classes, tmp_path):
  pytest.importorskip("keras", reason="keras is not installed (requirements-dev.txt)")
  channels = (4, 6, 8, 8, 8, 4)  # tiny widths: the importer reads them from the file
  source = nets.keras_pyment((32, 32, 32), seed=3, classes=classes, channels=channels)
  path = tmp_path / "sfcn.weights.h5"
  source.save_weights(path)
  w = tmp_path / "W"
  age_range = (3, 95) if not classes else (40, 50)
  pretrained.import_model("pyment-keras", path, w, image_shape=(32, 32, 32), age_range=age_range)
  x = _volumes(3, seed=4)
  out = nets.keras_forward(source, _in(x, "RAS"))
  expected = out[:, 0] if not classes else out @ np.arange(40, 51)
  got = artifact.load(w).predict({"model": x}, batch_size=3).ensemble
  np.testing.assert_allclose(got, expected, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# Bad files: one line naming the file and the first mismatching layer; nothing written.


def _one_line(error: BrainAgeError) -> str:
  text = str(error)
  assert "\n" not in text
  return text


def test_truncated_and_corrupt_files(keras_mrinet, tmp_path):
  path = tmp_path / "t1_model.h5"
  keras_mrinet.save(path)
  data = path.read_bytes()
  (tmp_path / "cut.h5").write_bytes(data[:len(data) // 2])
  (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
  for name in ("cut.h5", "junk.h5", "missing.h5"):
    with pytest.raises(DataError) as e:
      pretrained.import_model("mrinet-keras", tmp_path / name, tmp_path / f"W-{name}",
                              image_shape=(32, 32, 32))
    assert str(tmp_path / name) in _one_line(e.value)
    assert not (tmp_path / f"W-{name}" / "ensemble").exists()


def test_wrong_layer_count_and_shapes(tmp_path):
  keras = pytest.importorskip("keras")
  L = keras.layers
  # One conv block short: the file is named and the missing layer counted.
  short = keras.Sequential([keras.Input((32, 32, 32, 1))] + [
      L.Conv3D(f, 3, padding="same") for f in (16, 16, 32, 64)] + [
      L.Flatten(), L.Dense(64), L.Dense(1)])
  short.save_weights(tmp_path / "short.weights.h5")
  with pytest.raises(DataError, match=r"short\.weights\.h5: 4 conv layers, MRInet has 5"):
    pretrained.import_model("mrinet-keras", tmp_path / "short.weights.h5", tmp_path / "W1",
                            image_shape=(32, 32, 32))
  # Another input shape than the file's dense layer was trained for: names that layer.
  nets.keras_mrinet((32, 32, 32)).save_weights(tmp_path / "m.weights.h5")
  with pytest.raises(DataError) as e:
    pretrained.import_model("mrinet-keras", tmp_path / "m.weights.h5", tmp_path / "W2",
                            image_shape=(64, 64, 64))
  assert re.search(r"m\.weights\.h5: layer dense\S* \(params/dense1/kernel\) has shape \(32, "
                   r"64\) in the file, mrinet expects \(256, 64\)", _one_line(e.value))
  # Another architecture: pyment's SFCN imported as MRInet.
  nets.keras_pyment((32, 32, 32), channels=(4, 6, 8, 8, 8, 4)).save_weights(
      tmp_path / "p.weights.h5")
  with pytest.raises(DataError, match=r"p\.weights\.h5: 6 conv layers, MRInet has 5 \(first "
                                     r"mismatching: \S*top_conv\)"):
    pretrained.import_model("mrinet-keras", tmp_path / "p.weights.h5", tmp_path / "W3")
  # And MRInet imported as pyment: the conv count does not fit.
  with pytest.raises(DataError, match=r"m\.weights\.h5: 5 conv layers, pyment's SFCN has 6"):
    pretrained.import_model("pyment-keras", tmp_path / "m.weights.h5", tmp_path / "W4")


def test_torch_mismatches(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  state = torch.nn.DataParallel(nets.torch_sfcn(bins=40, channels=(4, 6, 8, 8, 8, 4)))
  state = state.state_dict()
  bad = dict(state)
  bad["module.feature_extractor.conv_2.0.weight"] = torch.zeros(8, 5, 3, 3, 3)
  torch.save(bad, tmp_path / "bad.p")
  with pytest.raises(DataError) as e:
    pretrained.import_model("sfcn-torch", tmp_path / "bad.p", tmp_path / "W1",
                            image_shape=(32, 32, 32))
  assert _one_line(e.value).startswith(f"{tmp_path / 'bad.p'}: layer feature_extractor.conv_2.0")
  short = {k: v for k, v in state.items() if "conv_5" not in k}
  torch.save(short, tmp_path / "short.p")
  with pytest.raises(DataError, match=r"short\.p: layer feature_extractor\.conv_5 missing"):
    pretrained.import_model("sfcn-torch", tmp_path / "short.p", tmp_path / "W2")
  (tmp_path / "junk.p").write_bytes(b"\x80\x04junk")
  with pytest.raises(DataError, match=r"junk\.p: unreadable PyTorch state dict"):
    pretrained.import_model("sfcn-torch", tmp_path / "junk.p", tmp_path / "W3")
  # Without torch: one line saying how to install it.
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ConfigError, match=r"pip install torch"):
    pretrained.import_model("sfcn-torch", tmp_path / "short.p", tmp_path / "W4")


def test_refuses_a_used_workdir(keras_mrinet, tmp_path):
  keras_mrinet.save_weights(tmp_path / "m.weights.h5")
  (tmp_path / "W").mkdir()
  (tmp_path / "W" / "config.json").write_text("{}")
  with pytest.raises(ConfigError, match="not empty"):
    pretrained.import_model("mrinet-keras", tmp_path / "m.weights.h5", tmp_path / "W")
