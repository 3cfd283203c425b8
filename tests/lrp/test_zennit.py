"""Cross-implementation check (lrp.md test group 9): `lrp` against zennit on identical weights.

The nets (tests/lrp/torch_nets.py): an MRInet-like CNN with overlapping 3/2 SAME max-pools, a net
with BatchNorm after convs and a dense layer, a net with a residual sum and average pooling, and
a net with strided, dilated, grouped and transposed convolutions.
Composites: every one zennit has (EpsilonPlus, EpsilonPlusFlat, EpsilonAlpha2Beta1,
EpsilonAlpha2Beta1Flat, EpsilonGammaBox) and the study's preset A built in zennit from its rules.
Relevance starts from the output itself (regression); one composite is also checked from a
contrast f(x) - reference (the seed as a function of the output and as an array). Two halves:

- golden: `lrp` against tests/lrp/golden/*.npz (zennit's relevance, written by
  make_zennit_golden.py, float64): runs everywhere, torch or not;
- live: zennit run now on the torch replica with the golden file's weights, against `lrp` on the
  flax net; skips, saying why, where torch or zennit is missing. It also catches a stale golden
  file and checks the torch replica (fresh weights) is the flax net's function.

Relevance must agree to 1e-5 relative to each sample's largest |relevance| (scale-aware: the
relevance maps of different nets and samples differ in scale by orders of magnitude); float64
on both sides. A float32 run of `lrp` (as users run it) must agree to 1e-4.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
GOLDEN_DIR = HERE / "golden"
RTOL = 1e-5  # float64, relative to the per-sample max |relevance|
RTOL_FLOAT32 = 1e-4
TRANSFER_SEED = 1  # the golden files use seed 0: the weight-transfer check sees other weights


def _load_helpers():
  """torch_nets.py by file path: independent of how pytest puts tests/ on sys.path."""
  name = "_lrp_zennit_torch_nets"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, HERE / "torch_nets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


nets = _load_helpers()
lrp = pytest.importorskip("lrp", reason="the lrp package is not importable")


def _require_zennit():
  """Skips with the reason when torch or zennit is missing; returns the zennit package."""
  pytest.importorskip("torch", reason="torch is not installed: live zennit cross-check skipped")
  try:
    return nets.import_zennit()
  except ImportError as error:
    pytest.skip(f"zennit cannot be imported ({error}; pip install --no-deps zennit): "
                "live cross-check skipped")


# ---------------------------------------------------------------------------------------------
# lrp side
# ---------------------------------------------------------------------------------------------


def lrp_composite(name: str):
  """`lrp`'s composite called `name`, with zennit's parameters (see torch_nets)."""
  composites = getattr(lrp, "composites", None)
  if composites is None or not hasattr(composites, name):
    pytest.xfail(f"lrp.composites.{name} does not exist yet")
  # Explicit BatchNorm folding, as zennit's side merges BatchNorm (also lrp's default).
  kwargs = dict(canonizers=[lrp.canonizers.BatchNormFold()])
  if name == "EpsilonGammaBox":
    kwargs.update(low=nets.LOW, high=nets.HIGH, gamma=nets.GAMMA)
  if name == "SequentialPresetA":
    kwargs.update(epsilon=nets.PRESET_A_EPSILON)
  else:
    kwargs.update(epsilon=nets.EPSILON)
  return getattr(composites, name)(stabilizer=nets.STABILIZER, **kwargs)


def lrp_relevance(net: str, variables, x: np.ndarray, composite: str, dtype=np.float64,
                  seed=None):
  """`lrp.relevance` of the flax net, starting from the output itself unless `seed` is given.

  Args:
    variables: flax variables (nested dicts of arrays).
    x: input `[batch, x, y, z, 1]`.
    dtype: float64 (under jax.enable_x64) or float32.
    seed: passed to lrp.relevance (None, an array or a function of the output).
  Returns:
    relevance `[batch, x, y, z, 1]` as a numpy array of `dtype`.
  """
  comp = lrp_composite(composite)
  with jax.enable_x64(dtype == np.float64):
    variables = jax.tree.map(lambda a: np.asarray(a, dtype), variables)
    relevance = lrp.relevance(nets.flax_model(net).apply, variables, np.asarray(x, dtype),
                              composite=comp, seed=seed)
    relevance = np.asarray(relevance)
  assert relevance.dtype == dtype, f"{net}/{composite}: relevance dtype {relevance.dtype}"
  return relevance


@functools.lru_cache(maxsize=None)
def lrp_relevance_on_golden(net: str, composite: str) -> np.ndarray:
  """lrp's float64 relevance for a golden file's weights and input, once per test process
  (the live and the golden test compare the same result: half the compile time)."""
  golden = load_golden(net)
  return lrp_relevance(net, golden.nested_variables(), golden.input, composite)


def assert_relevance_close(actual, expected, what: str, rtol: float = RTOL) -> None:
  """Per sample: max |actual - expected| <= rtol * max |expected|."""
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite relevance"
  for i in range(expected.shape[0]):
    scale = np.abs(expected[i]).max()
    assert scale > 0, f"{what}: zennit relevance of sample {i} is all zero (degenerate case)"
    error = np.abs(actual[i] - expected[i]).max()
    assert error <= rtol * scale, (
      f"{what}, sample {i}: max |lrp - zennit| = {error:.3g} > {rtol} x {scale:.3g}")


@functools.lru_cache(maxsize=None)
def flax_forward(net: str):
  return jax.jit(nets.flax_model(net).apply)


# ---------------------------------------------------------------------------------------------
# golden files: no torch needed
# ---------------------------------------------------------------------------------------------


class Golden:
  """One golden file: input, torch output, flax variables (flat), relevance per composite."""

  def __init__(self, path: Path):
    with np.load(path, allow_pickle=False) as f:
      self.input = f["input"]
      self.output = f["output"]
      self.variables = {k[len("variables/"):]: f[k] for k in f.files if k.startswith("variables/")}
      self.relevance = {k[len("relevance/"):]: f[k] for k in f.files if k.startswith("relevance/")}
      self.contrast = {k[len("contrast/"):]: f[k] for k in f.files if k.startswith("contrast/")}
      self.meta = {k[len("meta/"):]: f[k][()] for k in f.files if k.startswith("meta/")}

  def nested_variables(self):
    return nets.unflatten_variables(self.variables)


@functools.lru_cache(maxsize=None)
def load_golden(net: str) -> Golden:
  path = GOLDEN_DIR / f"{net}.npz"
  assert path.exists(), f"golden file {path} is missing: run tests/lrp/make_zennit_golden.py"
  return Golden(path)


@pytest.mark.parametrize("net", nets.NETS)
def test_golden_file_fits_this_suite(net):
  """The golden file was made for the nets, composites and parameters this suite uses, and the
  flax net with its stored weights computes what the torch replica computed."""
  golden = load_golden(net)
  assert set(golden.relevance) == set(nets.COMPOSITES)
  assert set(golden.contrast) == {nets.CONTRAST_COMPOSITE}
  assert golden.input.shape == nets.INPUT_SHAPES[net] and golden.input.dtype == np.float64
  assert nets.LOW <= golden.input.min() and golden.input.max() <= nets.HIGH
  assert str(golden.meta["net"]) == net
  for key, value in [("low", nets.LOW), ("high", nets.HIGH), ("epsilon", nets.EPSILON),
                     ("stabilizer", nets.STABILIZER), ("gamma", nets.GAMMA),
                     ("preset_a_epsilon", nets.PRESET_A_EPSILON),
                     ("contrast_reference", nets.CONTRAST_REFERENCE)]:
    assert float(golden.meta[key]) == value, f"{net}.npz meta/{key}"
  assert str(golden.meta["zennit_version"]).startswith("0.5")
  with jax.enable_x64(True):
    output = np.asarray(flax_forward(net)(golden.nested_variables(), golden.input))
  np.testing.assert_allclose(output, golden.output, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("composite", nets.COMPOSITES)
@pytest.mark.parametrize("net", nets.NETS)
def test_relevance_matches_golden(net, composite):
  """lrp == zennit's stored relevance on the stored weights and input (float64)."""
  actual = lrp_relevance_on_golden(net, composite)
  assert_relevance_close(actual, load_golden(net).relevance[composite], f"{net}/{composite}")


