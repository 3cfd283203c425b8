"""Small 3D CNNs in flax, their exact PyTorch replicas, and zennit's relevance for them.

The cross-check of `lrp` against zennit (tests/lrp/test_zennit.py) and the script that writes its
golden files (tests/lrp/make_zennit_golden.py) share these definitions. Importing this module
needs only numpy, jax and flax: torch and zennit are imported inside the functions that use them,
so the golden-file test runs where torch is missing.

Four nets, each a small version of something the study or a user of `lrp` relies on:
- `mrinet_mini`: MRInet's pattern (paper.md): conv 3^3 SAME + ReLU + max-pool 3/2 SAME, three
  times, flatten, dense + ReLU, dense 1. The 3/2 SAME pool has overlapping windows and
  asymmetric padding (XLA puts the odd pad voxel at the high end).
- `batchnorm_net`: BatchNorm after convs and after a dense layer (eval mode, random running
  statistics), folded by zennit's SequentialMergeBatchNorm (with upstream's fix of 0.5.1's
  inexact identity, see `_exact_merge_batch_norm`) and by `lrp.canonizers`.
- `residual_avgpool_net`: a residual block (conv + ReLU + conv, added to the block input) and
  average pooling. zennit has no rule for a plain `+` (it is not a module), so the torch replica
  adds through zennit's own `Sum` layer (stack, then sum), which zennit's composites map to the
  Norm rule, as its ResNet canonizer does; average pooling is Norm in every composite as well.
- `conv_variants_net`: the rest of what `lrp` covers of nn.Conv / nn.ConvTranspose: a stride-2
  SAME first conv, a dilated conv, a grouped conv (feature_group_count=2) and an overlapping
  transposed conv (kernel 3, stride 2), then max-pool 3/2 SAME and average pooling.

Layouts: flax is channels-last, `[batch, x, y, z, channel]`, conv kernels `[kx, ky, kz, in, out]`,
dense kernels `[in, out]`; torch is channels-first, `[batch, channel, x, y, z]`, conv weights
`[out, in, kx, ky, kz]`, linear weights `[out, in]`. The torch replicas move channels last before
flattening, so the dense kernels transfer as a plain transpose.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import types
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NETS = ("mrinet_mini", "batchnorm_net", "residual_avgpool_net", "conv_variants_net")
COMPOSITES = (
  "EpsilonPlus",
  "EpsilonPlusFlat",
  "EpsilonAlpha2Beta1",
  "EpsilonAlpha2Beta1Flat",
  "EpsilonGammaBox",
  "SequentialPresetA",
)
# Input volumes [batch, x, y, z, channel]: non-cubic so that an axis mix-up cannot pass unseen.
INPUT_SHAPE = (2, 12, 10, 8, 1)
# Odd sizes for the stride-2 SAME conv: its padding is then symmetric, which torch can express
# inside the conv (a pad module in front would feed ones into the padding under Flat / ZBox).
INPUT_SHAPES = {net: INPUT_SHAPE for net in NETS} | {"conv_variants_net": (2, 11, 9, 7, 1)}
# Inputs are drawn uniformly from [LOW, HIGH] (signed, like standardised intensities, so the
# negative-input branches of ZPlus / AlphaBeta / Gamma are exercised); ZBox uses the same bounds.
LOW, HIGH = -1.0, 1.0
# zennit's composite defaults, which `lrp` adopts.
EPSILON = 1e-6
STABILIZER = 1e-6
GAMMA = 0.25
PRESET_A_EPSILON = 0.1
BATCHNORM_EPSILON = 1e-5  # flax and torch defaults agree
# A contrast against a reference prediction: the starting relevance f(x) - CONTRAST_REFERENCE
# (e.g. the brain age predicted for a reference subject), explained with CONTRAST_COMPOSITE.
CONTRAST_REFERENCE = 0.5
CONTRAST_COMPOSITE = "EpsilonPlusFlat"


# ---------------------------------------------------------------------------------------------
# flax nets
# ---------------------------------------------------------------------------------------------


class MRInetMini(nn.Module):
  """MRInet's pattern at toy size. Input `[batch, x, y, z, 1]`, output `[batch]`."""

  features: Sequence[int] = (4, 6, 8)
  hidden: int = 16

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate(self.features):
      x = nn.Conv(features, (3, 3, 3), padding="SAME", name=f"conv{i + 1}")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="dense1")(x))
    return nn.Dense(1, name="dense2")(x)[:, 0]


