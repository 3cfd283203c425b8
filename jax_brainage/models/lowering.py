"""How a model's convolutions and max-pool gradients are lowered for the backend.

Convolutions: XLA's convolution, or patches @ kernel (im2col).

XLA's CPU backend runs small-channel 3D convolutions several times slower than a matrix
multiply of the same FLOPs (benchmarks/RESULTS.md: MRInet's single-channel conv1 at 64^3 took
1.51 s as a convolution and 0.11 s as shifted matmuls; a whole training step of the cpu
preset's nets runs 1.8-2.3x faster with im2col). Gathering the k^3 shifted copies of the input
into a patch tensor `[batch, x, y, z, k^3 * C_in]` and multiplying by the kernel reshaped to
`[k^3 * C_in, C_out]` computes the same numbers (to float rounding) with Eigen's matmul, and its
gradient is again slices and matmuls.

The cost is memory: the patch tensor holds k^3 copies of the layer input. `"auto"` therefore
uses im2col on the CPU backend only, and only for layers whose patch tensor stays under
`AUTO_PATCH_BYTES`; accelerators keep XLA's convolution (cuDNN's is the fast path there).
A convolution whose stride equals its kernel (MRInet's patch stem) has non-overlapping windows:
its patches are a reshape of the input (space-to-depth), no copies.

Relevance must see one convolution per layer: lrp's composites assign rules by layer kind, and
im2col turns a conv into a patch gather and a dense product. Parameters are the same under every
lowering, so the trainer trains with `model.conv_lowering` ("auto"), a model restored from a
workdir (`models.build_model`) uses XLA's convolution (the module users explain), batched
prediction asks for "auto" (`for_inference`), and the explanation code rebuilds any model with
"xla" (`for_relevance`).

Max-pooling: the forward pass is always XLA's `reduce_window_max` (what lrp's winner-take-all
routing sees), but its gradient, XLA's `select_and_scatter`, is slow on the CPU: 116 ms of a
344 ms training step of the cpu preset's MRInet (batch 4 at 50^3, 8 channels after conv1). A
box maximum is separable, so the gradient here is that of one strided 1D maximum per axis
(slices, `maximum` and pads), 2.5-4.5x faster (benchmarks/bench_pool.py). The two agree
wherever the window's maximum is unique; at ties XLA routes the whole gradient to one winner
and this splits it evenly (both are subgradients; after a ReLU the tied entries are zeros whose
ReLU derivative is 0, so the parameter gradients are the same). Selected by the same lowering
name as the convolutions.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_brainage.errors import ConfigError

LOWERINGS = ("auto", "xla", "im2col")

# "auto": the largest patch tensor (whole batch, bytes) built instead of calling XLA's conv.
AUTO_PATCH_BYTES = 1 << 30


def check(lowering: str, owner: str) -> None:
  """One-line ConfigError for an unknown lowering name (owner: the model's class name)."""
  if lowering not in LOWERINGS:
    raise ConfigError(f"{owner}: conv_lowering must be one of {LOWERINGS}, got {lowering!r}")


def _same_pads(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               padding: Any) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return [tuple(p) for p in jax.lax.padtype_to_pads(spatial, kernel, strides, padding)]
  return [tuple(p) for p in padding]


def _patchable(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count) -> bool:
  """Whether im2col below computes this convolution (the layouts flax uses, no dilation or
  groups, stride 1 or stride = kernel); anything else goes to XLA's convolution."""
  ones = lambda v: v is None or all(int(d) == 1 for d in v)
  kernel = tuple(int(k) for k in rhs.shape[:-2])
  strides_ok = ones(window_strides) or tuple(int(s) for s in window_strides) == kernel
  layouts_ok = dimension_numbers is None or (
      isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers)
      and tuple(dimension_numbers.lhs_spec) == (0, lhs.ndim - 1, *range(1, lhs.ndim - 1))
      and tuple(dimension_numbers.rhs_spec) == (rhs.ndim - 1, rhs.ndim - 2,
                                                 *range(rhs.ndim - 2))
      and tuple(dimension_numbers.out_spec) == (0, lhs.ndim - 1, *range(1, lhs.ndim - 1)))
  return (strides_ok and ones(lhs_dilation) and ones(rhs_dilation)
          and feature_group_count == 1 and layouts_ok)


def im2col_conv(lhs: jax.Array, rhs: jax.Array, padding: Any,
                precision: Any = None, preferred_element_type: Any = None,
                strides: Sequence[int] | None = None) -> jax.Array:
  """Convolution of stride 1 (or stride = kernel) as patches @ kernel.

  Args:
    lhs: `[batch, *spatial, C_in]` input (channels last).
    rhs: `[*kernel, C_in, C_out]` kernel (flax's layout).
    padding: "SAME" / "VALID" or one (low, high) pair per spatial axis.
    strides: None / all 1, or equal to the kernel (non-overlapping windows).
  Returns:
    `[batch, *out_spatial, C_out]`, equal to `lax.conv_general_dilated` with the same layouts.
  """
  kernel = rhs.shape[:-2]
  if strides is not None and any(int(s) != 1 for s in strides):
    return _space_to_depth_conv(lhs, rhs, padding, precision, preferred_element_type)
  pads = _same_pads(lhs.shape[1:-1], kernel, (1,) * len(kernel), padding)
  x = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
  out = [n - k + 1 for n, k in zip(x.shape[1:-1], kernel)]
  # Tap order (kx, ky, kz) then C_in, which is rhs's row-major order: one reshape, no transpose.
  cols = [x[(slice(None), *(slice(o, o + n) for o, n in zip(offset, out)), slice(None))]
          for offset in itertools.product(*(range(k) for k in kernel))]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return jnp.einsum("...i,io->...o", patches, rhs.reshape(-1, rhs.shape[-1]),
                    precision=precision, preferred_element_type=preferred_element_type)


