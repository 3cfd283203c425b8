"""SFCN: the Simple Fully Convolutional Network of Peng et al. (2021), in flax linen.

Peng, Gong, Beckmann, Vedaldi, Smith, "Accurate brain age prediction with lightweight deep
neural networks", Medical Image Analysis 68 (2021) 101871; reference code: github.com/ha-ha-ha-han/
UKBiobank_deep_pretrain (PyTorch). As there:
  blocks 1-5: conv 3^3 (SAME) -> BatchNorm -> max-pool 2^3 stride 2 (VALID: floor) -> ReLU,
              with 32, 64, 128, 256, 256 channels;
  block 6:    conv 1^3 to 64 -> BatchNorm -> ReLU;
  head:       average pooling over all remaining voxels, dropout 0.5, conv 1^3 to the age bins,
              log-softmax over bins. Predicted age = expectation over the bin centres.
Trained with the KL divergence to Gaussian soft labels (sigma 1 year) over 1-year bins
(`jax_brainage.models.losses.soft_label_kl`). BatchNorm as PyTorch's defaults (momentum 0.1,
i.e. flax momentum 0.9; epsilon 1e-5); its statistics live in the `batch_stats` collection.
One difference: PyTorch's running variance uses the unbiased batch variance, flax's the biased
one (a factor n / (n - 1), n = batch x voxels: negligible except for 1-voxel late layers).

Parameter count (trainable, as PyTorch counts it; BN running statistics excluded), independent of
the input size because of the global pooling: 2,951,336 + 1,600 (BN scale/bias) = 2,952,936 with
the UK Biobank head of 40 bins (ages 42-82), as in the reference code. The paper quotes "3M
parameters". Each further bin adds 65 parameters (64 weights + bias): 2,954,886 with this
module's default 70 bins (15-85 years).
The original's average pool has a fixed window [5, 6, 5], i.e. global pooling at 160x192x160;
here the window is always the whole remaining volume, so any input size works.

`SFCNRegression` is the plain regression variant: same trunk, one output (a dense layer on the
pooled features, i.e. a 1^3 conv) whose bias starts at the mean training age, trained with MSE.

`variables_from_torch` loads a state dict of the reference PyTorch code (e.g. Peng et al.'s
released UK Biobank model).

Layer names (LRP composites and canonizers find layers by name): `conv1`..`conv6`, `bn1`..`bn6`,
`dropout`, and `bin_head` (SFCN) or `age_head` (SFCNRegression). Each `convK` is directly
followed by `bnK`, so a canonizer can fold them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_brainage.errors import ConfigError, DataError
from jax_brainage.models import lowering, orientation

SFCN_CHANNELS = (32, 64, 128, 256, 256, 64)


@dataclasses.dataclass(frozen=True)
class AgeBins:
  """Age bins of width `width` years covering [start, stop) years.

  Bin k covers [start + k * width, start + (k + 1) * width); its centre is the midpoint
  (as `num2vect` in Peng et al.'s code). (stop - start) must be a whole number of bins.
  """

  start: float
  stop: float
  width: float = 1.0

  def __post_init__(self):
    if not self.width > 0:
      raise ConfigError(f"age bins: bin_width must be > 0 years, got {self.width}")
    if not self.stop > self.start:
      raise ConfigError(f"age bins: age_range must be (low, high) with low < high, got "
                        f"({self.start}, {self.stop})")
    n = (self.stop - self.start) / self.width
    if abs(n - round(n)) > 1e-6:
      raise ConfigError(f"age bins: age_range ({self.start}, {self.stop}) is not a whole number "
                        f"of {self.width}-year bins")

  @property
  def num_bins(self) -> int:
    return int(round((self.stop - self.start) / self.width))

  @property
  def centers(self) -> np.ndarray:
    """Bin centres `[num_bins]` (years, float32)."""
    return (self.start + self.width * (np.arange(self.num_bins) + 0.5)).astype(np.float32)


def expected_age(log_probs: jnp.ndarray, bin_centers: jnp.ndarray) -> jnp.ndarray:
  """Predicted age as the expectation over bins.

  Args:
    log_probs: `[batch, num_bins]` log-probabilities (SFCN output).
    bin_centers: `[num_bins]` bin centres (years).
  Returns:
    `[batch]` age in years (float32), always within [first centre, last centre].
  """
  probs = jnp.exp(log_probs.astype(jnp.float32))
  return probs @ jnp.asarray(bin_centers, jnp.float32)


def _torch_kernel_init():
  # PyTorch's default conv kernel init (kaiming_uniform, a = sqrt(5)): U(+-1 / sqrt(fan_in)).
  # Biases start at 0 (PyTorch draws them from the same range; BatchNorm makes it moot).
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _sfcn_trunk(module: nn.Module, x: jnp.ndarray, train: bool) -> jnp.ndarray:
  """Blocks 1-6 and global average pooling, with layers named on `module` (flat names).

  Must be called from inside `module`'s compact `__call__`.
  Returns `[batch, 1, 1, 1, channels[-1]]` (float32).
  """
  if x.ndim != 5:
    raise DataError(f"{type(module).__name__}: input must be [batch, x, y, z, channel], got "
                    f"shape {x.shape}")
  num_pools = len(module.channels) - 1
  small = [s for s in x.shape[1:4] if s < 2**num_pools]
  if small:
    raise DataError(f"{type(module).__name__}: spatial size {x.shape[1:4]} is too small for "
                    f"{num_pools} poolings by 2 (need >= {2**num_pools} voxels per side)")
  x = orientation.from_ras(x.astype(module.dtype), module.input_orientation)
  for i, features in enumerate(module.channels, start=1):
    last = i == len(module.channels)
    k = 1 if last else 3
    x = nn.Conv(features, (k, k, k), padding="SAME", kernel_init=_torch_kernel_init(),
                conv_general_dilated=lowering.conv_general_dilated(module.conv_lowering),
                dtype=module.dtype, param_dtype=module.param_dtype, name=f"conv{i}")(x)
    # Two-pass variance: E[x^2] - E[x]^2 in float32 loses digits when |mean| >> std, which
    # happens in the late layers where a batch holds few voxels (seen as 1e-3 errors in tests).
    x = nn.BatchNorm(use_running_average=not train, momentum=module.bn_momentum,
                     epsilon=module.bn_epsilon, use_fast_variance=False, dtype=module.dtype,
                     param_dtype=module.param_dtype, name=f"bn{i}")(x)
    if not last:
      # torch MaxPool3d(2, stride=2): VALID windows, odd remainders dropped.
      x = lowering.max_pool(x, (2, 2, 2), (2, 2, 2), "VALID", module.conv_lowering)
    x = nn.relu(x)
  # Global average pooling as one window over the whole volume (Peng's AvgPool3d([5, 6, 5])),
  # summed in float32 (bf16 sums of ~150 voxels lose digits); from here on all is float32.
  x = nn.avg_pool(x.astype(jnp.float32), x.shape[1:4], strides=(1, 1, 1), padding="VALID")
  x = nn.Dropout(module.dropout_rate, deterministic=not train, name="dropout")(x)
  return x


def _check_common(module) -> None:
  lowering.check(module.conv_lowering, type(module).__name__)
  orientation.check(module.input_orientation, type(module).__name__)
  if len(module.channels) < 2:
    raise ConfigError(f"{type(module).__name__}: channels needs >= 2 entries, got "
                      f"{tuple(module.channels)}")
  if not 0.0 <= module.dropout_rate < 1.0:
    raise ConfigError(f"{type(module).__name__}: dropout_rate must be in [0, 1), got "
                      f"{module.dropout_rate}")


class SFCN(nn.Module):
  """Peng et al.'s SFCN. `__call__(x, train)` returns log-probabilities `[batch, num_bins]` (f32).

  Attributes:
    age_range: (low, high) years covered by the bins. The default (15, 85) covers the source
      study's 18-82 with a 3-sigma margin; the model can only predict ages between the first and
      last bin centres, so cover the training ages with a margin.
    bin_width: bin width (years); 1 in the paper.
    channels: conv widths (five 3^3 blocks with pooling, then the 1^3 block).
    dropout_rate: dropout before the head, only with `train=True` (rng stream 'dropout').
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay in `param_dtype`. The head and the
      log-softmax always run in float32.
    bn_momentum, bn_epsilon: BatchNorm running-average decay and epsilon (PyTorch defaults).
    conv_lowering: "xla", "im2col" or "auto" (im2col on CPU): how the trunk's convolutions and
      max-pool gradients are computed (`jax_brainage.models.lowering`); the parameters and
      outputs are the same.
    input_orientation: "RAS" (the cube as prepared) or the array orientation the weights were
      trained in, e.g. "LAS" for Peng et al.'s FSL MNI152 volumes (`models.orientation`).
  """

  age_range: tuple[float, float] = (15.0, 85.0)
  bin_width: float = 1.0
  channels: Sequence[int] = SFCN_CHANNELS
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv_lowering: str = "xla"
  input_orientation: str = "RAS"

  def __post_init__(self):
    _check_common(self)
    self.bins  # noqa: B018 (validates the age range and bin width at construction)
    super().__post_init__()

  @property
  def bins(self) -> AgeBins:
    return AgeBins(float(self.age_range[0]), float(self.age_range[1]), float(self.bin_width))

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """x: `[batch, x, y, z, channel]`; returns `[batch, num_bins]` log-probabilities (float32)."""
    x = _sfcn_trunk(self, x, train)
    logits = nn.Conv(self.bins.num_bins, (1, 1, 1), kernel_init=_torch_kernel_init(),
                     dtype=jnp.float32, param_dtype=self.param_dtype,
                     name="bin_head")(x)
    return jax.nn.log_softmax(logits.reshape((x.shape[0], -1)), axis=-1)

  def predicted_age(self, log_probs: jnp.ndarray) -> jnp.ndarray:
    """`[batch, num_bins]` log-probabilities -> `[batch]` expected age (years)."""
    return expected_age(log_probs, self.bins.centers)


class SFCNRegression(nn.Module):
  """SFCN trunk with a single regression output. Returns `[batch]` age in years (float32).

  Attributes as `SFCN`, plus `mean_age`, the initial output bias (years), and `age_scale`, a
  constant output scale (years per head unit; 1.0 = raw years), as in MRInet: with the training
  ages' standard deviation the head learns a unit-variance target; and `output_range`: None
  (default) or (low, high) years, the output `low + clip(age, 0, high - low)` as pyment's
  `restrict_range` (a ReLU capped at high - low, plus low) in its RegressionSFCN (3-95 years).
  """

  mean_age: float = 50.0
  age_scale: float = 1.0
  output_range: tuple[float, float] | None = None
  channels: Sequence[int] = SFCN_CHANNELS
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv_lowering: str = "xla"
  input_orientation: str = "RAS"

  def __post_init__(self):
    _check_common(self)
    if not (math.isfinite(self.age_scale) and self.age_scale > 0):
      raise ConfigError(f"SFCNRegression: age_scale must be a finite number of years > 0, got "
                        f"{self.age_scale}")
    if self.output_range is not None and not (
        len(self.output_range) == 2 and float(self.output_range[0]) < float(self.output_range[1])):
      raise ConfigError(f"SFCNRegression: output_range must be (low, high) years with low < high, "
                        f"got {self.output_range}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """x: `[batch, x, y, z, channel]`; returns `[batch]` age in years (float32)."""
    x = _sfcn_trunk(self, x, train)
    # A Dense head (= a 1^3 conv on the pooled 1^3 map) so that LRP composites give it the
    # signed dense rule, as MRInet's age_head: relevance must say older as well as younger.
    age = nn.Dense(1, kernel_init=_torch_kernel_init(),
                   bias_init=nn.initializers.constant(self.mean_age / self.age_scale),
                   dtype=jnp.float32, param_dtype=self.param_dtype,
                   name="age_head")(x.reshape((x.shape[0], -1)))
    if self.age_scale != 1.0:  # Python-level: the plain network has no multiply at all.
      age = age * jnp.float32(self.age_scale)
    if self.output_range is not None:  # pyment's restrict_range: low + min(relu(age), high - low)
      low, high = (float(v) for v in self.output_range)
      age = jnp.float32(low) + jnp.clip(age, 0.0, high - low)
    return age[:, 0]


def variables_from_torch(state_dict: Mapping[str, Any], model: SFCN) -> dict[str, Any]:
  """Flax variables for `model` from a state dict of Peng et al.'s PyTorch SFCN.

  Reads the reference code's names (`feature_extractor.conv_{i}.0` conv, `.1` BatchNorm,
  `classifier.conv_6` head; a `module.` prefix from DataParallel is dropped), e.g. their UK
  Biobank brain-age model (T1, 160x192x160 MNI 1 mm, bins 42-82 years: use
  `SFCN(age_range=(42, 82))`). Arrays may be numpy or torch tensors; torch is not imported.
  Input axes are taken in order: torch `[batch, channel, D, H, W]` = our `[batch, D, H, W,
  channel]`.

  Returns:
    {"params": ..., "batch_stats": ...} (float32), usable as `model.apply(variables, x)`.
  Raises:
    DataError naming the first missing key or a head whose bin count does not match `model`.
  """
  state = {k.removeprefix("module."): v for k, v in state_dict.items()}

  def get(key: str) -> np.ndarray:
    if key not in state:
      raise DataError(f"SFCN state dict: missing {key!r}")
    value = state[key]
    value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    return value.astype(np.float32)

  # torch conv weight [out, in, D, H, W] -> flax kernel [D, H, W, in, out]
  kernel = lambda w: np.transpose(w, (2, 3, 4, 1, 0))
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  n = len(model.channels)
  for i in range(n):
    conv, bn = f"feature_extractor.conv_{i}.0", f"feature_extractor.conv_{i}.1"
    params[f"conv{i + 1}"] = {"kernel": kernel(get(f"{conv}.weight")), "bias": get(f"{conv}.bias")}
    params[f"bn{i + 1}"] = {"scale": get(f"{bn}.weight"), "bias": get(f"{bn}.bias")}
    stats[f"bn{i + 1}"] = {"mean": get(f"{bn}.running_mean"), "var": get(f"{bn}.running_var")}
  head = f"classifier.conv_{n}"
  head_kernel = kernel(get(f"{head}.weight"))
  if head_kernel.shape[-1] != model.bins.num_bins:
    raise DataError(f"SFCN state dict: {head}.weight has {head_kernel.shape[-1]} age bins, the "
                    f"model {model.bins.num_bins} (age_range {tuple(model.age_range)}, bin_width "
                    f"{model.bin_width})")
  params["bin_head"] = {"kernel": head_kernel, "bias": get(f"{head}.bias")}
  for i, c in enumerate(model.channels, start=1):
    if params[f"conv{i}"]["kernel"].shape[-1] != c:
      raise DataError(f"SFCN state dict: conv_{i - 1} has "
                      f"{params[f'conv{i}']['kernel'].shape[-1]} channels, the model {c}")
  return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})