class BatchNormNet(nn.Module):
  """Conv-BN-ReLU twice, dense-BN-ReLU, dense 1 (BN in inference mode). Output `[batch]`."""

  @nn.compact
  def __call__(self, x):
    bn = lambda name: nn.BatchNorm(
      use_running_average=True, epsilon=BATCHNORM_EPSILON, name=name)
    x = nn.relu(bn("bn1")(nn.Conv(4, (3, 3, 3), padding="SAME", name="conv1")(x)))
    x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
    x = nn.relu(bn("bn2")(nn.Conv(6, (3, 3, 3), padding="SAME", name="conv2")(x)))
    x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(bn("bn3")(nn.Dense(8, name="dense1")(x)))
    return nn.Dense(1, name="dense2")(x)[:, 0]


class ResidualAvgPoolNet(nn.Module):
  """Conv, a residual block (conv-ReLU-conv + skip, then ReLU), average pools. Output `[batch]`."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3, 3), padding="SAME", name="conv1")(x))
    h = nn.relu(nn.Conv(4, (3, 3, 3), padding="SAME", name="conv2")(x))
    h = nn.Conv(4, (3, 3, 3), padding="SAME", name="conv3")(h)
    x = nn.relu(h + x)  # the residual sum: Norm in zennit's composites
    x = nn.avg_pool(x, (2, 2, 2), strides=(2, 2, 2))
    x = nn.relu(nn.Conv(6, (3, 3, 3), padding="SAME", name="conv4")(x))
    x = nn.avg_pool(x, (2, 2, 2), strides=(2, 2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(8, name="dense1")(x))
    return nn.Dense(1, name="dense2")(x)[:, 0]


class ConvVariantsNet(nn.Module):
  """Strided, dilated, grouped and transposed 3D convs. Input `[batch, 11, 9, 7, 1]`, output
  `[batch]`.

  The layers are defined in `setup` in reverse data-path order: the "first layer" of the Flat /
  ZBox composites is the first on the data path (conv1), whatever the definition order (lrp.md
  pitfall 6); the torch replica registers its modules in data-path order, which zennit needs.
  """

  def setup(self):
    self.dense2 = nn.Dense(1)
    self.dense1 = nn.Dense(8)
    self.up = nn.ConvTranspose(4, (3, 3, 3), strides=(2, 2, 2), padding="VALID")
    self.conv3 = nn.Conv(8, (3, 3, 3), feature_group_count=2, padding="SAME")
    self.conv2 = nn.Conv(4, (3, 3, 3), kernel_dilation=(2, 2, 2), padding="SAME")
    self.conv1 = nn.Conv(4, (3, 3, 3), strides=(2, 2, 2), padding="SAME")

  def __call__(self, x):
    x = nn.relu(self.conv1(x))
    x = nn.relu(self.conv2(x))
    x = nn.relu(self.conv3(x))
    x = nn.relu(self.up(x))
    x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding="SAME")
    x = nn.avg_pool(x, (2, 2, 2), strides=(2, 2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(self.dense1(x))
    return self.dense2(x)[:, 0]


FLAX_NETS = {
  "conv_variants_net": ConvVariantsNet,
  "mrinet_mini": MRInetMini,
  "batchnorm_net": BatchNormNet,
  "residual_avgpool_net": ResidualAvgPoolNet,
}


def flax_model(net: str) -> nn.Module:
  """The flax module called `net` (one of NETS)."""
  return FLAX_NETS[net]()


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def init_variables(net: str, seed: int) -> dict[str, Any]:
  """Random float64 variables for `net`, drawn with numpy from `seed` (flax only gives shapes).

  Conv and dense kernels are He-normal, biases N(0, 0.1^2) (non-zero, so the rules' bias
  handling matters); BatchNorm gets random running statistics and affine parameters, with some
  negative scales, which flip a folded kernel's sign.
  """
  rng = np.random.default_rng(seed)
  x = jax.ShapeDtypeStruct(INPUT_SHAPES[net], jnp.float32)
  shapes = jax.eval_shape(flax_model(net).init, jax.random.key(0), x)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  values = []
  for path, leaf in leaves:
    name = _path_str(path)
    kind = name.rsplit("/", 1)[-1]
    shape = leaf.shape
    if kind == "kernel":
      fan_in = math.prod(shape[:-1])
      value = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
    elif kind == "bias" and name.startswith("params/bn"):
      value = rng.normal(0.0, 0.2, shape)
    elif kind == "bias":
      value = rng.normal(0.0, 0.1, shape)
    elif kind == "scale":
      value = rng.uniform(0.5, 1.5, shape) * np.where(rng.uniform(size=shape) < 0.25, -1.0, 1.0)
    elif kind == "mean":
      value = rng.normal(0.0, 0.3, shape)
    elif kind == "var":
      value = rng.uniform(0.5, 2.0, shape)
    else:
      raise ValueError(f"init_variables: no initialiser for variable {name!r} of {net}")
    values.append(np.asarray(value, np.float64))
  return jax.tree_util.tree_unflatten(treedef, values)


def random_input(net: str, seed: int) -> np.ndarray:
  """Input volume `[batch, x, y, z, 1]` for `net`, float64, uniform in [LOW, HIGH]."""
  return np.random.default_rng(seed).uniform(LOW, HIGH, INPUT_SHAPES[net])


def flatten_variables(variables) -> dict[str, np.ndarray]:
  """`{'params/conv1/kernel': array, ...}`: the flat form stored in the golden files."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  return {_path_str(path): np.asarray(leaf) for path, leaf in leaves}


