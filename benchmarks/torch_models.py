"""PyTorch implementations of this project's MRInet and SFCN, for side-by-side benchmarks.

The same architectures as `jax_brainage.models` (same layers, padding, pooling, flatten order,
dropout, heads and losses), written the way a PyTorch user writes them: channels-first
`[batch, channel, x, y, z]`, `nn.Conv3d` / `nn.MaxPool3d` / `nn.BatchNorm3d`, so that the
benchmark compares each framework at its best with the same network, not a transliteration.
`load_flax_variables` copies a flax variable tree into a torch model (tests check that outputs
then agree), and `from_flax` builds the torch model matching a flax module's fields.

- `TorchMRInet`: the study's MRInet (Keras SAME padding: 3^3 max pool, stride 2, the odd pad
  voxel at the high end, padded with -inf as flax/TF do), flatten channels-last as Keras.
- `TorchSFCN`: Peng et al.'s SFCN with their module names (`feature_extractor.conv_i` =
  conv, BatchNorm, max-pool 2, ReLU; `classifier.conv_6`), so a state dict of the reference code
  loads directly; `regression=True` is `SFCNRegression` (dense age head).

torch is imported here at module level: import this module only where torch is installed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SamePool3d(nn.Module):
  """Max pool `kernel`^3 / `stride` with TensorFlow's SAME padding (extra pad voxel at the high
  end, padded with -inf): output side ceil(n / stride), as `flax.linen.max_pool(..., "SAME")`."""

  def __init__(self, kernel: int = 3, stride: int = 2):
    super().__init__()
    self.kernel, self.stride = kernel, stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pads = []
    for n in reversed(x.shape[2:]):  # F.pad lists the last axis first
      total = max((-(-n // self.stride) - 1) * self.stride + self.kernel - n, 0)
      pads += [total // 2, total - total // 2]
    if any(pads):
      x = F.pad(x, pads, value=-math.inf)
    return F.max_pool3d(x, self.kernel, self.stride)


def _same_pool_side(n: int) -> int:
  return -(-n // 2)


class TorchMRInet(nn.Module):
  """MRInet (Hofmann et al. 2022). Input `[batch, channel, x, y, z]`, output age `[batch]`
  (years, float32 even under autocast).

  Args:
    input_shape: (x, y, z) voxels; fixes the flatten size of `dense1` (as in Keras).
    in_channels, conv_features, conv_kernels, dense_features, dropout_rate: as the flax model.
    mean_age: the age head's initial bias (years); age_scale: constant output scale (years).
  """

  def __init__(self, input_shape: Sequence[int], in_channels: int = 1,
               conv_features: Sequence[int] = (16, 16, 32, 64, 32),
               conv_kernels: Sequence[int] = (3, 3, 3, 3, 1), dense_features: int = 64,
               dropout_rate: float = 0.5, mean_age: float = 50.0, age_scale: float = 1.0):
    super().__init__()
    layers: list[nn.Module] = []
    c_in, side = in_channels, list(input_shape)
    for c_out, k in zip(conv_features, conv_kernels):
      layers += [nn.Conv3d(c_in, c_out, k, padding=k // 2), nn.ReLU(inplace=True), SamePool3d()]
      c_in, side = c_out, [_same_pool_side(s) for s in side]
    self.features = nn.Sequential(*layers)
    self.dropout = nn.Dropout(dropout_rate)
    self.dense1 = nn.Linear(c_in * math.prod(side), dense_features)
    self.age_head = nn.Linear(dense_features, 1)
    self.age_scale = float(age_scale)
    for m in self.modules():  # Keras defaults, as the flax model: Glorot-uniform, zero bias
      if isinstance(m, (nn.Conv3d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    nn.init.constant_(self.age_head.bias, mean_age / age_scale)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.features(x)
    x = x.permute(0, 2, 3, 4, 1).flatten(1)  # Keras flattens channels-last
    x = F.relu(self.dense1(self.dropout(x)))
    with torch.autocast(x.device.type, enabled=False):  # the head in float32, as the flax model
      age = self.age_head(x.float())
    if self.age_scale != 1.0:
      age = age * self.age_scale
    return age[:, 0].float()


class TorchSFCN(nn.Module):
  """Peng et al.'s SFCN (UKBiobank_deep_pretrain sfcn.py, their module names). Input
  `[batch, channel, x, y, z]`; output log-probabilities `[batch, num_bins]`, or with
  `regression=True` age `[batch]` (years) from a dense head (this project's SFCNRegression)."""

  def __init__(self, in_channels: int = 1,
               channels: Sequence[int] = (32, 64, 128, 256, 256, 64), num_bins: int = 70,
               dropout_rate: float = 0.5, regression: bool = False, mean_age: float = 50.0,
               bn_momentum: float = 0.1, bn_epsilon: float = 1e-5):
    super().__init__()
    self.feature_extractor = nn.Sequential()
    c_in = in_channels
    for i, c in enumerate(channels):
      last = i == len(channels) - 1
      conv = nn.Conv3d(c_in, c, 1 if last else 3, padding=0 if last else 1)
      bn = nn.BatchNorm3d(c, eps=bn_epsilon, momentum=bn_momentum)
      block = [conv, bn] if last else [conv, bn, nn.MaxPool3d(2, stride=2)]
      self.feature_extractor.add_module(f"conv_{i}", nn.Sequential(*block, nn.ReLU(inplace=True)))
      c_in = c
    self.regression = regression
    self.classifier = nn.Sequential()
    self.classifier.add_module("average_pool", nn.AdaptiveAvgPool3d(1))
    self.classifier.add_module("dropout", nn.Dropout(dropout_rate))
    if regression:
      self.age_head = nn.Linear(c_in, 1)
      nn.init.constant_(self.age_head.bias, mean_age)
    else:
      self.classifier.add_module(f"conv_{len(channels)}", nn.Conv3d(c_in, num_bins, 1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.feature_extractor(x)
    # The pooled features and head in float32, as the flax model (bf16 sums lose digits).
    h = self.classifier.dropout(F.adaptive_avg_pool3d(h.float(), 1))
    with torch.autocast(h.device.type, enabled=False):
      if self.regression:
        return self.age_head(h.flatten(1))[:, 0]
      head = getattr(self.classifier, f"conv_{len(self.feature_extractor)}")
      return F.log_softmax(head(h).flatten(1), dim=1)


def from_flax(name: str, model: Any, input_shape: Sequence[int], in_channels: int = 1) -> nn.Module:
  """The torch model with the same architecture as the flax module `model` (`get_model(name)`).

  Args:
    name: "mrinet", "sfcn" or "sfcn_regression".
    input_shape: (x, y, z) voxels.
  """
  if name == "mrinet":
    return TorchMRInet(input_shape, in_channels, tuple(model.conv_features),
                       tuple(model.conv_kernels), int(model.dense_features),
                       float(model.dropout_rate), float(model.mean_age), float(model.age_scale))
  if name in ("sfcn", "sfcn_regression"):
    regression = name == "sfcn_regression"
    if regression and float(getattr(model, "age_scale", 1.0)) != 1.0:
      raise ValueError("TorchSFCN: age_scale != 1 is not replicated")
    # flax momentum m keeps m of the old average; torch's momentum is the new sample's weight.
    return TorchSFCN(in_channels, tuple(model.channels),
                     0 if regression else model.bins.num_bins, float(model.dropout_rate),
                     regression, float(getattr(model, "mean_age", 50.0)),
                     bn_momentum=1.0 - float(model.bn_momentum),
                     bn_epsilon=float(model.bn_epsilon))
  raise ValueError(f"from_flax: no torch model for {name!r}")


def num_parameters(model: nn.Module) -> int:
  """Trainable parameter count (BatchNorm running statistics are buffers, not parameters)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_flax_variables(model: nn.Module, variables: dict[str, Any]) -> nn.Module:
  """Copies flax variables ({"params", optional "batch_stats"}) into `model` in place.

  Kernels: flax conv `[kx, ky, kz, in, out]` -> torch `[out, in, kx, ky, kz]`, dense `[in, out]`
  -> `[out, in]`; the MRInet flatten is channels-last on both sides, so dense kernels are a plain
  transpose. Returns `model`.
  """
  p = variables["params"]
  a = lambda v: torch.from_numpy(np.array(v, dtype=np.float32))
  conv_w = lambda k: a(k).permute(4, 3, 0, 1, 2).contiguous()

  def copy(module: nn.Module, kernel, bias, conv: bool):
    with torch.no_grad():
      module.weight.copy_(conv_w(kernel) if conv else a(kernel).T)
      module.bias.copy_(a(bias))

  if isinstance(model, TorchMRInet):
    convs = [m for m in model.features if isinstance(m, nn.Conv3d)]
    for i, conv in enumerate(convs, start=1):
      copy(conv, p[f"conv{i}"]["kernel"], p[f"conv{i}"]["bias"], True)
    copy(model.dense1, p["dense1"]["kernel"], p["dense1"]["bias"], False)
    copy(model.age_head, p["age_head"]["kernel"], p["age_head"]["bias"], False)
    return model
  stats = variables.get("batch_stats", {})
  for i, block in enumerate(model.feature_extractor, start=1):
    conv, bn = block[0], block[1]
    copy(conv, p[f"conv{i}"]["kernel"], p[f"conv{i}"]["bias"], True)
    with torch.no_grad():
      bn.weight.copy_(a(p[f"bn{i}"]["scale"]))
      bn.bias.copy_(a(p[f"bn{i}"]["bias"]))
      if f"bn{i}" in stats:
        bn.running_mean.copy_(a(stats[f"bn{i}"]["mean"]))
        bn.running_var.copy_(a(stats[f"bn{i}"]["var"]))
  if model.regression:
    copy(model.age_head, p["age_head"]["kernel"], p["age_head"]["bias"], False)
  else:
    head = getattr(model.classifier, f"conv_{len(model.feature_extractor)}")
    copy(head, p["bin_head"]["kernel"], p["bin_head"]["bias"], True)
  return model


def to_torch_input(x: np.ndarray) -> torch.Tensor:
  """`[batch, x, y, z, channel]` numpy -> `[batch, channel, x, y, z]` float32 tensor."""
  return torch.from_numpy(np.array(np.moveaxis(np.asarray(x, np.float32), -1, 1), order="C"))


def make_loss(name: str, bin_centers: np.ndarray | None = None, sigma: float = 1.0):
  """The training loss as the flax trainer's (`jax_brainage.models.losses`), for torch.

  "mse": mean squared error (years^2) of `[batch]` ages; "soft_label": mean over the batch of
  KL(Gaussian soft labels (sigma years, normalised over the bin centres) || prediction).
  Returns loss(outputs, ages) -> scalar float32 tensor.
  """
  if name == "mse":
    return lambda out, age: torch.mean(torch.square(out.float() - age))
  if name == "soft_label":
    centers = torch.as_tensor(np.asarray(bin_centers, np.float32))

    def soft_label_kl(log_probs, age):
      c = centers.to(age.device)
      target = torch.softmax(-0.5 * torch.square((c[None, :] - age[:, None]) / sigma), dim=-1)
      return torch.mean(torch.sum(torch.xlogy(target, target) - target * log_probs.float(), -1))

    return soft_label_kl
  raise ValueError(f"make_loss: no torch loss {name!r} (mse, soft_label)")
