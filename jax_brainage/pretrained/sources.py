"""The published brain-age models we import, and how their weight files become flax variables.

Each `Source` records what the model was trained with, as its project documents it (the
preprocessing users must reproduce; `brainage import` writes it into the workdir):

- "mrinet-keras": the study's MRInet base models (Hofmann et al. 2022, NeuroImage 258, 119504),
  published through the authors' xai4mri package (`xai4mri.model.mrinets.PretrainedMRInetT1`,
  `...FLAIR`, `...SWI`: files t1_model.h5, flair_model.h5, swi_model.h5, Keras 2 full models
  loaded with `keras.models.load_model`). Architecture: xai4mri's `MRInet.create` (five conv
  blocks 16-16-32-64-32, 3^3 and a last 1^3, SAME, ReLU, each followed by a 3^3 stride-2 SAME
  max-pool; flatten; dropout 0.5; dense 64 ReLU; dense 1), i.e. `models.MRInet` with the study's
  defaults. Preprocessing (xai4mri `dataloader`): FreeSurfer `brain.finalsurfs.mgz` (T1; FLAIR
  and SWI registered to it), 1 mm, FreeSurfer's LIA array orientation, pruned to a 198^3 cube
  around the brain, clipped at the 99.99th percentile of the non-zero voxels and min-max scaled
  to uint8 0..255 (`transformation.compress_and_norm`); fed as uint8 / 255 here. LIFE-Adult
  study, ages 18-82.
- "sfcn-torch": Peng et al. (2021, Medical Image Analysis 68, 101871), github.com/ha-ha-ha-han/
  UKBiobank_deep_pretrain, `brain_age/run_20190719_00_epoch_best_mae.p` (a state dict saved from
  `nn.DataParallel`: keys start with `module.`). Input: T1 linearly registered to MNI152 1 mm
  (FSL), array as stored (LAS), 182x218x182 cropped to 160x192x160, intensity divided by the
  volume's mean; output 40 one-year bins from 42 y (UK Biobank ages 44-80), soft labels. The
  preprocessing record reproduces the scaling: `intensity.mean_scaled` with the mean taken over
  182 x 218 x 182 voxels (the skull-stripped MNI volume the source divided, before its crop).
- "pyment-keras": Leonardsen et al. (2022, NeuroImage 256, 119210), github.com/estenhl/
  pyment-public: `RegressionSFCN` (SFCN-reg; Dense(1) on the pooled features, output
  restricted to 3-95 years by `restrict_range`) and `SoftClassificationSFCN` (SFCN-sm; Dense
  over integer ages with softmax). Blocks conv 3^3 -> BatchNorm (Keras: epsilon 1e-3) -> ReLU ->
  max-pool 2 (ReLU and max-pool commute, so this is our SFCN trunk). Input 167x212x160 at 1 mm
  (FreeSurfer-processed T1, FSL reorient2std + linear MNI registration, cropped).

Any mismatch between a file and the architecture (layer count, a shape, another network) is a
one-line DataError naming the file and the first layer that does not fit.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jax_brainage import models
from jax_brainage.errors import ConfigError, DataError
from jax_brainage.models import orientation
from jax_brainage.pretrained import keras_h5


@dataclasses.dataclass(frozen=True)
class Source:
  """A published model's format and what it was trained with.

  Attributes:
    format: `brainage import --format` name.
    project: who published it (paper, repository, file names).
    image_shape: input array shape in the source's orientation (voxels).
    voxel_size: mm.
    orientation: the array orientation the weights expect (axis codes).
    intensity: the source's intensity scaling, in words.
    scaling, ceiling_percentile: our nearest `Preprocessing` scaling.
    age_range: the training cohort's ages (years).
    mean_over_voxels: with scaling "mean", the voxel count of the image whose mean the source
      divided by (`Preprocessing.mean_over_voxels`).
  """

  format: str
  project: str
  image_shape: tuple[int, int, int]
  voxel_size: float
  orientation: str
  intensity: str
  scaling: str
  ceiling_percentile: float
  age_range: tuple[float, float]
  mean_over_voxels: int | None = None

  def record(self) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}


SOURCES = {
    "mrinet-keras": Source(
        "mrinet-keras", "Hofmann et al. 2022 (NeuroImage 258:119504); xai4mri "
        "PretrainedMRInetT1/FLAIR/SWI (t1_model.h5, flair_model.h5, swi_model.h5)",
        (198, 198, 198), 1.0, "LIA",
        "FreeSurfer brain.finalsurfs.mgz (FLAIR/SWI registered to it), clipped at the 99.99th "
        "percentile of non-zero voxels, min-max to uint8 0..255, input / 255",
        "minmax", 99.99, (18.0, 82.0)),
    "sfcn-torch": Source(
        "sfcn-torch", "Peng et al. 2021 (Medical Image Analysis 68:101871); "
        "ha-ha-ha-han/UKBiobank_deep_pretrain brain_age/run_20190719_00_epoch_best_mae.p",
        (160, 192, 160), 1.0, "LAS",
        "T1 linearly registered to MNI152 1 mm (FSL), divided by its mean, 182x218x182 cropped "
        "to 160x192x160", "mean", 99.5, (42.0, 82.0), 182 * 218 * 182),
    "pyment-keras": Source(
        "pyment-keras", "Leonardsen et al. 2022 (NeuroImage 256:119210); estenhl/pyment-public "
        "RegressionSFCN (sfcn-reg) / SoftClassificationSFCN (sfcn-sm) Keras weights",
        (167, 212, 160), 1.0, "RAS",
        "FreeSurfer-processed T1, FSL reorient2std and linear MNI registration, cropped to "
        "167x212x160; uint8 intensities", "minmax", 99.5, (3.0, 95.0)),
}

KERAS_FORMATS = ("mrinet-keras", "pyment-keras")


@dataclasses.dataclass(frozen=True)
class Imported:
  """A converted model: its manifest (`models.build_model`) and variables (numpy, unstacked)."""

  manifest: dict[str, Any]
  variables: dict[str, Any]
  source: Source


def _manifest(model: str, kwargs: dict[str, Any], image_shape: Sequence[int],
              sequences: Sequence[str], mean_age: float) -> dict[str, Any]:
  return {"model": model, "model_kwargs": kwargs, "image_shape": [int(s) for s in image_shape],
          "sequences": list(sequences), "mean_train_age": float(mean_age), "num_params": 0,
          "loss": "imported"}


def _fit(path: Path, manifest: dict[str, Any], variables: dict[str, Any],
         names: dict[str, str]) -> dict[str, Any]:
  """Checks every array against the manifest's model; DataError naming the file and the first
  source layer (`names`: our layer -> the file's layer name) whose shape does not fit."""
  expected = models.variable_shapes(manifest)
  flat_want = dict(_flat(jax.tree.map(lambda s: tuple(s.shape), expected,
                                      is_leaf=lambda s: hasattr(s, "shape"))))
  flat_have = dict(_flat(jax.tree.map(np.shape, variables)))
  order = {layer: i for i, layer in enumerate(names)}  # the file's network order
  layer_of = lambda key: key.split("/")[1] if "/" in key else key
  for key in sorted(set(flat_want) | set(flat_have),
                    key=lambda k: (order.get(layer_of(k), len(order)), k)):
    if flat_want.get(key) != flat_have.get(key):
      layer = layer_of(key)
      raise DataError(
          f"{path}: layer {names.get(layer, layer)} ({key}) has shape "
          f"{flat_have.get(key, 'missing')} in the file, {manifest['model']} expects "
          f"{flat_want.get(key, 'none')} (another architecture or input shape?)")
  n = sum(int(np.prod(s)) for k, s in flat_want.items() if k.startswith("params/"))
  manifest["num_params"] = n
  return jax.tree.map(lambda a: np.asarray(a, np.float32), variables)


def _flat(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
  if isinstance(tree, dict):
    return [kv for k, v in tree.items() for kv in _flat(v, f"{prefix}{k}/")]
  return [(prefix[:-1], tree)]


def _count(path: Path, layers: list[keras_h5.Layer], kind: str, want: int, arch: str
           ) -> list[keras_h5.Layer]:
  found = [l for l in layers if l.kind == kind]
  if len(found) != want:
    extra = found[want].name if len(found) > want else "none (missing)"
    raise DataError(f"{path}: {len(found)} {kind} layers, {arch} has {want} (first mismatching: "
                    f"{extra if len(found) > want else f'{kind} layer {len(found) + 1} missing'})")
  return found


def mrinet_from_keras(path: str | os.PathLike, *, sequences: Sequence[str] = ("T1w",),
                      image_shape: Sequence[int] | None = None) -> Imported:
  """The study's Keras MRInet (`.h5`) as `models.MRInet` variables.

  image_shape: the input array shape in the source's orientation (default 198^3).
  """
  path = Path(path)
  source = SOURCES["mrinet-keras"]
  layers = keras_h5.read_layers(path)
  convs = _count(path, layers, "conv", len(models.mrinet.STUDY_CONV_FEATURES), "MRInet")
  norms = [l for l in layers if l.kind == "norm"]
  if norms:
    raise DataError(f"{path}: layer {norms[0].name} is a batch norm; the study's MRInet has none "
                    "(another architecture)")
  dense = _count(path, layers, "dense", 2, "MRInet")
  shape = tuple(image_shape or source.image_shape)
  kwargs = {"mean_age": float(np.mean(source.age_range)),
            "input_orientation": source.orientation}
  manifest = _manifest("mrinet", kwargs, orientation.ras_shape(shape, source.orientation),
                       sequences, np.mean(source.age_range))
  params, names = {}, {}
  for i, layer in enumerate(convs, start=1):
    params[f"conv{i}"] = {"kernel": layer.weights.get("kernel"), "bias": layer.weights.get("bias")}
    names[f"conv{i}"] = layer.name
  for ours, layer in zip(("dense1", "age_head"), dense):
    params[ours] = {"kernel": layer.weights.get("kernel"), "bias": layer.weights.get("bias")}
    names[ours] = layer.name
  return Imported(manifest, _fit(path, manifest, {"params": params}, names), source)


def _torch_state(path: Path) -> dict[str, Any]:
  try:
    import torch  # optional: only this format needs it
  except ImportError:
    raise ConfigError(f"{path}: reading a PyTorch state dict needs torch (pip install torch)"
                      ) from None
  if not path.is_file():
    raise DataError(f"{path}: weights file not found")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 -- pickle/zip errors of a damaged or non-torch file
    raise DataError(f"{path}: unreadable PyTorch state dict ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'corrupt or truncated'})") from None
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
    raise DataError(f"{path}: not a state dict of tensors")
  return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in state.items()}


def sfcn_from_torch(path: str | os.PathLike, *, sequences: Sequence[str] = ("T1w",),
                    image_shape: Sequence[int] | None = None,
                    age_start: float | None = None, bin_width: float = 1.0) -> Imported:
  """Peng et al.'s PyTorch SFCN state dict (`.p`/`.pt`, read with `torch.load(weights_only=True)`:
  no pickle code runs) as `models.SFCN` variables; bins from `age_start` (default 42 y)."""
  path = Path(path)
  source = SOURCES["sfcn-torch"]
  state = _torch_state(path)
  n = len(models.sfcn.SFCN_CHANNELS)
  channels = []
  for i in range(n):
    key = f"feature_extractor.conv_{i}.0.weight"
    if key not in state:
      raise DataError(f"{path}: layer feature_extractor.conv_{i} missing (SFCN has {n} conv "
                      "blocks; another architecture?)")
    channels.append(int(state[key].shape[0]))
  if f"feature_extractor.conv_{n}.0.weight" in state:
    raise DataError(f"{path}: layer feature_extractor.conv_{n} is one more than SFCN's {n}")
  head = f"classifier.conv_{n}.weight"
  if head not in state:
    raise DataError(f"{path}: layer classifier.conv_{n} missing (not an SFCN age head)")
  bins = int(state[head].shape[0])
  start = source.age_range[0] if age_start is None else float(age_start)
  shape = tuple(image_shape or source.image_shape)
  kwargs = {"age_range": [start, start + bins * bin_width], "bin_width": float(bin_width),
            "channels": channels, "input_orientation": source.orientation}
  manifest = _manifest("sfcn", kwargs, orientation.ras_shape(shape, source.orientation),
                       sequences, start + bins * bin_width / 2)
  model = models.build_model(manifest)
  try:
    variables = models.sfcn_variables_from_torch(state, model)
  except DataError as e:
    raise DataError(f"{path}: {e}") from None
  names = {}
  for i in range(n):  # network order: conv, its BatchNorm, the next block ...
    names[f"conv{i + 1}"] = f"feature_extractor.conv_{i}.0"
    names[f"bn{i + 1}"] = f"feature_extractor.conv_{i}.1"
  names["bin_head"] = f"classifier.conv_{n}"
  return Imported(manifest, _fit(path, manifest, jax.tree.map(np.asarray, variables), names),
                  source)


def pyment_from_keras(path: str | os.PathLike, *, sequences: Sequence[str] = ("T1w",),
                      image_shape: Sequence[int] | None = None,
                      age_range: Sequence[float] | None = None) -> Imported:
  """pyment's SFCN-reg (Dense 1: `models.SFCNRegression`, output restricted to `age_range`,
  default 3-95 y; pass the range its model was built with) or SFCN-sm (Dense over the integer
  ages low..high, softmax: `models.SFCN` with one-year bins centred on them)."""
  path = Path(path)
  source = SOURCES["pyment-keras"]
  layers = keras_h5.read_layers(path)
  n = len(models.sfcn.SFCN_CHANNELS)
  convs = _count(path, layers, "conv", n, "pyment's SFCN")
  norms = _count(path, layers, "norm", n, "pyment's SFCN")
  dense = _count(path, layers, "dense", 1, "pyment's SFCN")[0]
  low, high = (float(v) for v in (age_range or source.age_range))
  channels = [int(l.weights["kernel"].shape[-1]) for l in convs]
  outputs = int(dense.weights["kernel"].shape[-1])
  shape = tuple(image_shape or source.image_shape)
  common = {"channels": channels, "bn_epsilon": 1e-3, "bn_momentum": 0.99,
            "input_orientation": source.orientation}
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  names: dict[str, str] = {}
  for i, (conv, norm) in enumerate(zip(convs, norms), start=1):
    params[f"conv{i}"] = {"kernel": conv.weights.get("kernel"), "bias": conv.weights.get("bias")}
    params[f"bn{i}"] = {"scale": norm.weights.get("gamma"), "bias": norm.weights.get("beta")}
    stats[f"bn{i}"] = {"mean": norm.weights.get("moving_mean"),
                       "var": norm.weights.get("moving_variance")}
    names[f"conv{i}"], names[f"bn{i}"] = conv.name, norm.name
  if outputs == 1:
    kwargs = {**common, "mean_age": (low + high) / 2, "output_range": [low, high]}
    manifest = _manifest("sfcn_regression", kwargs,
                         orientation.ras_shape(shape, source.orientation), sequences,
                         (low + high) / 2)
    params["age_head"] = {"kernel": dense.weights.get("kernel"), "bias": dense.weights.get("bias")}
    names["age_head"] = dense.name
  else:
    if age_range is None:
      low, high = source.age_range[0], source.age_range[0] + outputs - 1
    if round(high - low) + 1 != outputs:
      raise DataError(f"{path}: layer {dense.name} has {outputs} age classes, the age range "
                      f"{low:g}-{high:g} has {round(high - low) + 1} (pass --age-range LOW,HIGH)")
    kwargs = {**common, "age_range": [low - 0.5, high + 0.5], "bin_width": 1.0}
    manifest = _manifest("sfcn", kwargs, orientation.ras_shape(shape, source.orientation),
                         sequences, (low + high) / 2)
    kernel = dense.weights.get("kernel")
    params["bin_head"] = {"kernel": None if kernel is None else kernel[None, None, None],
                          "bias": dense.weights.get("bias")}
    names["bin_head"] = dense.name
  return Imported(manifest, _fit(path, manifest, {"params": params, "batch_stats": stats}, names),
                  source)


def import_weights(format: str, path: str | os.PathLike, **options: Any) -> Imported:
  """Dispatches on `format` (one of SOURCES); options as the converter takes them."""
  converters = {"mrinet-keras": mrinet_from_keras, "sfcn-torch": sfcn_from_torch,
                "pyment-keras": pyment_from_keras}
  if format not in converters:
    raise ConfigError(f"--format {format!r}: choose one of {', '.join(converters)}")
  return converters[format](path, **{k: v for k, v in options.items() if v is not None})
