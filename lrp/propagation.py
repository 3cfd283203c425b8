"""`relevance` and `explain`: LRP for any `apply_fn(variables, x)` (lrp.graph traces and analyses
the model, lrp.interpret re-evaluates it with the rules)."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from lrp import canonizers as _canonizers
from lrp import composites as _composites
from lrp import frameworks, graph, interpret
from lrp.core import LRPError


class Explanation(NamedTuple):
  """Result of `explain`.

  relevance: [batch, ...] relevance at the input, shape of x.
  output: the model output, [batch] or [batch, k].
  start: the starting relevance at the output (same shape as output).
  delta: [batch] convergence delta, sum of input relevance minus sum of starting relevance
    (what biases and stabilisers absorbed or added).
  layers: {name: relevance} at the requested intermediate layers.
  """
  relevance: jax.Array
  output: jax.Array
  start: jax.Array
  delta: jax.Array
  layers: dict


def _per_sample_sum(a):
  return jnp.sum(a.reshape(a.shape[0], -1), axis=1) if a.ndim > 1 else a


def convergence_delta(relevance, start):
  """[batch] sum of relevance at the input minus the sum of the starting relevance."""
  return _per_sample_sum(relevance) - _per_sample_sum(start)


def _starting_relevance(seed, output):
  if seed is None:
    return output
  if callable(seed):
    start = seed(output)
  else:
    start = jnp.asarray(seed, output.dtype)
  if start.shape != output.shape:
    start = jnp.broadcast_to(start, output.shape)
  return start.astype(output.dtype)


def build(apply_fn: Callable, variables, x, composite=None):
  """Trace `apply_fn` and assign the composite's rules: the `lrp.graph.Plan` of this model."""
  composite = composite if composite is not None else _composites.EpsilonPlusFlat()
  prog = graph.trace(apply_fn, variables, x)
  plan = graph.analyse(prog, fold_affine=_canonizers.wants_fold(composite.canonizers))
  return composite.assign(plan)


def explain(apply_fn: Callable, variables, x=None, composite=None, seed=None,
            layers: Sequence[str] = (), where: str = "input") -> Explanation:
  """Relevance of x for the output of `apply_fn(variables, x)`, with everything around it.

  Args:
    apply_fn: `apply_fn(variables, x) -> [batch] or [batch, k]`, e.g. a flax `model.apply` or a
      `functools.partial` of it with keyword arguments (train=False); or a flax NNX or Equinox
      module, called as `explain(module, x, ...)` (lrp.frameworks).
    variables: the model's variables (any pytree).
    x: [batch, ...] input (e.g. [batch, x, y, z, channel]).
    composite: an `lrp.composites.Composite` (default EpsilonPlusFlat()).
    seed: starting relevance. None: the output itself (regression, e.g. the predicted age in
      years); an array broadcastable to the output (e.g. a class one-hot); or a function of the
      output (e.g. `lambda y: y - y_ref` for a contrast against a reference prediction).
    layers: names of intermediate layers (module paths, see lrp.graph.name_matches) at which
      to return relevance too.
    where: 'input' (relevance at those layers' inputs) or 'output' (at their outputs).
  """
  if where not in ("input", "output"):
    raise LRPError(f"where must be 'input' or 'output', got {where!r}")
  apply_fn, variables, x = frameworks.resolve(apply_fn, variables, x)
  plan = build(apply_fn, variables, x, composite)
  leaves = jax.tree.leaves(variables)
  sites = {name: graph.find_site(plan, name) for name in layers}
  avals = plan.program.avals

  def probe(site):
    if where == "output":
      out_id = site.out
      return jnp.zeros(avals[out_id].shape, avals[out_id].dtype)
    if isinstance(site, graph.LinearSite):
      return jnp.zeros(avals[site.root].shape, avals[site.root].dtype)
    return [jnp.zeros(avals[site.eqn.ins[i]].shape, avals[site.eqn.ins[i]].dtype)
            for i in site.data_pos]

  probes = {name: probe(s) for name, s in sites.items()}

  def run(x, probes):
    by_site = {sites[n]: p for n, p in probes.items()}
    if where == "input":
      return interpret.evaluate(plan, leaves, x, probes_in=by_site)
    return interpret.evaluate(plan, leaves, x, probes_out=by_site)

  output, vjp = jax.vjp(run, x, probes)
  start = _starting_relevance(seed, output)
  rel, rel_layers = vjp(start)
  return Explanation(rel, output, start, convergence_delta(rel, start), rel_layers)


def relevance(apply_fn: Callable, variables, x=None, composite=None, seed=None):
  """LRP relevance of x, shape of x: `lrp.relevance(model.apply, variables, x, composite)`, or
  `lrp.relevance(module, x, composite=...)` for a flax NNX or Equinox module.

  See `explain` for the arguments. One jittable, vmappable function: wrap it in jax.jit, vmap it
  over samples or over stacked ensemble members' variables, or feed it sharded inputs.
  """
  return explain(apply_fn, variables, x, composite=composite, seed=seed).relevance


def relevance_fn(apply_fn: Callable, composite=None, layers: Sequence[str] = (),
                 where: str = "input"):
  """A jitted `f(variables, x, seed=None) -> Explanation` for repeated use (traced per shape)."""

  @functools.partial(jax.jit, static_argnames=())
  def f(variables, x, seed=None):
    return explain(apply_fn, variables, x, composite=composite, seed=seed, layers=layers,
                   where=where)

  return f


def describe(apply_fn: Callable, variables, x=None, composite=None) -> list:
  """The rule sites of a model in program order: [(name, kind, first, rule)] (for checking a
  composite's mapping before explaining)."""
  apply_fn, variables, x = frameworks.resolve(apply_fn, variables, x)
  plan = build(apply_fn, variables, x, composite)
  return [(s.name, s.kind, s.first, s.rule) for s in plan.sites]
