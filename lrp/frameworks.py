"""Any JAX model as `apply_fn(variables, x)`: flax linen, flax NNX, Equinox, plain functions.

lrp traces `apply_fn(variables, x)`; this module turns the other ways of holding a model into
that form, so that `lrp.relevance` and `lrp.explain` take them directly:

    lrp.relevance(linen_model.apply, variables, x, composite)   # flax linen
    lrp.relevance(nnx_model, x, composite=composite)             # flax NNX module
    lrp.relevance(eqx_model, x, composite=composite)             # Equinox module (per sample)
    apply_fn, params = lrp.frameworks.adapt(nnx_model)           # the pair, for jit / vmap

Neither flax nor equinox is imported here: a model is recognised by the classes of the library
that made it, which its user has imported already.
"""

from __future__ import annotations

import sys
from typing import Callable

import jax

from lrp.core import LRPError


def _nnx():
  return sys.modules.get("flax.nnx")


def _eqx():
  return sys.modules.get("equinox")


def is_module(model) -> bool:
  """Whether `model` is a flax NNX or an Equinox module instance."""
  nnx, eqx = _nnx(), _eqx()
  return bool((nnx is not None and isinstance(model, nnx.Module)) or
              (eqx is not None and isinstance(model, eqx.Module)))


def adapt(model, per_sample: bool = True) -> tuple[Callable, object]:
  """(apply_fn, variables) of an NNX or Equinox module, with `apply_fn(variables, x)` its output.

  Args:
    model: an `nnx.Module` (split into its graph definition and its `nnx.Param` state; other
      state, such as batch statistics, is held constant) or an `equinox.Module` (partitioned
      into its floating-point arrays and the rest).
    per_sample: Equinox only: the module maps one sample (Equinox's convention), so apply_fn
      maps it over the batch axis with jax.vmap. False: it takes the batch itself.
  Returns:
    (apply_fn, variables): variables is the pytree of parameters that lrp treats as weights.
  """
  nnx, eqx = _nnx(), _eqx()
  if nnx is not None and isinstance(model, nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_nnx(variables, x):
      return nnx.merge(graphdef, variables, rest)(x)

    return apply_nnx, params
  if eqx is not None and isinstance(model, eqx.Module):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply_eqx(variables, x):
      module = eqx.combine(variables, static)
      return jax.vmap(module)(x) if per_sample else module(x)

    return apply_eqx, params
  raise LRPError(f"{type(model).__name__} is not an NNX or Equinox module; pass "
                 "apply_fn(variables, x) and its variables instead (flax linen: model.apply)")


def resolve(apply_fn, variables, x):
  """The (apply_fn, variables, x) of a call `relevance(apply_fn, variables, x)` or
  `relevance(module, x)` (an NNX or Equinox module and its input)."""
  if is_module(apply_fn):
    if x is None:
      x = variables
    elif variables is not None:
      raise LRPError("a module carries its own variables: call relevance(module, x, ...)")
    apply_fn, variables = adapt(apply_fn)
  elif x is None:
    raise LRPError("x is missing: call relevance(apply_fn, variables, x) (or relevance(module, "
                   "x) with an NNX or Equinox module)")
  return apply_fn, variables, x
