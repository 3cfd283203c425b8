"""Keras weight files (`.h5`) read with h5py: no TensorFlow or Keras needed.

Three layouts exist, all read here into the same list of `Layer`s (in the network's order):

- Keras 2 `model.save("m.h5")` (the study's MRInet files, loaded by xai4mri with
  `keras.models.load_model`): group `model_weights` whose attribute `layer_names` lists the
  layers in order; each layer group's attribute `weight_names` lists its arrays, stored at
  `model_weights/<layer>/<weight name>` (e.g. `conv3d/kernel:0`).
- Keras 2 `model.save_weights("m.h5")`: the same at the file's root (no `model_weights`).
  Keras 3's legacy `model.save("m.h5")` writes the Keras 2 layout with names without `:0`
  (`sequential/conv3d/kernel`).
- Keras 3 `model.save_weights("m.weights.h5")`: `layers/<key>/vars/<i>` where `<key>` is the
  layer class's snake-case name numbered in creation order (`conv3d`, `conv3d_1`, ...) and the
  arrays are numbered in the layer's variable order (Conv/Dense: kernel, bias; BatchNorm: gamma,
  beta, moving_mean, moving_variance). h5py lists groups alphabetically, so the order within a
  layer class is restored from the numbers.

Arrays keep Keras' layout, which is flax's: conv kernels `[kx, ky, kz, in, out]`, dense kernels
`[in, out]` (channels-last flatten as in the flax models).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import h5py
import numpy as np

from jax_brainage.errors import DataError

# Keras' variable names per layer kind, in its variable order.
CONV_NAMES = ("kernel", "bias")
NORM_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One Keras layer with weights.

  Attributes:
    name: the layer's name in the file (e.g. "conv3d_2", "Regression3DSFCN/block1/conv").
    kind: "conv" (kernel of rank 5), "dense" (kernel of rank 2) or "norm" (BatchNormalization).
    weights: Keras variable name ("kernel", "bias", "gamma", ...) -> float32 array.
  """

  name: str
  kind: str
  weights: dict[str, np.ndarray]


def _kind(arrays: list[np.ndarray], names: list[str]) -> str | None:
  if "moving_mean" in names or (not any(n in CONV_NAMES for n in names) and len(arrays) == 4
                                and all(a.ndim == 1 for a in arrays)):
    return "norm"
  if arrays and arrays[0].ndim == 5:
    return "conv"
  if arrays and arrays[0].ndim == 2:
    return "dense"
  return None


def _named(arrays: list[np.ndarray], names: list[str], kind: str) -> dict[str, np.ndarray]:
  """Keras variable name -> array, from stored names where they are known, else by position."""
  known = CONV_NAMES if kind in ("conv", "dense") else NORM_NAMES
  if names and all(n in known for n in names) and len(set(names)) == len(names):
    return dict(zip(names, arrays))
  return dict(zip(known, arrays))


def _natural(key: str) -> tuple[str, int]:
  """("conv3d", 0) for "conv3d", ("conv3d", 12) for "conv3d_12": Keras' creation order."""
  m = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
  return m.group(1), int(m.group(2) or 0)


def _read(f, path: Path) -> list[Layer]:
  layers: list[Layer] = []
  if "layers" in f and "layer_names" not in f.attrs and "model_weights" not in f:
    group = f["layers"]
    for key in sorted(group, key=_natural):
      vars_ = group[key].get("vars")
      if vars_ is None or not len(vars_):
        continue
      arrays = [np.asarray(vars_[k], np.float32) for k in sorted(vars_, key=int)]
      name = str(vars_.attrs.get("name", key))
      kind = _kind(arrays, [])
      if kind is None:
        raise DataError(f"{path}: layer {name}: weights of shapes "
                        f"{[a.shape for a in arrays]} are not a conv, dense or batch-norm layer")
      layers.append(Layer(name, kind, _named(arrays, [], kind)))
    return layers
  root = f["model_weights"] if "model_weights" in f else f
  if "layer_names" not in root.attrs:
    raise DataError(f"{path}: not a Keras weight file (no model_weights/layer_names nor "
                    "layers/<name>/vars groups)")
  for raw in root.attrs["layer_names"]:
    name = raw.decode() if isinstance(raw, bytes) else str(raw)
    group = root[name]
    stored = [w.decode() if isinstance(w, bytes) else str(w)
              for w in group.attrs.get("weight_names", [])]
    if not stored:
      continue
    arrays = [np.asarray(group[w], np.float32) for w in stored]
    # "conv3d/kernel:0" (Keras 2), "sequential/conv3d/kernel" (Keras 3 legacy) -> "kernel"
    short = [w.rsplit("/", 1)[-1].split(":")[0] for w in stored]
    kind = _kind(arrays, short)
    if kind is None:
      raise DataError(f"{path}: layer {name}: weights {short} of shapes "
                      f"{[a.shape for a in arrays]} are not a conv, dense or batch-norm layer")
    layers.append(Layer(name, kind, _named(arrays, short, kind)))
  return layers


def read_layers(path: str | os.PathLike) -> list[Layer]:
  """The layers with weights of a Keras `.h5` file, in network order (see the module docstring).

  Raises:
    DataError: one line naming the file when it is missing, not HDF5 (corrupt, truncated), or
      not laid out as Keras writes weights; or naming the first layer that cannot be read.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: weights file not found")
  try:
    with h5py.File(path, "r") as f:
      layers = _read(f, path)
  except DataError:
    raise
  except (OSError, KeyError, ValueError, TypeError) as e:
    raise DataError(f"{path}: unreadable Keras weights ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'corrupt or truncated'})") from None
  if not layers:
    raise DataError(f"{path}: no layer with weights in this Keras file")
  return layers
