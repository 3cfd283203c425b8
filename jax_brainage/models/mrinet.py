"""MRInet: the source study's brain-age CNN (Hofmann et al. 2022), in flax linen.

Five conv blocks (conv 3^3 or 1^3, SAME, ReLU; max-pool 3^3 stride 2 SAME), flatten, dropout 0.5,
dense 64 ReLU, dense 1 whose bias starts at the mean training age. No batch norm, so LRP needs
no canonizer.

Optional output scale (not in the study; `age_scale=1.0`, the default, is the study's network):
age = age_scale * age_head(h), with the head's bias starting at mean_age / age_scale, i.e.
age = mean_age + age_scale * (standardised head output). With age_scale = the training ages'
standard deviation (years) the head learns a unit-variance target, so Adam's per-parameter step
(~learning rate) moves the prediction by ~lr standard deviations instead of ~lr years: the
raw-years head needs hundreds of steps to leave the mean age, during which most ReLUs die.
The scale is a constant (no parameter), and for LRP a constant element-wise multiply that
passes relevance through unchanged. Channels last: `[batch, x, y, z, channel]`, any number of channels (sequences).
Flatten order is channels-last as in the authors' Keras models, so their weights map 1:1.

Parameter counts with one input channel (checked in tests): 781,265 at 198^3, 209,873 at 98^3.

Layer names are stable, because LRP composites pick rules by layer name/path:
`conv1` .. `conv5` (conv1 is the first layer on the data path), `dropout`, `dense1`, `age_head`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jax_brainage.errors import ConfigError, DataError
from jax_brainage.models import lowering, orientation

# The study's layer table (paper.md): (features, kernel side) per conv block.
STUDY_CONV_FEATURES = (16, 16, 32, 64, 32)
STUDY_CONV_KERNELS = (3, 3, 3, 3, 1)

# Keras' defaults (the authors' framework): Glorot-uniform kernels, zero biases.
_kernel_init = nn.initializers.glorot_uniform()


class MRInet(nn.Module):
  """The study's base model. `__call__(x, train)` returns predicted age `[batch]` (years, f32).

  Attributes:
    mean_age: initial output bias (years); set to the mean training age so that the untrained
      net predicts the mean, and LRP relevance is relative to it.
    conv_features, conv_kernels: per-block output channels and kernel side (the study's default).
    dense_features: width of the hidden dense layer.
    age_scale: constant output scale (years per head unit, > 0); 1.0 is the study's network.
      The trainer sets it to the training ages' standard deviation when
      `config.model.scale_output` is on.
    dropout_rate: dropout before `dense1`, only active with `train=True` (rng stream 'dropout').
    patch_stem: 0 (the study's network) or p > 1: block 1's full-resolution conv 3^3 and
      max-pool become one conv `conv1` of kernel p^3 with stride p (non-overlapping patches, a
      "patchify" stem as in ViT and ConvNeXt), ReLU, no pool. For p = 2 the output grid is
      block 1's (ceil(n / 2) per axis) and later blocks are unchanged; `conv_kernels[0]` is not
      used. On a CPU block 1 is the most expensive block: at 40 x 50 x 40 a training step of
      4 volumes takes 54 instead of 118 ms (`benchmarks/bench_stem.py`).
    flip_average: at inference (`train=False`), the mean of the predicted ages of the volume
      and of its left-right mirror (axis x, RAS+): test-time augmentation for a net trained with
      random left-right flips. Validation, prediction and relevance maps all see this mean; LRP
      splits the relevance between the two passes in proportion to their ages (the sum rule),
      so each map is the mean of the two passes' maps, the mirror's mirrored back.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay in `param_dtype`. The age head
      always computes in float32: bf16 steps are 0.25 years at 32-64 and 0.5 years above 64.
    param_dtype: parameter dtype (float32).
    conv_lowering: "xla", "im2col" or "auto" (im2col on CPU): how the convolutions and the
      max-pool gradients are computed (`jax_brainage.models.lowering`); the parameters and
      outputs are the same.
    input_orientation: "RAS" (the cube as prepared) or the array orientation the weights were
      trained in, e.g. "LIA" for the study's FreeSurfer-space MRInets: the RAS+ input is
      permuted into it first (`models.orientation`).
  """

  mean_age: float = 50.0
  age_scale: float = 1.0
  conv_features: Sequence[int] = STUDY_CONV_FEATURES
  conv_kernels: Sequence[int] = STUDY_CONV_KERNELS
  dense_features: int = 64
  dropout_rate: float = 0.5
  patch_stem: int = 0
  flip_average: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_lowering: str = "xla"
  input_orientation: str = "RAS"

  def __post_init__(self):
    lowering.check(self.conv_lowering, "MRInet")
    orientation.check(self.input_orientation, "MRInet")
    if len(self.conv_features) != len(self.conv_kernels):
      raise ConfigError(
          f"MRInet: conv_features {tuple(self.conv_features)} and conv_kernels "
          f"{tuple(self.conv_kernels)} differ in length")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f"MRInet: dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.patch_stem < 0 or self.patch_stem == 1:
      raise ConfigError(f"MRInet: patch_stem must be 0 (none) or a patch side > 1, got "
                        f"{self.patch_stem}")
    if not (math.isfinite(self.age_scale) and self.age_scale > 0):
      raise ConfigError(f"MRInet: age_scale must be a finite number of years > 0, got "
                        f"{self.age_scale}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """x: `[batch, x, y, z, channel]` image in [0, 1]; returns `[batch]` age in years (float32)."""
    if x.ndim != 5:
      raise DataError(f"MRInet: input must be [batch, x, y, z, channel], got shape {x.shape}")
    convs = []
    for i, (features, k) in enumerate(zip(self.conv_features, self.conv_kernels), start=1):
      stem = i == 1 and self.patch_stem > 1
      k, stride = (self.patch_stem, self.patch_stem) if stem else (k, 1)
      convs.append((nn.Conv(features, (k, k, k), strides=(stride,) * 3, padding="SAME",
                            kernel_init=_kernel_init,
                            conv_general_dilated=lowering.conv_general_dilated(
                                self.conv_lowering),
                            dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i}"),
                    not stem))
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")
    dense1 = nn.Dense(self.dense_features, kernel_init=_kernel_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="dense1")
    # The bias starts where the (scaled) output is the mean age.
    age_head = nn.Dense(1, kernel_init=_kernel_init,
                        bias_init=nn.initializers.constant(self.mean_age / self.age_scale),
                        dtype=jnp.float32, param_dtype=self.param_dtype, name="age_head")

    def age(x):
      x = orientation.from_ras(x.astype(self.dtype), self.input_orientation)
      for conv, pool in convs:
        x = nn.relu(conv(x))
        if pool:
          # Overlapping 3^3 windows with stride 2, padded as Keras/TF "SAME": out = ceil(n / 2).
          x = lowering.max_pool(x, (3, 3, 3), (2, 2, 2), "SAME", self.conv_lowering)
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(dense1(dropout(x)))
      out = age_head(x.astype(jnp.float32))
      if self.age_scale != 1.0:  # Python-level: the study's network has no multiply at all.
        out = out * jnp.float32(self.age_scale)
      return out[:, 0]

    if self.flip_average and not train:
      # Two passes through the same layers (not one of a doubled batch): every layer sees
      # `[batch, ...]`, so per-sample inputs such as LRP's ZBox bounds still fit.
      return 0.5 * age(x) + 0.5 * age(jnp.flip(x, axis=1))
    return age(x)
