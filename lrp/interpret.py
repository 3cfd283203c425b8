"""The interpreter: re-evaluate an analysed program with LRP rules installed.

`evaluate` runs a `lrp.graph.Plan` equation by equation, with each rule site replaced by a
`jax.custom_vjp` function whose backward pass is the site's rule (a linear site sees its layer
through `LinearLayer`, the effective linear map after canonization), so that the VJP of the
re-evaluated program is the relevance. Parameters are ordinary arguments: nothing is mutated, and
the whole computation is one jittable, vmappable function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrp.graph import BilinearSite, Const, Eqn, LinearSite, Plan, RegionSite

# ---------------------------------------------------------------------------------------------
# The effective linear layer seen by the rules
# ---------------------------------------------------------------------------------------------


class LinearLayer:
  """Static structure of a linear site: out = A * lin(a * x, w) + b (A, a: folded element-wise
  scales of a canonized BatchNorm after/before the layer, b: effective bias, all optional).

  Parameters travel separately as a dict pytree p = {'w', 'a', 'A', 'b'} (absent keys: None).
  `forward(x, p, mode)` is the linear map (no bias) with the effective weights unmodified ('w'),
  restricted to their positive ('pos') or negative ('neg') part, squared ('sq') or replaced by
  ones ('ones'); `transpose(x, p, mode, s)` is its transpose applied to s (shape of x).
  """

  def __init__(self, site: LinearSite, x_nonneg: bool):
    self.prim = site.eqn.prim
    self.params = site.eqn.params
    self.x_pos = site.x_pos
    self.x_nonneg = x_nonneg
    self.name = site.name

  def lin(self, x, w):
    args = (x, w) if self.x_pos == 0 else (w, x)
    return self.prim.bind(*args, **self.params)

  def forward(self, x, p, mode="w"):
    w, a, A = p["w"], p.get("a"), p.get("A")
    if mode == "ones":
      return self.lin(x, jnp.ones_like(w))
    if mode == "sq":
      y = self.lin(x if a is None else jnp.square(a) * x, jnp.square(w))
      return y if A is None else jnp.square(A) * y
    if mode == "w":
      y = self.lin(x if a is None else a * x, w)
      return y if A is None else A * y
    # Effective weight A_j w_ji a_i has the sign of the product of the three signs.
    want = 1 if mode == "pos" else -1
    total = 0.0
    for ws, wpart in ((1, jnp.maximum(w, 0)), (-1, jnp.minimum(w, 0))):
      for As, Apart in ((1, None if A is None else jnp.maximum(A, 0)),
                        (-1, None if A is None else jnp.minimum(A, 0))):
        if A is None and As < 0:
          continue
        for as_, apart in ((1, None if a is None else jnp.maximum(a, 0)),
                           (-1, None if a is None else jnp.minimum(a, 0))):
          if a is None and as_ < 0:
            continue
          if ws * As * as_ != want:
            continue
          y = self.lin(x if apart is None else apart * x, wpart)
          total = total + (y if Apart is None else Apart * y)
    return total

  def transpose(self, x, p, mode, s):
    _, vjp = jax.vjp(lambda u: self.forward(u, p, mode), x)
    return vjp(s.astype(x.dtype) if s.dtype != x.dtype else s)[0]

  def bias(self, p):
    return p.get("b")


# ---------------------------------------------------------------------------------------------
# Interpreter
# ---------------------------------------------------------------------------------------------


def _fold_chain(chain, read, shape, dtype):
  """(scale, shift) of a chain of affine steps, both broadcast to `shape` (None if identity)."""
  A = B = None
  for op, atom, dpos in chain:
    v = jnp.broadcast_to(jnp.asarray(read(atom), dtype), shape)
    if op == "add":
      B = v if B is None else B + v
    elif op == "sub" and dpos == 0:
      B = -v if B is None else B - v
    elif op == "sub":
      A = -jnp.ones(shape, dtype) if A is None else -A
      B = v if B is None else v - B
    elif op == "mul":
      A = v if A is None else A * v
      B = None if B is None else B * v
    else:  # div by the constant operand
      A = 1.0 / v if A is None else A / v
      B = None if B is None else B / v
  return A, B


def _zeros_like_tree(p):
  return jax.tree.map(jnp.zeros_like, p)


def _linear_site_fn(rule, layer: LinearLayer):
  @jax.custom_vjp
  def f(x, p):
    z = layer.forward(x, p, "w")
    return z if p.get("b") is None else z + p["b"]

  def fwd(x, p):
    z = f(x, p)
    return z, (x, p, z)

  def bwd(res, R):
    x, p, z = res
    return rule.linear(layer, x, p, z, R).astype(x.dtype), _zeros_like_tree(p)

  f.defvjp(fwd, bwd)
  return f


def _norm_site_fn(rule, eqn: Eqn, data_pos, post=()):
  """f(xs, others): the site's sum of the activations xs; `others` ({operand position: value})
  are a bias site's parameters, explicit arguments (not closed over: vmap over members)."""

  def fn_with(others, *xs):
    args = list(eqn.ins)
    for i, x in zip(data_pos, xs):
      args[i] = x
    for i, v in others.items():
      args[i] = v
    args = [a.value if isinstance(a, Const) else a for a in args]
    y = eqn.prim.bind(*args, **eqn.params)
    for op, v in post:
      y = y * v if op == "mul" else y / v
    return y

  @jax.custom_vjp
  def f(xs, others):
    return fn_with(others, *xs)

  def fwd(xs, others):
    y = fn_with(others, *xs)
    return y, (xs, others, y)

  def bwd(res, R):
    xs, others, y = res
    rel = rule.norm(lambda *u: fn_with(others, *u), xs, y, R)
    return tuple(r.astype(x.dtype) for r, x in zip(rel, xs)), _zeros_like_tree(others)

  f.defvjp(fwd, bwd)
  return f


