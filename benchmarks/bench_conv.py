"""3D convolution on CPU (and any device): XLA against PyTorch, and other lowerings of the same
convolution for inference (issue 8, section 3).

Two measurements, forward only (what `brainage predict` and `explain` run on a laptop):
1. one layer, the issue's case: conv 3^3 SAME, 16 -> 16 channels on `[4, 64, 64, 64, 16]`;
2. the whole MRInet forward pass at 64^3, batch 4 (same weights in every row);
3. MRInet's five convolutions one by one, at the shapes they see in the network (where the
   time goes, per lowering).
Rows (each checked against the flax/XLA output, max abs difference reported):
- `xla`: `lax.conv_general_dilated` as flax calls it (NDHWC input, DHWIO kernel);
- `xla_ncdhw`: the same convolution with channels-first dimension numbers (NCDHW / OIDHW);
- `xla_bf16`: bfloat16 input and kernel, float32 accumulation and output;
- `shift_matmul`: the convolution as a sum over the k^3 kernel taps of
  shifted-input @ kernel-tap matmuls (`[voxels, C_in] @ [C_in, C_out]`), no patch tensor;
- `im2col_z`: the 3 taps along z concatenated into channels (K = 3 C_in), then k^2 matmuls;
- `im2col`: the full patch matrix per volume (`[voxels, k^3 C_in] @ [k^3 C_in, C_out]`, one
  volume at a time to bound memory);
- `torch` / `torch_cl`: `torch.nn.functional.conv3d` contiguous (NCDHW) and channels_last_3d;
for MRInet also `torch` (the PyTorch MRInet of torch_models.py, eager, no_grad).
Median of --repeats calls after a warm-up call; the ratio column is time / torch's time.

  python benchmarks/bench_conv.py                                  # issue's sizes
  python benchmarks/bench_conv.py --side 32 --batch-size 2 --repeats 3 --out conv.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

_DN_NDHWC = ("NDHWC", "DHWIO", "NDHWC")
_DN_NCDHW = ("NCDHW", "OIDHW", "NCDHW")


def conv_xla(x: jax.Array, w: jax.Array) -> jax.Array:
  """SAME, stride 1. x `[batch, x, y, z, c_in]`, w `[k, k, k, c_in, c_out]` -> `[batch, x, y, z,
  c_out]` (as flax.linen.Conv, without bias)."""
  return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=_DN_NDHWC)


def conv_xla_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
  """conv_xla on bfloat16 operands with float32 accumulation (float32 output)."""
  return jax.lax.conv_general_dilated(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1, 1), "SAME",
      dimension_numbers=_DN_NDHWC, preferred_element_type=jnp.float32)


def conv_xla_ncdhw(x: jax.Array, w: jax.Array) -> jax.Array:
  """conv_xla with channels-first dimension numbers inside (transposes at both ends)."""
  y = jax.lax.conv_general_dilated(jnp.moveaxis(x, -1, 1), jnp.transpose(w, (4, 3, 0, 1, 2)),
                                   (1, 1, 1), "SAME", dimension_numbers=_DN_NCDHW)
  return jnp.moveaxis(y, 1, -1)


def _pad_same(x: jax.Array, k: int) -> jax.Array:
  p = k // 2
  return jnp.pad(x, ((0, 0), (p, k - 1 - p), (p, k - 1 - p), (p, k - 1 - p), (0, 0)))


def conv_shift_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """conv_xla as a sum over the k^3 taps of (shifted input) @ (tap's `[c_in, c_out]` matrix)."""
  k = w.shape[0]
  n, sx, sy, sz, _ = x.shape
  xp = _pad_same(x, k)
  out = jnp.zeros((n, sx, sy, sz, w.shape[-1]), jnp.float32)
  for i, j, l in itertools.product(range(k), repeat=3):
    out = out + jnp.einsum("nxyzc,co->nxyzo", xp[:, i:i + sx, j:j + sy, l:l + sz], w[i, j, l])
  return out


def conv_im2col_z(x: jax.Array, w: jax.Array) -> jax.Array:
  """conv_xla with the k taps along z concatenated into channels, then k^2 matmuls."""
  k = w.shape[0]
  n, sx, sy, sz, c = x.shape
  xp = _pad_same(x, k)
  zcat = jnp.concatenate([xp[:, :, :, l:l + sz] for l in range(k)], axis=-1)
  wz = w.reshape(k, k, k * c, w.shape[-1])  # [kx, ky, (kz, c_in), c_out]
  out = jnp.zeros((n, sx, sy, sz, w.shape[-1]), jnp.float32)
  for i, j in itertools.product(range(k), repeat=2):
    out = out + jnp.einsum("nxyzc,co->nxyzo", zcat[:, i:i + sx, j:j + sy], wz[i, j])
  return out


def conv_im2col(x: jax.Array, w: jax.Array) -> jax.Array:
  """conv_xla as one `[voxels, k^3 c_in] @ [k^3 c_in, c_out]` matmul per volume."""
  k = w.shape[0]
  _, sx, sy, sz, c = x.shape
  wm = w.reshape(k ** 3 * c, w.shape[-1])

  def one(v):
    vp = _pad_same(v[None], k)[0]
    patches = jnp.concatenate([vp[i:i + sx, j:j + sy, l:l + sz]
                               for i, j, l in itertools.product(range(k), repeat=3)], axis=-1)
    return patches @ wm

  return jax.lax.map(one, x)


LOWERINGS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "xla": conv_xla, "xla_ncdhw": conv_xla_ncdhw, "xla_bf16": conv_xla_bf16,
    "shift_matmul": conv_shift_matmul, "im2col_z": conv_im2col_z, "im2col": conv_im2col,
}


