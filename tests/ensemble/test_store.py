"""The ensemble store against explicit references: every member applied by itself in a Python
loop (flax model.apply, input scaled in numpy), the head written out in numpy, and the JSON
manifest and orbax arrays read back from disk."""

from __future__ import annotations

import functools
import json
import types

import numpy as np
import pytest

from tests.ensemble.conftest import volumes
from jax_brainage import integrity
from jax_brainage.ensemble import correction as corr
from jax_brainage.ensemble import head as head_lib
from jax_brainage.ensemble import model as ensemble_model
from jax_brainage.ensemble import store
from jax_brainage.errors import ConfigError, DataError


_EXPLICIT: dict = {}


def _explicit(two_subs, inputs):
  """{name: [n, M]} each member applied alone (jitted flax apply, no vmap), one subject at a
  time, the input scaled in numpy."""
  import jax

  key = id(inputs["a"])
  if key not in _EXPLICIT:
    out = {}
    for name, each in two_subs["each"].items():
      apply = jax.jit(functools.partial(two_subs["models"][name].apply, train=False))
      x = (inputs[name].astype(np.float64) / 255.0).astype(np.float32)
      out[name] = np.array([[float(np.asarray(apply(v, x[i:i + 1]))[0]) for v in each]
                            for i in range(len(x))])
    _EXPLICIT[key] = out
  return _EXPLICIT[key]


@pytest.fixture(scope="module")
def data():
  val = {"a": volumes(14, 1, 1), "b": volumes(14, 2, 2)}
  test = {"a": volumes(7, 3, 1), "b": volumes(7, 4, 2)}
  rng = np.random.default_rng(0)
  return val, rng.uniform(20, 80, 14), test, rng.uniform(20, 80, 7)


@pytest.fixture(scope="module")
def ensemble(two_subs, data):
  val, val_ages, _, _ = data
  return ensemble_model.fit_ensemble(two_subs["subs"], val, val_ages, head="linear", folds=4,
                            correction="linear", batch_size=3)


def test_predict_members_is_every_member_applied_alone(two_subs, data, ensemble):
  _, _, test, _ = data
  got = ensemble.predict_members(test, batch_size=3)  # 7 subjects: batches of 4, last padded
  ref = _explicit(two_subs, test)
  assert set(got) == {"a", "b"} and got["a"].shape == (7, 3) and got["b"].shape == (7, 2)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-3)
  assert np.ptp(ref["a"]) > 1.0  # members and subjects differ: nothing constant passes
  # Members in groups of 2 (for memory): the same predictions.
  grouped = ensemble.predict_members(test, batch_size=3, members_per_call=2)
  for k in ref:
    np.testing.assert_allclose(grouped[k], ref[k], rtol=1e-5, atol=1e-3)


def test_predict_combines_as_the_head_written_out(two_subs, data, ensemble):
  val, val_ages, test, test_ages = data
  ref_val = _explicit(two_subs, val)
  # The head was fit on the members' validation predictions: refit it from the explicit ones.
  ref_head = head_lib.fit_multilevel(ref_val, val_ages, folds=4)
  ref = _explicit(two_subs, test)
  pred = ensemble.predict(test, batch_size=5)
  subs = {k: ref[k] @ ref_head.level1[k].weights + ref_head.level1[k].intercept for k in ref}
  ens = np.stack([subs["a"], subs["b"]], 1) @ ref_head.level2.weights + ref_head.level2.intercept
  np.testing.assert_allclose(pred.ensemble, ens, rtol=1e-4, atol=2e-2)
  for k in subs:
    np.testing.assert_allclose(pred.subs[k], subs[k], rtol=1e-4, atol=2e-2)
  allm = np.concatenate([ref["a"], ref["b"]], 1)
  np.testing.assert_allclose(pred.spread, allm.std(1, ddof=1), rtol=1e-4, atol=1e-3)
  # Correction: gap ~ a + b * age fit on the validation ensemble predictions (np.polyfit).
  val_ens = ensemble.head.apply(ref_val)
  coef = np.polyfit(val_ages, val_ens - val_ages, 1)
  np.testing.assert_allclose(pred.corrected(test_ages),
                             pred.ensemble - np.polyval(coef, test_ages), atol=2e-2)
  np.testing.assert_allclose(pred.corrected_gap(test_ages),
                             pred.corrected(test_ages) - test_ages, atol=1e-9)


def test_save_and_load_round_trip(two_subs, data, ensemble, tmp_path):
  _, _, test, test_ages = data
  w = tmp_path / "W"
  path = store.save_ensemble(w, ensemble)
  assert path == (w / "ensemble").resolve() and store.is_ensemble_workdir(w)
  assert sorted(p.name for p in w.iterdir()) == ["ensemble"]  # no temporary left behind
  manifest = json.loads((path / "manifest" / "metadata").read_text())
  assert manifest["kind"] == store.MANIFEST_KIND and manifest["n_members"] == 5
  subs = {s["name"]: s for s in manifest["sub_ensembles"]}
  assert subs["b"]["sequences"] == ["T1w", "FLAIR"] and subs["b"]["regions"] == ["cerebellum"]
  assert subs["a"]["members"] == 3 and subs["a"]["model_manifest"]["image_shape"] == [16, 16, 16]
  np.testing.assert_allclose(subs["a"]["member_weights"], ensemble.member_weights()["a"])
  assert manifest["correction"]["kind"] == "linear"
  loaded = store.load_ensemble(w)
  for s, t in zip(ensemble.subs, loaded.subs):
    for x, y in zip(jax_leaves(s.variables), jax_leaves(t.variables)):
      np.testing.assert_array_equal(x, y)
  a, b = ensemble.predict(test), loaded.predict(test)
  np.testing.assert_allclose(b.ensemble, a.ensemble, rtol=1e-6)
  np.testing.assert_allclose(b.corrected(test_ages), a.corrected(test_ages), rtol=1e-6)
  # Saving again replaces the store in one piece.
  store.save_ensemble(w, loaded)
  assert sorted(p.name for p in w.iterdir()) == ["ensemble"]


