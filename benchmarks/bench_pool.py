"""Max-pooling's gradient: XLA's `select_and_scatter` against the separable gradient of
`jax_brainage.models.lowering.max_pool` (the `im2col` / CPU `auto` lowering).

Two measurements, float32, median of --repeats calls after a warm-up:
1. the gradient of one 3^3 stride-2 SAME pool (MRInet's) at the shapes MRInet's first two
   pools see: `[batch, X, Y, Z, 8]` and `[batch, X/2, Y/2, Z/2, 16]` (a cube of --side, or the
   box --shape X,Y,Z);
2. a whole MRInet loss gradient (im2col convolutions, 3 input channels) with each pool
   gradient, for the cpu preset's widths and the narrow (8, 8, 16, 16, 8) net.
Every row is checked: gradients agree with XLA's to float rounding (ReLU'd inputs).

  python benchmarks/bench_pool.py                        # the cpu preset's 50^3, batch 4
  python benchmarks/bench_pool.py --side 98 --batch-size 2 --out pool.json
  python benchmarks/bench_pool.py --shape 40,50,40       # the cpu preset's box
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from jax_brainage.models import lowering  # noqa: E402
from jax_brainage.models.mrinet import MRInet  # noqa: E402

NETS = {"preset": ((8, 16, 32, 64, 32), 64), "narrow": ((8, 8, 16, 16, 8), 16)}


def _time(fn, args, repeats: int) -> float:
  seconds, _ = common.median_seconds(lambda: fn(*args), jax.block_until_ready, steps=repeats,
                                     warmup=1)
  return seconds


def bench_pools(shape: tuple[int, int, int], batch: int, repeats: int) -> list[dict]:
  rows = []
  rng = np.random.default_rng(0)
  for s, c in ((shape, 8), (tuple(-(-n // 2) for n in shape), 16)):
    x = jnp.asarray(np.maximum(rng.normal(size=(batch, *s, c)), 0), jnp.float32)
    grads = {name: jax.jit(jax.grad(lambda v, name=name: jnp.sum(
        lowering.max_pool(v, (3, 3, 3), (2, 2, 2), "SAME", name) ** 2)))
             for name in ("xla", "im2col")}
    diff = float(jnp.abs(grads["xla"](x) - grads["im2col"](x)).max())
    seconds = {name: _time(g, (x,), repeats) for name, g in grads.items()}
    rows.append({"shape": list(x.shape), "seconds": seconds, "max_abs_diff": diff,
                 "speedup": seconds["xla"] / seconds["im2col"]})
  return rows


def bench_steps(shape: tuple[int, int, int], batch: int, repeats: int) -> list[dict]:
  rows = []
  x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, *shape, 3)), jnp.float32)
  for net, (features, dense) in NETS.items():
    model = MRInet(conv_features=features, dense_features=dense, dropout_rate=0.0,
                   conv_lowering="im2col")
    variables = model.init(jax.random.key(0), x[:1])
    separable = jax.jit(jax.grad(lambda v: jnp.mean(model.apply(v, x) ** 2)))
    # The same program with XLA's pooling gradient: swap the pool for the xla lowering's.
    pool = lowering.max_pool
    lowering.max_pool = lambda v, w, s, p, _lowering: pool(v, w, s, p, "xla")
    try:
      xla = jax.jit(jax.grad(lambda v: jnp.mean(model.apply(v, x) ** 2)))
      xla_grads = xla(variables)
    finally:
      lowering.max_pool = pool
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(xla_grads), jax.tree.leaves(separable(variables))))
    seconds = {"xla": _time(xla, (variables,), repeats),
               "im2col": _time(separable, (variables,), repeats)}
    rows.append({"net": net, "conv_features": list(features), "dense_features": dense,
                 "seconds": seconds, "max_abs_grad_diff": diff,
                 "speedup": seconds["xla"] / seconds["im2col"]})
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--side", type=int, default=50, help="cube side (voxels)")
  parser.add_argument("--shape", help="box X,Y,Z (voxels) instead of the --side cube")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", help="write results as JSON here")
  args = parser.parse_args(argv)
  shape = (args.side,) * 3
  if args.shape:
    try:
      shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
      shape = ()
    if len(shape) != 3 or min(shape) < 1:
      parser.error(f"--shape must be X,Y,Z (positive voxel counts), got {args.shape!r}")
  result = {**common.environment("jax", "flax"), "benchmark": "pool",
            "shape": list(shape), "batch_size": args.batch_size,
            "pools": bench_pools(shape, args.batch_size, args.repeats),
            "steps": bench_steps(shape, args.batch_size, args.repeats)}
  print("| input | XLA select_and_scatter ms | separable ms | speedup |")
  for r in result["pools"]:
    print(f"| {'x'.join(map(str, r['shape']))} | {1e3 * r['seconds']['xla']:.1f} | "
          f"{1e3 * r['seconds']['im2col']:.1f} | {r['speedup']:.2f}x |")
  print("| MRInet gradient | XLA pool gradient ms | separable ms | speedup |")
  for r in result["steps"]:
    print(f"| {r['net']} {tuple(r['conv_features'])} | {1e3 * r['seconds']['xla']:.1f} | "
          f"{1e3 * r['seconds']['im2col']:.1f} | {r['speedup']:.2f}x |")
  common.write_result(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
