"""Smoke tests of the benchmark harness (benchmarks/): every script runs at tiny size and writes
JSON with its expected keys, and what the harness compares is the same computation on both
sides: the PyTorch models match the flax models on the same weights, the torch losses match
jax_brainage.models.losses, zennit's relevance matches lrp's, the alternative convolution
lowerings match a numpy convolution, and the roofline's FLOP count matches a hand count.

No timing is asserted (speed is what the scripts report, not what tests check).
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

torch = pytest.importorskip("torch", reason="the PyTorch side of the harness needs torch")

import bench_conv  # noqa: E402
import bench_intervals  # noqa: E402
import bench_pool  # noqa: E402
import bench_stem  # noqa: E402
import bench_roofline  # noqa: E402
import bench_train  # noqa: E402
import torch_models  # noqa: E402
from jax_brainage import models  # noqa: E402
from jax_brainage.models import losses  # noqa: E402

ENV_KEYS = {"benchmark", "date", "device", "platform", "versions"}


def _random_variables(model, x_shape, seed):
  """numpy-drawn variables for `model` (non-zero biases; BatchNorm statistics away from 0/1)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name or "'var'" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 4
    return rng.normal(0, 1 / math.sqrt(fan_in), leaf.shape).astype(np.float32)

  return jax.tree.map_with_path(draw, shapes)


@pytest.mark.parametrize("name,shape,kwargs", [
    ("mrinet", (17, 12, 14), dict(mean_age=47.0)),  # odd/even sides: asymmetric SAME pooling
    ("sfcn", (33, 34, 35), dict(age_range=(40, 60), channels=(4, 8, 8, 8, 8, 4))),
    ("sfcn_regression", (32, 33, 32), dict(channels=(4, 8, 8, 8, 8, 4))),
])
def test_torch_models_match_flax_on_same_weights(name, shape, kwargs):
  model = models.get_model(name, **kwargs)
  x = np.random.default_rng(0).uniform(size=(2, *shape, 2)).astype(np.float32)
  variables = _random_variables(model, x.shape, seed=1)
  expected = np.asarray(jax.jit(model.apply)(variables, x))
  net = torch_models.load_flax_variables(torch_models.from_flax(name, model, shape, 2), variables)
  assert torch_models.num_parameters(net) == models.num_parameters(model, x.shape)
  with torch.no_grad():
    got = net.eval()(torch_models.to_torch_input(x)).numpy()
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_torch_losses_match_project_losses():
  rng = np.random.default_rng(0)
  ages = rng.uniform(20, 60, 5).astype(np.float32)
  centers = np.arange(15, 65, dtype=np.float32) + 0.5
  log_probs = np.asarray(jax.nn.log_softmax(rng.normal(size=(5, 50)).astype(np.float32)))
  kl = torch_models.make_loss("soft_label", centers, 1.5)(torch.tensor(log_probs),
                                                         torch.tensor(ages))
  np.testing.assert_allclose(float(kl), float(losses.soft_label_kl(log_probs, ages, centers, 1.5)),
                             rtol=1e-5)
  pred = rng.normal(40, 10, 5).astype(np.float32)
  mse = torch_models.make_loss("mse")(torch.tensor(pred), torch.tensor(ages))
  np.testing.assert_allclose(float(mse), np.mean((pred - ages) ** 2), rtol=1e-6)


def test_bench_train_tiny(tmp_path):
  out = tmp_path / "train.json"
  status = bench_train.main(["--size", "tiny", "--cases", "mrinet-98", "--dtypes", "float32",
                             "--torch", "eager", "--steps", "1", "--warmup", "1",
                             "--out", str(out)])
  result = json.loads(out.read_text())
  assert status == 0 and ENV_KEYS <= set(result) and result["benchmark"] == "bench_train"
  jax_row, torch_row = result["results"]
  assert (jax_row["framework"], torch_row["framework"]) == ("jax", "torch")
  assert jax_row["params"] == torch_row["params"] == models.num_parameters(
      models.MRInet(), (1, 16, 16, 16, 1))
  for row in (jax_row, torch_row):
    assert row["loss_finite"] and row["volumes_per_second"] > 0 and row["shape"] == [16] * 3
  # the same batch (4 = the fake device count) on both sides
  assert jax_row["batch_size"] == torch_row["batch_size"] == result["batch_size"]
  np.testing.assert_allclose(jax_row["speedup_vs_torch"]["eager"],
                             jax_row["volumes_per_second"] / torch_row["volumes_per_second"])


