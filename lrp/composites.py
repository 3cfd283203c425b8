"""Composites: which rule serves which layer, with the names zennit's users know.

A composite maps every rule site of a traced model (lrp.graph) to a rule by, in this order of
precedence:

1. `name_map`: (patterns, rule) pairs, the first pattern matching the layer's module path wins
   (a pattern matches the full path, a suffix at a '/' boundary, or an fnmatch glob: 'conv1',
   'MRInet/conv1', 'block*/conv?');
2. `first_map`: (types, rule) pairs for the first linear layer(s) on the data path, i.e. those
   whose input is reached from x without crossing another linear layer (never definition order);
3. `layer_map`: (types, rule) pairs by layer type;
4. defaults: element-wise activations -> Pass(), sum/average pooling and residual sums -> Norm().

Types are strings ('conv', 'conv_transpose', 'dense', 'sum_pool', 'sum', 'residual',
'activation', 'affine', and the groups 'convolution' = conv + conv_transpose, 'linear' = all
three parameterised kinds) or the flax classes nn.Conv, nn.ConvTranspose, nn.Dense,
nn.DenseGeneral, nn.Einsum, nn.BatchNorm. A parameterised layer that no entry maps raises
`lrp.UnsupportedLayerError` naming it (nothing is silently propagated as a gradient).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from lrp import rules as R
from lrp.canonizers import BatchNormFold
from lrp.core import CompositeError, UnsupportedLayerError
from lrp.graph import name_matches

_GROUPS = {
    "linear": {"conv", "conv_transpose", "dense"},
    "convolution": {"conv", "conv_transpose"},
    "conv": {"conv"},
    "conv_transpose": {"conv_transpose"},
    "dense": {"dense"},
    "sum_pool": {"sum_pool"},
    "avg_pool": {"sum_pool"},
    "sum": {"sum"},
    "residual": {"residual"},
    "activation": {"activation"},
    "affine": {"affine"},
    "batch_norm": {"affine"},
    "bias": {"bias"},
    "bilinear": {"bilinear"},
    "matmul": {"bilinear"},
    "product": {"product"},
    "products": {"bilinear", "product"},
    "softmax": {"softmax"},
    "normalization": {"normalization"},
    "layer_norm": {"normalization"},
}


def _kinds(t) -> set:
  if isinstance(t, str):
    if t not in _GROUPS:
      raise CompositeError(f"unknown layer type {t!r}; known: {', '.join(sorted(_GROUPS))}")
    return _GROUPS[t]
  if isinstance(t, (tuple, list, set, frozenset)):
    out = set()
    for u in t:
      out |= _kinds(u)
    return out
  name = getattr(t, "__name__", None)
  by_class = {"Conv": {"conv"}, "ConvTranspose": {"conv_transpose"}, "Dense": {"dense"},
              "DenseGeneral": {"dense"}, "Einsum": {"dense"}, "BatchNorm": {"affine"},
              "LayerNorm": {"normalization"}, "RMSNorm": {"normalization"}}
  if name in by_class:
    return by_class[name]
  raise CompositeError(f"unknown layer type {t!r}")


def _patterns(p) -> tuple:
  return (p,) if isinstance(p, str) else tuple(p)


class Composite:
  """Generic composite: rules by layer name, for the first layer, and by layer type.

  Args:
    layer_map: sequence of (types, rule).
    name_map: sequence of (pattern or patterns, rule), or a dict {pattern: rule}.
    first_map: sequence of (types, rule) for the first linear layer(s) on the data path.
    canonizers: applied when the model is traced; None (every composite's default) means
      (lrp.canonizers.BatchNormFold(),), () none (an unfolded BatchNorm then raises).
  """

  def __init__(self, layer_map: Sequence = (), name_map=(), first_map: Sequence = (),
               canonizers: Iterable = None):
    if isinstance(name_map, dict):
      name_map = list(name_map.items())
    self.layer_map = tuple((frozenset(_kinds(t)), r) for t, r in layer_map)
    self.name_map = tuple((_patterns(p), r) for p, r in name_map)
    self.first_map = tuple((frozenset(_kinds(t)), r) for t, r in first_map)
    if canonizers is None:  # BatchNorm folding is always wanted; canonizers=() switches it off
      canonizers = (BatchNormFold(),)
    self.canonizers = tuple(canonizers)

  def __repr__(self):
    return f"{type(self).__name__}()"

  def rule_for(self, site):
    """The rule of one site (lrp.graph.Site), or None if nothing maps it."""
    for patterns, rule in self.name_map:
      if any(name_matches(p, site.name) for p in patterns):
        return rule
    if site.first and site.category == "linear":
      for kinds, rule in self.first_map:
        if site.kind in kinds:
          return rule
    for kinds, rule in self.layer_map:
      if site.kind in kinds:
        return rule
    if site.kind == "activation":
      return R.Pass()
    if site.category == "norm":
      return R.Norm()
    return None

  def assign(self, plan):
    """Set `site.rule` on every site of a plan; raise on unmapped or mismatched layers."""
    for site in plan.sites:
      rule = self.rule_for(site)
      prim = f" ({site.eqn.prim.name})" if getattr(site, "eqn", None) is not None else ""
      where = f"{site.kind} layer '{site.name or '<top level>'}'{prim}"
      if rule is None:
        hint = (" (an unfolded BatchNorm or scale: add canonizers=[lrp.canonizers.BatchNormFold()]"
                " or map 'affine' to a rule)" if site.kind == "affine" else "")
        raise UnsupportedLayerError(f"{where} has no rule in {self!r}{hint}")
      if site.category not in rule.sites:
        raise UnsupportedLayerError(
            f"{where} cannot take rule {rule!r} (serves {sorted(rule.sites)})")
      site.rule = rule
    return plan


def _base(stabilizer):
  return [("sum_pool", R.Norm(stabilizer)), ("sum", R.Norm(stabilizer)),
          ("residual", R.Norm(stabilizer)), ("activation", R.Pass())]


class LayerMapComposite(Composite):
  """Rules by layer type only (zennit's LayerMapComposite)."""

  def __init__(self, layer_map, canonizers=None):
    super().__init__(layer_map=layer_map, canonizers=canonizers)


class SpecialFirstLayerMapComposite(Composite):
  """Rules by layer type, with a separate map for the first layer on the data path."""

  def __init__(self, layer_map, first_map, canonizers=None):
    super().__init__(layer_map=layer_map, first_map=first_map, canonizers=canonizers)


class NameMapComposite(Composite):
  """Rules by layer name/path only (zennit's NameMapComposite)."""

  def __init__(self, name_map, canonizers=None):
    super().__init__(name_map=name_map, canonizers=canonizers)


class EpsilonPlus(Composite):
  """ZPlus on convolutions (incl. transposed), Epsilon on dense layers (zennit's EpsilonPlus)."""

  def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=(), name_map=(), zero_bias=False,
               canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("convolution", R.ZPlus(stabilizer, zero_bias=zero_bias)),
            ("dense", R.Epsilon(epsilon, zero_bias=zero_bias))],
        name_map=name_map, canonizers=canonizers)