def lrp_contrast(net: str, golden: Golden, seed_as: str) -> np.ndarray:
  """lrp's relevance of f(x) - reference, the seed given as a function or as an array."""
  reference = nets.CONTRAST_REFERENCE
  if seed_as == "function":
    seed = lambda output: output - reference
  else:
    seed = golden.output - reference  # [batch], the output's shape
  return lrp_relevance(net, golden.nested_variables(), golden.input, nets.CONTRAST_COMPOSITE,
                       seed=seed)


@pytest.mark.parametrize("seed_as", ["function", "array"])
@pytest.mark.parametrize("net", nets.NETS)
def test_contrast_matches_golden(net, seed_as):
  """A starting relevance other than the output (contrast against a reference prediction),
  given as a function of the output or as an array, matches zennit's."""
  golden = load_golden(net)
  actual = lrp_contrast(net, golden, seed_as)
  assert_relevance_close(actual, golden.contrast[nets.CONTRAST_COMPOSITE],
                         f"{net}/{nets.CONTRAST_COMPOSITE} contrast ({seed_as})")


@pytest.mark.parametrize("composite", nets.COMPOSITES)
def test_float32_relevance_matches_golden(composite):
  """lrp in float32 (no x64, as users run it) still matches zennit's float64 relevance on the
  study's architecture."""
  golden = load_golden("mrinet_mini")
  actual = lrp_relevance(
    "mrinet_mini", golden.nested_variables(), golden.input, composite, dtype=np.float32)
  assert_relevance_close(actual, golden.relevance[composite], f"mrinet_mini/{composite} float32",
                         rtol=RTOL_FLOAT32)


