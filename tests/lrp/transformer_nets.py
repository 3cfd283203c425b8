"""Small transformers for the attention-rule tests: a flax ViT and a flax causal text model,
and their plain-torch replicas explained with LXT (explicit AttnLRP rules, and CP-LRP / AttnLRP
in LXT's efficient Gradient*Input form), on the same weights.

ViT: [batch, 8, 8, 3] images, 4x4 patches (4 tokens), dim 8, 2 heads, 2 pre-norm blocks
(LayerNorm, attention, GELU MLP), mean over tokens, one output (a regression, like brain age).
Text: [batch, 5, 8] input embeddings, causal attention (-inf mask), RMSNorm, SwiGLU MLP (no
biases, LLaMA-like), the last token's output.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Attention(nn.Module):
  heads: int = 2
  causal: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    b, t, dim = x.shape
    h, d = self.heads, dim // self.heads
    q, k, v = (nn.Dense(dim, use_bias=self.use_bias, name=n)(x).reshape(b, t, h, d)
               for n in ("q", "k", "v"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d ** -0.5)
    if self.causal:
      s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    a = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, dim)
    return nn.Dense(dim, use_bias=self.use_bias, name="o")(o)


class ViT(nn.Module):
  patch: int = 4
  dim: int = 8
  depth: int = 2
  mlp: int = 16

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    p = self.patch
    x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (hh // p) * (ww // p), p * p * c)
    x = nn.Dense(self.dim, name="embed")(x)
    x = x + self.param("pos", nn.initializers.normal(0.5), (1, x.shape[1], self.dim))
    for i in range(self.depth):
      x = x + Attention(name=f"attn{i}")(nn.LayerNorm(name=f"ln{i}a")(x))
      y = nn.LayerNorm(name=f"ln{i}b")(x)
      x = x + nn.Dense(self.dim, name=f"fc{i}b")(nn.gelu(nn.Dense(self.mlp, name=f"fc{i}a")(y)))
    x = nn.LayerNorm(name="ln_out")(x)
    return nn.Dense(1, name="head")(x.mean(1))[:, 0]


class TextLM(nn.Module):
  dim: int = 8
  depth: int = 2
  hidden: int = 12

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = x + Attention(causal=True, use_bias=False, name=f"attn{i}")(
          nn.RMSNorm(name=f"rms{i}a")(x))
      y = nn.RMSNorm(name=f"rms{i}b")(x)
      g = nn.silu(nn.Dense(self.hidden, use_bias=False, name=f"gate{i}")(y))
      u = nn.Dense(self.hidden, use_bias=False, name=f"up{i}")(y)
      x = x + nn.Dense(self.dim, use_bias=False, name=f"down{i}")(g * u)
    x = nn.RMSNorm(name="rms_out")(x)
    return nn.Dense(1, name="head")(x[:, -1])[:, 0]


def init(model, shape, seed=0, dtype=jnp.float64):
  """(variables, x): signed random weights and biases, norm scales around 1."""
  x = jax.random.normal(jax.random.key(seed + 100), shape, dtype)
  variables = model.init(jax.random.key(seed), x)
  leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  out = []
  for k, (path, leaf) in zip(keys, leaves):
    noise = jax.random.normal(k, leaf.shape, dtype)
    scale = getattr(path[-1], "key", "") == "scale"
    out.append(1.0 + 0.3 * noise if scale else 0.5 * noise)
  return jax.tree.unflatten(tree, out), x


# ---------------------------------------------------------------------------------------------
# torch replicas
# ---------------------------------------------------------------------------------------------


def load_lxt():
  """(explicit functional, explicit rules, efficient rules) of LXT; the efficient rules by file
  path, because lxt.efficient's package init imports transformers."""
  import lxt
  from lxt.explicit import functional, rules

  name = "_lxt_efficient_rules"
  spec = importlib.util.spec_from_file_location(
      name, Path(lxt.__file__).parent / "efficient" / "rules.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return functional, rules, module


class TorchReplica:
  """The flax models above in plain torch (float64), on the flax weights, three ways:
  'explicit' (LXT's explicit AttnLRP functions: the backward pass is the relevance),
  'attnlrp' and 'cplrp' (LXT's efficient rules: relevance = input * gradient)."""

  def __init__(self, variables, eps=1e-12):
    import torch

    self.torch = torch
    self.F, self.R, self.E = load_lxt()
    self.p = jax.tree.map(lambda a: torch.tensor(np.asarray(a, np.float64)),
                          variables["params"])
    self.eps = eps

  # -- layers -------------------------------------------------------------------------------
  def linear(self, x, p, mode):
    w, b = p["kernel"].T, p.get("bias")
    if mode == "explicit":
      return self.F.linear_epsilon(x, w, b, self.eps)
    return self.torch.nn.functional.linear(x, w, b)

  def layer_norm(self, x, p, mode):
    if mode == "explicit":
      return self.F.layer_norm_grad_fn.apply(x, p["scale"], p["bias"], 1e-6, self.eps)
    mean = x.mean(-1, keepdim=True)
    std = (((x - mean) ** 2).mean(-1, keepdim=True) + 1e-6).sqrt()
    return (x - mean) / self.E.stop_gradient(std) * p["scale"] + p["bias"]

  def rms_norm(self, x, p, mode):
    if mode == "explicit":
      return self.F.rms_norm_identity(x, p["scale"], 1e-6)
    r = self.torch.rsqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)
    return x * self.E.stop_gradient(r) * p["scale"]

  def add(self, a, b, mode):
    return self.F.add2(a, b, epsilon=self.eps) if mode == "explicit" else a + b

  def elementwise(self, fn, x, mode):
    if mode == "explicit":
      return self.R.identity(fn, x)
    return self.E.identity_rule_implicit(fn, x)

  def attention(self, x, p, mode, causal):
    torch = self.torch
    b, t, dim = x.shape
    h = 2
    d = dim // h
    q, k, v = (self.linear(x, p[n], mode).reshape(b, t, h, d).transpose(1, 2)
               for n in ("q", "k", "v"))
    if mode == "cplrp":  # LXT's cp_multi_head_attention_forward: no gradient through q and k
      q, k = self.E.stop_gradient(q), self.E.stop_gradient(k)
    if mode == "explicit":
      s = self.F.mul2(self.F.matmul(q, k.transpose(-1, -2), epsilon=self.eps), d ** -0.5)
    else:
      s = q @ k.transpose(-1, -2)
      s = (self.E.divide_gradient(s, 2) if mode == "attnlrp" else s) * d ** -0.5
    if causal:
      s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    if mode == "explicit":
      a = self.F.softmax(s, -1)
      o = self.F.matmul(a, v, epsilon=self.eps)
    else:
      o = torch.softmax(s, -1) @ v
      o = self.E.divide_gradient(o, 2) if mode == "attnlrp" else o
    return self.linear(o.transpose(1, 2).reshape(b, t, dim), p["o"], mode)

  # -- models -------------------------------------------------------------------------------
  def vit(self, x, mode):
    torch, p = self.torch, self.p
    b, hh, ww, c = x.shape
    x = x.reshape(b, hh // 4, 4, ww // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, 16 * c)
    x = self.linear(x, p["embed"], mode)
    x = self.add(x, p["pos"], mode)
    for i in range(2):
      x = self.add(x, self.attention(self.layer_norm(x, p[f"ln{i}a"], mode), p[f"attn{i}"],
                                     mode, False), mode)
      y = self.layer_norm(x, p[f"ln{i}b"], mode)
      gelu = lambda u: torch.nn.functional.gelu(u, approximate="tanh")  # noqa: E731
      y = self.elementwise(gelu, self.linear(y, p[f"fc{i}a"], mode), mode)
      x = self.add(x, self.linear(y, p[f"fc{i}b"], mode), mode)
    x = self.layer_norm(x, p["ln_out"], mode)
    x = self.F.mean(x, 1, False, self.eps) if mode == "explicit" else x.mean(1)
    return self.linear(x, p["head"], mode)[:, 0]

  def text(self, x, mode):
    torch, p = self.torch, self.p
    for i in range(2):
      x = self.add(x, self.attention(self.rms_norm(x, p[f"rms{i}a"], mode), p[f"attn{i}"],
                                     mode, True), mode)
      y = self.rms_norm(x, p[f"rms{i}b"], mode)
      gate = self.linear(y, p[f"gate{i}"], mode)
      up = self.linear(y, p[f"up{i}"], mode)
      if mode == "explicit":
        prod = self.F.mul2(self.R.identity(torch.nn.functional.silu, gate), up)
      elif mode == "attnlrp":
        prod = self.E.divide_gradient(
            self.E.identity_rule_implicit(torch.nn.functional.silu, gate) * up, 2)
      else:  # LXT's cp_gated_mlp_forward: no gradient through the gate
        prod = torch.nn.functional.silu(self.E.stop_gradient(gate)) * up
      x = self.add(x, self.linear(prod, p[f"down{i}"], mode), mode)
    x = self.rms_norm(x, p["rms_out"], mode)
    return self.linear(x[:, -1], p["head"], mode)[:, 0]

  def relevance(self, model: str, x, mode: str):
    """(output, relevance at the input) of the torch replica, relevance starting at the
    output itself; x: numpy float64."""
    torch = self.torch
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    y = getattr(self, model)(xt, mode)
    if mode == "explicit":  # the backward pass carries relevance: seed with the output
      y.backward(y.detach())
      rel = xt.grad
    else:  # Gradient*Input: the gradient of the output's sum times the input
      y.sum().backward()
      rel = xt.grad * xt.detach()
    return y.detach().numpy(), rel.numpy()
