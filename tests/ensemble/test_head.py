"""Head models against independent solvers: numpy lstsq with an explicit ones column, scipy's
bounded least squares (lsq_linear) for NNLS with a free intercept, and a leave-one-out replica of
the multi-level head written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import lsq_linear

from jax_brainage.ensemble import head as head_lib
from jax_brainage.errors import ConfigError, DataError


def _members(rng, n=40, k=4, noise=(2.0, 3.0, 5.0, 8.0), bias=(0.0, 3.0, -2.0, 1.0)):
  age = rng.uniform(20, 80, n)
  P = np.stack([0.8 * age + 10 + bias[j] + rng.normal(0, noise[j], n) for j in range(k)], 1)
  return P, age


def test_linear_head_matches_lstsq_with_ones_column():
  rng = np.random.default_rng(0)
  P, y = _members(rng)
  head = head_lib.fit_linear_head(P, y)
  ref = np.linalg.lstsq(np.column_stack([P, np.ones(len(y))]), y, rcond=None)[0]
  np.testing.assert_allclose(head.weights, ref[:-1], rtol=1e-8, atol=1e-9)
  np.testing.assert_allclose(head.intercept, ref[-1], rtol=1e-8, atol=1e-7)
  np.testing.assert_allclose(head.apply(P), P @ ref[:-1] + ref[-1], atol=1e-8)
  # Without intercept: plain lstsq.
  h0 = head_lib.fit_linear_head(P, y, intercept=False)
  np.testing.assert_allclose(h0.weights, np.linalg.lstsq(P, y, rcond=None)[0], rtol=1e-8)
  assert h0.intercept == 0.0


def test_nonnegative_head_matches_bounded_least_squares():
  rng = np.random.default_rng(1)
  age = rng.uniform(20, 80, 60)
  good = age + rng.normal(0, 2, 60)
  # A member anti-correlated with the error of `good`: least squares gives it a negative weight.
  anti = age - 0.7 * (good - age) + rng.normal(0, 1, 60)
  bad = 50 + rng.normal(0, 10, 60)
  P = np.stack([good, anti, bad, 0.5 * age + 25 + rng.normal(0, 4, 60)], 1)
  ls = head_lib.fit_linear_head(P, age)
  assert np.any(ls.weights < -1e-3)  # the constraint matters for this data
  nn = head_lib.fit_linear_head(P, age, nonnegative=True)
  A = np.column_stack([P, np.ones(len(age))])
  ref = lsq_linear(A, age, bounds=([0, 0, 0, 0, -np.inf], np.inf), method="bvls",
                   tol=1e-12).x
  np.testing.assert_allclose(nn.weights, ref[:-1], atol=1e-6)
  np.testing.assert_allclose(nn.intercept, ref[-1], atol=1e-4)
  assert np.all(nn.weights >= 0) and nn.kind == "nonnegative"
  # No intercept: scipy nnls on the raw problem.
  from scipy.optimize import nnls
  np.testing.assert_allclose(head_lib.fit_linear_head(P, age, nonnegative=True,
                                                      intercept=False).weights,
                             nnls(P, age)[0], atol=1e-8)


def test_mean_head_and_unknown_kind():
  P = np.array([[1.0, 3.0], [2.0, 6.0]])
  h = head_lib.fit_head("mean", P, [0.0, 0.0])
  np.testing.assert_allclose(h.apply(P), [2.0, 4.0])
  with pytest.raises(ConfigError, match="ridge"):
    head_lib.fit_head("ridge", P, [0.0, 0.0])
  with pytest.raises(DataError, match=r"\[n, 2\]"):
    h.apply(np.zeros((3, 3)))
  with pytest.raises(DataError, match="not finite"):
    head_lib.fit_linear_head(np.array([[np.nan], [1.0]]), [1.0, 2.0])


def _loo_reference(preds: dict[str, np.ndarray], y: np.ndarray, nonneg: bool = False):
  """Leave-one-out multi-level head written out (level 1 refit without each subject)."""
  from scipy.optimize import nnls

  def fit(P, t):
    A = np.column_stack([P, np.ones(len(t))])
    if nonneg:
      return lsq_linear(A, t, bounds=([0] * P.shape[1] + [-np.inf], np.inf), method="bvls",
                        tol=1e-12).x
    return np.linalg.lstsq(A, t, rcond=None)[0]

  del nnls
  names = list(preds)
  n = len(y)
  oof = np.zeros((n, len(names)))
  for i in range(n):
    keep = np.arange(n) != i
    for j, name in enumerate(names):
      c = fit(preds[name][keep], y[keep])
      oof[i, j] = preds[name][i] @ c[:-1] + c[-1]
  level2 = fit(oof, y)
  level1 = {name: fit(preds[name], y) for name in names}
  return level1, level2


@pytest.mark.parametrize("kind", ["linear", "nonnegative"])
def test_multilevel_head_leave_one_out_matches_replica(kind):
  rng = np.random.default_rng(2)
  n = 30
  age = rng.uniform(20, 80, n)
  preds = {"t1": np.stack([age + rng.normal(0, 3, n) for _ in range(3)], 1),
           "flair": np.stack([0.7 * age + 15 + rng.normal(0, 5, n) for _ in range(2)], 1),
           "swi": np.stack([50 + rng.normal(0, 8, n) for _ in range(4)], 1)}
  ml = head_lib.fit_multilevel(preds, age, kind=kind, folds=n)  # folds = n: leave-one-out
  level1, level2 = _loo_reference(preds, age, nonneg=kind == "nonnegative")
  assert ml.names == ("t1", "flair", "swi") and ml.folds == n
  for name in preds:
    np.testing.assert_allclose(ml.level1[name].weights, level1[name][:-1], atol=1e-6)
    np.testing.assert_allclose(ml.level1[name].intercept, level1[name][-1], atol=1e-4)
  np.testing.assert_allclose(ml.level2.weights, level2[:-1], atol=1e-6)
  np.testing.assert_allclose(ml.level2.intercept, level2[-1], atol=1e-4)
  # The ensemble is level 2 over level-1 outputs, and equals the effective member weights.
  subs = np.stack([preds[k] @ level1[k][:-1] + level1[k][-1] for k in preds], 1)
  expected = subs @ level2[:-1] + level2[-1]
  np.testing.assert_allclose(ml.apply(preds), expected, atol=1e-6)
  w = ml.member_weights()
  flat = sum(preds[k] @ w[k] for k in preds) + ml.intercept()
  np.testing.assert_allclose(flat, expected, atol=1e-6)
  for j, k in enumerate(preds):
    np.testing.assert_allclose(w[k], level2[j] * level1[k][:-1], atol=1e-6)
  # The uninformative sub-ensemble gets (almost) no level-2 weight, the best the most.
  assert abs(ml.level2.weights[2]) < 0.1 < ml.level2.weights[0]
  assert ml.oof_mae is not None and ml.oof_mae > 0
  # Round trip through the manifest's JSON form.
  again = head_lib.MultiLevelHead.from_dict(ml.to_dict())
  np.testing.assert_allclose(again.apply(preds), ml.apply(preds), atol=1e-12)


def test_multilevel_folds_are_a_partition_and_k_fold_differs_from_in_sample():
  parts = head_lib.fold_indices(23, 5, seed=3)
  assert len(parts) == 5 and sorted(np.concatenate(parts).tolist()) == list(range(23))
  assert {len(p) for p in parts} <= {4, 5}
  rng = np.random.default_rng(4)
  age = rng.uniform(20, 80, 23)
  preds = {"a": np.stack([age + rng.normal(0, 3, 23) for _ in range(6)], 1),
           "b": np.stack([age + rng.normal(0, 6, 23) for _ in range(6)], 1)}
  ml = head_lib.fit_multilevel(preds, age, folds=5, seed=3)
  # Replica of level 2 for these folds: out-of-fold level-1 predictions, then lstsq.
  oof = np.zeros((23, 2))
  for held in parts:
    train = np.setdiff1d(np.arange(23), held)
    for j, k in enumerate(preds):
      A = np.column_stack([preds[k][train], np.ones(len(train))])
      c = np.linalg.lstsq(A, age[train], rcond=None)[0]
      oof[held, j] = preds[k][held] @ c[:-1] + c[-1]
  c2 = np.linalg.lstsq(np.column_stack([oof, np.ones(23)]), age, rcond=None)[0]
  np.testing.assert_allclose(ml.level2.weights, c2[:-1], atol=1e-6)
  # In-sample level-1 predictions would give level 2 different weights (6 members, 23 rows:
  # level 1 overfits), so the cross-validation is doing something.
  ins = np.stack([ml.level1[k].apply(preds[k]) for k in preds], 1)
  c_in = np.linalg.lstsq(np.column_stack([ins, np.ones(23)]), age, rcond=None)[0]
  assert not np.allclose(c_in[:-1], c2[:-1], atol=1e-3)


def test_single_sub_ensemble_and_mean_kind():
  rng = np.random.default_rng(5)
  age = rng.uniform(20, 80, 12)
  P = np.stack([age + rng.normal(0, 2, 12) for _ in range(3)], 1)
  ml = head_lib.fit_multilevel({"all": P}, age)
  ref = np.linalg.lstsq(np.column_stack([P, np.ones(12)]), age, rcond=None)[0]
  np.testing.assert_allclose(ml.apply({"all": P}), P @ ref[:-1] + ref[-1], atol=1e-8)
  np.testing.assert_allclose(ml.level2.weights, [1.0]) and ml.level2.intercept == 0.0
  mean = head_lib.fit_multilevel({"a": P, "b": P[:, :2] + 1}, age, kind="mean")
  np.testing.assert_allclose(mean.apply({"a": P, "b": P[:, :2] + 1}),
                             (P.mean(1) + P[:, :2].mean(1) + 1) / 2, atol=1e-10)
  with pytest.raises(DataError, match="'b'"):
    mean.apply({"a": P})


def test_member_spread_is_the_pooled_member_standard_deviation():
  rng = np.random.default_rng(6)
  a, b = rng.normal(50, 5, (7, 3)), rng.normal(50, 5, (7, 2))
  expected = [np.std(np.concatenate([a[i], b[i]]), ddof=1) for i in range(7)]
  np.testing.assert_allclose(head_lib.member_spread({"a": a, "b": b}), expected, rtol=1e-12)
  np.testing.assert_array_equal(head_lib.member_spread({"a": a[:, :1]}), np.zeros(7))
