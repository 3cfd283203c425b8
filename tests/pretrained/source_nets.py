"""The published architectures rebuilt in their own frameworks, as their projects write them, and
their weight files saved the way those projects save them (tests of `jax_brainage.pretrained`).

- MRInet: xai4mri's `MRInet.create` (Keras Sequential), saved with Keras 3's
  `save_weights("*.weights.h5")`, Keras 3's legacy `save("*.h5")`, and the Keras 2 layout
  (`model_weights/<layer>/<layer>/kernel:0`, what xai4mri's published files hold) written with
  h5py as Keras 2's `save_model_to_hdf5` lays it out.
- SFCN: Peng et al.'s PyTorch module (`feature_extractor.conv_i` Sequential(conv, BN, max-pool,
  ReLU), `classifier` (avg-pool, dropout, conv_6)), saved as
  `torch.save(nn.DataParallel(model).state_dict())` (keys `module.`...).
- pyment: `RegressionSFCN` / `SoftClassificationSFCN` (Keras functional, pyment's layer names).

Keras runs on its JAX backend (no TensorFlow); torch on CPU. Weights are random (seeded) with
BatchNorm statistics away from 0/1, so that every parameter matters.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")


def _randomise(model, seed: int, scale: float = 0.05) -> None:
  rng = np.random.default_rng(seed)
  weights = []
  for w in model.get_weights():
    if w.ndim == 1 and np.all(w == 1):  # BN gamma / moving variance: positive, not 1
      weights.append(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
    else:
      weights.append((w + rng.normal(0, scale, w.shape)).astype(np.float32))
  model.set_weights(weights)


def keras_mrinet(shape=(32, 32, 32), seed: int = 0, bias: float = 50.0):
  """xai4mri's MRInet (regression, no batch norm, ReLU) for inputs `shape` (LIA array)."""
  import keras
  L = keras.layers
  m = keras.Sequential(name="mrinet")
  m.add(keras.Input((*shape, 1)))
  for features, k in zip((16, 16, 32, 64, 32), (3, 3, 3, 3, 1)):
    m.add(L.Conv3D(features, (k, k, k), padding="same", activation="relu"))
    m.add(L.MaxPool3D(pool_size=(3, 3, 3), strides=(2, 2, 2), padding="same"))
  m.add(L.Flatten())
  m.add(L.Dropout(rate=0.5))
  m.add(L.Dense(64, activation="relu"))
  m.add(L.Dense(1, bias_initializer=keras.initializers.Constant(bias)))
  _randomise(m, seed)
  return m


def save_keras2_layout(model, path) -> None:
  """The Keras 2 `model.save("m.h5")` weight layout (xai4mri's published files)."""
  with h5py.File(path, "w") as f:
    f.attrs["keras_version"] = "2.11.0"
    f.attrs["backend"] = "tensorflow"
    root = f.create_group("model_weights")
    names = [layer.name for layer in model.layers]
    root.attrs["layer_names"] = np.array([n.encode() for n in names])
    for layer in model.layers:
      group = root.create_group(layer.name)
      weight_names = [f"{layer.name}/{v.name.split('/')[-1]}:0" for v in layer.weights]
      group.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
      for name, value in zip(weight_names, layer.get_weights()):
        group.create_dataset(name, data=value)


def keras_pyment(shape=(32, 32, 32), seed: int = 0, classes: int = 0,
                 prediction_range=(3, 95), channels=(32, 64, 128, 256, 256, 64)):
  """pyment's RegressionSFCN (classes=0, output restricted to `prediction_range` as its
  `restrict_range`) or SoftClassificationSFCN (Dense(classes) softmax), functional Keras."""
  import keras
  L = keras.layers
  name = "Regression3DSFCN" if not classes else "sfcn-sm"
  inputs = keras.Input(shape, name=f"{name}_inputs")
  x = L.Reshape((*shape, 1), name=f"{name}_expand_dims")(inputs)
  for i in range(len(channels) - 1):
    x = L.Conv3D(channels[i], (3, 3, 3), padding="same", name=f"{name}_block{i + 1}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_block{i + 1}_norm")(x)
    x = L.Activation("relu", name=f"{name}_block{i + 1}_relu")(x)
    x = L.MaxPooling3D((2, 2, 2), name=f"{name}_block{i + 1}_pool")(x)
  x = L.Conv3D(channels[-1], (1, 1, 1), padding="same", name=f"{name}_top_conv")(x)
  x = L.BatchNormalization(name=f"{name}_top_norm")(x)
  x = L.Activation("relu", name=f"{name}_top_relu")(x)
  x = L.GlobalAveragePooling3D(name=f"{name}_top_pool")(x)
  x = L.Dropout(0.5, name=f"{name}_top_dropout")(x)
  if classes:
    x = L.Dense(classes, activation="softmax", name=f"{name}_predictions")(x)
  else:
    x = L.Dense(1, name=f"{name}_predictions",
                bias_initializer=keras.initializers.Constant(40.0))(x)
    low, high = prediction_range
    x = L.ReLU(max_value=high - low, name=f"{name}_restrict_relu")(x)
    x = L.Lambda(lambda t: t + low, name=f"{name}_restrict_add")(x)
  model = keras.Model(inputs, x, name=name)
  _randomise(model, seed, scale=0.02)
  return model


def torch_sfcn(seed: int = 0, bins: int = 40, channels=(32, 64, 128, 256, 256, 64)):
  """Peng et al.'s SFCN (their module's structure and names; the average pool is over the whole
  remaining volume, their [5, 6, 5] at 160x192x160), eval mode, random BN statistics."""
  import torch
  from torch import nn

  class SFCN(nn.Module):
    def __init__(self):
      super().__init__()
      self.feature_extractor = nn.Sequential()
      for i, out in enumerate(channels):
        inc = 1 if i == 0 else channels[i - 1]
        if i < len(channels) - 1:
          block = nn.Sequential(nn.Conv3d(inc, out, 3, padding=1), nn.BatchNorm3d(out),
                                nn.MaxPool3d(2, stride=2), nn.ReLU())
        else:
          block = nn.Sequential(nn.Conv3d(inc, out, 1, padding=0), nn.BatchNorm3d(out), nn.ReLU())
        self.feature_extractor.add_module(f"conv_{i}", block)
      self.classifier = nn.Sequential()
      self.classifier.add_module("average_pool", nn.AdaptiveAvgPool3d(1))
      self.classifier.add_module("dropout", nn.Dropout(0.5))
      self.classifier.add_module(f"conv_{len(channels)}", nn.Conv3d(channels[-1], bins, 1))

    def forward(self, x):
      x = self.classifier(self.feature_extractor(x))
      return torch.log_softmax(x, dim=1).reshape(x.shape[0], -1)

  torch.manual_seed(seed)
  model = SFCN()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm3d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.1, 0.1)
  return model.eval()


def keras_forward(model, x: np.ndarray) -> np.ndarray:
  """The Keras model's inference output on `x` (Keras' own broadcasting: the test session's
  rank-promotion guard is for our code)."""
  import jax

  with jax.numpy_rank_promotion("allow"):
    return np.asarray(model(x, training=False))