class EpsilonPlusFlat(Composite):
  """EpsilonPlus with Flat on the first linear layer on the data path (zennit's EpsilonPlusFlat)."""

  def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=(), first_map=(), name_map=(),
               zero_bias=False, canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("convolution", R.ZPlus(stabilizer, zero_bias=zero_bias)),
            ("dense", R.Epsilon(epsilon, zero_bias=zero_bias))],
        first_map=list(first_map) + [("linear", R.Flat(stabilizer))],
        name_map=name_map, canonizers=canonizers)


class EpsilonAlpha2Beta1(Composite):
  """AlphaBeta(2, 1) on convolutions, Epsilon on dense layers."""

  def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=(), name_map=(), zero_bias=False,
               canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("convolution", R.AlphaBeta(2.0, 1.0, stabilizer, zero_bias=zero_bias)),
            ("dense", R.Epsilon(epsilon, zero_bias=zero_bias))],
        name_map=name_map, canonizers=canonizers)


class EpsilonAlpha2Beta1Flat(Composite):
  """EpsilonAlpha2Beta1 with Flat on the first linear layer on the data path."""

  def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=(), first_map=(), name_map=(),
               zero_bias=False, canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("convolution", R.AlphaBeta(2.0, 1.0, stabilizer, zero_bias=zero_bias)),
            ("dense", R.Epsilon(epsilon, zero_bias=zero_bias))],
        first_map=list(first_map) + [("linear", R.Flat(stabilizer))],
        name_map=name_map, canonizers=canonizers)


