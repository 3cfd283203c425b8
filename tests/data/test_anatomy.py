"""Template anatomy and atlas of the simulated cohort, checked against nilearn's maps and MNI
anatomy (coordinates in mm)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from jax_brainage.data import anatomy as anatomy_lib
from jax_brainage.errors import ConfigError


@pytest.fixture(scope="module")
def anat():
  return anatomy_lib.load_anatomy(4)


def _mni(anat, mask):
  """MNI coordinates (mm) `[n, 3]` of the voxels in `mask`."""
  ijk = np.argwhere(mask)
  return ijk * anat.resolution_mm + anat.affine[:3, 3]


def test_tissue_maps_match_nilearn(anat):
  from nilearn import datasets

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    gm = datasets.load_mni152_gm_template(resolution=4)
    wm = datasets.load_mni152_wm_template(resolution=4).get_fdata()
    mask = datasets.load_mni152_brain_mask(resolution=4).get_fdata() > 0.5
  np.testing.assert_allclose(anat.affine, gm.affine)
  gm = gm.get_fdata()
  # Where GM + WM <= 1 inside the mask the maps are nilearn's, and CSF = mask - GM - WM.
  ok = mask & (gm + wm <= 1)
  np.testing.assert_allclose(anat.gm[ok], gm[ok], atol=1e-5)
  np.testing.assert_allclose(anat.wm[ok], wm[ok], atol=1e-5)
  np.testing.assert_allclose(anat.csf[ok], np.clip(1 - gm - wm, 0, 1)[ok], atol=1e-5)
  np.testing.assert_array_equal(anat.brain > 0.5, mask)
  total = anat.gm + anat.wm + anat.csf
  np.testing.assert_allclose(total, mask.astype(np.float32), atol=1e-5)
  assert anat.gm.min() >= 0 and anat.wm.min() >= 0 and anat.csf.min() >= 0


def test_atlas_partitions_the_brain(anat):
  labels = anat.atlas.labels
  brain = anat.brain > 0.5
  assert np.all(labels[~brain] == 0)
  assert np.all(labels[brain] > 0)
  assert set(np.unique(labels[brain]).tolist()) == set(anat.atlas.table)
  regions = [anat.atlas.region_mask(r) for r in anatomy_lib.REGIONS]
  np.testing.assert_array_equal(sum(m.astype(int) for m in regions), brain.astype(int))
  coarse = anat.atlas.region_labels()
  for value, mask in enumerate(regions, start=1):
    np.testing.assert_array_equal(coarse == value, mask)
  rows = [line.split("\t") for line in anat.atlas.table_tsv().strip().split("\n")]
  assert rows[0] == ["index", "name", "region", "lobe"]
  assert {int(r[0]) for r in rows[1:]} == set(anat.atlas.table)
  with pytest.raises(ConfigError, match="unknown atlas region 'limbic'"):
    anat.atlas.region_mask("limbic")


def test_structures_are_where_anatomy_puts_them(anat):
  vv = anat.voxel_volume_ml
  vent = _mni(anat, anat.ventricles)
  assert 10 < len(vent) * vv < 60  # ml; young-adult lateral ventricles
  assert (vent[:, 0] < 0).sum() > 0.3 * len(vent) and (vent[:, 0] > 0).sum() > 0.3 * len(vent)
  assert np.all(np.abs(vent[:, 0]) < 35) and -30 < vent[:, 1].mean() < 10
  assert 0 < vent[:, 2].mean() < 30
  lent = _mni(anat, anat.atlas.labels == 8)
  assert np.all((np.abs(lent[:, 0]) > 10) & (np.abs(lent[:, 0]) < 35))
  assert np.all(np.abs(lent[:, 1] - 2) <= 18) and np.all(np.abs(lent[:, 2]) <= 13)
  # Deep grey nuclei are grey matter on the template.
  assert anat.gm[anat.atlas.labels == 8].mean() > 0.5
  cereb = _mni(anat, anat.atlas.labels == 11)
  assert np.all(cereb[:, 1] < -40) and np.all(cereb[:, 2] < -8)
  assert 80 < len(cereb) * vv < 300
  frontal = _mni(anat, anat.atlas.labels == 1)
  occipital = _mni(anat, anat.atlas.labels == 4)
  assert frontal[:, 1].mean() > 10 and occipital[:, 1].mean() < -75
  # Cortex labels hold grey matter and CSF, white-matter labels white matter.
  cortex = anat.atlas.region_mask("cortical")
  assert anat.gm[cortex].mean() > anat.wm[cortex].mean()
  assert anat.wm[np.isin(anat.atlas.labels, [5, 6])].mean() > 0.6
  # Periventricular WM is white matter close to the ventricles.
  dist = ndimage.distance_transform_edt(~anat.ventricles, sampling=anat.resolution_mm)
  assert np.all(dist[anat.periventricular_wm] <= anatomy_lib.PERIVENTRICULAR_MM)
  assert np.all(anat.wm[anat.periventricular_wm] > anat.gm[anat.periventricular_wm])


def test_ventricle_field_points_outward_and_vanishes_far_away(anat):
  field = anat.ventricle_field
  dist = ndimage.distance_transform_edt(~anat.ventricles, sampling=anat.resolution_mm)
  grad = np.stack(np.gradient(dist, anat.resolution_mm))
  shell = (dist > 0) & (dist <= 12) & (anat.brain > 0.5)
  cos = (field * grad).sum(0)[shell]
  assert np.mean(cos > 0) > 0.9  # outward: along increasing distance from the ventricles
  assert np.all(field[:, dist > anatomy_lib.VENTRICLE_REACH_MM] == 0)
  assert np.all(field[:, anat.brain < 0.5] == 0)
  assert np.abs(field).max() <= 1.0 + 1e-6


def test_bad_resolution_is_a_config_error():
  with pytest.raises(ConfigError, match="resolution_mm=5"):
    anatomy_lib.load_anatomy(5)