def unflatten_variables(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of `flatten_variables`: nested dicts of arrays."""
  out: dict[str, Any] = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


# ---------------------------------------------------------------------------------------------
# torch and zennit
# ---------------------------------------------------------------------------------------------

_MISSING = object()
_STUB_NAMES = ("torchvision", "torchvision.models", "torchvision.models.resnet")


@contextlib.contextmanager
def torchvision_stub():
  """Temporarily provides `torchvision.models.resnet` (BasicBlock, Bottleneck) for zennit's import.

  zennit imports torchvision's ResNet blocks at import time only to name them in its ResNet
  canonizer; there is no CPU build of torchvision here. The stub lives in sys.modules only inside
  this context, so no other test sees a fake torchvision. A real torchvision is left alone.
  """
  try:
    real = importlib.util.find_spec("torchvision") is not None
  except (ImportError, ValueError):
    real = False
  if real:
    yield
    return
  import torch

  saved = {name: sys.modules.get(name, _MISSING) for name in _STUB_NAMES}
  root = types.ModuleType("torchvision")
  models = types.ModuleType("torchvision.models")
  resnet = types.ModuleType("torchvision.models.resnet")
  resnet.BasicBlock = type("BasicBlock", (torch.nn.Module,), {})
  resnet.Bottleneck = type("Bottleneck", (torch.nn.Module,), {})
  root.models, models.resnet = models, resnet
  sys.modules.update(dict(zip(_STUB_NAMES, (root, models, resnet))))
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is _MISSING:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def import_zennit():
  """Imports zennit (with the torchvision stub only while importing); returns the package."""
  if "zennit.composites" not in sys.modules:
    with torchvision_stub():
      import zennit.attribution  # noqa: F401
      import zennit.canonizers  # noqa: F401
      import zennit.composites  # noqa: F401
      import zennit.layer  # noqa: F401
      import zennit.rules  # noqa: F401
  return sys.modules["zennit"]


def _torch_modules():
  """The torch replicas, defined on first use so that this module imports without torch."""
  import torch
  import torch.nn.functional as F
  from torch import nn as tnn

  zennit = import_zennit()

  class SamePad3d(tnn.Module):
    """XLA's SAME padding for a pooling window (odd pad voxel at the high end)."""

    def __init__(self, kernel: int, stride: int, value: float):
      super().__init__()
      self.kernel, self.stride, self.value = kernel, stride, value

    def forward(self, x):
      pads = []
      for n in reversed(x.shape[2:]):  # F.pad lists the last axis first
        total = max((-(-n // self.stride) - 1) * self.stride + self.kernel - n, 0)
        pads += [total // 2, total - total // 2]
      return F.pad(x, pads, value=self.value)

  class ChannelsLastFlatten(tnn.Module):
    """[batch, c, x, y, z] -> [batch, x*y*z*c] in flax's (channels-last) order."""

    def forward(self, x):
      return x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1)

  def max_pool_3_2_same():
    # -inf padding, as flax pads max_pool; the pad is a plain module zennit passes by gradient.
    return [SamePad3d(3, 2, -math.inf), tnn.MaxPool3d(3, 2)]

  class TorchMRInetMini(tnn.Module):
    def __init__(self, features=(4, 6, 8), hidden=16):
      super().__init__()
      # Modules are registered in data-path order: zennit's "first layer" is the first one.
      layers, c_in = [], 1
      for c_out in features:
        layers += [tnn.Conv3d(c_in, c_out, 3, padding=1), tnn.ReLU(), *max_pool_3_2_same()]
        c_in = c_out
      self.features = tnn.Sequential(*layers)
      self.flatten = ChannelsLastFlatten()
      self.dense1 = tnn.Linear(2 * 2 * 1 * c_in, hidden)
      self.act = tnn.ReLU()
      self.dense2 = tnn.Linear(hidden, 1)

    def forward(self, x):
      x = self.flatten(self.features(x))
      return self.dense2(self.act(self.dense1(x)))

  class TorchBatchNormNet(tnn.Module):
    def __init__(self):
      super().__init__()
      eps = BATCHNORM_EPSILON
      # SequentialMergeBatchNorm merges a BN into the module registered just before it.
      self.conv1 = tnn.Conv3d(1, 4, 3, padding=1)
      self.bn1, self.act1 = tnn.BatchNorm3d(4, eps), tnn.ReLU()
      self.pool1 = tnn.MaxPool3d(2, 2)
      self.conv2 = tnn.Conv3d(4, 6, 3, padding=1)
      self.bn2, self.act2 = tnn.BatchNorm3d(6, eps), tnn.ReLU()
      self.pad2, self.pool2 = max_pool_3_2_same()
      self.flatten = ChannelsLastFlatten()
      self.dense1 = tnn.Linear(3 * 3 * 2 * 6, 8)
      self.bn3, self.act3 = tnn.BatchNorm1d(8, eps), tnn.ReLU()
      self.dense2 = tnn.Linear(8, 1)

    def forward(self, x):
      x = self.pool1(self.act1(self.bn1(self.conv1(x))))
      x = self.pool2(self.pad2(self.act2(self.bn2(self.conv2(x)))))
      x = self.act3(self.bn3(self.dense1(self.flatten(x))))
      return self.dense2(x)

  class TorchResidualAvgPoolNet(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1, self.act1 = tnn.Conv3d(1, 4, 3, padding=1), tnn.ReLU()
      self.conv2, self.act2 = tnn.Conv3d(4, 4, 3, padding=1), tnn.ReLU()
      self.conv3 = tnn.Conv3d(4, 4, 3, padding=1)
      # zennit maps its Sum layer to Norm; a bare `+` would be invisible to its composites.
      self.residual_sum, self.act3 = zennit.layer.Sum(dim=-1), tnn.ReLU()
      self.pool1 = tnn.AvgPool3d(2, 2)
      self.conv4, self.act4 = tnn.Conv3d(4, 6, 3, padding=1), tnn.ReLU()
      self.pool2 = tnn.AvgPool3d(2, 2)
      self.flatten = ChannelsLastFlatten()
      self.dense1, self.act5 = tnn.Linear(3 * 2 * 2 * 6, 8), tnn.ReLU()
      self.dense2 = tnn.Linear(8, 1)

    def forward(self, x):
      x = self.act1(self.conv1(x))
      h = self.conv3(self.act2(self.conv2(x)))
      x = self.act3(self.residual_sum(torch.stack([h, x], dim=-1)))
      x = self.pool2(self.act4(self.conv4(self.pool1(x))))
      return self.dense2(self.act5(self.dense1(self.flatten(x))))

  class TorchConvVariantsNet(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1, self.act1 = tnn.Conv3d(1, 4, 3, stride=2, padding=1), tnn.ReLU()
      self.conv2, self.act2 = tnn.Conv3d(4, 4, 3, dilation=2, padding=2), tnn.ReLU()
      self.conv3, self.act3 = tnn.Conv3d(4, 8, 3, padding=1, groups=2), tnn.ReLU()
      self.up, self.act4 = tnn.ConvTranspose3d(8, 4, 3, stride=2), tnn.ReLU()
      self.pad, self.pool1 = max_pool_3_2_same()
      self.pool2 = tnn.AvgPool3d(2, 2)
      self.flatten = ChannelsLastFlatten()
      self.dense1, self.act5 = tnn.Linear(3 * 3 * 2 * 4, 8), tnn.ReLU()
      self.dense2 = tnn.Linear(8, 1)

    def forward(self, x):
      x = self.act3(self.conv3(self.act2(self.conv2(self.act1(self.conv1(x))))))
      x = self.pool2(self.pool1(self.pad(self.act4(self.up(x)))))
      return self.dense2(self.act5(self.dense1(self.flatten(x))))

  return {
    "conv_variants_net": TorchConvVariantsNet,
    "mrinet_mini": TorchMRInetMini,
    "batchnorm_net": TorchBatchNormNet,
    "residual_avgpool_net": TorchResidualAvgPoolNet,
  }


def _flax_to_torch_state(net: str, variables, torch_model) -> dict:
  """Maps flax variables onto the replica's state_dict (layout changes made explicit)."""
  import torch

  params = variables["params"]
  stats = variables.get("batch_stats", {})
  conv_names = sorted(k for k in params if k.startswith("conv"))
  dense_names = sorted(k for k in params if k.startswith("dense"))
  if net == "mrinet_mini":
    # Convs live in `features` (Sequential of 4 modules per stage: conv, relu, pad, pool).
    torch_conv = {name: f"features.{4 * i}" for i, name in enumerate(conv_names)}
  else:
    torch_conv = {name: name for name in conv_names}
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float64))
  state = {}
  for name in conv_names:
    # flax [kx, ky, kz, in, out] -> torch [out, in, kx, ky, kz]
    state[f"{torch_conv[name]}.weight"] = t(np.transpose(params[name]["kernel"], (4, 3, 0, 1, 2)))
    state[f"{torch_conv[name]}.bias"] = t(params[name]["bias"])
  if "up" in params:
    # flax's ConvTranspose (transpose_kernel=False) correlates the dilated input with the kernel
    # as stored; torch's is the gradient of a conv, which flips it: [kx, ky, kz, in, out] ->
    # [in, out, kx, ky, kz] with every spatial axis reversed.
    kernel = params["up"]["kernel"][::-1, ::-1, ::-1]
    state["up.weight"] = t(np.transpose(kernel, (3, 4, 0, 1, 2)))
    state["up.bias"] = t(params["up"]["bias"])
  for name in dense_names:
    state[f"{name}.weight"] = t(np.transpose(params[name]["kernel"]))  # [in, out] -> [out, in]
    state[f"{name}.bias"] = t(params[name]["bias"])
  for name in sorted(k for k in params if k.startswith("bn")):
    state[f"{name}.weight"] = t(params[name]["scale"])
    state[f"{name}.bias"] = t(params[name]["bias"])
    state[f"{name}.running_mean"] = t(stats[name]["mean"])
    state[f"{name}.running_var"] = t(stats[name]["var"])
    state[f"{name}.num_batches_tracked"] = torch.tensor(0)
  expected = set(torch_model.state_dict())
  if set(state) != expected:
    raise ValueError(
      f"weight transfer for {net}: torch keys {sorted(expected ^ set(state))} unmatched")
  return state


def torch_replica(net: str, variables):
  """The torch replica of `net` with `variables` (flax layout) copied in: float64, eval mode."""
  model = _torch_modules()[net]().double()
  model.load_state_dict(_flax_to_torch_state(net, variables, model), strict=True)
  return model.eval()


def _to_torch_input(x: np.ndarray):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float64), -1, 1)))


