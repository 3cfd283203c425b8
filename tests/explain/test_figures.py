"""explain.figures: colour-map endpoints, symmetric clipping, overlay blending, panel orientation,
PNG files and TensorBoard images (the glass brain is checked in test_command)."""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pytest

from jax_brainage.explain import figures


def test_colour_map_endpoints_and_halves():
  cmap = figures.relevance_cmap()
  np.testing.assert_allclose(cmap(0.0)[:3], (0, 1, 1), atol=1e-3)   # most negative: cyan
  np.testing.assert_allclose(cmap(0.5)[:3], (0, 0, 0), atol=5e-3)   # zero: black
  np.testing.assert_allclose(cmap(1.0)[:3], (1, 1, 0), atol=1e-3)   # most positive: yellow
  rgb = figures.colorize(np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0, -3.0]))
  np.testing.assert_allclose(rgb, [(0, 1, 1), (0, 0, 1), (0, 0, 0), (1, 0, 0), (1, 1, 0),
                                   (1, 1, 0), (0, 1, 1)])
  pos = figures.colorize(np.linspace(0, 1, 50))
  neg = figures.colorize(-np.linspace(0, 1, 50))
  assert np.all(np.diff(pos[:, 0]) >= 0) and np.all(pos[:, 2] == 0)  # black -> red -> yellow
  assert np.all(np.diff(neg[:, 2] + neg[:, 1]) >= 0) and np.all(neg[:, 0] == 0)  # blue, cyan
  # The matplotlib map and the numpy one agree everywhere.
  t = np.linspace(-1, 1, 21)
  # (matplotlib looks up a 512-entry table: steps of 1/511)
  np.testing.assert_allclose(cmap((t + 1) / 2)[:, :3], figures.colorize(t), atol=1e-2)


def test_symmetric_limit_and_overlay():
  rng = np.random.default_rng(0)
  rel = rng.normal(size=(10, 10, 10))
  rel[rel < 0.3] = 0
  a = np.abs(rel[rel != 0])
  assert figures.symmetric_limit(rel, 90) == pytest.approx(np.percentile(a, 90))
  assert figures.symmetric_limit(np.zeros(3)) == 1.0
  anatomy = np.array([[0.0, 50.0, 100.0, 100.0, 100.0]])
  r = np.array([[0.0, 0.0, 2.0, -2.0, 9.0]])
  rgb = figures.overlay(anatomy, r, limit=2.0)
  np.testing.assert_allclose(rgb[0, 0], (0, 0, 0))
  np.testing.assert_allclose(rgb[0, 1], (0.5, 0.5, 0.5))   # no relevance: the anatomy
  np.testing.assert_allclose(rgb[0, 2], (1, 1, 0))          # at +limit: pure colour
  np.testing.assert_allclose(rgb[0, 3], (0, 1, 1))          # at -limit
  np.testing.assert_allclose(rgb[0, 4], (1, 1, 0))          # clipped beyond the limit


def test_montage_orientation_and_png(tmp_path):
  anatomy = np.zeros((10, 12, 8), np.float32)
  anatomy[1:9, 1:11, 1:7] = 1.0
  rel = np.zeros_like(anatomy)
  x, y, z = 7, 9, 4
  rel[x, y, z] = 1.0
  rgb, limit = figures.montage_rgb(anatomy, rel, views=("axial",), n_slices=1, limit=1.0)
  assert limit == 1.0 and figures.slice_positions(anatomy, "axial", 1) == [4]
  assert rgb.shape == (12, 12, 3)
  # Axial panel: rows are y with anterior (high y) at the top, columns x (right on the right).
  hot = np.argwhere(np.all(np.isclose(rgb, (1, 1, 0)), axis=-1))
  np.testing.assert_array_equal(hot, [[12 - 1 - y, x]])
  rgb, _ = figures.montage_rgb(anatomy, rel, views=("sagittal",), n_slices=1, limit=1.0)
  assert figures.slice_positions(anatomy, "sagittal", 1) == [4]  # x = 4: no hot voxel
  assert not np.any(np.all(np.isclose(rgb, (1, 1, 0)), axis=-1))
  path = tmp_path / "m.png"
  used = figures.save_montage(path, anatomy, rel, title="t", n_slices=3)
  assert used == pytest.approx(1.0)
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 100
  assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temporary left behind


