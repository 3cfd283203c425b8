"""Model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps").

Cascading: the layers are randomised one after another from the output to the input, and after
every step the map of the partly random model is compared with the trained model's map (Spearman
rank correlation of absolute and of signed values, Pearson correlation, overlap of the top
elements). A method whose map stays the same while the model it explains is destroyed fails the
check.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from lrp import graph
from lrp.core import LRPError
from lrp.evaluation.arrays import check_pair, flat_features


class MapSimilarity(NamedTuple):
  """Similarity of two maps per sample, each `[batch]` float32 (NaN where undefined: a constant
  map has no rank or linear correlation; an empty support has no top elements).

  spearman_abs: Spearman rank correlation of the absolute values (ties get their mean rank).
  spearman: Spearman rank correlation of the signed values.
  pearson: Pearson correlation of the signed values.
  top_iou: intersection over union of the `top_fraction` elements of largest absolute value.
  """
  spearman_abs: jax.Array
  spearman: jax.Array
  pearson: jax.Array
  top_iou: jax.Array


class ParameterRandomisation(NamedTuple):
  """Cascading model-parameter randomisation of one batch, L = len(layers) steps.

  layers: the L layer paths ("a/b" for nested sub-trees) in the order they were randomised; at
    step s (1-based) layers[:s] are random (cumulative), the others trained.
  outputs: `[L + 1, batch]` model output of the trained model (row 0) and after each step.
  spearman_abs, spearman, pearson, top_iou: `[L, batch]` similarity between the trained model's
    map and the map after each step (see `MapSimilarity`).
  """
  layers: tuple[str, ...]
  outputs: jax.Array
  spearman_abs: jax.Array
  spearman: jax.Array
  pearson: jax.Array
  top_iou: jax.Array


def _average_ranks(v):
  """1-based ranks along axis 1 of `[batch, n]`, tied values sharing their mean rank (as
  scipy.stats.rankdata's default): an element's rank is the mean of the first and last
  positions its value takes in the sorted row."""
  s = jnp.sort(v, axis=1)
  lo = jax.vmap(functools.partial(jnp.searchsorted, side="left"))(s, v)
  hi = jax.vmap(functools.partial(jnp.searchsorted, side="right"))(s, v)
  return (lo + hi + 1).astype(jnp.float32) / 2.0


def _pearson(a, b, w):
  """Pearson correlation along axis 1 over the elements where w; NaN if either is constant."""
  n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1)
  # where, not multiplication: elements outside the support may be +-inf (see _similarity)
  da = jnp.where(w, a - jnp.sum(jnp.where(w, a, 0.0), axis=1, keepdims=True) / n, 0.0)
  db = jnp.where(w, b - jnp.sum(jnp.where(w, b, 0.0), axis=1, keepdims=True) / n, 0.0)
  na = jnp.sqrt(jnp.sum(da * da, axis=1, keepdims=True))
  nb = jnp.sqrt(jnp.sum(db * db, axis=1, keepdims=True))
  ok = (na > 0) & (nb > 0)
  za, zb = da / jnp.where(ok, na, 1.0), db / jnp.where(ok, nb, 1.0)
  # r = 1 - |za - zb|^2 / 2 (= za . zb for unit vectors): exactly 1 for identical maps, which
  # za . zb misses by rounding, and more accurate near 1.
  r = jnp.clip(1.0 - 0.5 * jnp.sum((za - zb) ** 2, axis=1), -1.0, 1.0)
  return jnp.where(ok[:, 0], r, jnp.nan)


def _top(a, w, fraction):
  """bool `[batch, n]`: the round(fraction x |support|) (at least 1) elements of largest value
  inside the support; ties at the boundary go to the earlier element (stable sort)."""
  k = jnp.maximum(jnp.round(fraction * jnp.sum(w, axis=1)), 1).astype(jnp.int32)
  position = jnp.argsort(jnp.argsort(-jnp.where(w, a, -jnp.inf), axis=1, stable=True), axis=1)
  return (position < k[:, None]) & w


@functools.partial(jax.jit, static_argnames=("top_fraction",))
def _similarity(a, b, w, *, top_fraction):
  a = flat_features(a).astype(jnp.float32)
  b = flat_features(b).astype(jnp.float32)
  w = flat_features(w)
  # Outside the support a value of +inf ranks after every real one and leaves their ranks as
  # they are; _pearson then ignores it.
  rank = lambda v: _average_ranks(jnp.where(w, v, jnp.inf))
  spearman_abs = _pearson(rank(jnp.abs(a)), rank(jnp.abs(b)), w)
  spearman = _pearson(rank(a), rank(b), w)
  pearson = _pearson(a, b, w)
  ta, tb = _top(jnp.abs(a), w, top_fraction), _top(jnp.abs(b), w, top_fraction)
  union = jnp.sum(ta | tb, axis=1)
  iou = jnp.where(union > 0, jnp.sum(ta & tb, axis=1) / jnp.maximum(union, 1), jnp.nan)
  return MapSimilarity(spearman_abs, spearman, pearson, iou.astype(jnp.float32))


def map_similarity(a, b, support=None, *, top_fraction: float = 0.05) -> MapSimilarity:
  """Per-sample similarity of two maps `[batch, ...]` (every axis after the first is a feature
  axis): Spearman of |a| and |b|, Spearman and Pearson of a and b, and the IoU of their
  `top_fraction` largest-|value| elements.

  Args:
    a, b: maps of the same shape `[batch, ...]`.
    support: optional bool, broadcastable: only these elements count (e.g. the brain: relevance
      that is exactly zero in the background of both maps would inflate every correlation).
    top_fraction: share of the support's elements in the top set (0 < top_fraction <= 1).

  Returns:
    `MapSimilarity` of `[batch]` float32 arrays.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape:
    raise LRPError(f"maps of shapes {a.shape} and {b.shape} cannot be compared")
  if a.ndim < 2:
    raise LRPError(f"maps must be batched [batch, ...], got shape {a.shape}")
  if not 0 < top_fraction <= 1:
    raise LRPError(f"top_fraction must be in (0, 1], got {top_fraction}")
  support = jnp.ones((), bool) if support is None else jnp.asarray(support)
  check_pair(a, support, "support")
  return _similarity(a, b, jnp.broadcast_to(support, a.shape).astype(bool),
                     top_fraction=float(top_fraction))


def _path(layer) -> tuple[str, ...]:
  parts = tuple(layer.split("/")) if isinstance(layer, str) else tuple(layer)
  if not parts or not all(isinstance(p, str) and p for p in parts):
    raise LRPError(f"layer {layer!r}: give a parameter sub-tree as 'name' or 'outer/inner'")
  return parts


def _params(variables, params_key):
  if params_key is None:
    return variables
  if not isinstance(variables, Mapping) or params_key not in variables:
    raise LRPError(f"variables have no {params_key!r} collection (pass params_key=None if "
                   "they are the parameter tree itself)")
  return variables[params_key]


def _subtree(params, path: tuple[str, ...]):
  node = params
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      where = "/".join(path[:i]) or "the top level"
      known = ", ".join(map(str, node)) if isinstance(node, Mapping) else "none (a leaf)"
      raise LRPError(f"layer {'/'.join(path)!r}: no parameter key {key!r} under {where} "
                     f"(keys: {known})")
    node = node[key]
  return node


def _replace(tree, path: tuple[str, ...], value):
  """A copy of the nested mapping `tree` with tree[path] = value (the input is not modified:
  parameters are never changed in place); dict order is kept."""
  if not path:
    return value
  items = dict(tree)
  items[path[0]] = _replace(tree[path[0]], path[1:], value)
  return items if isinstance(tree, dict) else type(tree)(items)


def layer_order(model_fn: Callable, variables, x, *,
                params_key: str | None = "params") -> tuple[str, ...]:
  """The default randomisation order: the top-level parameter names from the output to the
  input, i.e. the reverse of the order in which `model_fn(variables, x)` first uses a leaf of
  each (found in its traced program; names it never uses come last).

  For a flax model this is the reverse of its definition order, the order `model.init` stores
  the parameters in. The dict's own order cannot be trusted: every jax tree operation (jit
  outputs, `jax.tree.map`, checkpoint restores) returns it sorted by name.
  """
  params = _params(variables, params_key)
  names = [str(k) for k in params]
  prog = graph.trace(model_fn, variables, jax.ShapeDtypeStruct(x.shape, x.dtype))
  # value id i < number of leaves is leaf i of jax.tree.flatten(variables)
  owner = {}
  for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(variables)[0]):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if params_key is not None:
      if not keys or keys[0] != params_key:
        continue
      keys = keys[1:]
    if keys:
      owner[i] = str(keys[0])
  first: dict[str, int] = {}
  for step, eqn in enumerate(prog.eqns):
    for a in eqn.ins:
      if isinstance(a, int) and a in owner:
        first.setdefault(owner[a], step)
  used = sorted(first, key=first.get)
  return tuple(reversed(used)) + tuple(n for n in names if n not in first)


