"""The simulated cohort: population model, oracle MAE, ageing effects, ground-truth masks,
determinism, BIDS files and the `brainage simulate` command. 4 mm subjects throughout."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, special, stats

from jax_brainage import cli
from jax_brainage.data import simulate
from jax_brainage.data.simulation import population
from jax_brainage.errors import ConfigError, DataError

SEQS = ("T1w", "FLAIR", "swi")


@pytest.fixture(scope="module")
def cohort():
  return simulate.Cohort(simulate.CohortConfig(seed=7, n=40, resolution_mm=4))


def _digest(subject) -> str:
  h = hashlib.sha256()
  for seq in SEQS:
    h.update(subject.images[seq].tobytes())
    h.update(subject.ageing_masks[seq].tobytes())
  h.update(subject.lesion_mask.tobytes())
  h.update(json.dumps([subject.age, subject.sex, subject.brain_age, subject.effects]).encode())
  return h.hexdigest()


_DIGEST_SCRIPT = """
import hashlib, json, sys
from jax_brainage.data import simulate
s = simulate.Cohort(simulate.CohortConfig(seed=7, n=40, resolution_mm=4)).subject(3)
h = hashlib.sha256()
for seq in ("T1w", "FLAIR", "swi"):
  h.update(s.images[seq].tobytes())
  h.update(s.ageing_masks[seq].tobytes())
