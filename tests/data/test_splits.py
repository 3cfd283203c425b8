"""splits: seeded, disjoint, covering, apportioned sizes; age stratification."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from jax_brainage.data import splits
from jax_brainage.errors import ConfigError, DataError


@pytest.mark.parametrize("n", [1, 3, 10, 37, 2637])
@pytest.mark.parametrize("stratified", [False, True])
def test_disjoint_covering_and_sized(n, stratified):
  ages = np.random.default_rng(n).uniform(18, 82, n) if stratified else None
  s = splits.split_subjects(n, seed=4, ages=ages)
  allrows = np.concatenate([s.train, s.val, s.test])
  np.testing.assert_array_equal(np.sort(allrows), np.arange(n))  # covering and disjoint
  sizes = np.array([len(s.train), len(s.val), len(s.test)])
  quota = np.array(splits.STUDY_FRACTIONS) * n
  if n >= 3:
    assert np.all(sizes >= 1)
    assert np.all(np.abs(sizes - quota) < 1.0 + 1e-9) or n < 10
  assert sizes.sum() == n


def test_study_sizes_for_the_life_cohort():
  # 2637 x (0.8, 0.1, 0.1) = (2109.6, 263.7, 263.7): largest remainders go to val and test.
  assert splits.split_subjects(2637, 0).sizes() == dict(train=2109, val=264, test=264)


def test_deterministic_per_seed_and_different_across_seeds():
  a, b = splits.split_subjects(200, 7), splits.split_subjects(200, 7)
  c = splits.split_subjects(200, 8)
  for name in splits.NAMES:
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a.test, c.test)


def test_random_split_is_uniform_over_subjects():
  # Each subject lands in test with probability 0.1: chi-square over many seeds.
  n, trials = 20, 600
  counts = np.zeros(n)
  for seed in range(trials):
    counts[splits.split_subjects(n, seed).test] += 1
  expected = trials * 2 / n
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert stats.chi2.sf(chi2, n - 1) > 1e-4


def test_stratified_split_matches_age_distribution_better_than_random():
  rng = np.random.default_rng(0)
  ages = np.concatenate([rng.normal(30, 5, 300), rng.normal(70, 4, 200)])
  ks_strat, ks_rand = [], []
  for seed in range(10):
    st = splits.split_subjects(len(ages), seed, ages=ages)
    rd = splits.split_subjects(len(ages), seed)
    ks_strat.append(stats.ks_2samp(ages[st.test], ages).statistic)
    ks_rand.append(stats.ks_2samp(ages[rd.test], ages).statistic)
  assert np.mean(ks_strat) < 0.5 * np.mean(ks_rand)
  # Each test member sits in its own 1/size quantile band of the age order, up to one band.
  st = splits.split_subjects(len(ages), 3, ages=ages)
  rank = np.argsort(np.argsort(ages)) / len(ages)
  band = np.sort(rank[st.test]) * len(st.test)
  assert np.all(np.abs(band - np.arange(len(st.test))) < 2.0)


def test_stratified_split_varies_with_seed():
  ages = np.linspace(20, 80, 100)
  a = splits.split_subjects(100, 0, ages=ages)
  b = splits.split_subjects(100, 1, ages=ages)
  assert not np.array_equal(a.test, b.test)


def test_apportion_is_largest_remainder():
  np.testing.assert_array_equal(splits.apportion(10, [0.8, 0.1, 0.1]), [8, 1, 1])
  np.testing.assert_array_equal(splits.apportion(11, [0.5, 0.25, 0.25]), [5, 3, 3])
  np.testing.assert_array_equal(splits.apportion(4, [1.0, 0.0, 0.0]), [4, 0, 0])


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.5, 0.5, 0.5), (1.2, -0.1, -0.1),
                                       (0.8, float("nan"), 0.1)])
def test_bad_fractions_are_config_errors(fractions):
  with pytest.raises(ConfigError):
    splits.split_subjects(10, 0, fractions)


def test_bad_ages_name_the_row():
  ages = np.array([30.0, np.nan, 40.0, 50.0])
  with pytest.raises(DataError, match="row 1"):
    splits.split_subjects(4, 0, ages=ages)
  with pytest.raises(DataError):
    splits.split_subjects(5, 0, ages=ages)


def test_save_load_round_trip_checks_subject_ids(tmp_path):
  ids = [f"sub-{i:03d}" for i in range(30)]
  s = splits.split_subjects(30, 2)
  path = tmp_path / "split.json"
  splits.save_split(path, s, ids, seed=2)
  d = json.loads(path.read_text())
  assert d["seed"] == 2 and d["subject_ids"]["test"] == [ids[i] for i in s.test]
  back = splits.load_split(path, ids)
  for name in splits.NAMES:
    np.testing.assert_array_equal(back[name], s[name])
  moved = ids[1:] + ids[:1]
  with pytest.raises(DataError, match="no longer at its row"):
    splits.load_split(path, moved)
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(DataError, match="bad.json"):
    splits.load_split(tmp_path / "bad.json")