def randomise_layer(variables, layer, key, *, params_key: str | None = "params"):
  """`variables` with one layer's parameters re-drawn at random.

  Every leaf of the sub-tree is replaced by a draw from N(0, sd^2), sd the standard deviation of
  that trained leaf (over all its elements), cast back to its dtype: the scale of the layer is
  kept, what it learned is not. A constant leaf (all elements equal: a bias never moved from its
  initial value, or a single-element leaf such as a regression head's bias) is kept as it is:
  there is no trained spread to draw from, and it shifts the output without shaping a map.
  Other collections (e.g. batch statistics) are not touched.

  Args:
    variables: a pytree whose `params_key` entry (or itself, with params_key=None) is a nested
      mapping of parameters.
    layer: a top-level name ("conv1") or a path into the tree ("block/conv1" or a tuple).
    key: jax.random key; leaf i of the sub-tree draws from fold_in(key, i).
  """
  path = _path(layer)
  params = _params(variables, params_key)
  sub = _subtree(params, path)
  leaves, treedef = jax.tree.flatten(sub)
  new = []
  for i, leaf in enumerate(leaves):
    leaf = jnp.asarray(leaf)
    sd = jnp.std(leaf.astype(jnp.float32))
    # Constant means all elements equal: the sd of a constant is not exactly 0 in float32.
    varies = leaf.size > 0 and jnp.any(leaf != jnp.ravel(leaf)[:1].reshape((1,) * leaf.ndim))
    # Drawn flat and reshaped: XLA:CPU compiles a multi-dimensional threefry draw slower.
    draw = jax.random.normal(jax.random.fold_in(key, i), (leaf.size,)).reshape(leaf.shape)
    new.append(jnp.where(varies, sd * draw, leaf.astype(jnp.float32)).astype(leaf.dtype))
  params = _replace(params, path, jax.tree.unflatten(treedef, new))
  return params if params_key is None else _replace(variables, (params_key,), params)