# ---------------------------------------------------------------------------------------------
# live: torch + zennit
# ---------------------------------------------------------------------------------------------


def test_zennit_import_leaves_no_torchvision_stub():
  """The torchvision stub zennit's import needs is gone from sys.modules afterwards."""
  _require_zennit()
  if importlib.util.find_spec("torchvision") is not None:
    pytest.skip("a real torchvision is installed: no stub is used")
  assert "torchvision" not in sys.modules
  assert "torchvision.models.resnet" not in sys.modules
  assert hasattr(sys.modules["zennit.composites"], "EpsilonGammaBox")


@pytest.mark.parametrize("net", nets.NETS)
def test_torch_replica_computes_the_flax_net(net):
  """Weight transfer (flax channels-last -> torch channels-first, SAME pads, flatten order) on
  weights and input that are not the golden ones: same outputs to float64 round-off."""
  _require_zennit()
  variables, x = nets.init_variables(net, TRANSFER_SEED), nets.random_input(net, TRANSFER_SEED)
  with jax.enable_x64(True):
    expected = np.asarray(flax_forward(net)(variables, x))
  assert expected.shape == (x.shape[0],)
  np.testing.assert_allclose(nets.torch_forward(net, variables, x), expected, rtol=1e-10,
                             atol=1e-12)


@pytest.mark.parametrize("composite", nets.COMPOSITES)
@pytest.mark.parametrize("net", nets.NETS)
def test_relevance_matches_zennit(net, composite):
  """lrp == zennit run now on identical weights, for every composite zennit has and preset A."""
  _require_zennit()
  golden = load_golden(net)
  output, expected = nets.zennit_attribution(
    net, golden.nested_variables(), golden.input, composite)
  # zennit (hooks and canonizer in place) must still compute the net lrp explains.
  np.testing.assert_allclose(output, golden.output, rtol=1e-12, atol=1e-14,
                             err_msg=f"{net}/{composite}: zennit's canonized replica changed f(x)")
  np.testing.assert_allclose(
    golden.relevance[composite], expected, rtol=0, atol=1e-9 * np.abs(expected).max(),
    err_msg=f"golden/{net}.npz relevance/{composite} is stale: run make_zennit_golden.py")
  actual = lrp_relevance_on_golden(net, composite)
  assert_relevance_close(actual, expected, f"{net}/{composite} (live zennit)")


@pytest.mark.parametrize("net", nets.NETS)
def test_contrast_matches_zennit(net):
  """lrp == zennit run now, starting from f(x) - reference."""
  _require_zennit()
  golden = load_golden(net)
  expected = nets.zennit_relevance(net, golden.nested_variables(), golden.input,
                                   nets.CONTRAST_COMPOSITE, reference=nets.CONTRAST_REFERENCE)
  assert_relevance_close(lrp_contrast(net, golden, "function"), expected,
                         f"{net}/{nets.CONTRAST_COMPOSITE} contrast (live zennit)")
