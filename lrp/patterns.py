"""Transformer patterns in a traced program: softmax and normalisation regions, bilinear operands.

A softmax or a LayerNorm/RMSNorm is not one primitive in a jaxpr but a small sub-program. This
module finds those sub-programs ("regions") on the flat program of `lrp.graph.trace`, so that one
rule can serve the whole of it, whatever library wrote it (flax linen or NNX, Equinox, plain
jax.numpy):

- softmax (`jax.nn.softmax`, or written by hand): ``e = exp(x - stop_gradient(max(x)))`` (the
  shift is optional), ``s = sum(e, axes)``, ``y = e / broadcast(s)``. The region runs from x to y;
  `axes` are the reduced axes.
- normalisation (flax nn.LayerNorm / nn.RMSNorm, equinox LayerNorm/RMSNorm, hand-written):
  a scale ``c = rsqrt(v + eps)`` (or ``1 / sqrt(...)``, or ``u / sqrt(...)``) whose input v is
  computed from the data, multiplied into (or divided out of) the centred or raw input u, then
  optionally an element-wise affine map by parameters (``* weight + bias``). The region runs from
  x (u, or the x of ``u = x - mean(x)``) to the end of that affine map; `scale` is the value id of
  c (or of the sqrt), which the normalisation rules hold constant.

A region is only formed when it is closed: every value computed inside it is used only inside it
(the input x aside). Its input x dominates its output (every data path to the output passes
through x), which is checked with the program's dominator tree. A candidate that fails these
checks is left to the ordinary analysis (and a division of two activations then raises).
"""

from __future__ import annotations

import dataclasses

# Shape-changing or type-changing operations that carry a value unchanged for pattern matching.
_CARRY = frozenset({"broadcast_in_dim", "reshape", "convert_element_type", "copy", "copy_p",
                    "squeeze", "expand_dims", "stop_gradient", "transpose"})
_AFFINE = frozenset({"add", "sub", "mul", "div"})


@dataclasses.dataclass(eq=False)
class Region:
  kind: str  # 'softmax' | 'normalization'
  root: int  # value id of the region's input x
  out: int  # value id of its output
  eqns: list  # eqn indices, program order
  axes: tuple = ()  # softmax: reduced axes of the output
  scale: int = -1  # normalisation: value id of the scale held constant by the rules
  name: str = ""


class _Index:
  """Producers, consumers and data dependence of a flat program, with dominators on demand."""

  def __init__(self, prog, data):
    self.prog = prog
    self.eqns = prog.eqns
    self.data = data
    self.producer = {}
    self.consumers = {}
    for k, e in enumerate(self.eqns):
      for a in e.ins:
        if isinstance(a, int):
          self.consumers.setdefault(a, []).append(k)
      for o in e.outs:
        self.producer[o] = k
    if isinstance(prog.out, int):
      self.consumers.setdefault(prog.out, []).append(-1)
    self._idom = None

  def is_data(self, a):
    return isinstance(a, int) and a in self.data

  def data_ins(self, k):
    return [a for a in self.eqns[k].ins if self.is_data(a)]

  def prim(self, v):
    k = self.producer.get(v)
    return None if k is None else self.eqns[k].prim.name

  def through_carry(self, v):
    """Follow a value back through broadcasts, reshapes and stop_gradient to its source."""
    while True:
      k = self.producer.get(v)
      if k is None or self.eqns[k].prim.name not in _CARRY:
        return v
      d = self.data_ins(k)
      if len(d) != 1:
        return v
      v = d[0]

  def idom(self, v):
    """Immediate dominator of a data value (None for the program input)."""
    if self._idom is None:
      self._build_dominators()
    return self._idom.get(v)

  def _build_dominators(self):
    idom = {self.prog.data_id: None}
    depth = {self.prog.data_id: 0}

    def meet(a, b):
      while a != b:
        if depth[a] >= depth[b]:
          a = idom[a]
        else:
          b = idom[b]
      return a

    for e in self.eqns:
      preds = [a for a in e.ins if self.is_data(a) and a in depth]
      if not preds:
        continue
      d = preds[0]
      for p in preds[1:]:
        d = meet(d, p)
      for o in e.outs:
        if o in self.data:
          # The eqn is the only way to its outputs: a value's dominator is the meet of its inputs
          # (each input dominates itself).
          idom[o] = d
          depth[o] = depth[d] + 1
    self._idom = idom

  def dominates(self, a, b):
    while b is not None:
      if b == a:
        return True
      b = self.idom(b)
    return False

  def region(self, root, out):
    """Eqn indices on the data paths from root to out, or None when the region is not closed."""
    todo, seen = [out], set()
    ks = set()
    while todo:
      v = todo.pop()
      if v == root or v in seen or not self.is_data(v):
        continue
      seen.add(v)
      k = self.producer.get(v)
      if k is None:
        return None
      ks.add(k)
      todo.extend(a for a in self.eqns[k].ins if isinstance(a, int))
    for k in ks:  # closed: values made inside are used only inside (or are the output)
      for o in self.eqns[k].outs:
        if o == out:
          continue
        if any(c < 0 or c not in ks for c in self.consumers.get(o, [])):
          return None
    return sorted(ks)


def _reduced_from(ix, v, source):
  """Whether v is (through carries and constant scalings) a reduce_sum or reduce_max of source."""
  v = ix.through_carry(v)
  k = ix.producer.get(v)
  while k is not None and ix.eqns[k].prim.name in ("div", "mul", "max") and \
      len(ix.data_ins(k)) == 1:  # mean = sum / n; flax clamps the max with -inf
    v = ix.through_carry(ix.data_ins(k)[0])
    k = ix.producer.get(v)
  if k is None or ix.eqns[k].prim.name not in ("reduce_sum", "reduce_max"):
    return False
  return ix.data_ins(k) == [source]


