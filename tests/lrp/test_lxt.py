"""Transformer rules against LXT (lrp.md test group 9 for attention): a small ViT and a small
causal text model (tests/lrp/transformer_nets.py), the same weights in flax and in plain torch.

- AttnLRP: `lrp.composites.get("attnlrp")` against LXT's explicit rules (lxt.explicit.functional:
  linear_epsilon, matmul, softmax, layer_norm, rms_norm_identity, add2, mean, mul2, identity),
  and against LXT's efficient Gradient*Input form (lxt.efficient.rules) with epsilon 0.
- CP-LRP: `get("cp-lrp")` against LXT's efficient CP-LRP (no gradient through q, k and the gate).
Float64 on both sides; relevance must agree to rtol 1e-4 (element-wise, with an absolute floor
of 1e-8 of the sample's largest |relevance|). Skips, saying why, where torch or lxt is missing
(`pip install --no-deps lxt`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
RTOL = 1e-4


def _load(name, file):
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


nets = _load("_lrp_transformer_nets", "transformer_nets.py")
lrp = pytest.importorskip("lrp", reason="the lrp package is not importable")

MODELS = {"vit": (nets.ViT, (2, 8, 8, 3)), "text": (nets.TextLM, (2, 5, 8))}


def _replica(variables, eps=1e-12):
  pytest.importorskip("torch", reason="torch is not installed: LXT cross-check skipped")
  pytest.importorskip("lxt", reason="lxt is not installed (pip install --no-deps lxt)")
  return nets.TorchReplica(variables, eps)


def _close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  floor = 1e-8 * np.abs(want).reshape(len(want), -1).max(1)
  floor = floor.reshape((-1,) + (1,) * (want.ndim - 1))
  assert np.all(np.abs(got - want) <= RTOL * np.abs(want) + floor), (
      f"max abs diff {np.abs(got - want).max():.3g}, max |want| {np.abs(want).max():.3g}")


@pytest.mark.parametrize("which", sorted(MODELS))
@pytest.mark.parametrize("mode", ["explicit", "attnlrp", "cplrp"])
def test_relevance_equals_lxt(which, mode):
  cls, shape = MODELS[which]
  with jax.enable_x64(True):
    model = cls()
    variables, x = nets.init(model, shape)
    replica = _replica(variables)
    y_ref, r_ref = replica.relevance(which, np.asarray(x), mode)
    eps = 1e-12 if mode == "explicit" else 0.0  # LXT's efficient form has no stabiliser
    name = "cp-lrp" if mode == "cplrp" else "attnlrp"
    composite = lrp.composites.get(name, epsilon=eps, stabilizer=eps)
    e = lrp.explain(model.apply, variables, x, composite)
    # LXT's rms_norm_identity computes in float32
    np.testing.assert_allclose(np.asarray(e.output), y_ref, rtol=1e-6)
    _close(e.relevance, r_ref)


def test_sites_found_in_both_models():
  """Every transformer piece is a site of its own kind (no pattern fell through)."""
  with jax.enable_x64(True):
    for which, (cls, shape) in MODELS.items():
      model = cls()
      variables, x = nets.init(model, shape)
      kinds = {}
      for name, kind, _, _ in lrp.describe(model.apply, variables, x, lrp.composites.get("attnlrp")):
        kinds[kind] = kinds.get(kind, 0) + 1
      assert kinds["softmax"] == 2 and kinds["bilinear"] == 4
      assert kinds["normalization"] == 5
      if which == "text":
        assert kinds["product"] == 2