def model_parameter_randomisation(model_fn: Callable, variables, x, attribute: Callable, *, key,
                                  layers: Sequence[Any] | None = None, support=None,
                                  top_fraction: float = 0.05,
                                  params_key: str | None = "params") -> ParameterRandomisation:
  """Cascading model-parameter randomisation (Adebayo et al. 2018): randomise the layers one
  after another from the output towards the input (cumulatively) and compare, after each step,
  the map of the partly random model with the trained model's map, per sample.

  A map that explains the model must change as the model is destroyed: correlations that stay
  near 1 mean the method shows something other than the model (e.g. the input itself). The
  check says nothing about whether a map is right; report it beside other measures.

  Args:
    model_fn: `f(variables, x) -> [batch]` the explained output (recorded after each step, to
      show that the randomisation changed the model).
    variables: pytree holding the parameter tree at `params_key` (flax: {"params": ...}).
    x: `[batch, ...]` inputs.
    attribute: `attribute(variables, x) -> [batch, ...]` the map to check (an lrp composite,
      a gradient baseline, ...); jitted once here, one compilation serves every step.
    key: jax.random key; layer s (0-based, in `layers` order) is drawn from fold_in(key, s), so
      a fixed key gives the same random models.
    layers: parameter sub-trees from the output to the input ("name", "outer/inner" or tuples);
      default `layer_order(model_fn, variables, x)` (top-level names, last applied first).
    support: optional bool broadcastable to the maps: only these elements are compared.
    top_fraction: share of the elements in the top set of `top_iou`.
    params_key: the parameter collection (None: `variables` is the parameter tree).

  Returns:
    `ParameterRandomisation`: layers, outputs `[L + 1, batch]`, spearman_abs / spearman /
    pearson / top_iou `[L, batch]`.
  """
  x = jnp.asarray(x)
  if layers is None:
    layers = layer_order(model_fn, variables, x, params_key=params_key)
  paths = [_path(layer) for layer in layers]
  if not paths:
    raise LRPError("no layers to randomise")
  params = _params(variables, params_key)
  for p in paths:  # every name checked before any work is done
    _subtree(params, p)
  attribute_jit = jax.jit(attribute)
  model_jit = jax.jit(model_fn)
  original = attribute_jit(variables, x)
  outputs = [model_jit(variables, x)]
  sims = []
  current = variables
  for s, path in enumerate(paths):  # a handful of layers, each one batched attribution
    current = randomise_layer(current, path, jax.random.fold_in(key, s), params_key=params_key)
    outputs.append(model_jit(current, x))
    sims.append(map_similarity(original, attribute_jit(current, x), support,
                               top_fraction=top_fraction))
  stack = lambda field: jnp.stack([getattr(m, field) for m in sims])
  return ParameterRandomisation(
      tuple("/".join(p) for p in paths), jnp.stack(outputs).astype(jnp.float32),
      stack("spearman_abs"), stack("spearman"), stack("pearson"), stack("top_iou"))
