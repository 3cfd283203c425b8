"""Ensemble relevance: LRP of every member in one jitted call, combined by the head's weights.

The ensemble predicts `intercept + sum_m w_m f_m(x)` (`head.MultiLevelHead.member_weights`), so
its relevance is the same linear combination of the members' relevance maps:

    R_ensemble(x) = sum_m w_m R_m(x)

exact for a linear head (LRP is linear in the starting relevance; the intercept is a constant,
like an output bias, and gets no relevance). Each member's relevance starts from its own
predicted age (years), as in the study; the members of a sub-ensemble are evaluated by one
`jax.vmap` of `lrp.relevance` over the stacked parameters inside one `jax.jit`; the weighted
sum is taken on the device, so only `[n, X, Y, Z, C]` per sub-ensemble comes back to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import lrp
from jax_brainage import models, sharding
from jax_brainage.errors import DataError


def _apply_fn(model) -> Callable:
  """`(variables, x) -> predicted age [n]` (years) for lrp: the model in inference mode, with
  one rule site per convolution (XLA's conv whatever the model was trained with)."""
  model = models.lowering.for_relevance(model)

  def apply(variables, x):
    return models.predicted_age(model, model.apply(variables, x, train=False))

  return apply


def _member_relevance(model, composite, stacked_variables, x):
  apply = _apply_fn(model)
  return jax.vmap(lambda v: lrp.relevance(apply, v, x, composite=composite))(stacked_variables)


@functools.lru_cache(maxsize=16)
def _jitted(model, composite) -> Callable:
  """Jitted (stacked variables, x) -> members' relevance `[M, n, ...]`."""
  from jax_brainage.data import intensity

  def members(stacked, x):
    return _member_relevance(model, composite, stacked, intensity.to_unit_float(x))

  return jax.jit(members)


@jax.jit
def _weighted_sum(weights, R):
  """`sum_m w_m R_m` on the device: `[M]`, `[M, n, ...]` -> `[n, ...]`."""
  return jnp.einsum("m,m...->...", weights.astype(R.dtype), R)


def _fns(model, composite) -> Callable:
  try:
    return _jitted(model, composite)
  except TypeError:  # an unhashable composite: compile for this call only
    return _jitted.__wrapped__(model, composite)


def member_relevance(model, stacked_variables: Any, x: Any, composite=None) -> jax.Array:
  """LRP relevance of every member: `[M, n, X, Y, Z, C]` for x `[n, X, Y, Z, C]`.

  Args:
    model: the members' flax module (regression: its output is the predicted age in years).
    stacked_variables: {"params": ..., **model_state}, every leaf `[M, ...]`.
    x: network input (float in [0, 1]) or stored volumes (uint8, scaled / 255 as in training).
    composite: an `lrp.composites.Composite` (default EpsilonPlusFlat).
  One jitted call: `jax.vmap` of `lrp.relevance` over the member axis.
  """
  composite = composite if composite is not None else lrp.composites.EpsilonPlusFlat()
  return _fns(model, composite)(stacked_variables, jnp.asarray(x))


@dataclasses.dataclass(frozen=True)
class EnsembleRelevance:
  """Relevance (years of predicted age per voxel and channel) of n subjects.

  Attributes:
    subs: {sub name: `[n, X, Y, Z, C]`} the head-weighted sum of the sub-ensemble's members'
      relevance, `sum_m w_m R_m` with the members' effective ensemble weights.
    weights: {sub name: `[M]`} those weights.
    intercept: the ensemble's intercept (years), which gets no relevance.
  """

  subs: Mapping[str, np.ndarray]
  weights: Mapping[str, np.ndarray]
  intercept: float

  def total(self) -> np.ndarray:
    """The ensemble's relevance `[n, X, Y, Z, C]`: the sum over sub-ensembles (they must share
    one cube grid and channel count, e.g. per-region sub-ensembles of one sequence)."""
    shapes = {np.shape(r) for r in self.subs.values()}
    if len(shapes) != 1:
      raise DataError(f"ensemble relevance: sub-ensembles' maps have different shapes "
                      f"{sorted(shapes)}; sum them per channel instead")
    return sum(np.asarray(r, np.float64) for r in self.subs.values()).astype(np.float32)

  def per_subject_sum(self) -> np.ndarray:
    """`[n]` the sum of all relevance per subject (years; ~ prediction - intercept under a
    conserving rule)."""
    return sum(np.asarray(r, np.float64).reshape(len(r), -1).sum(1) for r in self.subs.values())


def ensemble_relevance(ensemble, inputs: Mapping[str, Any] | Any, composite=None, *,
                       batch_size: int = 8, members_per_call: int = 0) -> EnsembleRelevance:
  """The ensemble's relevance: per sub-ensemble, the head-weighted sum of its members' LRP.

  Args:
    ensemble: a `store.Ensemble`.
    inputs: {sub name: volumes `[n, X, Y, Z, C]`} (uint8 or float), or the volumes of a
      single-sub-ensemble ensemble.
    composite: an `lrp.composites.Composite` (default EpsilonPlusFlat).
    batch_size: subjects per jitted call (memory: M x batch_size relevance maps per call).
    members_per_call: members per jitted call (0: all of a sub-ensemble's at once); smaller
      groups bound device memory for large ensembles and volumes.
  """
  composite = composite if composite is not None else lrp.composites.EpsilonPlusFlat()
  inputs = ensemble._inputs(inputs)
  weights = ensemble.member_weights()
  mesh = sharding.make_mesh(devices=jax.local_devices())
  d = sharding.data_size(mesh)
  batch_size = max(d, int(math.ceil(max(1, batch_size) / d)) * d)
  batch = sharding.batch_sharding(mesh)
  out = {}
  for sub in ensemble.subs:
    volumes = np.asarray(inputs[sub.name])
    sub.check_inputs(volumes.shape)
    fn = _fns(sub.model, composite)
    groups = [(sharding.put_replicated(mesh, jax.tree.map(lambda a: a[g], sub.variables)),
               sharding.put_replicated(mesh, np.asarray(weights[sub.name][g], np.float32)))
              for g in sub.member_groups(members_per_call)]
    maps = []
    for start in range(0, len(volumes), batch_size):
      chunk = np.ascontiguousarray(volumes[start:start + batch_size])
      k = len(chunk)
      if k < batch_size:  # one compiled shape: pad with zero volumes, drop their maps
        chunk = np.concatenate([chunk, np.zeros((batch_size - k, *chunk.shape[1:]),
                                                chunk.dtype)])
      x = jax.device_put(chunk, batch)
      # Each group's [M_group, batch, ...] maps stay on the device; only their sum comes back.
      total = None
      for variables, w in groups:
        part = _weighted_sum(w, fn(variables, x))
        total = part if total is None else total + part
      maps.append(np.asarray(jax.device_get(total))[:k])
    out[sub.name] = (np.concatenate(maps) if maps
                     else np.zeros((0, *sub.input_shape), np.float32))
  return EnsembleRelevance(out, {k: np.asarray(v) for k, v in weights.items()},
                           ensemble.head.intercept())
