"""Tiny flax nets for the lrp tests (small volumes: compile time dominates on 2 CPU cores)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MiniMRInet(nn.Module):
  """MRInet's pattern in miniature: conv-ReLU-maxpool(3/2 SAME) x2, flatten, dropout, dense."""
  bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(3, (3, 3, 3), padding="SAME", use_bias=self.bias, name="conv1")(x))
    x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding="SAME")
    x = nn.relu(nn.Conv(4, (3, 3, 3), padding="SAME", use_bias=self.bias, name="conv2")(x))
    x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = nn.relu(nn.Dense(5, use_bias=self.bias, name="dense1")(x))
    return nn.Dense(1, use_bias=self.bias, name="out")(x)[:, 0]


class ResidualAvgNet(nn.Module):
  """Max-pool on the input (ties), conv, residual block, average pool, dense; no biases."""

  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding="SAME")
    x = nn.relu(nn.Conv(3, (3, 3, 3), padding="SAME", use_bias=False, name="conv1")(x))
    h = nn.relu(nn.Conv(3, (3, 3, 3), padding="SAME", use_bias=False, name="conv2")(x))
    x = nn.relu(x + h)
    x = nn.avg_pool(x, (2, 2, 2), strides=(2, 2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(1, use_bias=False, name="out")(x)[:, 0]


def init(model, shape, seed=0, dtype=jnp.float32):
  kx, kp = jax.random.split(jax.random.key(seed))
  x = jax.random.uniform(kx, shape, dtype)
  return model.init(kp, x), x
