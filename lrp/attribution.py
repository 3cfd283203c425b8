"""Gradient-based attribution baselines with the same call shape as `lrp.relevance`.

`seed` is the cotangent at the output: None means ones (the gradient of each sample's output),
an array broadcastable to the output, or a function of the output (e.g. a class one-hot).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _cotangent(seed, y):
  if seed is None:
    return jnp.ones_like(y)
  c = seed(y) if callable(seed) else jnp.asarray(seed, y.dtype)
  return jnp.broadcast_to(c, y.shape).astype(y.dtype)


def gradient(apply_fn: Callable, variables, x, seed=None):
  """d(seed . output)/dx, shape of x."""
  y, vjp = jax.vjp(lambda u: apply_fn(variables, u), x)
  return vjp(_cotangent(seed, y))[0]


def gradient_x_input(apply_fn: Callable, variables, x, seed=None):
  """x * gradient: equals LRP-0 (seeded with the output) on ReLU/max-pool nets without biases."""
  return x * gradient(apply_fn, variables, x, seed)


def smoothgrad(apply_fn: Callable, variables, x, seed=None, *, key, n_samples: int = 16,
               noise_level: float = 0.1, times_input: bool = False):
  """SmoothGrad: mean gradient over x + N(0, sigma^2), sigma = noise_level * (max - min of each
  sample). `key` is an explicit jax.random key.

  Args:
    n_samples: number of noisy copies (evaluated one after another: memory of one gradient).
    times_input: multiply the mean gradient by x.
  """
  axes = tuple(range(1, x.ndim))
  span = jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True)
  sigma = noise_level * span
  keys = jax.random.split(key, n_samples)

  def one(k):
    noise = jax.random.normal(k, x.shape, x.dtype) * sigma
    return gradient(apply_fn, variables, x + noise, seed)

  g = jnp.mean(jax.lax.map(one, keys), axis=0)
  return g * x if times_input else g


def integrated_gradients(apply_fn: Callable, variables, x, seed=None, *, baseline=None,
                         n_steps: int = 32):
  """Integrated Gradients: (x - x0) * mean of the gradient at x0 + a (x - x0), a at the
  midpoints of n_steps equal intervals (Riemann midpoint rule). Completeness:
  sum(IG) ~ seed . (f(x) - f(x0)).

  Args:
    baseline: x0, broadcastable to x (default zeros).
  """
  if baseline is None:
    x0 = jnp.zeros_like(x)
  else:
    x0 = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
  alphas = (jnp.arange(n_steps, dtype=x.dtype) + 0.5) / n_steps
  if seed is not None and callable(seed):
    c = _cotangent(seed, apply_fn(variables, x))  # one cotangent for the whole path
    seed = c

  def one(a):
    return gradient(apply_fn, variables, x0 + a * (x - x0), seed)

  g = jnp.mean(jax.lax.map(one, alphas), axis=0)
  return (x - x0) * g
