"""Program tracing and analysis: trace a model and find its LRP rule sites.

`trace` turns `apply_fn(variables, x)` into a flat list of primitive equations (jit, custom_jvp,
custom_vjp, closed_call and remat sub-programs are inlined), each with its flax module path from
`eqn.source_info.name_stack` (e.g. 'MRInet/conv1'). `analyse` finds the rule sites:

- linear:  conv_general_dilated / dot_general with one input-dependent operand (nn.Conv, nn.Dense,
           nn.ConvTranspose, einsum...), with the bias add (and, with a BatchNorm canonizer, the
           per-element affine maps right after and right before it) folded in;
- norm:    reduce_window_sum (sum and average pooling), reduce_sum (global pooling, means) and
           the add/sub of two different activations (residual connections);
- pass:    element-wise functions of one activation (ReLU, GELU, dividing by a constant, ...),
           grouped by the activation they are computed from ('activation'); those with a
           parameter operand are 'affine' (an unfolded BatchNorm) and have no default rule.

Everything else (reshape, max-pooling, slicing, concatenation, ...) is re-bound as it is: its own
VJP routes relevance (max-pooling: winner takes all). `lrp.interpret.evaluate` re-evaluates the
analysed program (a `Plan`) with the rules installed. `name_matches` and `find_site` select sites
by module path.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable

import jax
from jax.extend import core as jex_core
import numpy as np

from lrp import patterns
from lrp.core import UnsupportedLayerError

# ---------------------------------------------------------------------------------------------
# Tracing and inlining
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Const:
  """A literal or a captured constant operand."""
  value: Any


@dataclasses.dataclass(eq=False)
class Eqn:
  prim: Any
  params: dict
  ins: list  # int (value id) or Const
  outs: list  # int value ids
  name: str  # module path, e.g. 'MRInet/conv1' ('' outside any module)


@dataclasses.dataclass(eq=False)
class Program:
  """A flat program: value ids 0..n_params-1 are the parameter leaves, `data_id` is x."""
  eqns: list
  param_ids: list
  data_id: int
  out: Any  # int or Const
  avals: dict  # id -> ShapedArray
  treedef: Any


_CALL_PARAMS = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
}


def _join(prefix: str, name: str) -> str:
  return "/".join(s for s in (prefix, name) if s)


def _inline(jaxpr, consts, in_atoms, prefix, prog, counter):
  env = {}

  def read(a):
    if isinstance(a, jex_core.Literal):
      return Const(a.val)
    return env[a]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = Const(c)
  for v, a in zip(jaxpr.invars, in_atoms):
    env[v] = a
  for e in jaxpr.eqns:
    ins = [read(a) for a in e.invars]
    name = _join(prefix, str(e.source_info.name_stack))
    key = _CALL_PARAMS.get(e.primitive.name)
    sub = e.params.get(key) if key else None
    if sub is not None:
      if isinstance(sub, jex_core.ClosedJaxpr):
        sub_jaxpr, sub_consts = sub.jaxpr, sub.consts
      else:
        sub_jaxpr, sub_consts = sub, ()
      if len(sub_jaxpr.invars) != len(ins):  # e.g. custom_vjp variants with extra operands
        ins = ins[len(ins) - len(sub_jaxpr.invars):]
      outs = _inline(sub_jaxpr, sub_consts, ins, name, prog, counter)
      for v, o in zip(e.outvars, outs):
        env[v] = o
      continue
    outs = []
    for v in e.outvars:
      i = counter[0]
      counter[0] += 1
      prog.avals[i] = v.aval
      env[v] = i
      outs.append(i)
    prog.eqns.append(Eqn(e.primitive, dict(e.params), ins, outs, name))
  return [read(v) for v in jaxpr.outvars]


def trace(apply_fn: Callable, variables, x) -> Program:
  """Flat program of `apply_fn(variables, x)` (x: one array, output: one array)."""
  leaves, treedef = jax.tree.flatten(variables)

  def flat_fn(leaves, x):
    return apply_fn(jax.tree.unflatten(treedef, leaves), x)

  closed = jax.make_jaxpr(flat_fn)(leaves, x)
  jaxpr = closed.jaxpr
  if len(jaxpr.outvars) != 1:
    raise UnsupportedLayerError(
        f"apply_fn must return one array [batch] or [batch, k], got {len(jaxpr.outvars)} outputs")
  prog = Program([], [], -1, None, {}, treedef)
  n = len(jaxpr.invars)
  for i, v in enumerate(jaxpr.invars):
    prog.avals[i] = v.aval
  prog.param_ids = list(range(n - 1))
  prog.data_id = n - 1
  counter = [n]
  outs = _inline(jaxpr, closed.consts, list(range(n)), "", prog, counter)
  prog.out = outs[0]
  return prog


# ---------------------------------------------------------------------------------------------
# Analysis: rule sites
# ---------------------------------------------------------------------------------------------

_ELEMENTWISE = frozenset("""
neg sign floor ceil round is_finite abs exp exp2 log log1p expm1 tanh logistic sin cos tan asin
acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt erf erfc erf_inv lgamma digamma
integer_pow pow square reciprocal max min add sub mul div rem atan2 nextafter select_n clamp
convert_element_type copy copy_p eq ne lt le gt ge and or not xor stop_gradient
""".split())
_AFFINE = frozenset({"add", "sub", "mul", "div"})
_STRUCTURAL_NONNEG = frozenset("""
reshape transpose broadcast_in_dim squeeze expand_dims slice dynamic_slice
reduce_window_max reduce_max concatenate convert_element_type copy copy_p rev gather
reduce_window_sum reduce_sum cumsum cummax
""".split())


@dataclasses.dataclass(eq=False)
class Site:
  # 'conv' | 'conv_transpose' | 'dense' | 'sum_pool' | 'sum' | 'residual' | 'bias' | 'activation'
  # | 'affine' | 'bilinear' | 'product' | 'softmax' | 'normalization'
  kind: str
  name: str
  first: bool = False
  rule: Any = None

  @property
  def category(self) -> str:
    if self.kind in ("conv", "conv_transpose", "dense"):
      return "linear"
    if self.kind in ("activation", "affine"):
      return "pass"
    if self.kind in ("bilinear", "product"):
      return "bilinear"
    if self.kind in ("softmax", "normalization"):
      return self.kind
    return "norm"


@dataclasses.dataclass(eq=False)
class LinearSite(Site):
  eqn: Eqn = None
  x_pos: int = 0  # operand position of the activation
  w: Any = None  # atom of the weight operand
  root: int = -1  # value id of the (canonized) layer input
  # (op, atom, data_pos) steps: root -> eqn input, and eqn output -> site output
  in_chain: list = dataclasses.field(default_factory=list)
  out_chain: list = dataclasses.field(default_factory=list)
  out: int = -1
  x_nonneg: bool = False


@dataclasses.dataclass(eq=False)
class NormSite(Site):
  eqn: Eqn = None
  data_pos: list = dataclasses.field(default_factory=list)
  post: list = dataclasses.field(default_factory=list)  # (op, atom): avg = sum / count
  out: int = -1


@dataclasses.dataclass(eq=False)
class GroupSite(Site):
  root: int = -1


@dataclasses.dataclass(eq=False)
class BilinearSite(Site):
  """dot_general ('bilinear') or element-wise mul ('product') of two activations."""
  eqn: Eqn = None
  out: int = -1
  gate_pos: list = dataclasses.field(default_factory=list)  # operands that are gates / weights


@dataclasses.dataclass(eq=False)
class RegionSite(Site):
  """A softmax or a normalisation layer: a sub-program from `region.root` to `out`."""
  region: Any = None  # lrp.patterns.Region
  eqns: list = dataclasses.field(default_factory=list)
  eqn: Eqn = None  # the last one
  out: int = -1


@dataclasses.dataclass(eq=False)
class Plan:
  program: Program
  steps: list  # ('eqn', Eqn) | ('site', LinearSite|NormSite) | ('member', Eqn, GroupSite)
  sites: list
  data: set
  param: set


def _conv_kind(eqn):
  if eqn.prim.name == "dot_general":
    return "dense"
  if any(d > 1 for d in eqn.params.get("lhs_dilation", ()) or ()):
    return "conv_transpose"
  return "conv"


def analyse(prog: Program, fold_affine: bool = False) -> Plan:
  """Find the rule sites of a program (see the module docstring)."""
  eqns = prog.eqns
  data = {prog.data_id}
  param = set(prog.param_ids)
  for e in eqns:
    ids = [a for a in e.ins if isinstance(a, int)]
    if any(a in data for a in ids):
      data.update(e.outs)
    elif any(a in param for a in ids):
      param.update(e.outs)
  consumers: dict = {}
  producer: dict = {}
  for k, e in enumerate(eqns):
    for a in e.ins:
      if isinstance(a, int):
        consumers.setdefault(a, []).append(k)
    for o in e.outs:
      producer[o] = k
  if isinstance(prog.out, int):
    consumers.setdefault(prog.out, []).append(-1)

  def is_data(a):
    return isinstance(a, int) and a in data

  def shape(a):
    return tuple(prog.avals[a].shape) if isinstance(a, int) else tuple(np.shape(a.value))

  def affine_step(e, cur):
    """(op, other atom, data position) if e is an affine map of `cur` by a constant operand."""
    if e.prim.name not in _AFFINE or len(e.ins) != 2:
      return None
    dpos = [i for i, a in enumerate(e.ins) if is_data(a)]
    if len(dpos) != 1 or e.ins[dpos[0]] != cur or shape(e.outs[0]) != shape(cur):
      return None
    if e.prim.name == "div" and dpos[0] != 0:
      return None
    return (e.prim.name, e.ins[1 - dpos[0]], dpos[0])

  claimed: dict = {}  # eqn index -> site
  site_end: dict = {}  # eqn index where a site is evaluated -> site
  sites = []
  # Softmax and normalisation regions (lrp.patterns) first: one site for each sub-program, so
  # that the BatchNorm folding below does not take a LayerNorm's own affine map.
  regions, is_gate = patterns.find_regions(prog, data)
  for r in regions:
    site = RegionSite(kind=r.kind, name=r.name, region=r, eqns=[eqns[i] for i in r.eqns],
                      eqn=eqns[r.eqns[-1]], out=r.out)
    for i in r.eqns:
      claimed[i] = site
    site_end[r.eqns[-1]] = site
    sites.append(site)
  # Linear sites, in program order, with their bias (and folded affine maps).
  for k, e in enumerate(eqns):
    if e.prim.name not in ("conv_general_dilated", "dot_general") or not is_data(e.outs[0]):
      continue
    dpos = [i for i, a in enumerate(e.ins) if is_data(a)]
    if len(dpos) != 1 and e.prim.name == "dot_general":
      # A matmul of two activations (attention's q k^T and a v): a bilinear site.
      site = BilinearSite(kind="bilinear", name=e.name, eqn=e, out=e.outs[0])
      claimed[k] = site
      site_end[k] = site
      sites.append(site)
      continue
    if len(dpos) != 1:
      raise UnsupportedLayerError(
          f"layer '{e.name or e.prim.name}': {e.prim.name} of two activations (bilinear) "
          "has no LRP rule")
    site = LinearSite(kind=_conv_kind(e), name=e.name, eqn=e, x_pos=dpos[0], w=e.ins[1 - dpos[0]])
    claimed[k] = site
    end = k
    cur = e.outs[0]
    while True:
      cons = consumers.get(cur, [])
      if len(cons) != 1 or cons[0] < 0:
        break
      step = affine_step(eqns[cons[0]], cur)
      if step is None or cons[0] in claimed or (
          step[0] in ("mul", "div") and not (fold_affine and step[1] in param)):
        break
      site.out_chain.append(step)
      claimed[cons[0]] = site
      end = cons[0]
      cur = eqns[end].outs[0]
    site.out = cur
    u = e.ins[dpos[0]]
    while fold_affine and u in producer:
      pk = producer[u]
      pe = eqns[pk]
      if pk in claimed or consumers.get(u, []) != [k if not site.in_chain else site.in_chain[0][3]]:
        break
      d = [a for a in pe.ins if is_data(a)]
      if len(d) != 1:
        break
      step = affine_step(pe, d[0])
      if step is None or step[1] not in param:  # only parameters (BatchNorm), not literals
        break
      site.in_chain.insert(0, step + (pk,))
      claimed[pk] = site
      u = d[0]
    site.in_chain = [s[:3] for s in site.in_chain]
    site.root = u
    site_end[end] = site
    sites.append(site)

  for site in sites:
    if isinstance(site, BilinearSite):
      site.gate_pos = [i for i, a in enumerate(site.eqn.ins) if is_gate(a)]

  # Norm sites and element-wise groups.
  root_of: dict = {}
  groups: dict = {}
  steps = []
  for k, e in enumerate(eqns):
    if k in claimed:
      if k in site_end:
        steps.append(("site", site_end[k]))
      continue
    if not any(is_data(a) for a in e.ins):
      steps.append(("eqn", e))
      continue
    pname = e.prim.name
    if pname in ("reduce_window_sum", "reduce_sum"):
      site = NormSite(kind="sum_pool" if pname == "reduce_window_sum" else "sum", name=e.name,
                      eqn=e, data_pos=[0], out=e.outs[0])
      sites.append(site)
      # Average pooling / mean: the division by the window size belongs to the site, so that the
      # stabiliser acts on the average (as zennit's Norm on AvgPool does).
      end = k
      cons = consumers.get(site.out, [])
      if len(cons) == 1 and cons[0] >= 0:
        step = affine_step(eqns[cons[0]], site.out)
        if step is not None and step[0] in ("mul", "div") and step[2] == 0 and step[1] not in param:
          site.post.append(step[:2])
          claimed[cons[0]] = site
          site.out = eqns[cons[0]].outs[0]
          end = cons[0]
      if end == k:
        steps.append(("site", site))
      else:
        site_end[end] = site
      continue
    if pname in _ELEMENTWISE and len(e.outs) == 1:
      dops = [a for a in e.ins if is_data(a)]
      roots = {root_of.get(a, a) for a in dops}
      out_shape = shape(e.outs[0])
      same_shape = all(shape(a) == out_shape for a in dops)
      if len(roots) == 1 and same_shape and shape(next(iter(roots))) == out_shape:
        r = next(iter(roots))
        g = groups.get(r)
        if g is None:
          g = groups[r] = GroupSite(kind="activation", name=e.name, root=r)
          sites.append(g)
        if any(isinstance(a, int) and a in param for a in e.ins):
          g.kind = "affine"
          g.name = e.name
        root_of[e.outs[0]] = r
        steps.append(("member", e, g))
        continue
      if pname in ("add", "sub") and len(dops) == 2 and same_shape:
        site = NormSite(kind="residual", name=e.name, eqn=e, data_pos=[0, 1], out=e.outs[0])
        sites.append(site)
        steps.append(("site", site))
        continue
      if pname == "mul" and len(dops) == 2 and same_shape:
        # Element-wise product of two different activations (a gate, GLU): a bilinear site.
        # A gate: a softmax or sigmoid output, or the output of an element-wise function (the
        # SiLU of a SwiGLU) multiplying a raw activation.
        site = BilinearSite(kind="product", name=e.name, eqn=e, out=e.outs[0],
                            gate_pos=[i for i, a in enumerate(e.ins)
                                      if is_gate(a) or a in root_of])
        sites.append(site)
        steps.append(("site", site))
        continue
      if pname in ("add", "sub") and len(dops) == 1 and dops[0] not in root_of and same_shape \
          and all(a in param for a in e.ins if isinstance(a, int) and a != dops[0]) \
          and any(isinstance(a, int) and a in param for a in e.ins):
        # A parameter added to an activation that no layer claims (a position embedding, a
        # learnt offset): a bias site, whose share of the relevance the rules decide.
        site = NormSite(kind="bias", name=e.name, eqn=e,
                        data_pos=[e.ins.index(dops[0])], out=e.outs[0])
        sites.append(site)
        steps.append(("site", site))
        continue
      if pname in ("div", "pow", "atan2", "rem") and len(dops) == 2:
        raise UnsupportedLayerError(
            f"layer '{e.name or '<top level>'}': primitive {pname} of two activations has no "
            "LRP rule (see the lrp guide, 'A rule for a new primitive')")
    if _contains_linear(e.params):
      raise UnsupportedLayerError(
          f"layer '{e.name or pname}': a {pname} (control flow) contains convolutions or dense "
          "layers; LRP rules cannot be installed inside it (unroll it in Python)")
    if pname in ("add_any",) and len(e.ins) == 2:
      site = NormSite(kind="residual", name=e.name, eqn=e, data_pos=[0, 1], out=e.outs[0])
      sites.append(site)
      steps.append(("site", site))
      continue
    steps.append(("eqn", e))

  _mark_nonneg_and_first(prog, steps, data, param)
  return Plan(prog, steps, sites, data, param)


def _contains_linear(params) -> bool:
  """Whether a higher-order primitive's sub-programs contain a conv or dot_general."""
  for sub in jex_core.jaxprs_in_params(params):
    for e in sub.eqns:
      if e.primitive.name in ("conv_general_dilated", "dot_general") or _contains_linear(e.params):
        return True
  return False