def torch_forward(net: str, variables, x: np.ndarray) -> np.ndarray:
  """Replica output for `x` `[batch, x, y, z, 1]`: `[batch]`, float64."""
  import torch

  model = torch_replica(net, variables)
  with torch.no_grad():
    return model(_to_torch_input(x))[:, 0].numpy()


def _exact_merge_batch_norm():
  """zennit's SequentialMergeBatchNorm with the merged BatchNorm made exactly the identity.

  zennit 0.5.1 folds the statistics into the preceding layer and then sets the BatchNorm to
  mean 0, var 1, scale 1, shift 0 but keeps its eps, so the "identity" divides by sqrt(1 + eps):
  every folded BN scales the net by (1 + 1e-5)^-1/2, 1.5e-5 relative for three of them, more than
  this check's tolerance and not what a canonizer should do. zennit fixed it upstream (it set eps
  to 0, and since chr5tphr/zennit#240, for torch >= 2.10, var = eps = 0.5); this applies that fix.
  """
  import torch

  zennit = import_zennit()

  class ExactSequentialMergeBatchNorm(zennit.canonizers.SequentialMergeBatchNorm):
    def register(self, linears, batch_norm):
      self.batch_norm_eps = batch_norm.eps
      super().register(linears, batch_norm)
      batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 0.5)
      batch_norm.eps = 0.5

    def remove(self):
      super().remove()
      self.batch_norm.eps = self.batch_norm_eps

  return ExactSequentialMergeBatchNorm