def jax_leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def test_store_that_does_not_fit_its_models(ensemble, tmp_path):
  w = tmp_path / "W"
  path = store.save_ensemble(w, ensemble)
  meta = path / "manifest" / "metadata"
  manifest = json.loads(meta.read_text())
  manifest["sub_ensembles"][0]["model_manifest"]["model_kwargs"]["dense_features"] = 16
  meta.write_text(json.dumps(manifest))
  # Unsealed, the edit is a checksum error naming the manifest (tests/test_fault_injection.py);
  # sealed again, it is a store whose arrays do not fit the models it describes.
  with pytest.raises(DataError,
                     match=r"W/ensemble/manifest/metadata: (extended|truncated|corrupt) file"):
    store.load_ensemble(w)
  integrity.seal(path)
  with pytest.raises(ConfigError,
                     match=r"W/ensemble does not fit this model: a/params/age_head/kernel") as e:
    store.load_ensemble(w)
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="no ensemble store"):
    store.load_ensemble(tmp_path / "nothing")
  assert not store.is_ensemble_workdir(tmp_path / "nothing")


def test_inputs_that_do_not_match(ensemble, data):
  _, _, test, _ = data
  with pytest.raises(DataError, match=r"sub-ensemble b expects \[n, 16, 16, 16, 2\].*T1w\+FLAIR"):
    ensemble.predict({"a": test["a"], "b": test["a"]})
  with pytest.raises(DataError, match="'b'"):
    ensemble.predict({"a": test["a"]})
  with pytest.raises(DataError, match="different numbers of subjects .a: 3, b: 7"):
    ensemble.predict({"a": test["a"][:3], "b": test["b"]})


def test_check_cache(two_subs):
  from jax_brainage.data.preprocess import Preprocessing

  sub = two_subs["subs"][1]
  prep = Preprocessing(sequences=("T1w", "FLAIR"), shape=(16, 16, 16), regions=(3,))
  sub = ensemble_model.SubEnsemble(sub.name, sub.sequences, sub.regions, sub.manifest,
                                   sub.members, sub.variables, "/c", prep.to_dict())

  def cache(**kw):
    p = Preprocessing(**{**dict(sequences=("T1w", "FLAIR"), shape=(16, 16, 16), regions=(3,)),
                         **kw})
    return types.SimpleNamespace(path="/c", shape=p.shape, sequences=p.sequences,
                                 preprocessing=p)

  ensemble_model.check_cache(sub, cache())
  with pytest.raises(DataError, match=r"/c: cubes are \(32, 32, 32\).*sub-ensemble b"):
    ensemble_model.check_cache(sub, cache(shape=(32, 32, 32)))
  with pytest.raises(DataError, match="'FLAIR'"):
    ensemble_model.check_cache(sub, cache(sequences=("T1w", "swi")))
  with pytest.raises(DataError, match=r"preprocessing regions is \[3, 4\] now"):
    ensemble_model.check_cache(sub, cache(regions=(3, 4)))


def test_ensemble_metrics(two_subs, data, ensemble):
  _, _, test, ages = data
  m = ensemble_model.ensemble_metrics(ensemble, test, ages)
  ref = _explicit(two_subs, test)
  ens = ensemble.head.apply(ref)
  from scipy.stats import spearmanr
  np.testing.assert_allclose(m["mae_ensemble"], np.mean(np.abs(ens - ages)), atol=2e-2)
  member_mae = np.abs(np.concatenate([ref["a"], ref["b"]], 1) - ages[:, None]).mean(0)
  np.testing.assert_allclose(m["mae_best_member"], member_mae.min(), atol=2e-3)
  c = corr.fit_correction("linear", data[1], ensemble.head.apply(_explicit(two_subs, data[0])))
  np.testing.assert_allclose(m["mae_corrected"], np.mean(np.abs(c.apply(ens, ages) - ages)),
                             atol=2e-2)
  np.testing.assert_allclose(m["spearman_gap_age"], spearmanr(ens - ages, ages)[0], atol=1e-6)
  assert m["n_members"] == 5 and set(m["mae_subs"]) == {"a", "b"}
  val_ref = _explicit(two_subs, data[0])
  val_mae = np.abs(np.concatenate([val_ref["a"], val_ref["b"]], 1) - data[1][:, None]).mean(0)
  np.testing.assert_allclose(m["mae_member_best_on_validation"],
                             member_mae[np.argmin(val_mae)], atol=2e-3)
  json.dumps(m)  # the demo writes it into summary.json