def _as_last_axis(b: jax.Array, ndim: int) -> jax.Array:
  """`[c]` -> `[1, ..., 1, c]` of rank `ndim` (explicit broadcasting)."""
  return b.reshape((1,) * (ndim - 1) + b.shape)


def mrinet_forward(conv: Callable, params: dict[str, Any], x: jax.Array) -> jax.Array:
  """MRInet's inference forward pass (eval: no dropout) with `conv` for every convolution:
  `[batch, x, y, z, c]` -> age `[batch]` (years). The same computation as
  `jax_brainage.models.MRInet.apply` (checked against it in the benchmark's output)."""
  h = x
  for i in range(1, 6):
    p = params[f"conv{i}"]
    h = conv(h, p["kernel"]) + _as_last_axis(p["bias"], h.ndim)
    h = jax.nn.relu(h)
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 3, 3, 3, 1), (1, 2, 2, 2, 1), "SAME")
  h = h.reshape(h.shape[0], -1)
  h = jax.nn.relu(h @ params["dense1"]["kernel"] + params["dense1"]["bias"][None])
  return (h @ params["age_head"]["kernel"] + params["age_head"]["bias"][None])[:, 0]


def _timed(fn, repeats: int) -> float:
  median, _ = common.median_seconds(fn, jax.block_until_ready, steps=repeats, warmup=1)
  return median