def zennit_composite(name: str, canonize: bool):
  """zennit's composite called `name` (SequentialPresetA built as a LayerMapComposite)."""
  import torch

  zennit = import_zennit()
  zc, zr, zt = zennit.composites, zennit.rules, zennit.types
  canonizers = [_exact_merge_batch_norm()()] if canonize else None
  common = dict(epsilon=EPSILON, stabilizer=STABILIZER, canonizers=canonizers)
  if name == "EpsilonPlus":
    return zc.EpsilonPlus(**common)
  if name == "EpsilonPlusFlat":
    return zc.EpsilonPlusFlat(**common)
  if name == "EpsilonAlpha2Beta1":
    return zc.EpsilonAlpha2Beta1(**common)
  if name == "EpsilonAlpha2Beta1Flat":
    return zc.EpsilonAlpha2Beta1Flat(**common)
  if name == "EpsilonGammaBox":
    return zc.EpsilonGammaBox(low=LOW, high=HIGH, gamma=GAMMA, **common)
  if name == "SequentialPresetA":
    # The study's iNNvestigate preset A: alpha1beta0 on convs, epsilon 0.1 on dense layers;
    # activations Pass, average pools and sums Norm, as in every zennit composite.
    layer_map = zc.layer_map_base(STABILIZER) + [
      (zt.Convolution, zr.AlphaBeta(alpha=1.0, beta=0.0, stabilizer=STABILIZER)),
      (torch.nn.Linear, zr.Epsilon(epsilon=PRESET_A_EPSILON)),
    ]
    return zc.LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
  raise ValueError(f"zennit_composite: unknown composite {name!r}")