def _literal_nonneg(a) -> bool:
  if not isinstance(a, Const):
    return False
  try:
    return bool(np.all(np.asarray(a.value) >= 0))
  except Exception:  # noqa: BLE001 - non-numeric constants
    return False


def _mark_nonneg_and_first(prog, steps, data, param):
  """Which activations are >= 0 (for the cost shortcut) and which linear sites come first."""
  nonneg = set()
  upstream = set()  # activations with a linear site upstream on the data path

  def nn_(a):
    return (isinstance(a, int) and a in nonneg) or _literal_nonneg(a)

  for step in steps:
    if step[0] == "site" and isinstance(step[1], LinearSite):
      s = step[1]
      s.x_nonneg = s.root in nonneg
      s.first = s.root not in upstream
      upstream.add(s.out)
      continue
    e = step[1].eqn if step[0] == "site" else step[1]
    ins = [step[1].region.root] if isinstance(step[1], RegionSite) else e.ins
    outs = [step[1].out] if step[0] == "site" else e.outs
    if any(isinstance(a, int) and a in upstream for a in ins):
      upstream.update(outs)
    name = e.prim.name
    if name == "max":
      ok = any(nn_(a) for a in ins)
    elif name in ("abs", "exp", "exp2", "logistic", "sqrt", "rsqrt", "square"):
      ok = True
    elif name == "integer_pow":
      ok = e.params.get("y", 1) % 2 == 0
    elif name in ("add", "mul", "min", "concatenate", "clamp"):
      ok = all(nn_(a) for a in ins)
    elif name == "select_n":
      ok = all(nn_(a) for a in ins[1:])
    elif name == "pad":
      ok = nn_(ins[0]) and nn_(ins[1])
    elif name in _STRUCTURAL_NONNEG:
      ok = nn_(ins[0])
    else:
      ok = False
    if ok and step[0] == "site" and step[1].post:
      ok = all(_literal_nonneg(a) for _, a in step[1].post)
    if ok:
      nonneg.update(outs)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def name_matches(pattern: str, name: str) -> bool:
  """Whether a layer-name pattern selects a module path.

  A pattern matches the full path ('MRInet/conv1'), any suffix of it at a '/' boundary
  ('conv1', 'block1/conv1'), or, with wildcards, as an fnmatch glob over the full path or a
  suffix ('*conv*', 'block?/conv1').
  """
  if not name:
    return False
  parts = name.split("/")
  suffixes = ["/".join(parts[i:]) for i in range(len(parts))]
  return any(s == pattern or fnmatch.fnmatchcase(s, pattern) for s in suffixes)


def find_site(plan: Plan, name: str, categories=("linear", "norm")) -> Site:
  """The one site selected by `name` (see `name_matches`), else LRPError listing the names."""
  hits = [s for s in plan.sites if s.category in categories and name_matches(name, s.name)]
  exact = [s for s in hits if s.name == name]
  hits = exact or hits
  if len(hits) != 1:
    names = sorted({s.name for s in plan.sites if s.category in categories})
    what = "no layer" if not hits else f"{len(hits)} layers"
    raise UnsupportedLayerError(
        f"layer name {name!r} selects {what}; layers are: {', '.join(names)}")
  return hits[0]