h.update(s.lesion_mask.tobytes())
h.update(json.dumps([s.age, s.sex, s.brain_age, s.effects]).encode())
print(h.hexdigest())
"""


def _mni_affine_4mm():
  from nilearn import datasets

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return datasets.load_mni152_brain_mask(resolution=4).affine


# ------------------------------------------------------------------------------------------------
# Population and oracle.
# ------------------------------------------------------------------------------------------------


def test_population_follows_the_documented_model():
  config = simulate.CohortConfig()
  p = population.sample_participants(config, 200_000, np.random.default_rng(0))
  assert p.age.min() >= 18 and p.age.max() <= 82
  assert stats.kstest((p.age - 18) / 64, "uniform").pvalue > 1e-3
  assert abs(p.male.mean() - 0.5) < 0.01
  # Prevalences by age decade and sex against the logistic model written out here.
  coef = {"diabetes": (-2.6, 0.55, 0.3), "hypertension": (-0.85, 0.75, 0.3),
          "smoking": (-1.3, -0.25, 0.3)}
  for factor, (c0, c1, c2) in coef.items():
    flags = getattr(p, factor)
    for lo in (20, 40, 60, 75):
      for male in (False, True):
        sel = (p.age >= lo) & (p.age < lo + 5) & (p.male == male)
        expected = special.expit(c0 + c1 * (p.age[sel] - 50) / 10 + c2 * male).mean()
        se = np.sqrt(expected * (1 - expected) / sel.sum())
        assert abs(flags[sel].mean() - expected) < 5 * se, (factor, lo, male)
  old = p.age > 70
  assert p.hypertension[old].mean() > 2 * p.hypertension[p.age < 30].mean()
  # BMI log-normal around 26 + 0.6 / decade (+0.8 for men).
  med = 26 + 0.6 * (p.age - 50) / 10 + 0.8 * p.male
  z = (np.log(p.bmi) - np.log(med)) / 0.15
  assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
  # b = a + 4 diabetes + 2 hypertension + 1.5 smoking + 0.3 (BMI - 25)_+ + N(0, 2).
  shift = 4 * p.diabetes + 2 * p.hypertension + 1.5 * p.smoking + 0.3 * np.maximum(p.bmi - 25, 0)
  np.testing.assert_allclose(p.risk_shift, shift, rtol=1e-12)
  assert stats.kstest((p.brain_age - p.age - shift) / 2.0, "norm").pvalue > 1e-3


def test_oracle_given_brain_age_matches_a_nonparametric_monte_carlo():
  config = simulate.CohortConfig()
  p = population.sample_participants(config, 600_000, np.random.default_rng(1))
  # Best predictor of a from b, estimated model-free: median age within narrow bins of b,
  # fitted on one half and scored on the other (no in-sample optimism).
  edges = np.arange(p.brain_age.min() - 0.1, p.brain_age.max() + 0.3, 0.25)
  bins = np.digitize(p.brain_age, edges)
  fit, test = np.arange(len(bins)) % 2 == 0, np.arange(len(bins)) % 2 == 1
  medians = np.full(len(edges) + 1, np.nan)
  order = np.argsort(bins[fit], kind="stable")
  b_sorted, a_sorted = bins[fit][order], p.age[fit][order]
  starts = np.searchsorted(b_sorted, np.arange(len(edges) + 1))
  ends = np.searchsorted(b_sorted, np.arange(len(edges) + 1), side="right")
  for k in np.flatnonzero(ends > starts):
    medians[k] = np.median(a_sorted[starts[k]:ends[k]])
  pred = medians[bins[test]]
  ok = np.isfinite(pred)
  assert ok.mean() > 0.999
  empirical = np.mean(np.abs(p.age[test][ok] - pred[ok]))
  oracle = population.oracle_mae(config, "brain_age")
  assert 1.5 < oracle < 2.5
  assert abs(empirical - oracle) < 0.02 * oracle, (empirical, oracle)


def test_oracle_given_all_latent_variables_matches_monte_carlo():
  """Independent replica: draw (a, X, b), compute each draw's posterior median on a fine grid
  from densities written here, and average |a - median|."""
  rng = np.random.default_rng(2)
  n = 10000
  a = rng.uniform(18, 82, n)
  male = rng.uniform(size=n) < 0.5
  logit = lambda c, age, m: special.expit(c[0] + c[1] * (age - 50) / 10 + c[2] * m)  # noqa: E731
  cd, ch, cs = (-2.6, 0.55, 0.3), (-0.85, 0.75, 0.3), (-1.3, -0.25, 0.3)
  d = rng.uniform(size=n) < logit(cd, a, male)
  h = rng.uniform(size=n) < logit(ch, a, male)
  s = rng.uniform(size=n) < logit(cs, a, male)
  mu = lambda age, m: np.log(26 + 0.6 * (age - 50) / 10 + 0.8 * m)  # noqa: E731
  bmi = np.exp(mu(a, male) + 0.15 * rng.standard_normal(n))
  r = 4 * d + 2 * h + 1.5 * s + 0.3 * np.maximum(bmi - 25, 0)
  b = a + r + 2 * rng.standard_normal(n)

  grid = np.linspace(18, 82, 801)[None]  # [1, g]
  post = stats.norm.pdf(b[:, None], grid + r[:, None], 2.0)
  for flag, c in ((d, cd), (h, ch), (s, cs)):
    pk = logit(c, grid, male[:, None])
    post *= np.where(flag[:, None], pk, 1 - pk)
  post *= stats.norm.pdf(np.log(bmi)[:, None], mu(grid, male[:, None]), 0.15)
  cdf = np.cumsum(post, 1)
  cdf /= cdf[:, -1:]
  median = grid[0, np.argmax(cdf >= 0.5, axis=1)]
  err = np.abs(a - median)
  oracle = population.oracle_mae(simulate.CohortConfig(), "latent")
  assert abs(err.mean() - oracle) < 4 * err.std() / np.sqrt(n) + 0.01, (err.mean(), oracle)
  assert oracle < population.oracle_mae(simulate.CohortConfig(), "brain_age")


def test_oracle_without_risk_effects_is_the_noise_mae():
  """No risk effects: a ~ U, b = a + N(0, s). Away from the prior's edges the posterior median
  is b and the MAE is s sqrt(2 / pi); the edges (where the prior helps) only lower it."""
  config = simulate.CohortConfig(beta_diabetes=0, beta_hypertension=0, beta_smoking=0,
                                 beta_bmi=0, sigma_brain_age=1.0)
  expected = 1.0 * np.sqrt(2 / np.pi)
  for condition_on in ("brain_age", "latent"):
    value = population.oracle_mae(config, condition_on)
    assert expected - 0.04 < value < expected + 0.005, (condition_on, value)


# ------------------------------------------------------------------------------------------------
# Subjects: determinism, ageing effects, ground truth.
# ------------------------------------------------------------------------------------------------


def test_subject_is_a_pure_function_of_seed_and_index(cohort):
  later_first = cohort.subject(9)
  first = cohort.subject(3)
  other = simulate.Cohort(simulate.CohortConfig(seed=7, n=40, resolution_mm=4))
  assert _digest(other.subject(3)) == _digest(first)  # new instance, other order
  assert _digest(simulate.Cohort(cohort.config.replace(n=10)).subject(3)) == _digest(first)
  assert _digest(later_first) != _digest(first)
  assert _digest(simulate.Cohort(cohort.config.replace(seed=8)).subject(3)) != _digest(first)
  # Another interpreter (fresh hash seeds, fresh caches) makes the same bytes.
  env = {**os.environ, "PYTHONPATH": str(Path(simulate.__file__).parents[2]), "PYTHONHASHSEED": "1"}
  done = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True,
                        env=env, check=True, timeout=300, stdin=subprocess.DEVNULL)
  assert done.stdout.strip() == _digest(first)
  # A pickled cohort (as data-loader workers get it) carries its config, not the anatomy.
  import pickle
  blob = pickle.dumps(cohort)
  assert len(blob) < 10_000
  assert _digest(pickle.loads(blob).subject(3)) == _digest(first)
  # Without ground truth: the same images, faster; as a channels-last volume too.
  fast = cohort.subject(3, ground_truth=False)
  assert not fast.reference_images and not fast.ageing_masks
  np.testing.assert_array_equal(fast.lesion_mask, first.lesion_mask)
  vol = cohort.volume(3)
  assert vol.shape == (50, 59, 48, 3) and vol.dtype == np.float32
  for c, seq in enumerate(SEQS):
    np.testing.assert_array_equal(fast.images[seq], first.images[seq])
    np.testing.assert_array_equal(vol[..., c], first.images[seq])
  # Asking for fewer sequences changes nothing in those that remain.
  t1_only = simulate.Cohort(cohort.config.replace(sequences=("T1w",))).subject(3)
  assert set(t1_only.images) == {"T1w"}
  np.testing.assert_array_equal(t1_only.images["T1w"], first.images["T1w"])


def test_subject_fields_and_images(cohort):
  s = cohort.subject(0)
  assert s.subject_id == "sub-0001" and s.sex in ("F", "M")
  p = cohort.participants(0)
  assert s.age == p.age[0] and s.brain_age == p.brain_age[0]
  assert s.risk_shift == pytest.approx(
      4 * s.risk_factors["diabetes"] + 2 * s.risk_factors["hypertension"]
      + 1.5 * s.risk_factors["smoking"] + 0.3 * max(s.risk_factors["bmi"] - 25, 0))
  np.testing.assert_allclose(s.affine, _mni_affine_4mm())
  for seq in SEQS:
    img = s.images[seq]
    assert img.dtype == np.float32 and img.shape == (50, 59, 48)
    np.testing.assert_array_equal(img, np.rint(img))  # integer-valued: exact as int16
    assert np.all(img[~s.brain_mask] == 0) and img[s.brain_mask].mean() > 100
  # Contrasts: lesions bright on FLAIR and dark on T1w relative to the same voxels unlesioned.
  old = cohort.subject(0, brain_age=85.0)
  les = old.lesion_mask
  assert les.sum() > 0
  ratio = {q: old.images[q][les].mean() / old.reference_images[q][les].mean() for q in SEQS}
  assert ratio["FLAIR"] > 1.3 and ratio["T1w"] < 0.85, ratio


def _ventricle_csf_ml(subject, atlas, reference=False):
  """Dark (CSF) T1w volume around the template ventricles, in ml: measured from the image."""
  region = ndimage.binary_dilation(atlas.labels == 7, iterations=3) & subject.brain_mask
  unit = 1000 * subject.nuisance["intensity_scale"]["T1w"]
  image = subject.reference_images["T1w"] if reference else subject.images["T1w"]
  return float(((image < 0.45 * unit) & region).sum()) * 0.064


def test_ageing_effects_grow_with_brain_age_in_one_subject(cohort):
  ages = (25.0, 45.0, 65.0, 85.0)
  subs = [cohort.subject(5, brain_age=b) for b in ages]
  atlas = cohort.atlas
  vent = [_ventricle_csf_ml(s, atlas) for s in subs]
  assert all(x < y for x, y in zip(vent, vent[1:])), vent
  assert vent[-1] > 1.8 * vent[0]
  lesions = [s.effects["lesion_count"] for s in subs]
  assert lesions[0] == 0 and all(x <= y for x, y in zip(lesions, lesions[1:])) and lesions[-1] > 10
  les_vox = [s.lesion_mask.sum() for s in subs]
  assert all(x <= y for x, y in zip(les_vox, les_vox[1:])) and les_vox[-1] > les_vox[1]
  # Lesions are nested across brain ages (same draws, more of them): their volume only grows.
  les_ml = [s.effects["lesion_volume_ml"] for s in subs]
  assert all(x <= y for x, y in zip(les_ml, les_ml[1:])) and les_ml[-1] > 0
  # Iron: the lentiform nucleus darkens on SWI relative to the young reference.
  lent = (atlas.labels == 8) & subs[0].brain_mask
  swi = [s.images["swi"][lent].mean() / s.reference_images["swi"][lent].mean() for s in subs]
  assert all(x > y for x, y in zip(swi, swi[1:])) and swi[-1] < 0.93, swi
  # Cortical thinning: T1w cortex darkens (GM -> CSF), the frontal lobe more than the parietal.
  def drop(s, label):
    m = (atlas.labels == label) & s.brain_mask
    return 1 - s.images["T1w"][m].mean() / s.reference_images["T1w"][m].mean()
  frontal = [drop(s, 1) for s in subs]
  assert all(x < y for x, y in zip(frontal, frontal[1:])), frontal
  assert drop(subs[-1], 1) > 1.2 * drop(subs[-1], 2)
  # Ageing masks grow with brain age.
  for seq in SEQS:
    sizes = [s.ageing_masks[seq].sum() for s in subs]
    assert all(x <= y for x, y in zip(sizes, sizes[1:])) and sizes[-1] > sizes[0], (seq, sizes)


def test_ageing_effects_track_latent_brain_age_across_subjects(cohort):
  subs = [cohort.subject(i) for i in range(14)]
  b = np.array([s.brain_age for s in subs])
  # Enlargement over the individual's own young ventricles (which vary between people).
  vent = np.array([_ventricle_csf_ml(s, cohort.atlas)
                   - _ventricle_csf_ml(s, cohort.atlas, reference=True) for s in subs])
  assert stats.spearmanr(b, vent).statistic > 0.8
  les = np.array([s.lesion_mask.sum() for s in subs])
  assert stats.spearmanr(b, les).statistic > 0.6
  lent = cohort.atlas.labels == 8
  swi = np.array([s.images["swi"][lent & s.brain_mask].mean()
                  / s.reference_images["swi"][lent & s.brain_mask].mean() for s in subs])
  assert stats.spearmanr(b, swi).statistic < -0.8
  flair = np.array([s.ageing_masks["FLAIR"].sum() for s in subs])
  assert stats.spearmanr(b, flair).statistic > 0.8
  # Risk factors accelerate frontal atrophy beyond b: the risk term is kappa * R * p(b).
  for s in subs:
    p = (s.brain_age - 18) / 64
    assert s.effects["frontal_risk_thinning"] == pytest.approx(0.012 * s.risk_shift * p)


def test_masks_are_exactly_the_voxels_ageing_changed(cohort):
  s = cohort.subject(2, brain_age=70.0)
  for seq in SEQS:
    diff = np.abs(s.images[seq].astype(np.float64) - s.reference_images[seq].astype(np.float64))
    np.testing.assert_array_equal(s.ageing_masks[seq], diff > s.mask_thresholds[seq])
    assert s.mask_thresholds[seq] == pytest.approx(
        0.05 * 1000 * s.nuisance["intensity_scale"][seq])
  # Lesions are ageing: nearly all lesion voxels are in the FLAIR ageing mask.
  assert s.lesion_mask.sum() > 0
  assert s.ageing_masks["FLAIR"][s.lesion_mask].mean() > 0.9
  # The reference is this subject without ageing and with the same nuisance: (a) rendering at
  # the reference brain age gives it exactly, and (b) so does a cohort with every ageing effect
  # switched off.
  young = cohort.subject(2, brain_age=cohort.config.brain_age_reference)
  no_ageing = simulate.Cohort(cohort.config.replace(
      ventricle_expansion_mm=0.0, cortical_thinning=0.0, frontal_risk_thinning=0.0,
      lesion_rate=0.0, iron_darkening=0.0)).subject(2)
  for seq in SEQS:
    np.testing.assert_array_equal(young.images[seq], s.reference_images[seq])
    np.testing.assert_array_equal(no_ageing.images[seq], s.reference_images[seq])
    assert not young.ageing_masks[seq].any() and not no_ageing.ageing_masks[seq].any()
  assert not young.lesion_mask.any()


def test_nuisance_is_not_age(cohort):
  """Head size differs by sex, not by age; images differ between subjects of the same b."""
  from jax_brainage.data.simulation import render

  cfg = cohort.config
  rng = np.random.default_rng(0)
  log_scale = {m: np.log([render.draw_nuisance(cfg, cohort.anatomy, m, rng).head_scale
                          for _ in range(1500)]) for m in (False, True)}
  gap = log_scale[True].mean() - log_scale[False].mean()
  assert abs(gap - 2 * cfg.head_scale_male) < 4 * cfg.head_scale_sd * np.sqrt(2 / 1500)
  assert abs(log_scale[True].std() - cfg.head_scale_sd) < 0.1 * cfg.head_scale_sd
  mid = 0.5 * (log_scale[True].mean() + log_scale[False].mean())
  assert abs(mid - cfg.head_scale_mean) < 4 * cfg.head_scale_sd / np.sqrt(3000)
  # The head scale is visible as brain volume: the mask's volume over the template's ~ scale^3.
  template = (cohort.anatomy.brain > 0.5).sum()
  for i in (4, 5, 6):
    sub = cohort.subject(i)
    assert sub.brain_mask.sum() / template == pytest.approx(sub.nuisance["head_scale"] ** 3,
                                                            rel=0.04)
  nuisance_free = simulate.Cohort(cfg.replace(
      ventricle_size_sd_mm=0.0, cortical_thickness_sd=0.0, head_scale_mean=0.0, head_scale_sd=0.0,
      head_scale_male=0.0,
      rotation_sd_deg=0.0, translation_sd_mm=0.0,
      deformation_sd_mm=0.0, bias_field_sd=0.0, noise_sd=0.0, intensity_scale_sd=0.0))
  a, b = nuisance_free.subject(0, brain_age=18.0), nuisance_free.subject(1, brain_age=18.0)
  np.testing.assert_array_equal(a.images["T1w"], b.images["T1w"])  # only nuisance told them apart
  assert not np.array_equal(cohort.subject(0, brain_age=18.0).images["T1w"],
                            cohort.subject(1, brain_age=18.0).images["T1w"])


# ------------------------------------------------------------------------------------------------
# Files and command line.
# ------------------------------------------------------------------------------------------------


def _read_tsv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f, delimiter="\t"))


def test_write_cohort_bids_layout(tmp_path, cohort):
  config = simulate.CohortConfig(seed=7, n=3, resolution_mm=4)
  out = simulate.write_cohort(tmp_path / "sim", config, workers=2)
  description = json.loads((out / "dataset_description.json").read_text())
  assert description["BIDSVersion"] and description["DatasetType"] == "raw"
  rows = _read_tsv(out / "participants.tsv")
  assert [r["participant_id"] for r in rows] == ["sub-0001", "sub-0002", "sub-0003"]
  assert set(rows[0]) == {"participant_id", "age", "sex", "diabetes", "hypertension", "smoking",
                          "bmi"}  # no latent brain age where a model could learn from it
  latent = _read_tsv(out / "derivatives/simulation/brain_age.tsv")
  affine = _mni_affine_4mm()
  for i, (row, lrow) in enumerate(zip(rows, latent)):
    s = cohort.subject(i)  # same seed, same index: another cohort size changes nothing
    assert float(row["age"]) == pytest.approx(s.age, abs=1e-4) and row["sex"] == s.sex
    assert float(lrow["brain_age"]) == pytest.approx(s.brain_age, abs=1e-4)
    assert int(lrow["lesion_count"]) == s.effects["lesion_count"]
    sid = s.subject_id
    for seq in SEQS:
      img = nib.load(out / sid / "anat" / f"{sid}_{seq}.nii.gz")
      np.testing.assert_allclose(img.affine, affine)
      assert img.header.get_zooms() == (4.0, 4.0, 4.0)
      np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), s.images[seq])
      deriv = out / "derivatives/simulation" / sid / "anat"
      mask = nib.load(deriv / f"{sid}_{seq}_ageingmask.nii.gz")
      np.testing.assert_array_equal(np.asarray(mask.dataobj) > 0, s.ageing_masks[seq])
    les = nib.load(out / "derivatives/simulation" / sid / "anat" / f"{sid}_lesionmask.nii.gz")
    np.testing.assert_array_equal(np.asarray(les.dataobj) > 0, s.lesion_mask)
  atlas = nib.load(out / "derivatives/simulation/atlas.nii.gz")
  np.testing.assert_array_equal(np.asarray(atlas.dataobj), cohort.atlas.labels)
  table = _read_tsv(out / "derivatives/simulation/atlas.tsv")
  assert {r["name"] for r in table} >= {"frontal_cortex", "cerebellum", "lentiform_nucleus"}
  regions = _read_tsv(out / "derivatives/simulation/atlas_regions.tsv")
  assert [r["name"] for r in regions] == ["cortical", "subcortical", "cerebellum"]
  meta = json.loads((out / "derivatives/simulation/cohort.json").read_text())
  assert simulate.CohortConfig.from_dict(meta["config"]) == config
  assert meta["oracle_mae"] == pytest.approx(population.oracle_mae(config, "latent"))
  assert meta["oracle_mae"] < meta["oracle_mae_brain_age_only"]
  assert not list(out.rglob("*.tmp"))  # nothing half-written left behind
  # Byte for byte the same dataset from one process as from two.
  again = simulate.write_cohort(tmp_path / "again", config, workers=1)
  files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
  for f in files:
    assert (out / f).read_bytes() == (again / f).read_bytes(), f
  # The same configuration again: complete, returned as it is. Another one: refused.
  before = (out / "participants.tsv").stat().st_mtime_ns
  simulate.write_cohort(out, config, workers=1)
  assert (out / "participants.tsv").stat().st_mtime_ns == before
  with pytest.raises(DataError, match="another configuration"):
    simulate.write_cohort(out, config.replace(seed=8), workers=1)


def test_cli_writes_a_dataset_and_rejects_bad_arguments(tmp_path, capsys):
  out = tmp_path / "cli"
  assert cli.main(["simulate", "--out", str(out), "--n", "2", "--resolution", "4", "--seed", "3",
                   "--sequences", "T1w,FLAIR", "--workers", "1"]) == 0
  assert (out / "sub-0002" / "anat" / "sub-0002_FLAIR.nii.gz").exists()
  assert not (out / "sub-0002" / "anat" / "sub-0002_swi.nii.gz").exists()
  assert "oracle MAE" in capsys.readouterr().out
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  bad = [
      (["--sequences", "T1w,DWI"], "unknown sequence 'DWI'"),
      (["--resolution", "5"], "--resolution 5"),
      (["--n", "0"], "--n 0"),
      (["--out", str(foreign)], "is not empty and holds no simulated cohort"),
  ]
  for extra, message in bad:
    args = ["simulate", "--out", str(tmp_path / "new"), "--n", "2", "--resolution", "4"] + extra
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
  assert (foreign / "notes.txt").read_text() == "mine"
  assert not (tmp_path / "new").exists()


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match="unknown cohort config key 'sigma'"):
    simulate.CohortConfig.from_dict({"sigma": 1.0})
  with pytest.raises(ConfigError, match="sigma_brain_age"):
    simulate.CohortConfig(sigma_brain_age=0.0)
  with pytest.raises(DataError, match="subject index 40"):
    simulate.Cohort(simulate.CohortConfig(n=40, resolution_mm=4)).subject(40)