def _space_to_depth_conv(lhs, rhs, padding, precision, preferred_element_type) -> jax.Array:
  """Convolution with stride = kernel: each output voxel sees its own block of k^3 input voxels,
  so the patches are the input regrouped `[batch, *out, k^3 * C_in]` (no copies)."""
  kernel = tuple(int(k) for k in rhs.shape[:-2])
  pads = _same_pads(lhs.shape[1:-1], kernel, kernel, padding)
  x = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
  out = [(n - k) // k + 1 for n, k in zip(x.shape[1:-1], kernel)]
  x = x[(slice(None), *(slice(0, o * k) for o, k in zip(out, kernel)), slice(None))]  # VALID
  d = len(kernel)
  # [b, o1, k1, o2, k2, ..., C] -> [b, o1, o2, ..., k1, k2, ..., C]: rhs's row-major tap order.
  x = x.reshape(x.shape[0], *itertools.chain.from_iterable(zip(out, kernel)), x.shape[-1])
  x = x.transpose(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1)
  patches = x.reshape(x.shape[0], *out, -1)
  return jnp.einsum("...i,io->...o", patches, rhs.reshape(-1, rhs.shape[-1]),
                    precision=precision, preferred_element_type=preferred_element_type)


def patch_bytes(lhs_shape: Sequence[int], kernel: Sequence[int], itemsize: int) -> int:
  """Bytes of im2col's patch tensor for an input `[batch, *spatial, C_in]` (SAME padding)."""
  return math.prod(lhs_shape) * math.prod(kernel) * itemsize


@functools.lru_cache(maxsize=None)  # one function per name: modules compare and hash equal
def conv_general_dilated(lowering: str) -> Callable[..., jax.Array] | None:
  """The `conv_general_dilated` argument of `flax.linen.Conv` for a lowering name.

  None for "xla" (flax's default, `lax.conv_general_dilated`); otherwise a function with
  lax's signature that computes supported convolutions by im2col ("im2col": always; "auto":
  on the CPU backend when the patch tensor is under AUTO_PATCH_BYTES) and hands any other to
  lax.
  """
  check(lowering, "conv_general_dilated")
  if lowering == "xla":
    return None

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
           preferred_element_type=None):
    use = (batch_group_count == 1 and _patchable(
        lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count))
    if use and lowering == "auto":
      use = (jax.default_backend() == "cpu" and
             patch_bytes(lhs.shape, rhs.shape[:-2], lhs.dtype.itemsize) <= AUTO_PATCH_BYTES)
    if use:
      return im2col_conv(lhs, rhs, padding, precision, preferred_element_type, window_strides)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)

  return conv


def for_inference(model: Any) -> Any:
  """`model` with the "auto" lowering (im2col on CPU) for batched prediction; the same module
  when it has no `conv_lowering` field."""
  if getattr(model, "conv_lowering", "auto") == "auto":
    return model
  return model.clone(conv_lowering="auto")


def for_relevance(model: Any) -> Any:
  """`model` with XLA's convolution (one rule site per conv layer for lrp); the same module
  when it already uses it or has no `conv_lowering` field."""
  if getattr(model, "conv_lowering", "xla") == "xla":
    return model
  return model.clone(conv_lowering="xla")


def _pool_geometry(n: int, k: int, s: int, padding: str) -> tuple[int, int, int]:
  """(output size, low pad, high pad) of one axis, as XLA/Keras compute SAME and VALID."""
  if padding == "SAME":
    m = -(-n // s)
    total = max((m - 1) * s + k - n, 0)
    return m, total // 2, total - total // 2
  return (n - k) // s + 1, 0, 0


def separable_max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
                       padding: str) -> jax.Array:
  """Max-pooling of `x` `[batch, *spatial, C]` as one strided 1D maximum per spatial axis.

  Equals `nn.max_pool(x, window, strides, padding)` exactly (max is associative); built from
  slices and `maximum`, so that its autodiff gradient avoids `select_and_scatter`.
  """
  for axis, (k, s) in enumerate(zip(window, strides), start=1):
    m, lo, hi = _pool_geometry(x.shape[axis], k, s, padding)
    if lo or hi:
      pads = [(0, 0, 0)] * x.ndim
      pads[axis] = (lo, hi, 0)
      x = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), pads)
    taps = [jax.lax.slice_in_dim(x, o, o + s * (m - 1) + 1, s, axis=axis) for o in range(k)]
    x = functools.reduce(jnp.maximum, taps)
  return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_separable_grad(x, window, strides, padding):
  return nn.max_pool(x, window, strides=strides, padding=padding)


def _max_pool_fwd(x, window, strides, padding):
  return _max_pool_separable_grad(x, window, strides, padding), x


def _max_pool_bwd(window, strides, padding, x, g):
  # Recomputing the (cheap) separable forward keeps only x as the residual.
  _, vjp = jax.vjp(lambda v: separable_max_pool(v, window, strides, padding), x)
  return vjp(g)


_max_pool_separable_grad.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding: str,
             lowering: str) -> jax.Array:
  """`nn.max_pool(x, window, strides, padding)` whose gradient follows `lowering`.

  "xla": XLA's own gradient; "im2col": the separable gradient; "auto": the separable gradient
  on the CPU backend. The forward values are identical under every lowering.
  """
  check(lowering, "max_pool")
  window, strides = tuple(int(k) for k in window), tuple(int(s) for s in strides)
  if lowering == "im2col" or (lowering == "auto" and jax.default_backend() == "cpu"):
    return _max_pool_separable_grad(x, window, strides, padding)
  return nn.max_pool(x, window, strides=strides, padding=padding)