def _softmax_regions(ix):
  out = []
  for k, e in enumerate(ix.eqns):
    if e.prim.name != "div" or len(ix.data_ins(k)) != 2:
      continue
    num, den = e.ins
    if not (ix.is_data(num) and ix.is_data(den)) or ix.prim(num) != "exp":
      continue
    s = ix.through_carry(den)
    ks = ix.producer.get(s)
    if ks is None or ix.eqns[ks].prim.name != "reduce_sum" or ix.data_ins(ks) != [num]:
      continue
    axes = tuple(ix.eqns[ks].params["axes"])
    (shifted,) = ix.data_ins(ix.producer[num])
    root = shifted
    ksub = ix.producer.get(shifted)
    if ksub is not None and ix.eqns[ksub].prim.name == "sub":
      a, b = ix.eqns[ksub].ins
      if ix.is_data(a) and ix.is_data(b) and _reduced_from(ix, b, a):
        root = a  # x - max(x): the shift cancels, the rule sees the logits themselves
    eqns = ix.region(root, e.outs[0])
    if eqns is None or not ix.dominates(root, e.outs[0]):
      continue
    out.append(Region("softmax", root, e.outs[0], eqns, axes=axes,
                      name=ix.eqns[ix.producer[num]].name))
  return out


def _scale_consumer(ix, c):
  """The mul/div that applies the normalisation scale c to the data: (eqn index, data operand)."""
  frontier = [c]
  while frontier:
    v = frontier.pop()
    for k in ix.consumers.get(v, []):
      if k < 0:
        continue
      e = ix.eqns[k]
      name = e.prim.name
      d = ix.data_ins(k)
      if name in _CARRY and len(d) == 1:
        frontier.extend(e.outs)
      elif name in ("mul", "div") and len(d) == 1:  # scale * weight (flax) or 1 / sqrt
        frontier.extend(e.outs)
      elif name in ("mul", "div") and len(d) == 2:
        other = [a for a in e.ins if a != v]
        if len(other) != 1 or (name == "div" and e.ins[1] != v):
          continue
        return k, other[0]
  return None


def _norm_regions(ix):
  out = []
  for k, e in enumerate(ix.eqns):
    if e.prim.name not in ("rsqrt", "sqrt") or not ix.data_ins(k):
      continue
    c = e.outs[0]
    found = _scale_consumer(ix, c)
    if found is None:
      continue
    kn, u = found
    # The scale's input must be computed through a reduction (a variance or mean square).
    if not _has_reduction_above(ix, e.ins[0]):
      continue
    root = u
    ku = ix.producer.get(u)
    if ku is not None and ix.eqns[ku].prim.name == "sub":
      a, b = ix.eqns[ku].ins
      if ix.is_data(a) and ix.is_data(b) and _reduced_from(ix, b, a):
        root = a  # centred input: the mean subtraction is part of the layer
    y = ix.eqns[kn].outs[0]
    # The element-wise affine map by parameters that follows (weight and bias).
    while True:
      cons = ix.consumers.get(y, [])
      if len(cons) != 1 or cons[0] < 0:
        break
      ce = ix.eqns[cons[0]]
      if ce.prim.name not in _AFFINE or len(ix.data_ins(cons[0])) != 1 or \
          ix.prog.avals[ce.outs[0]].shape != ix.prog.avals[y].shape:
        break
      if ce.prim.name == "div" and ce.ins[0] != y:
        break
      y = ce.outs[0]
    # The statistics may be computed from an earlier value than u (flax's RMSNorm: u = x - 0):
    # the input is the nearest dominator of the output with u's shape.
    while root is not None and not ix.dominates(root, y):
      root = ix.idom(root)
    if root is None or ix.prog.avals[root].shape != ix.prog.avals[u].shape:
      continue
    eqns = ix.region(root, y)
    if eqns is None:
      continue
    out.append(Region("normalization", root, y, eqns, scale=c, name=e.name))
  return out


def _has_reduction_above(ix, v, limit=64):
  todo, seen = [v], set()
  while todo and len(seen) < limit:
    w = todo.pop()
    if w in seen or not ix.is_data(w):
      continue
    seen.add(w)
    k = ix.producer.get(w)
    if k is None:
      continue
    if ix.eqns[k].prim.name in ("reduce_sum", "reduce_max"):
      return True
    todo.extend(ix.data_ins(k))
  return False


def find_regions(prog, data, claimed=()):
  """Softmax and normalisation regions of a program (see the module docstring).

  Args:
    prog: an `lrp.graph.Program`.
    data: the ids of values that depend on the input.
    claimed: eqn indices already taken by other sites (a region contains none of them, nor any
      convolution or matmul).
  Returns:
    (regions, is_gate): a list of `Region`, no two sharing an equation, and a function
    value id -> bool telling gates (see `is_gate`).
  """
  ix = _Index(prog, data)
  taken = set(claimed)
  taken.update(k for k, e in enumerate(prog.eqns)
               if e.prim.name in ("dot_general", "conv_general_dilated"))
  out = []
  for r in _norm_regions(ix) + _softmax_regions(ix):
    if taken.intersection(r.eqns):
      continue
    taken.update(r.eqns)
    out.append(r)
  softmax_outs = {r.out for r in out if r.kind == "softmax"}

  def is_gate(v):
    """Whether v is (through reshapes, transposes and broadcasts) a gate: a softmax's output
    (attention weights) or a logistic sigmoid. Tells gates from the values they weigh."""
    w = ix.through_carry(v)
    return w in softmax_outs or ix.prim(w) == "logistic"

  return out, is_gate