class EpsilonGammaBox(Composite):
  """Gamma on convolutions, Epsilon on dense layers, ZBox(low, high) on the first convolution
  on the data path (zennit's EpsilonGammaBox).

  Args:
    low, high: bounds of the input (e.g. 0.0 and 1.0 for intensities scaled to [0, 1]),
      scalars or arrays broadcastable to the input.
  """

  def __init__(self, low, high, epsilon=1e-6, gamma=0.25, stabilizer=1e-6, layer_map=(),
               first_map=(), name_map=(), zero_bias=False, canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("convolution", R.Gamma(gamma, stabilizer, zero_bias=zero_bias)),
            ("dense", R.Epsilon(epsilon, zero_bias=zero_bias))],
        first_map=list(first_map) + [("convolution", R.ZBox(low, high, stabilizer))],
        name_map=name_map, canonizers=canonizers)


class SequentialPresetA(Composite):
  """The source study's preset (iNNvestigate's LRPSequentialPresetA, its bias defect fixed):
  AlphaBeta(1, 0) on convolutions with b+ in the positive part only, Epsilon(0.1) on dense
  layers, max-pooling winner takes all."""

  def __init__(self, epsilon=0.1, stabilizer=1e-6, layer_map=(), name_map=(), zero_bias=False,
               canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("convolution", R.AlphaBeta(1.0, 0.0, stabilizer, zero_bias=zero_bias)),
            ("dense", R.Epsilon(epsilon, zero_bias=zero_bias))],
        name_map=name_map, canonizers=canonizers)


class EpsilonAll(Composite):
  """Epsilon on every linear layer (epsilon=0: LRP-0, which equals gradient x input on ReLU /
  max-pool networks without biases)."""

  def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=(), name_map=(), zero_bias=False,
               canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("linear", R.Epsilon(epsilon, zero_bias=zero_bias))],
        name_map=name_map, canonizers=canonizers)


class AttnLRP(Composite):
  """AttnLRP (Achtibat et al., ICML 2024; the rules of LXT): Epsilon on linear layers,
  `SoftmaxDTD` on softmax, `Uniform` on matmuls and element-wise products of two activations,
  `ConstantScale` on LayerNorm/RMSNorm, Pass (identity) on element-wise activations (GELU, SiLU),
  Norm on residual sums, means and added parameters (position embeddings).
  """

  def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=(), name_map=(), canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("linear", R.Epsilon(epsilon)),
            ("softmax", R.SoftmaxDTD()),
            (("bilinear", "product"), R.Uniform(epsilon)),
            ("normalization", R.ConstantScale(epsilon)),
            ("affine", R.Pass())],
        name_map=name_map, canonizers=canonizers)


class CPLRP(Composite):
  """CP-LRP (Ali et al., ICML 2022, "conservative propagation"): attention weights and
  normalisation scales are constants. `ConstantGate` on matmuls and element-wise products
  (relevance flows only through the value path, none through q k^T), `ConstantScale` on
  LayerNorm/RMSNorm, Epsilon on linear layers, the rest as in `AttnLRP`.
  """

  def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=(), name_map=(), canonizers=None):
    super().__init__(
        layer_map=list(layer_map) + _base(stabilizer) + [
            ("linear", R.Epsilon(epsilon)),
            ("softmax", R.SoftmaxDTD()),
            (("bilinear", "product"), R.ConstantGate(epsilon)),
            ("normalization", R.ConstantScale(epsilon)),
            ("affine", R.Pass())],
        name_map=name_map, canonizers=canonizers)


_BY_NAME = {
    "attnlrp": AttnLRP, "cplrp": CPLRP, "epsilonplus": EpsilonPlus,
    "epsilonplusflat": EpsilonPlusFlat, "epsilonalpha2beta1": EpsilonAlpha2Beta1,
    "epsilonalpha2beta1flat": EpsilonAlpha2Beta1Flat, "epsilongammabox": EpsilonGammaBox,
    "sequentialpreseta": SequentialPresetA, "preseta": SequentialPresetA, "epsilon": EpsilonAll,
    "epsilonall": EpsilonAll,
}


def names() -> list:
  """The names `get` knows (case, '-' and '_' are ignored when looking one up)."""
  return sorted(_BY_NAME)


def get(name: str, **kwargs) -> Composite:
  """A composite by its paper or zennit name: get("attnlrp"), get("cp-lrp"),
  get("EpsilonPlusFlat"), get("epsilon_gamma_box", low=0.0, high=1.0); kwargs go to its class."""
  key = "".join(ch for ch in str(name).lower() if ch not in "-_ ")
  if key not in _BY_NAME:
    raise CompositeError(f"unknown composite {name!r}; known: {', '.join(names())}")
  return _BY_NAME[key](**kwargs)