def test_tensorboard_rgb_image(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  from jax_brainage.train.summary import SummaryWriter

  rng = np.random.default_rng(0)
  rgb = rng.random((9, 14, 3))
  writer = SummaryWriter(tmp_path, enabled=True)
  figures.write_tensorboard_image(writer, 3, "relevance/x", rgb)
  writer.close()
  acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
  acc.Reload()
  (event,) = acc.Images("relevance/x")
  assert (event.step, event.height, event.width) == (3, 9, 14)
  decoded = matplotlib.image.imread(io.BytesIO(event.encoded_image_string), format="png")
  np.testing.assert_allclose(decoded[..., :3], rgb, atol=1 / 255 + 1e-6)
  figures.write_tensorboard_image(SummaryWriter(tmp_path / "off", enabled=False), 0, "t", rgb)
  assert not (tmp_path / "off").exists()


def test_stat_map_figure_cuts_in_mm_and_png(tmp_path):
  """Cuts are world coordinates (mm, nibabel's affine) through the brain; the PNG is drawn."""
  import matplotlib.image
  import nibabel as nib
  from nibabel.affines import apply_affine

  from jax_brainage.data import nifti
  from jax_brainage.explain import maps

  affine = np.array([[-4.0, 0, 0, 60], [0, 4.0, 0, -80], [0, 0, 4.0, -40], [0, 0, 0, 1]])
  anatomy = np.zeros((24, 28, 22), np.float32)
  anatomy[5:19, 6:22, 4:18] = 1.0  # the "brain"
  relevance = np.zeros_like(anatomy)
  relevance[8:12, 10:14, 8:12] = 0.02
  relevance[14:16, 16:18, 12:14] = -0.01
  for axis in range(3):
    cuts = figures.world_cuts(anatomy, affine, axis, 4)
    ends = apply_affine(affine, np.array([[5, 6, 4], [18, 21, 17]]))[:, axis]
    assert len(cuts) == 4 and all(min(ends) < c < max(ends) for c in cuts), (axis, cuts)
  image = maps.relevance_image(relevance, affine, "epsilon_plus_flat")
  path = tmp_path / "map.png"
  limit = figures.save_stat_map(path, image, nifti.make_image(anatomy, affine),
                                title="sub-01, T1w", n_cuts=3)
  assert limit == pytest.approx(figures.symmetric_limit(relevance))
  pixels = matplotlib.image.imread(path)[..., :3]
  assert pixels.shape[0] > 300 and pixels.shape[1] > 500
  assert ((pixels[..., 0] > 0.8) & (pixels[..., 2] < 0.3)).any()  # positive: red-yellow
  assert ((pixels[..., 2] > 0.8) & (pixels[..., 0] < 0.3)).any()  # negative: blue-cyan
  header = nib.Nifti1Image.from_bytes(image.to_bytes()).header
  assert header.get_xyzt_units()[0] == "mm" and header.get_intent()[0] == "estimate"


def test_ranked_region_bars(tmp_path):
  """Ranking by mean positive - negative relevance, one row per region of the chosen model."""
  import matplotlib.image

  from jax_brainage import plots
  from jax_brainage.explain import regions

  subject = [{"participant_id": f"s{i}", "model": model, "sequence": "all", "label": k,
              "region": name, "voxels": 10, "sum": 0.0, "mean": 0.0,
              "positive": pos * (1 + i), "negative": neg, "positive_fraction": 0.1}
             for i in range(3) for model in ("ensemble", "allm0")
             for k, (name, pos, neg) in enumerate([("a", 0.1, -0.1), ("b", 0.5, -0.05),
                                                   ("c", 0.2, -0.6)])]
  grouped = regions.group_rows(subject, {("all", "all"): ["s0", "s1", "s2"]})
  ranked = regions.ranked_regions(grouped, model="ensemble", sequence="all")
  assert [r["region"] for r in ranked] == ["b", "c", "a"]  # 1.0+0.05, 0.4+0.6, 0.2+0.1
  assert ranked[0]["positive_mean"] == pytest.approx(np.mean([0.5, 1.0, 1.5]))
  assert ranked[0]["positive_sd"] == pytest.approx(np.std([0.5, 1.0, 1.5], ddof=1))
  path = tmp_path / "bars.png"
  plots.region_bars(path, [r["region"] for r in ranked],
                    np.array([r["positive_mean"] for r in ranked]),
                    np.array([r["positive_sd"] for r in ranked]),
                    np.array([r["negative_mean"] for r in ranked]),
                    np.array([r["negative_sd"] for r in ranked]), title="regions")
  assert matplotlib.image.imread(path).std() > 0.05