def _hand_count_mrinet_flops(side: int) -> float:
  """Forward FLOPs (2 per multiply-add) of the study's MRInet on a `side`^3 volume."""
  total, c_in, n = 0.0, 1, side
  for c_out, k in zip(models.mrinet.STUDY_CONV_FEATURES, models.mrinet.STUDY_CONV_KERNELS):
    total += 2.0 * n ** 3 * k ** 3 * c_in * c_out  # SAME: the conv keeps n^3 outputs
    c_in, n = c_out, -(-n // 2)
  return total + 2.0 * (n ** 3 * c_in) * 64 + 2.0 * 64


def test_bench_roofline_tiny(tmp_path):
  out = tmp_path / "roofline.json"
  assert bench_roofline.main(["--size", "tiny", "--cases", "mrinet-98", "--dtypes", "float32",
                              "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert ENV_KEYS <= set(result) and "peak_per_device" in result
  rows = {r["program"]: r for r in result["results"]}
  assert set(rows) == {"forward", "train"}
  forward = _hand_count_mrinet_flops(16)
  assert rows["forward"]["conv_dot_flops_per_volume"] == pytest.approx(forward, rel=1e-9)
  # backward: weight gradients of every layer, input gradients of all but conv1: ~3x forward
  assert 2.5 * forward < rows["train"]["conv_dot_flops_per_volume"] < 3.0 * forward
  for r in rows.values():
    assert r["xla_flops_per_volume"] > 0 and r["xla_bytes_per_volume"] > 0
    assert r["fraction_of_peak_flops"] > 0 and r["bound"] in ("compute", "memory")


def test_peak_table_names():
  assert bench_roofline.device_peak_name("NVIDIA H100 80GB HBM3") == "H100 SXM"
  assert bench_roofline.device_peak_name("NVIDIA H100 PCIe") == "H100 PCIe"
  assert bench_roofline.device_peak_name("NVIDIA H200") == "H200"
  assert bench_roofline.device_peak_name("NVIDIA A100-SXM4-40GB") == "A100 40GB"
  assert bench_roofline.device_peak_name("NVIDIA A100-SXM4-80GB") == "A100 SXM 80GB"
  assert bench_roofline.device_peak_name("cpu") is None


def test_bench_lrp_tiny_agrees_with_zennit(tmp_path):
  import importlib.util

  if importlib.util.find_spec("zennit") is None:
    pytest.skip("zennit is not installed")
  import bench_lrp

  out = tmp_path / "lrp.json"
  # GammaBox (its box bounds) and preset A (built from zennit's rules by the script); all three
  # composites against zennit on small nets: tests/lrp/test_zennit.py.
  bench_lrp.main(["--shape", "16", "--batch-size", "2", "--repeats", "1", "--zennit",
                  "--composites", "EpsilonGammaBox,SequentialPresetA", "--out", str(out)])
  result = json.loads(out.read_text())
  assert ENV_KEYS <= set(result)
  names = {"EpsilonGammaBox", "SequentialPresetA"}
  assert names | {"forward", "gradient"} == set(result["seconds_per_call"])
  assert names | {"gradient"} == set(result["zennit"]["seconds_per_call"])
  for name in names:  # the two libraries explain the same weights with the same rules
    assert result["zennit"]["agreement_with_lrp"][name]["relative_l2"] < 1e-4


def test_bench_pipeline_tiny(tmp_path):
  import bench_pipeline

  out = tmp_path / "pipeline.json"
  # 16^3 and batch 4: the training step compiled by test_bench_train_tiny (build_setup's cache)
  assert bench_pipeline.main(["--shapes", "16", "--subjects", "4", "--batch-size", "4",
                              "--steps", "1", "--warmup", "1", "--workers", "0",
                              "--modes", "host-numpy,device", "--augment", "off",
                              "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  (step,) = result["train_step"]
  assert step["case"] == "mrinet-98" and step["volumes_per_second"] > 0
  assert {r["mode"] for r in result["results"]} == {"host-numpy", "device"}
  for r in result["results"]:
    np.testing.assert_allclose(r["headroom"], r["volumes_per_second"] / step["volumes_per_second"],
                               rtol=1e-2)
    assert r["bottleneck"] == (r["headroom"] < 1)


def _numpy_conv_same(x, w):
  """Direct SAME 3D convolution (cross-correlation, as XLA/torch): x [n, X, Y, Z, ci], w [k, k,
  k, ci, co]."""
  k = w.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, k - 1 - p), (p, k - 1 - p), (p, k - 1 - p), (0, 0)))
  n, sx, sy, sz, _ = x.shape
  out = np.zeros((n, sx, sy, sz, w.shape[-1]))
  for i, j, l in itertools.product(range(k), repeat=3):
    out += xp[:, i:i + sx, j:j + sy, l:l + sz] @ w[i, j, l]
  return out


@pytest.mark.parametrize("name", sorted(bench_conv.LOWERINGS))
def test_conv_lowerings_match_numpy(name):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 5, 7, 3))
  w = rng.normal(size=(3, 3, 3, 3, 4)) / 9
  expected = _numpy_conv_same(x, w)
  got = np.asarray(jax.jit(bench_conv.LOWERINGS[name])(jnp.asarray(x, jnp.float32),
                                                      jnp.asarray(w, jnp.float32)))
  tol = 5e-2 if name == "xla_bf16" else 1e-4
  np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