def _torch_timed(fn, repeats: int) -> float:
  import torch

  with torch.no_grad():
    median, _ = common.median_seconds(fn, lambda _: None, steps=repeats, warmup=1)
  return median


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--side", type=int, default=64, help="cube side (voxels)")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--channels", type=int, default=16, help="layer test: C_in = C_out")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--lowerings", default=",".join(LOWERINGS))
  parser.add_argument("--parts", default="layer,mrinet,layers",
                      help="comma list: layer (the issue's conv), mrinet (whole forward), "
                           "layers (MRInet's convs one by one)")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)

  import torch
  import torch.nn.functional as F

  import torch_models

  names = [n for n in args.lowerings.split(",") if n]
  rng = np.random.default_rng(0)
  n, s, c = args.batch_size, args.side, args.channels
  result: dict[str, Any] = {"benchmark": "bench_conv", **common.environment("torch"),
                            "torch_threads": torch.get_num_threads(), "side": s,
                            "batch_size": n, "repeats": args.repeats}
  parts = args.parts.split(",")
  if "layer" in parts:
    x = rng.standard_normal((n, s, s, s, c), dtype=np.float32)
    w = (rng.standard_normal((3, 3, 3, c, c)) / np.sqrt(27 * c)).astype(np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    ref = np.asarray(jax.jit(conv_xla)(xj, wj))
    xt = torch_models.to_torch_input(x)
    wt = torch.from_numpy(np.array(w.transpose(4, 3, 0, 1, 2)))
    rows = {"torch": _torch_timed(lambda: F.conv3d(xt, wt, padding=1), args.repeats)}
    xcl = xt.to(memory_format=torch.channels_last_3d)
    wcl = wt.to(memory_format=torch.channels_last_3d)
    rows["torch_cl"] = _torch_timed(lambda: F.conv3d(xcl, wcl, padding=1), args.repeats)
    diffs = {}
    for name in names:
      fn = jax.jit(LOWERINGS[name])
      rows[name] = _timed(lambda fn=fn: fn(xj, wj), args.repeats)
      diffs[name] = float(np.abs(np.asarray(fn(xj, wj)) - ref).max())
    flops = 2.0 * n * s ** 3 * 27 * c * c
    print(f"conv 3^3 SAME {c}->{c} on [{n}, {s}^3, {c}], forward, median of {args.repeats}")
    print(f"{'lowering':<14}{'s/call':>10}{'GFLOP/s':>10}{'x torch':>9}{'max |diff|':>12}")
    for name, t in rows.items():
      print(f"{name:<14}{t:>10.4f}{flops / t / 1e9:>10.2f}{t / rows['torch']:>9.2f}"
            f"{diffs.get(name, float('nan')):>12.2e}", flush=True)
    result["layer"] = {"shape": [n, s, s, s, c], "flops": flops, "seconds": rows,
                       "ratio_to_torch": {k: v / rows["torch"] for k, v in rows.items()},
                       "max_abs_diff_vs_xla": diffs}
  if "mrinet" in parts:
    from jax_brainage.models import MRInet

    model = MRInet(mean_age=0.0)  # output = the network's own value: differences visible
    x = rng.random((n, s, s, s, 1), dtype=np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    # Non-zero biases (the init's are 0), so that every layer's bias handling is compared too.
    variables = jax.tree.map_with_path(
        lambda path, v: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['bias']") else v, jax.device_get(variables))
    apply = jax.jit(model.apply)
    ref = np.asarray(apply(variables, x))
    rows = {"flax": _timed(lambda: apply(variables, x), args.repeats)}
    net = torch_models.load_flax_variables(
        torch_models.from_flax("mrinet", model, (s, s, s)), variables).eval()
    xt = torch_models.to_torch_input(x)
    rows["torch"] = _torch_timed(lambda: net(xt), args.repeats)
    with torch.no_grad():
      diffs = {"torch": float(np.abs(net(xt).numpy() - ref).max())}
    net_cl = net.to(memory_format=torch.channels_last_3d)
    xcl = xt.to(memory_format=torch.channels_last_3d)
    rows["torch_cl"] = _torch_timed(lambda: net_cl(xcl), args.repeats)
    for name in names:
      fn = jax.jit(lambda p, u, conv=LOWERINGS[name]: mrinet_forward(conv, p, u))
      rows[name] = _timed(lambda fn=fn: fn(variables["params"], x), args.repeats)
      diffs[name] = float(np.abs(np.asarray(fn(variables["params"], x)) - ref).max())
    print(f"MRInet forward (inference) at {s}^3, batch {n}, median of {args.repeats}")
    print(f"{'lowering':<14}{'s/call':>10}{'volumes/s':>11}{'x torch':>9}{'max |diff| y':>14}")
    for name, t in rows.items():
      print(f"{name:<14}{t:>10.4f}{n / t:>11.2f}{t / rows['torch']:>9.2f}"
            f"{diffs.get(name, 0.0):>14.2e}", flush=True)
    result["mrinet"] = {"shape": [n, s, s, s, 1], "seconds": rows,
                        "volumes_per_second": {k: n / v for k, v in rows.items()},
                        "ratio_to_torch": {k: v / rows["torch"] for k, v in rows.items()},
                        "max_abs_diff_vs_flax_years": diffs}
  if "layers" in parts:
    # MRInet's convolutions one by one, at the shapes they see in the network at --side.
    from jax_brainage.models import mrinet as mrinet_lib

    side, c_in, layer_rows = s, 1, []
    print(f"MRInet's convolutions at {s}^3, batch {n}: seconds per forward call (x torch)")
    print(f"{'layer':<7}{'input':>22}{'k':>3}" + "".join(f"{k:>16}" for k in
                                                          ["torch", "torch_cl", *names]))
    for i, (c_out, k) in enumerate(zip(mrinet_lib.STUDY_CONV_FEATURES,
                                       mrinet_lib.STUDY_CONV_KERNELS), start=1):
      x = rng.random((n, side, side, side, c_in), dtype=np.float32)
      w = (rng.standard_normal((k, k, k, c_in, c_out)) / np.sqrt(k ** 3 * c_in)).astype(np.float32)
      xj, wj = jnp.asarray(x), jnp.asarray(w)
      xt = torch_models.to_torch_input(x)
      wt = torch.from_numpy(np.array(w.transpose(4, 3, 0, 1, 2)))
      xcl, wcl = (u.to(memory_format=torch.channels_last_3d) for u in (xt, wt))
      times = {"torch": _torch_timed(lambda: F.conv3d(xt, wt, padding=k // 2), args.repeats),
               "torch_cl": _torch_timed(lambda: F.conv3d(xcl, wcl, padding=k // 2),
                                        args.repeats)}
      for name in names:
        fn = jax.jit(LOWERINGS[name])
        times[name] = _timed(lambda fn=fn: fn(xj, wj), args.repeats)
      layer_rows.append({"layer": f"conv{i}", "input": [n, side, side, side, c_in],
                         "kernel": k, "c_out": c_out, "seconds": times})
      print(f"{'conv' + str(i):<7}{str([n, side, side, side, c_in]):>22}{k:>3}" + "".join(
          f"{t:>9.4f} ({t / times['torch']:>4.1f})" for t in times.values()), flush=True)
      side, c_in = -(-side // 2), c_out
    result["mrinet_layers"] = layer_rows
  common.write_result(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
