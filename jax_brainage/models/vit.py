"""A 3D vision transformer (ViT) for brain age, in flax linen.

After Dosovitskiy et al., "An image is worth 16x16 words" (ICLR 2021), in 3D as in the brain-age
transformers of the field (e.g. Cai et al. 2023, He et al. 2022), sized for the simulated 4 mm
cohort on a CPU:

  patch_embed: non-overlapping p^3 patches, each projected linearly to `width` features (a conv
               of kernel p^3 and stride p, SAME: a 40 x 50 x 40 box with p = 5 gives an
               8 x 10 x 8 grid of 640 tokens), plus a position embedding (learned, or fixed 3D
               sine-cosine), added on the grid before it is flattened to tokens;
  blocks:      `depth` pre-norm encoder blocks: x + attn(LN(x)), then x + mlp(LN(x)), with
               multi-head scaled dot-product self-attention over all tokens and an MLP
               width -> mlp_dim -> width with GELU (exact, erf);
  head:        a final LayerNorm, the mean over tokens, dropout, `dense1` (ReLU) and the scalar
               `age_head` whose bias starts at the mean training age (MRInet's head), times the
               constant `age_scale`.

Everything is a plain JAX primitive for lrp's jaxpr mechanism (no fused attention kernel): the
attention logits and the weighted values are `jnp.einsum` (dot_general of two activations),
the attention weights `jax.nn.softmax`, the norms `flax.linen.LayerNorm`.

Layer names (LRP composites assign rules by module path): `patch_embed`, `block{i}/norm1`,
`block{i}/attn/{query,key,value,out}`, `block{i}/norm2`, `block{i}/mlp/{fc1,fc2}` (i = 1..depth),
`norm`, `dropout`, `dense1`, `age_head`; the learned position embedding is the parameter
`pos_embed` `[gx, gy, gz, width]`. Channels last: `[batch, x, y, z, channel]`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_brainage.errors import ConfigError, DataError
from jax_brainage.models import lowering

POS_EMBEDDINGS = ("learned", "sincos")

# ViT's initialisers (big_vision): Xavier-uniform projections, zero biases, N(0, 0.02) positions.
_dense_init = nn.initializers.xavier_uniform()


def patch_grid(shape: tuple[int, ...], patch_size: int) -> tuple[int, int, int]:
  """Token grid `(gx, gy, gz)` of an input of spatial `shape` (voxels) cut into `patch_size`^3
  patches (SAME: an axis that is no multiple of the patch side is zero-padded to one, half the
  zeros before the volume and the rest after it)."""
  return tuple(-(-int(s) // int(patch_size)) for s in shape[:3])


def sincos_embedding(grid: tuple[int, int, int], width: int) -> np.ndarray:
  """Fixed 3D sine-cosine position embedding `[gx, gy, gz, width]` (float32).

  A third of the features per axis, half sines and half cosines of the patch index at
  frequencies 1 / 10000^(k / (width / 6)), k = 0 .. width/6 - 1 (the 2D embedding of MAE /
  big_vision extended to three axes). `width` must be a multiple of 6.
  """
  if width % 6:
    raise ConfigError(f"ViT: a sincos position embedding needs width divisible by 6, got {width}")
  n = width // 6
  omega = 1.0 / 10000.0 ** (np.arange(n, dtype=np.float64) / n)
  coords = np.meshgrid(*(np.arange(g, dtype=np.float64) for g in grid), indexing="ij")
  parts = []
  for c in coords:
    angle = c[..., None] * omega  # [gx, gy, gz, n]
    parts += [np.sin(angle), np.cos(angle)]
  return np.concatenate(parts, axis=-1).astype(np.float32)


class SelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention. `[batch, tokens, width]` -> same shape."""

  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    head_dim = width // self.num_heads

    def project(name):
      return nn.DenseGeneral((self.num_heads, head_dim), kernel_init=_dense_init,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    q, k, v = project("query"), project("key"), project("value")  # [batch, tokens, heads, d]
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    # Softmax in float32 also under bf16 compute: its sums over hundreds of tokens lose digits.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return nn.DenseGeneral(width, axis=(-2, -1), kernel_init=_dense_init, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="out")(out)


class MLP(nn.Module):
  """The encoder's feed-forward block: Dense(mlp_dim) -> GELU -> Dense(width)."""

  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    h = nn.Dense(self.mlp_dim, kernel_init=_dense_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc1")(x)
    h = jax.nn.gelu(h, approximate=False)
    return nn.Dense(width, kernel_init=_dense_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="fc2")(h)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

  num_heads: int
  mlp_dim: int
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    norm = dict(epsilon=self.epsilon, use_fast_variance=False, dtype=self.dtype,
                param_dtype=self.param_dtype)
    x = x + SelfAttention(self.num_heads, self.dtype, self.param_dtype, name="attn")(
        nn.LayerNorm(name="norm1", **norm)(x))
    return x + MLP(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(
        nn.LayerNorm(name="norm2", **norm)(x))


class ViT(nn.Module):
  """3D ViT regressor. `__call__(x, train)` returns predicted age `[batch]` (years, float32).

  Attributes:
    mean_age: initial output bias (years), the mean training age (as MRInet).
    age_scale: constant output scale (years per head unit, > 0), as MRInet's.
    patch_size: patch side p (voxels): p^3 voxels per token (5 at 4 mm = 20 mm patches).
    width: token features (embedding dimension), a multiple of num_heads.
    depth: encoder blocks.
    num_heads: attention heads per block (head dimension width / num_heads).
    mlp_dim: hidden width of each block's MLP.
    pos_embedding: "learned" (a parameter `[gx, gy, gz, width]`, N(0, 0.02) at init; the grid is
      fixed by the input shape at init) or "sincos" (fixed 3D sine-cosine, any input size;
      width divisible by 6).
    dense_features: width of the head's hidden dense layer `dense1` (ReLU).
    dropout_rate: dropout before `dense1`, only with `train=True` (rng stream 'dropout').
    flip_average: at inference, the mean of the predicted ages of the volume and its left-right
      mirror (as MRInet's).
    dtype, param_dtype: compute and parameter dtypes; the softmax and the age head run in
      float32.
    conv_lowering: how the patch embedding (a conv of stride = kernel) is computed: "xla",
      "im2col" (a reshape and a matmul, space-to-depth) or "auto" (im2col on CPU).
  """

  mean_age: float = 50.0
  age_scale: float = 1.0
  patch_size: int = 5
  width: int = 96
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 192
  pos_embedding: str = "learned"
  dense_features: int = 64
  dropout_rate: float = 0.0
  flip_average: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_lowering: str = "xla"

  def __post_init__(self):
    lowering.check(self.conv_lowering, "ViT")
    for key in ("patch_size", "width", "depth", "num_heads", "mlp_dim", "dense_features"):
      value = getattr(self, key)
      if not (isinstance(value, int) and value >= 1):
        raise ConfigError(f"ViT: {key} must be a positive integer, got {value!r}")
    if self.width % self.num_heads:
      raise ConfigError(f"ViT: width {self.width} is not a multiple of num_heads "
                        f"{self.num_heads}")
    if self.pos_embedding not in POS_EMBEDDINGS:
      raise ConfigError(f"ViT: pos_embedding must be one of {POS_EMBEDDINGS}, got "
                        f"{self.pos_embedding!r}")
    if self.pos_embedding == "sincos" and self.width % 6:
      raise ConfigError(f"ViT: a sincos position embedding needs width divisible by 6, got "
                        f"{self.width}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f"ViT: dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if not (math.isfinite(self.age_scale) and self.age_scale > 0):
      raise ConfigError(f"ViT: age_scale must be a finite number of years > 0, got "
                        f"{self.age_scale}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """x: `[batch, x, y, z, channel]`; returns `[batch]` age in years (float32)."""
    if x.ndim != 5:
      raise DataError(f"ViT: input must be [batch, x, y, z, channel], got shape {x.shape}")
    p = self.patch_size
    grid = patch_grid(x.shape[1:4], p)
    embed = nn.Conv(self.width, (p, p, p), strides=(p, p, p), padding="SAME",
                    kernel_init=nn.initializers.lecun_normal(),
                    conv_general_dilated=lowering.conv_general_dilated(self.conv_lowering),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed")
    if self.pos_embedding == "learned":
      pos = self.param("pos_embed", nn.initializers.normal(0.02), (*grid, self.width),
                       self.param_dtype)
    else:
      pos = jnp.asarray(sincos_embedding(grid, self.width))
    blocks = [EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f"block{i}")
              for i in range(1, self.depth + 1)]
    norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="norm")
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")
    dense1 = nn.Dense(self.dense_features, kernel_init=_dense_init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="dense1")
    age_head = nn.Dense(1, kernel_init=_dense_init,
                        bias_init=nn.initializers.constant(self.mean_age / self.age_scale),
                        dtype=jnp.float32, param_dtype=self.param_dtype, name="age_head")

    def age(x):
      # The position embedding is added on the grid, right after the projection: for lrp it is
      # a second bias of the patch_embed site.
      h = embed(x.astype(self.dtype)) + pos.astype(self.dtype)[None]
      h = h.reshape((h.shape[0], -1, self.width))  # [batch, tokens, width], x-major order
      for block in blocks:
        h = block(h)
      h = jnp.mean(norm(h).astype(jnp.float32), axis=1)  # mean over tokens, summed in f32
      h = nn.relu(dense1(dropout(h).astype(self.dtype)))
      out = age_head(h.astype(jnp.float32))
      if self.age_scale != 1.0:  # Python-level, as MRInet: no multiply in the plain network
        out = out * jnp.float32(self.age_scale)
      return out[:, 0]

    if self.flip_average and not train:
      return 0.5 * age(x) + 0.5 * age(jnp.flip(x, axis=1))
    return age(x)