def test_bench_conv_tiny(tmp_path):
  out = tmp_path / "conv.json"
  assert bench_conv.main(["--side", "8", "--batch-size", "1", "--channels", "4", "--repeats",
                          "1", "--lowerings", "im2col_z", "--parts", "layer,mrinet",
                          "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert ENV_KEYS <= set(result)
  assert {"torch", "torch_cl", "im2col_z"} == set(result["layer"]["seconds"])
  assert {"flax", "torch", "torch_cl", "im2col_z"} == set(result["mrinet"]["seconds"])
  # MRInet through every lowering gives the flax model's age (years)
  for name, diff in result["mrinet"]["max_abs_diff_vs_flax_years"].items():
    assert diff < 1e-3, name


def test_bench_pool_tiny_gradients_agree(tmp_path):
  out = tmp_path / "pool.json"
  assert bench_pool.main(["--side", "8", "--batch-size", "1", "--repeats", "1",
                          "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert ENV_KEYS <= set(result)
  assert [r["shape"] for r in result["pools"]] == [[1, 8, 8, 8, 8], [1, 4, 4, 4, 16]]
  assert all(r["max_abs_diff"] < 1e-5 for r in result["pools"])
  assert {r["net"] for r in result["steps"]} == set(bench_pool.NETS)
  assert all(r["max_abs_grad_diff"] < 1e-4 for r in result["steps"])


def test_bench_pool_box_shape(tmp_path):
  out = tmp_path / "pool.json"
  assert bench_pool.main(["--shape", "8,10,6", "--batch-size", "1", "--repeats", "1",
                          "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["shape"] == [8, 10, 6]
  assert [r["shape"] for r in result["pools"]] == [[1, 8, 10, 6, 8], [1, 4, 5, 3, 16]]
  assert all(r["max_abs_grad_diff"] < 1e-4 for r in result["steps"])


def test_bench_stem_tiny_lowerings_agree(tmp_path):
  out = tmp_path / "stem.json"
  assert bench_stem.main(["--shape", "8,10,8", "--batch-size", "1", "--repeats", "1",
                          "--stems", "2", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert ENV_KEYS <= set(result)
  assert [r["case"] for r in result["rows"]] == ["block 1", "stem 2, s2d",
                                                 "stem 2, strided conv"]
  # the stem replaces block 1's 3^3 x 3 x 8 kernel by a 2^3 x 3 x 8 one (+ the same bias)
  block, s2d, xla = (r["num_params"] for r in result["rows"])
  assert block - s2d == (27 - 8) * 3 * 8 and s2d == xla
  assert all(r["max_rel_grad_diff_s2d_vs_strided"] < 1e-4 for r in result["rows"][1:])
  with pytest.raises(SystemExit):
    bench_stem.main(["--stems", "1"])


def test_run_all_is_valid_bash():
  subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "run_all.sh")], check=True)


def test_bench_intervals_study_methods_cover_exchangeable_synthetic_scans():
  """Every method the interval study compares targets >= 90% on exchangeable scans: on 600
  synthetic validation scans (error SD growing with age) each one's mean coverage over 20 random
  halves is 0.90-0.94 (mondrian's bins of 30: 28/31 = 0.903 analytic; smooth: 0.9004 + O(1/n))."""
  rng = np.random.default_rng(0)
  age = rng.uniform(20, 80, 600)
  residual = (1 + (age - 20) / 20) * rng.standard_normal(600) - 0.3 * (age - 50)
  result = bench_intervals.study(age, residual, 0.9, repeats=20)
  assert set(result) == set(bench_intervals.variants(0.9))
  for name, row in result.items():
    assert 0.88 <= row["coverage"] <= 0.945, (name, row["coverage"])
    assert len(row["mean_decile_coverage"]) == 10 and row["width"] > 0
