"""Ensemble relevance (`maps.ensemble_maps`, the one implementation) against an explicit Python
sum over members of `lrp.relevance` (each member alone, no vmap, input scaled in numpy), and
LRP-0 conservation of the head-weighted sum."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import lrp
from tests.ensemble.conftest import random_members, tiny_manifest, volumes
from jax_brainage.ensemble import correction as corr
from jax_brainage.ensemble import head as head_lib
from jax_brainage.ensemble import model as ensemble_model
from jax_brainage.explain import maps

# One Method per composite instance: compiled functions are reused across tests.
EPF = maps.composite_method(lrp.composites.EpsilonPlusFlat(), "epsilon_plus_flat")
LRP0 = maps.composite_method(lrp.composites.EpsilonAll(epsilon=0.0), "lrp0")
_REFERENCE: dict = {}


def _per_member(model, each, x, method):
  """[M, n, ...] lrp.relevance of each member by itself (jitted per member, no vmap)."""
  key = (model, method.name)
  if key not in _REFERENCE:
    made = {"epsilon_plus_flat": lrp.composites.EpsilonPlusFlat(),
            "lrp0": lrp.composites.EpsilonAll(epsilon=0.0)}[method.name]
    _REFERENCE[key] = jax.jit(lambda v, x: lrp.relevance(
        functools.partial(model.apply, train=False), v, x, composite=made))
  return np.stack([np.asarray(_REFERENCE[key](v, x)) for v in each])


@pytest.fixture(scope="module")
def case():
  ma, mb = tiny_manifest(("T1w",)), tiny_manifest(("T1w", "FLAIR"))
  model_a, each_a, stacked_a = random_members(ma, 3, seed=30, zero_bias=True)
  model_b, each_b, stacked_b = random_members(mb, 2, seed=40, zero_bias=True)
  subs = (ensemble_model.SubEnsemble("a", ("T1w",), (), ma, 3, stacked_a),
          ensemble_model.SubEnsemble("b", ("T1w", "FLAIR"), (), mb, 2, stacked_b))
  val = {"a": volumes(9, 5, 1), "b": volumes(9, 6, 2)}
  ages = np.random.default_rng(1).uniform(20, 80, 9)
  x = {"a": volumes(3, 7, 1), "b": volumes(3, 8, 2)}
  ensemble = ensemble_model.fit_ensemble(subs, val, ages, folds=3, correction="none")
  return {"ensemble": ensemble, "models": {"a": model_a, "b": model_b},
          "each": {"a": each_a, "b": each_b}, "x": x}


def _network_input(volumes_uint8):
  return (volumes_uint8.astype(np.float64) / 255.0).astype(np.float32)


def test_members_maps_are_each_members_lrp(case):
  sub = case["ensemble"].sub("a")
  got, _ = maps.Explainer(sub.model, sub.variables, EPF, batch_size=4, stacked=True)(
      case["x"]["a"])
  ref = _per_member(case["models"]["a"], case["each"]["a"], _network_input(case["x"]["a"]), EPF)
  assert got.shape == (3, 3, 16, 16, 16, 1)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(got, ref, atol=1e-5 * scale)
  assert scale > 0 and not np.allclose(ref[0], ref[1])  # members differ


def test_ensemble_map_is_the_head_weighted_sum(case):
  ens = case["ensemble"]
  em = maps.ensemble_maps(ens, case["x"], EPF, batch_size=2)  # 3 subjects: padded
  weights = ens.head.member_weights()
  contribution = {}
  for name in ("a", "b"):
    R = _per_member(case["models"][name], case["each"][name], _network_input(case["x"][name]),
                    EPF)
    contribution[name] = sum(weights[name][m] * R[m].astype(np.float64) for m in range(len(R)))
    np.testing.assert_allclose(em.members[name], R, atol=1e-5 * np.abs(R).max())
  # Channels: T1w gets both sub-ensembles' T1w maps, FLAIR sub-ensemble b's second channel.
  assert em.sequences == ("T1w", "FLAIR")
  expected = np.stack([contribution["a"][..., 0] + contribution["b"][..., 0],
                       contribution["b"][..., 1]], axis=-1)
  np.testing.assert_allclose(em.ensemble, expected, atol=1e-5 * np.abs(expected).max())


def test_lrp0_conservation_of_the_weighted_sum(case):
  # Members without biases are positively homogeneous ReLU/max-pool networks: LRP-0 conserves
  # each member's output, so the weighted sum conserves the ensemble's prediction minus its
  # intercept (which, like an output bias, gets no relevance).
  ens = case["ensemble"]
  em = maps.ensemble_maps(ens, case["x"], LRP0, batch_size=4,
                          members_per_call=2)  # "a" (3 members) in groups of 2 and 1
  pred = ens.predict(case["x"]).ensemble
  per_subject = em.ensemble.astype(np.float64).reshape(len(pred), -1).sum(1)
  np.testing.assert_allclose(per_subject, pred - ens.head.intercept(), rtol=1e-4, atol=1e-3)
  assert np.all(np.abs(pred - ens.head.intercept()) > 1.0)  # a non-trivial amount to conserve


def test_sub_ensembles_of_one_grid_add_up(case):
  # Two regional sub-ensembles of one sequence on one grid (here the same members, as the
  # compiled relevance of case's "a" is reused): the ensemble map is the sum of both.
  a = case["ensemble"].sub("a")
  subs = (ensemble_model.SubEnsemble("r1", ("T1w",), ("cortex",), a.manifest, 3, a.variables),
          ensemble_model.SubEnsemble("r2", ("T1w",), ("cerebellum",), a.manifest, 3,
                                     a.variables))
  head = head_lib.MultiLevelHead({"r1": head_lib.LinearHead([0.25, 0.5, 0.0], 3.0),
                                  "r2": head_lib.LinearHead([0.0, 0.0, 1.0], 0.0)},
                                 head_lib.LinearHead([0.6, 0.4], 1.0), ("r1", "r2"))
  ens = ensemble_model.Ensemble(subs, head, corr.Correction("none"))
  x = case["x"]["a"]
  em = maps.ensemble_maps(ens, {"r1": x, "r2": x}, EPF, batch_size=2)
  R = _per_member(case["models"]["a"], case["each"]["a"], _network_input(x), EPF)
  expected = 0.6 * (0.25 * R[0] + 0.5 * R[1]) + 0.4 * R[2]
  np.testing.assert_allclose(em.ensemble, expected, atol=1e-5 * np.abs(expected).max())
  np.testing.assert_allclose(ens.head.intercept(), 1.0 + 0.6 * 3.0)


def test_a_single_model_is_an_ensemble_of_one(case):
  # `ensemble.model.identity`: the model's own map, weight 1, no intercept.
  a = case["ensemble"].sub("a")
  one = ensemble_model.SubEnsemble("model", ("T1w",), (), a.manifest, 1,
                                   jax.tree.map(lambda v: v[1:2], a.variables))
  ens = ensemble_model.identity(one)
  got = maps.relevance(ens, case["x"]["a"], EPF, batch_size=2)
  ref = _per_member(case["models"]["a"], case["each"]["a"][1:2], _network_input(case["x"]["a"]),
                    EPF)[0]
  np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
  assert ens.head.intercept() == 0.0 and ens.correction.kind == "none"
  np.testing.assert_allclose(ens.predict(case["x"]["a"]).ensemble,
                             ens.predict_members(case["x"]["a"])["model"][:, 0], rtol=1e-6)
