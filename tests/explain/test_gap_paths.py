"""Maps of the gap on paths to the expected age (`--reference expected`): the path fractions and
their regula-falsi step against hand-computed values, integrated gradients along the shortened
paths against the closed form on a linear model, and the whole design on a tiny trained workdir
(a subject whose estimate is the expected one gets an all-zero map; otherwise the map sums to
f(x) - E(a) with E(a) from the model's correction line)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import lrp
from jax_brainage import predict
from jax_brainage.commands import explain as explain_command
from jax_brainage.data import cache as cache_lib
from jax_brainage.data import intensity
from jax_brainage.ensemble import correction as correction_lib
from jax_brainage.errors import ConfigError
from jax_brainage.explain import derivative, maps, reference
from jax_brainage.train import artifact
from test_maps import Linear, SmallConv


def test_path_fractions_clip_and_sign_rules():
  gap = np.array([2.0, 2.0, -3.0, 0.0, 5.0])
  d = np.array([[4.0, 1.0, -1.0, 0.0],     # g/d = 0.5; 2 -> clip 1; opposite sign; d = 0
                [8.0, 2.0, 3.0, -8.0],     # 0.25, 1, 2/3, none
                [-6.0, -1.5, 3.0, -30.0],  # 0.5, 2 -> 1, none, 0.1
                [4.0, -4.0, 1.0, 0.0],     # g = 0: no path anywhere
                [0.0, 10.0, 20.0, 5.0]])   # d = 0: none; 0.5, 0.25, 1
  want = np.array([[0.5, 1.0, 0.0, 0.0], [0.25, 1.0, 2 / 3, 0.0], [0.5, 1.0, 0.0, 0.1],
                   [0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.25, 1.0]])
  got = reference.path_fractions(gap, d)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_regula_falsi_against_closed_form_drops():
  g, d = 2.0, 4.0
  gap, diff = np.array([g]), np.array([[d]])
  assert reference.regula_falsi(lambda t: 1 / 0, gap, diff, 0)[0, 0] == 0.5  # first order
  # piecewise-linear drop with its knot at the first guess t0 = 1/2: one step is exact,
  # whether the root lies below t0 (overshoot) or above (undershoot)
  for h_t0 in (3.0, 1.0):
    def h(t, h_t0=h_t0):
      t = np.asarray(t, np.float64)
      return np.where(t <= 0.5, t / 0.5 * h_t0, h_t0 + (t - 0.5) / 0.5 * (d - h_t0))
    t1 = reference.regula_falsi(h, gap, diff, 1)
    np.testing.assert_allclose(h(t1), [[g]], rtol=1e-6)
  # a drop that first RISES the wrong way (blends read as older), h(t) = d t (3 t - 2): the
  # only root of h = g in (0, 1] is t* = (1 + sqrt(1 + 3 g / d)) / 3, found by the bracket
  h = lambda t: d * np.asarray(t, np.float64) * (3 * np.asarray(t, np.float64) - 2)  # noqa
  t_star = (1 + np.sqrt(1 + 3 * g / d)) / 3
  errors = [abs(reference.regula_falsi(h, gap, diff, s)[0, 0] - t_star) for s in (2, 6, 20)]
  assert errors[-1] < 1e-4 and errors[0] > errors[1] > errors[2]
  # no path (opposite sign, g = 0) and whole paths (|d| <= |g|) are never evaluated
  calls = []
  got = reference.regula_falsi(lambda t: calls.append(t) or np.zeros_like(t),
                               np.array([2.0, 0.0, 5.0]),
                               np.array([[-4.0], [3.0], [4.0]]), 3)
  np.testing.assert_array_equal(got, [[0.0], [0.0], [1.0]])
  assert not calls


def test_integrated_gradients_on_shortened_paths_on_a_linear_model():
  model = Linear()
  rng = np.random.default_rng(0)
  volumes = rng.integers(0, 256, size=(4, 4, 4, 4, 2), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, 4, 2)))
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)[:, 0].reshape(4, 4, 4, 2)
  refs = rng.integers(0, 256, size=(4, 3, 4, 4, 4, 2), dtype=np.uint8)
  t = np.array([[0.5, 0.0, 1.0], [0.2, 0.3, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
  got, _ = maps.Explainer(model, variables, "integrated_gradients", batch_size=4)(
      volumes, references=refs, fractions=t)
  x, xr = volumes / 255.0, refs / 255.0
  # analytic: the mean over the paths with t_k > 0 of t_k (x - x_k) w
  used = (t > 0).astype(np.float64)
  weight = used / np.maximum(1.0, used.sum(1, keepdims=True))
  want = np.einsum("nk,nkxyzc->nxyzc", weight * t, x[:, None] - xr) * w
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  assert np.all(got[2] == 0.0)  # no path: an all-zero map, exactly
  # t = 1 everywhere is the unshortened mean over the references
  full, _ = maps.Explainer(model, variables, "integrated_gradients", batch_size=4)(
      volumes, references=refs)
  np.testing.assert_allclose(got[3], full[3], rtol=1e-4, atol=1e-6)


def test_linear_model_map_sums_to_the_gap_exactly():
  # f linear along every path: the first-order fractions are exact and sum R = g.
  model = Linear()
  rng = np.random.default_rng(5)
  volumes = rng.integers(0, 256, size=(3, 4, 4, 4, 2), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 4, 4, 4, 2)))
  refs = rng.integers(0, 256, size=(3, 4, 4, 4, 4, 2), dtype=np.uint8)
  f = lambda v: np.asarray(model.apply(variables, jnp.asarray(v, jnp.float32) / 255.0),  # noqa
                           np.float64)
  f_x, f_ref = f(volumes), f(refs.reshape(-1, 4, 4, 4, 2)).reshape(3, 4)
  d = f_x[:, None] - f_ref
  # a gap half the smallest difference of its sign (t_k <= 1/2: no path clipped at x_k);
  # references of the other sign give no path
  sign = np.sign(d[:, 0])
  gap = 0.5 * sign * np.array([np.abs(row[np.sign(row) == s]).min() for row, s in zip(d, sign)])
  t = reference.path_fractions(gap, d)
  assert np.all(t.sum(1) > 0) and np.all(t <= 0.5 + 1e-6)
  starts = reference.path_starts({"m": volumes}, {"m": refs}, t)["m"]
  drops = f_x[:, None] - np.asarray(model.apply(variables, starts), np.float64).reshape(3, 4)
  np.testing.assert_allclose(np.where(t > 0, drops, gap[:, None]),
                             np.broadcast_to(gap[:, None], t.shape), atol=1e-4)
  got, _ = maps.Explainer(model, variables, "integrated_gradients", batch_size=4)(
      volumes, references=refs, fractions=t)
  np.testing.assert_allclose(got.reshape(3, -1).sum(1), gap, atol=1e-4)


def test_shortened_paths_are_complete_on_a_nonlinear_model():
  model = SmallConv()
  rng = np.random.default_rng(2)
  volumes = rng.integers(0, 256, size=(2, 6, 6, 6, 1), dtype=np.uint8)
  variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 6, 6, 6, 1)))
  refs = rng.integers(0, 256, size=(2, 2, 6, 6, 6, 1), dtype=np.uint8)
  t = np.array([[0.4, 0.7], [0.0, 0.6]], np.float32)
  got, _ = maps.Explainer(model, variables, "integrated_gradients", batch_size=2)(
      volumes, references=refs, fractions=t)
  starts = reference.path_starts({"m": volumes}, {"m": refs}, t)["m"]
  f_start = np.asarray(model.apply(variables, starts)).reshape(2, 2)
  f_x = np.asarray(model.apply(variables, jnp.asarray(volumes, jnp.float32) / 255.0))
  used = t > 0
  want = ((f_x[:, None] - f_start) * used).sum(1) / used.sum(1)
  np.testing.assert_allclose(got.reshape(2, -1).sum(1), want,
                             atol=0.03 * np.abs(want).max() + 1e-4)


def test_expected_design_on_a_trained_workdir(explain_workdir):
  method = maps.get_method("integrated_gradients")
  target = derivative.Target(explain_workdir, "best", method, batch_size=4, seed=0,
                             levels=("ensemble",), target="gap", reference_design="expected")
  cache = cache_lib.Cache.open(explain_workdir / "cache")
  rows = np.array([0, 1])
  cubes = np.asarray(cache.volumes[rows])
  ages = [float(a) for a in np.asarray(cache.ages)[rows]]
  f_x = np.asarray(target.ensemble.predict(cubes).ensemble, np.float64)
  name = target.ensemble.subs[0].name
  refs = target.references
  ref_rows = refs.rows_for(name, ages[1], cubes[1])
  d = f_x[1] - np.asarray(target.ensemble.predict(refs.volumes(name, ref_rows)).ensemble)
  # subject 1's gap: half the smallest difference of the sign of its first reference's (no
  # path reaches its reference: every path ends inside the segment, sum R ~ g)
  gap = 0.5 * np.sign(d[0]) * np.abs(d[np.sign(d) == np.sign(d[0])]).min()
  # E(a) on the correction line a + bias(a): bias(a) = c0 + c1 a, c0 and c1 chosen so that
  # subject 0's estimate is exactly the expected one and subject 1's is `gap` above it.
  c1 = ((f_x[1] - gap - ages[1]) - (f_x[0] - ages[0])) / (ages[1] - ages[0])
  c0 = f_x[0] - ages[0] - c1 * ages[0]
  target.ensemble = dataclasses.replace(
      target.ensemble, correction=correction_lib.Correction("linear", (c0, c1)))
  refs.ensemble = target.ensemble
  levels, predicted = target.explain({name: cubes}, rows, ages)
  r = levels[target.top][0]
  np.testing.assert_allclose(target.reference_predicted, f_x - np.array([0.0, gap]),
                             atol=1e-4)
  np.testing.assert_allclose(predicted, f_x, rtol=1e-5)
  assert np.all(target.path_fractions[0] == 0) and np.all(r[0] == 0)  # no gap: no map
  t = target.path_fractions[1]
  np.testing.assert_array_equal(t > 0, np.sign(d) == np.sign(gap))
  assert np.all(t < 1)
  # complete along the paths it walked: sum R = mean over them of f(x) - f(x'_k) (f from
  # the model's own forward pass at the path starts; 4 midpoint steps per path)
  starts = reference.path_starts({name: cubes[1:]}, {name: refs.volumes(name, ref_rows)[None]},
                                 t[None])[name]
  h = f_x[1] - np.asarray(target.ensemble.predict(starts).ensemble, np.float64)
  walked = float(h[t > 0].mean())
  print(f"gap {gap:.4f} walked {walked:.4f} sum {float(r[1].sum()):.4f} t {t}")
  assert float(r[1].sum()) == pytest.approx(walked, rel=0.1, abs=0.05 * abs(gap))
  with pytest.raises(ConfigError, match="expected"):
    derivative.Target(explain_workdir, "best", maps.get_method("gradient"), batch_size=4,
                      seed=0, levels=("ensemble",), target="gap", reference_design="expected")


def test_explain_command_with_reference_expected(explain_workdir, tmp_path):
  w = explain_workdir
  index = json.loads((w / "cache" / "index.json").read_text())
  subject = index["subjects"][1]
  sid, age = subject["subject_id"], float(subject["age"])
  parser = argparse.ArgumentParser()
  explain_command.add_parser(parser.add_subparsers())
  args = parser.parse_args(["explain", "--workdir", str(w), "--data", str(w / "data"),
                            "--out", str(tmp_path / "e"), "--subjects", sid, "--target", "gap",
                            "--reference", "expected", "--figures", "0", "--no-glass-brain",
                            "--quiet", "--workers", "1"])
  assert args.func(args) == 0
  record = json.loads((tmp_path / "e" / "explain.json").read_text())
  entry = record["subjects"][0]
  assert record["reference"] == "expected" and record["method"] == "integrated_gradients"
  model = artifact.load(w)
  sub = model.subs[0]
  variables = jax.tree.map(lambda a: np.asarray(a)[0], sub.variables)  # the one member
  f = maps.regression_apply(sub.model)
  unit = lambda v: jnp.asarray(intensity.to_unit_float(np.asarray(v)))  # noqa: E731
  # E(a), no bias correction: the mean estimate of the training scans within +-2 years of the
  # whole-year age (at least 5: the nearest in age), brute force from split.json
  train = set(json.loads((w / "split.json").read_text())["subject_ids"]["train"])
  rows = np.array([i for i, s in enumerate(index["subjects"]) if s["subject_id"] in train])
  distance = np.abs(np.array([index["subjects"][i]["age"] for i in rows]) - round(age))
  k = min(max(int(np.sum(distance <= 2.0)), 5), len(rows))
  volumes = np.load(w / "cache" / "volumes.npy")
  channels = [index["sequences"].index(q) for q in sub.sequences]
  scans = volumes[rows[np.argsort(distance, kind="stable")[:k]]][..., channels]
  assert entry["reference_predicted_age"] == pytest.approx(
      float(np.mean(np.asarray(f(variables, unit(scans))))), abs=1e-3)
  # The map: lrp's integrated gradients (4 midpoint steps) from x + t_k (x_k - x) to x,
  # averaged over the paths with t_k > 0 (t_k as recorded in explain.json).
  cache = cache_lib.Cache.open(w / "cache")
  view, _ = predict.preprocessor_for(sub.sequences, cache, "the model")
  images = {q: str(next((w / "data" / sid / "anat").glob(f"{sid}_*{q}.nii.gz")))
            for q in sub.sequences}
  x, inverse = view.preprocess(images, subject=sid)
  inputs = predict.model_inputs(model)
  refs = reference.References(model, inputs.views, inputs.of_sub, design="expected")
  x_k = refs.volumes(sub.name, refs.rows_for(sub.name, age, x))
  t = np.array(entry["path_fractions"])
  assert entry["reference_paths"] == int(np.sum(t > 0))
  x0 = unit(x)[None]
  paths = [np.asarray(lrp.attribution.integrated_gradients(
      f, variables, x0, baseline=x0 + float(tk) * (unit(xk)[None] - x0), n_steps=4))[0]
      for tk, xk in zip(t, x_k) if tk > 0]
  want_cube = np.mean(paths, axis=0) if paths else np.zeros(x.shape, np.float32)
  written = np.asarray(nib.load(tmp_path / "e" / entry["maps"][next(iter(entry["maps"]))][0])
                       .dataobj)
  want = np.asarray(maps.to_subject_space(want_cube[..., 0], inverse).dataobj)
  np.testing.assert_allclose(written, want, rtol=1e-3, atol=1e-4 * np.abs(want).max() + 1e-9)


def test_ageing_design_on_a_trained_workdir(explain_workdir):
  w = explain_workdir
  target = derivative.Target(w, "best", maps.get_method("integrated_gradients"), batch_size=4,
                             seed=0, levels=("ensemble",), target="gap",
                             reference_design="ageing")
  index = json.loads((w / "cache" / "index.json").read_text())
  cache = cache_lib.Cache.open(w / "cache")
  rows = np.array([0, 1])
  cubes = np.asarray(cache.volumes[rows])
  ages = [float(a) for a in np.asarray(cache.ages)[rows]]
  name = target.ensemble.subs[0].name
  # dm/da: numpy's least-squares line (np.polyfit) of every voxel on age over the training
  # scans within +-2 years of the whole-year age (at least 5, the nearest in age)
  train = set(json.loads((w / "split.json").read_text())["subject_ids"]["train"])
  train_rows = np.array([i for i, s in enumerate(index["subjects"]) if s["subject_id"] in train])
  train_ages = np.array([index["subjects"][i]["age"] for i in train_rows])
  distance = np.abs(train_ages - round(ages[1]))
  k = min(max(int(np.sum(distance <= 2.0)), 5), len(train_rows))
  pick = np.argsort(distance, kind="stable")[:k]
  x_fit = np.load(w / "cache" / "volumes.npy")[train_rows[pick]].astype(np.float64) / 255.0
  slope = np.polyfit(train_ages[pick], x_fit.reshape(k, -1), 1)[0].reshape(x_fit.shape[1:])
  np.testing.assert_allclose(target.references.ageing_direction(name, ages[1]), slope,
                             rtol=1e-4, atol=1e-5 * np.abs(slope).max())
  # subject 0 exactly at E(a), subject 1 one year above (the correction line)
  f_x = np.asarray(target.ensemble.predict(cubes).ensemble, np.float64)
  c1 = ((f_x[1] - 1.0 - ages[1]) - (f_x[0] - ages[0])) / (ages[1] - ages[0])
  c0 = f_x[0] - ages[0] - c1 * ages[0]
  target.ensemble = dataclasses.replace(
      target.ensemble, correction=correction_lib.Correction("linear", (c0, c1)))
  target.references.ensemble = target.ensemble
  levels, _ = target.explain({name: cubes}, rows, ages)
  r = levels[target.top][0]
  t = target.path_fractions
  assert t.shape == (2, 1) and t[0, 0] == 0 and np.all(r[0] == 0)
  if t[1, 0] > 0:  # a path: complete along it (f at its start from the model's forward pass)
    start = cubes[1:] / 255.0 - float(t[1, 0] * reference.AGEING_REACH * 1.0) * slope[None]
    walked = f_x[1] - float(np.asarray(target.ensemble.predict(start.astype(np.float32))
                                       .ensemble)[0])
    assert float(r[1].sum()) == pytest.approx(walked, rel=0.1, abs=0.02)
  else:  # the model's estimate does not move that way along the ageing direction
    assert np.all(r[1] == 0)
