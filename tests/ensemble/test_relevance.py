"""Ensemble relevance against an explicit Python sum over members of `lrp.relevance` (each member
alone, no vmap, input scaled in numpy), and LRP-0 conservation of the head-weighted sum."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import lrp
from tests.ensemble.conftest import random_members, tiny_manifest, volumes
from jax_brainage.ensemble import head as head_lib
from jax_brainage.ensemble import relevance as rel
from jax_brainage.ensemble import store


EPF = lrp.composites.EpsilonPlusFlat()  # one instance: compiled functions are reused
LRP0 = lrp.composites.EpsilonAll(epsilon=0.0)
_REFERENCE: dict = {}


def _per_member(model, each, x, composite):
  """[M, n, ...] lrp.relevance of each member by itself (jitted per member, no vmap)."""
  key = (model, id(composite))
  if key not in _REFERENCE:
    _REFERENCE[key] = jax.jit(lambda v, x: lrp.relevance(
        functools.partial(model.apply, train=False), v, x, composite=composite))
  return np.stack([np.asarray(_REFERENCE[key](v, x)) for v in each])


def _ensemble(subs, val, ages):
  return store.fit_ensemble(subs, val, ages, folds=3, correction="none")


@pytest.fixture(scope="module")
def case():
  ma, mb = tiny_manifest(("T1w",)), tiny_manifest(("T1w", "FLAIR"))
  model_a, each_a, stacked_a = random_members(ma, 3, seed=30, zero_bias=True)
  model_b, each_b, stacked_b = random_members(mb, 2, seed=40, zero_bias=True)
  subs = (store.SubEnsemble("a", ("T1w",), (), ma, 3, stacked_a),
          store.SubEnsemble("b", ("T1w", "FLAIR"), (), mb, 2, stacked_b))
  val = {"a": volumes(9, 5, 1), "b": volumes(9, 6, 2)}
  ages = np.random.default_rng(1).uniform(20, 80, 9)
  x = {"a": volumes(3, 7, 1), "b": volumes(3, 8, 2)}
  return {"ensemble": _ensemble(subs, val, ages), "models": {"a": model_a, "b": model_b},
          "each": {"a": each_a, "b": each_b}, "x": x}


def test_member_relevance_is_each_members_lrp(case):
  composite = EPF
  sub = case["ensemble"].sub("a")
  got = np.asarray(rel.member_relevance(sub.model, sub.variables, case["x"]["a"], composite))
  x = (case["x"]["a"].astype(np.float64) / 255.0).astype(np.float32)
  ref = _per_member(case["models"]["a"], case["each"]["a"], x, composite)
  assert got.shape == (3, 3, 16, 16, 16, 1)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(got, ref, atol=1e-5 * scale)
  assert scale > 0 and not np.allclose(ref[0], ref[1])  # members differ


def test_ensemble_relevance_is_the_head_weighted_sum(case):
  composite = EPF
  ens = case["ensemble"]
  out = rel.ensemble_relevance(ens, case["x"], composite, batch_size=2)  # 3 subjects: padded
  weights = ens.head.member_weights()
  for name in ("a", "b"):
    x = (case["x"][name].astype(np.float64) / 255.0).astype(np.float32)
    R = _per_member(case["models"][name], case["each"][name], x, composite)
    expected = sum(weights[name][m] * R[m].astype(np.float64) for m in range(len(R)))
    assert out.subs[name].shape == x.shape
    np.testing.assert_allclose(out.subs[name], expected, atol=1e-5 * np.abs(expected).max())
  np.testing.assert_allclose(out.intercept, ens.head.intercept())


def test_lrp0_conservation_of_the_weighted_sum(case):
  # Members without biases are positively homogeneous ReLU/max-pool networks: LRP-0 conserves
  # each member's output, so the weighted sum conserves the ensemble's prediction minus its
  # intercept (which, like an output bias, gets no relevance).
  ens = case["ensemble"]
  out = rel.ensemble_relevance(ens, case["x"], LRP0, batch_size=4,
                               members_per_call=2)  # "a" (3 members) in groups of 2 and 1
  pred = ens.predict(case["x"]).ensemble
  np.testing.assert_allclose(out.per_subject_sum(), pred - ens.head.intercept(),
                             rtol=1e-4, atol=1e-3)
  assert np.all(np.abs(pred - ens.head.intercept()) > 1.0)  # a non-trivial amount to conserve
  with pytest.raises(Exception, match="different shapes"):
    out.total()


def test_total_over_sub_ensembles_of_one_grid(case):
  # Two regional sub-ensembles of one sequence on one grid (here the same members, as the
  # compiled relevance of case's "a" is reused): the ensemble map is the sum of both.
  a = case["ensemble"].sub("a")
  subs = (store.SubEnsemble("r1", ("T1w",), ("cortex",), a.manifest, 3, a.variables),
          store.SubEnsemble("r2", ("T1w",), ("cerebellum",), a.manifest, 3, a.variables))
  head = head_lib.MultiLevelHead({"r1": head_lib.LinearHead([0.25, 0.5, 0.0], 3.0),
                                  "r2": head_lib.LinearHead([0.0, 0.0, 1.0], 0.0)},
                                 head_lib.LinearHead([0.6, 0.4], 1.0), ("r1", "r2"))
  from jax_brainage.ensemble import correction as corr
  ens = store.Ensemble(subs, head, corr.Correction("none"))
  x = case["x"]["a"]
  out = rel.ensemble_relevance(ens, {"r1": x, "r2": x}, EPF, batch_size=2)
  xf = (x.astype(np.float64) / 255.0).astype(np.float32)
  R = _per_member(case["models"]["a"], case["each"]["a"], xf, EPF)
  expected = 0.6 * (0.25 * R[0] + 0.5 * R[1]) + 0.4 * R[2]
  np.testing.assert_allclose(out.total(), expected, atol=1e-5 * np.abs(expected).max())
  np.testing.assert_allclose(out.intercept, 1.0 + 0.6 * 3.0)