def _bilinear_site_fn(rule, site: BilinearSite):
  eqn = site.eqn

  def fn(a, b):
    return eqn.prim.bind(a, b, **eqn.params)

  @jax.custom_vjp
  def f(a, b):
    return fn(a, b)

  def fwd(a, b):
    y = fn(a, b)
    return y, (a, b, y)

  def bwd(res, R):
    a, b, y = res
    ra, rb = rule.bilinear(fn, (a, b), y, R, site.kind, tuple(site.gate_pos))
    return ra.astype(a.dtype), rb.astype(b.dtype)

  f.defvjp(fwd, bwd)
  return f


def _run_region(site: RegionSite, x, ext, frozen=False):
  """The region's sub-program on input x (ext: values it reads from outside, by id); with
  `frozen`, the normalisation scale is a constant (stop_gradient)."""
  r = site.region
  env = dict(ext)
  env[r.root] = x
  for e in site.eqns:
    out = e.prim.bind(*[a.value if isinstance(a, Const) else env[a] for a in e.ins], **e.params)
    for o, v in zip(e.outs, out if e.prim.multiple_results else [out]):
      env[o] = jax.lax.stop_gradient(v) if frozen and o == r.scale else v
  return env[r.out]


def _region_site_fn(rule, site: RegionSite):
  @jax.custom_vjp
  def f(x, ext):
    return _run_region(site, x, ext)

  def fwd(x, ext):
    y = f(x, ext)
    return y, (x, ext, y)

  def bwd(res, R):
    x, ext, y = res
    if site.kind == "softmax":
      r_in = rule.softmax(x, y, R, site.region.axes)
    else:
      r_in = rule.normalization(lambda u: _run_region(site, u, ext, frozen=True), x, y, R)
    return r_in.astype(x.dtype), _zeros_like_tree(ext)

  f.defvjp(fwd, bwd)
  return f


@jax.custom_vjp
def _pass_to_root(root, value):
  return value


def _pass_fwd(root, value):
  return value, (jnp.zeros_like(root), jnp.zeros_like(value))


