"""Cross-implementation check (lrp.md test group 9): `lrp` against zennit on identical weights.

Two halves:
- live: the flax nets of torch_nets.py and their torch replicas with the same weights; zennit's
  composites on the replica versus the same composites of `lrp` on the flax net, float64 on both
  sides, relevance starting from the output itself (regression). Skips, saying why, where torch
  or zennit is missing.
- golden: the same comparison against tests/lrp/golden/*.npz (written by make_zennit_golden.py
  with zennit), so it runs without torch.

Relevance must agree to 1e-5 relative to each sample's largest |relevance| (scale-aware: the
study's regression outputs and the nets' relevance maps differ in scale by orders of magnitude).
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
RTOL = 1e-5  # relative to the per-sample max |relevance|, float64 on both sides
LIVE_SEED = 1  # the golden files use seed 0: the transfer check sees other weights


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
  if importlib.util.find_spec("zennit") is None:
    pytest.skip("zennit is not installed (pip install --no-deps zennit): live cross-check skipped")
  return nets.import_zennit()


# ---------------------------------------------------------------------------------------------
# lrp side
# ---------------------------------------------------------------------------------------------


def lrp_composite(name: str):
  """`lrp`'s composite called `name`, with zennit's parameters (see torch_nets)."""
  composites = lrp.composites
  if not hasattr(composites, name):
    pytest.xfail(f"lrp.composites.{name} does not exist yet")
  if name == "EpsilonGammaBox":
    return composites.EpsilonGammaBox(low=nets.LOW, high=nets.HIGH)
  return getattr(composites, name)()


def lrp_relevance(net: str, variables, x: np.ndarray, composite: str) -> np.ndarray:
  """`lrp.relevance` of the flax net in float64, starting from the output itself.

  Args:
    variables: flax variables (nested dicts of arrays).
    x: input `[batch, x, y, z, 1]`.
  Returns:
    relevance `[batch, x, y, z, 1]`, float64.
  """
  comp = lrp_composite(composite)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    relevance = lrp.relevance(
      nets.flax_model(net).apply, variables, np.asarray(x, np.float64), composite=comp)
    return np.asarray(relevance)


@functools.lru_cache(maxsize=None)
def lrp_relevance_on_golden(net: str, composite: str) -> np.ndarray:
  """lrp's relevance for a golden file's weights and input, computed once per test process.

  The live and the golden check compare this one result against zennit (live and stored), which
  halves lrp's compile time in the suite's 60 s budget.
  """
  golden = load_golden(net)
  return lrp_relevance(net, golden.nested_variables(), golden.input, composite)


def assert_relevance_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
  """Per sample: max |actual - expected| <= RTOL * max |expected|."""
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite relevance"
  for i in range(expected.shape[0]):
    scale = np.abs(expected[i]).max()
    assert scale > 0, f"{what}: zennit relevance of sample {i} is all zero (degenerate case)"
    error = np.abs(actual[i] - expected[i]).max()
    assert error <= RTOL * scale, (
      f"{what}, sample {i}: max |lrp - zennit| = {error:.3g} > {RTOL} x {scale:.3g}")


# ---------------------------------------------------------------------------------------------
# golden files
# ---------------------------------------------------------------------------------------------


class Golden:
  """One golden file: input, torch output, flax variables (flat), relevance per composite."""

  def __init__(self, path: Path):
    with np.load(path, allow_pickle=False) as f:
      self.input = f["input"]
      self.output = f["output"]
      self.variables = {k[len("variables/"):]: f[k] for k in f.files if k.startswith("variables/")}
      self.relevance = {k[len("relevance/"):]: f[k] for k in f.files if k.startswith("relevance/")}
      self.meta = {k[len("meta/"):]: f[k][()] for k in f.files if k.startswith("meta/")}

  def nested_variables(self):
    return nets.unflatten_variables(self.variables)


@functools.lru_cache(maxsize=None)
def load_golden(net: str) -> Golden:
  path = GOLDEN_DIR / f"{net}.npz"
  assert path.exists(), f"golden file {path} is missing: run tests/lrp/make_zennit_golden.py"
  return Golden(path)


@pytest.mark.parametrize("net", nets.NETS)
def test_golden_file_matches_this_suite(net):
  """The golden file was made for the nets, composites and parameters this suite uses, and the
  flax net with its stored weights computes what the torch replica computed."""
  golden = load_golden(net)
  assert set(golden.relevance) == set(nets.COMPOSITES)
  assert golden.input.shape == nets.INPUT_SHAPE and golden.input.dtype == np.float64
  assert nets.LOW <= golden.input.min() and golden.input.max() <= nets.HIGH
  assert str(golden.meta["net"]) == net
  for key, value in [("low", nets.LOW), ("high", nets.HIGH), ("epsilon", nets.EPSILON),
                     ("stabilizer", nets.STABILIZER), ("gamma", nets.GAMMA),
                     ("preset_a_epsilon", nets.PRESET_A_EPSILON)]:
    assert float(golden.meta[key]) == value, f"{net}.npz meta/{key}"
  assert str(golden.meta["zennit_version"]).startswith("0.5")
  with jax.enable_x64(True):
    output = np.asarray(nets.flax_model(net).apply(golden.nested_variables(), golden.input))
  np.testing.assert_allclose(output, golden.output, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("composite", nets.COMPOSITES)
@pytest.mark.parametrize("net", nets.NETS)
def test_relevance_matches_golden(net, composite):
  """lrp == zennit's stored relevance on the stored weights and input (no torch needed)."""
  actual = lrp_relevance_on_golden(net, composite)
  assert_relevance_close(actual, load_golden(net).relevance[composite], f"{net}/{composite} golden")


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
def test_replica_computes_the_flax_net(net):
  """The torch replica with freshly transferred weights is the same function as the flax net
  (weights and input not from a golden file: checks the transfer itself)."""
  _require_zennit()
  variables, x = nets.init_variables(net, LIVE_SEED), nets.random_input(LIVE_SEED)
  with jax.enable_x64(True):
    expected = np.asarray(nets.flax_model(net).apply(variables, x))
  actual = nets.torch_forward(net, variables, x)
  assert expected.shape == (x.shape[0],)
  np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


def test_zennit_canonizer_keeps_the_function():
  """Under every composite (BatchNorm merged), the replica still computes the flax net exactly:
  zennit explains the same function lrp does."""
  _require_zennit()
  golden = load_golden("batchnorm_net")
  for composite in nets.COMPOSITES:
    output, _ = nets.zennit_attribution(
      "batchnorm_net", golden.nested_variables(), golden.input, composite)
    np.testing.assert_allclose(output, golden.output, rtol=1e-12, atol=1e-14, err_msg=composite)


@pytest.mark.parametrize("composite", nets.COMPOSITES)
@pytest.mark.parametrize("net", nets.NETS)
def test_relevance_matches_zennit(net, composite):
  """lrp == zennit run now on identical weights, for every composite zennit has and preset A.

  Uses the golden file's weights and input (lrp's result is shared with the golden test); the
  golden file must also still be what zennit computes (else it is stale: regenerate it).
  """
  _require_zennit()
  golden = load_golden(net)
  expected = nets.zennit_relevance(net, golden.nested_variables(), golden.input, composite)
  np.testing.assert_allclose(
    golden.relevance[composite], expected, rtol=0, atol=1e-9 * np.abs(expected).max(),
    err_msg=f"golden/{net}.npz relevance/{composite} is stale: run make_zennit_golden.py")
  actual = lrp_relevance_on_golden(net, composite)
  assert_relevance_close(actual, expected, f"{net}/{composite} live zennit")