def zennit_attribution(net: str, variables, x: np.ndarray, composite: str,
                       reference: float | None = None):
  """zennit's output and relevance for the replica of `net`.

  Args:
    x: input `[batch, x, y, z, 1]`.
    reference: None starts from the output itself (regression); a float starts from the
      contrast f(x) - reference.
  Returns:
    (output `[batch]` of the canonized replica under the composite's hooks,
     relevance `[batch, x, y, z, 1]`), float64, channels-last like `x`.
  """
  zennit = import_zennit()
  model = torch_replica(net, variables)
  inputs = _to_torch_input(x).requires_grad_(True)
  if reference is None:
    start = lambda output: output
  else:
    start = lambda output: output - reference
  with zennit.attribution.Gradient(
      model, zennit_composite(composite, canonize=net == "batchnorm_net")) as attributor:
    output, relevance = attributor(inputs, start)
  return output.detach().numpy()[:, 0], np.moveaxis(relevance.detach().numpy(), 1, -1)


def zennit_relevance(net: str, variables, x: np.ndarray, composite: str,
                     reference: float | None = None) -> np.ndarray:
  """zennit's relevance `[batch, x, y, z, 1]` (see `zennit_attribution`)."""
  return zennit_attribution(net, variables, x, composite, reference)[1]


def versions() -> dict[str, str]:
  """torch and zennit versions (for the golden files' provenance)."""
  import torch

  zennit_version = "unknown"
  try:
    from importlib.metadata import version

    zennit_version = version("zennit")
  except Exception:  # noqa: BLE001 - provenance only
    pass
  return {"torch": torch.__version__, "zennit": zennit_version}