def _pass_bwd(res, R):
  zr, zv = res
  return R.astype(zr.dtype).reshape(zr.shape), zv


_pass_to_root.defvjp(_pass_fwd, _pass_bwd)


def _is_float(x):
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def evaluate(plan: Plan, leaves, x, probes_in=None, probes_out=None):
  """Re-evaluate the program with the rules installed; the VJP of this function is the relevance.

  Args:
    plan: from `analyse`, with a rule on every site.
    leaves: the parameter leaves (flattened variables).
    x: the input, [batch, ...].
    probes_in / probes_out: {site: zeros} added to a site's input / output, so that the
      cotangent of a probe is the relevance at that layer's input / output.
  Returns:
    the model output (same value as apply_fn(variables, x)).
  """
  prog = plan.program
  probes_in = probes_in or {}
  probes_out = probes_out or {}
  env = dict(zip(prog.param_ids, leaves))
  env[prog.data_id] = x

  def read(a):
    return a.value if isinstance(a, Const) else env[a]

  for step in plan.steps:
    kind = step[0]
    if kind == "eqn":
      e = step[1]
      out = e.prim.bind(*[read(a) for a in e.ins], **e.params)
      for o, v in zip(e.outs, out if e.prim.multiple_results else [out]):
        env[o] = v
    elif kind == "member":
      e, g = step[1], step[2]
      vals = [jax.lax.stop_gradient(read(a)) if isinstance(a, int) and a in plan.data else read(a)
              for a in e.ins]
      out = e.prim.bind(*vals, **e.params)
      if _is_float(out) and _is_float(env[g.root]):
        out = _pass_to_root(env[g.root], out)  # Pass: relevance goes to the group's input
      env[e.outs[0]] = out
    else:
      site = step[1]
      if isinstance(site, LinearSite):
        xin = env[site.root]
        if site in probes_in:
          xin = xin + probes_in[site]
        e = site.eqn
        w = read(site.w)
        zshape = tuple(prog.avals[e.outs[0]].shape)
        dtype = jnp.result_type(prog.avals[e.outs[0]].dtype)
        a, c = _fold_chain(site.in_chain, read, tuple(xin.shape), xin.dtype)
        A, B = _fold_chain(site.out_chain, read, zshape, dtype)
        layer = LinearLayer(site, site.x_nonneg)
        bias = B
        if c is not None:  # a BatchNorm shift before the layer becomes part of its bias
          cb = layer.forward(c, {"w": w, "A": A}, "w")
          bias = cb if bias is None else bias + cb
        p = {"w": w}
        if a is not None:
          p["a"] = a
        if A is not None:
          p["A"] = A
        if bias is not None:
          p["b"] = bias
        out = _linear_site_fn(site.rule, layer)(xin, p)
        if site in probes_out:
          out = out + probes_out[site]
        env[site.out] = out
      elif isinstance(site, BilinearSite):
        a, b = (read(v) for v in site.eqn.ins)
        env[site.out] = _bilinear_site_fn(site.rule, site)(a, b)
      elif isinstance(site, RegionSite):
        made = {o for e in site.eqns for o in e.outs}
        ext = {a: read(a) for e in site.eqns for a in e.ins
               if isinstance(a, int) and a not in made and a != site.region.root}
        env[site.out] = _region_site_fn(site.rule, site)(env[site.region.root], ext)
      else:
        e = site.eqn
        xs = [read(e.ins[i]) for i in site.data_pos]
        if site in probes_in:
          xs = [v + probes_in[site][j] for j, v in enumerate(xs)]
        post = [(op, jnp.broadcast_to(jnp.asarray(read(a)), prog.avals[site.out].shape))
                for op, a in site.post]
        others = {i: read(a) for i, a in enumerate(e.ins)
                  if i not in site.data_pos and isinstance(a, int)}
        out = _norm_site_fn(site.rule, e, site.data_pos, post)(tuple(xs), others)
        if site in probes_out:
          out = out + probes_out[site]
        env[site.out] = out
  return read(prog.out)
