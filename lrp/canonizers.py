"""Canonizers: rewrite a network into an equivalent one on which LRP rules are meaningful.

`BatchNormFold` folds inference-mode BatchNorm (any per-element affine map y = x * scale + shift
with parameter operands, as flax's nn.BatchNorm(use_running_average=True) computes it) into the
neighbouring linear layer, on the traced program (lrp.graph, lrp.interpret):

- BN after a conv/dense: W' = W * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps);
- BN before a conv/dense: W' = W * s (on the input side), b' = b + W (beta - mean * s), with
  the shift propagated through the layer exactly (zero padding included).

The rules then see one linear layer with these effective weights (sign splits such as W'+ use
the signs of W * s, not of W). Nothing is mutated: the folded parameters are new arrays computed
inside the traced function. A BatchNorm that is not next to a linear layer (e.g. after a residual
sum) cannot be folded and raises `lrp.UnsupportedLayerError` naming it, unless a composite maps
'affine' to a rule.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax

from lrp import graph, interpret, rules
from lrp.core import UnsupportedLayerError


class BatchNormFold:
  """Fold BatchNorm (per-element affine maps with parameters) into adjacent linear layers."""

  fold_affine = True

  def __repr__(self):
    return "BatchNormFold()"


def wants_fold(canonizers: Iterable) -> bool:
  return any(getattr(c, "fold_affine", False) for c in canonizers or ())


def canonize(apply_fn: Callable, variables, x, canonizers: Iterable = (BatchNormFold(),)):
  """The canonized network as a function `f(variables, x) -> output` (same shapes as x).

  Its output equals apply_fn(variables, x) up to rounding; it evaluates each linear layer in its
  folded form A * lin(a * x, W) + b'. Traced once for x's shape and dtype.

  Returns:
    (f, layers): f as above, and the names of the linear layers with BatchNorm folded in.
  """
  prog = graph.trace(apply_fn, variables, x)
  plan = graph.analyse(prog, fold_affine=wants_fold(canonizers))
  folded = []
  for site in plan.sites:
    if site.category == "linear":
      site.rule = rules.Epsilon(0.0)
      if any(op in ("mul", "div") for op, _, _ in site.in_chain + site.out_chain):
        folded.append(site.name)
    elif site.category == "norm":
      site.rule = rules.Norm()
    elif site.kind == "affine":
      raise UnsupportedLayerError(
          f"affine layer '{site.name}' is not next to a linear layer and cannot be folded")
    else:
      site.rule = rules.Pass()

  def f(variables, x):
    return interpret.evaluate(plan, jax.tree.leaves(variables), x)

  return f, folded
