"""MRInet's first block on a CPU: the study's full-resolution conv 3^3 + max-pool against a
patch stem (`model.patch_stem`, a p^3 convolution with stride p), per whole training step.

One training step = loss gradient + Adam update, jitted, float32, median of --repeats steps
after a warm-up, for the cpu preset's net (widths 8, 16, 32, 64, 32, dense 64, 3 sequences):

- `block 1`: the study's first block (conv 3^3 at full resolution, then pool), im2col lowering;
- `stem p, s2d`: the patch stem computed as space-to-depth + matmul (the `im2col` / CPU `auto`
  lowering of a convolution whose stride equals its kernel);
- `stem p, strided conv`: the same stem as XLA's strided convolution (the other layers as in
  the row above).

Each stem row is checked: both stem computations give the same gradient to float rounding.

  python benchmarks/bench_stem.py                          # the cpu preset's 40 x 50 x 40, batch 4
  python benchmarks/bench_stem.py --shape 50,50,50 --stems 2,3 --out stem.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402
from jax_brainage.models import lowering  # noqa: E402
from jax_brainage.models.mrinet import MRInet  # noqa: E402


@contextlib.contextmanager
def _strided_stem():
  """Within: the im2col lowering hands stride = kernel convolutions to XLA's convolution."""
  s2d = lowering._space_to_depth_conv

  def xla_conv(lhs, rhs, padding, precision, preferred_element_type):
    kernel = tuple(int(k) for k in rhs.shape[:-2])
    return jax.lax.conv_general_dilated(
        lhs, rhs, kernel, padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=precision, preferred_element_type=preferred_element_type)

  lowering._space_to_depth_conv = xla_conv
  try:
    yield
  finally:
    lowering._space_to_depth_conv = s2d


def _step_fn(model: MRInet, x: jax.Array, age: jax.Array):
  """A jitted training step `(params, opt_state) -> (params, opt_state, loss)` and its state."""
  variables = model.init(jax.random.key(0), x[:1])
  tx = optax.adam(5e-4)
  opt_state = tx.init(variables)

  def loss_fn(v):
    return jnp.mean((model.apply(v, x) - age) ** 2)

  @jax.jit
  def step(v, s):
    loss, grads = jax.value_and_grad(loss_fn)(v)
    updates, s = tx.update(grads, s, v)
    return optax.apply_updates(v, updates), s, loss

  grad = jax.jit(jax.grad(loss_fn))
  return step, variables, opt_state, grad


def bench(shape: tuple[int, int, int], batch: int, stems: list[int], features: tuple[int, ...],
          repeats: int) -> list[dict]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, *shape, 3)), jnp.float32)
  age = jnp.asarray(rng.uniform(20, 80, size=batch), jnp.float32)
  cases = [("block 1", 0, "im2col")]
  for p in stems:
    cases += [(f"stem {p}, s2d", p, "s2d"), (f"stem {p}, strided conv", p, "strided conv")]
  rows, grads = [], {}
  for name, p, stem in cases:
    model = MRInet(conv_features=features, dense_features=64, dropout_rate=0.0,
                   conv_lowering="im2col", patch_stem=p)
    # Traced (and so compiled) inside the context: jit caches the lowering it saw.
    with _strided_stem() if stem == "strided conv" else contextlib.nullcontext():
      step, variables, opt_state, grad = _step_fn(model, x, age)
      grads[name] = grad(variables)
      state = [variables, opt_state]

      def run():
        state[0], state[1], loss = step(state[0], state[1])
        return loss

      seconds, _ = common.median_seconds(run, jax.block_until_ready, steps=repeats, warmup=2)
    rows.append({"case": name, "patch_stem": p, "stem": stem,
                 "num_params": sum(int(v.size) for v in jax.tree.leaves(variables)),
                 "seconds_per_step": seconds, "volumes_per_second": batch / seconds})
  for p in stems:
    a, b = grads[f"stem {p}, s2d"], grads[f"stem {p}, strided conv"]
    diff = max(float(jnp.abs(u - v).max() / (jnp.abs(v).max() + 1e-12))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    for r in rows:
      if r["patch_stem"] == p:
        r["max_rel_grad_diff_s2d_vs_strided"] = diff
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", default="40,50,40", help="input box X,Y,Z or one cube side (voxels)")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--stems", default="2", help="comma list of patch sides (> 1)")
  parser.add_argument("--features", default="8,16,32,64,32",
                      help="MRInet conv widths (the first is block 1's or the stem's)")
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--out", help="write results as JSON here")
  args = parser.parse_args(argv)
  try:
    shape = common.parse_shape(args.shape)
    stems = [int(v) for v in args.stems.split(",")]
    features = tuple(int(v) for v in args.features.split(","))
  except ValueError as e:
    parser.error(f"--shape, --stems and --features take integers: {e}")
  if min(shape) < 1:
    parser.error(f"--shape must be X,Y,Z (positive voxel counts), got {args.shape!r}")
  if any(p < 2 for p in stems):
    parser.error(f"--stems: patch sides must be > 1, got {args.stems!r}")
  rows = bench(shape, args.batch_size, stems, features, args.repeats)
  result = {**common.environment("jax", "flax", "optax"), "benchmark": "stem",
            "shape": list(shape), "batch_size": args.batch_size,
            "conv_features": list(features), "rows": rows}
  print(f"| first block ({'x'.join(map(str, shape))}, batch {args.batch_size}) | parameters "
        "| ms / step | volumes/s |")
  for r in rows:
    print(f"| {r['case']} | {r['num_params']:,} | {1e3 * r['seconds_per_step']:.0f} | "
          f"{r['volumes_per_second']:.1f} |")
  for p in stems:
    diff = next(r for r in rows if r["patch_stem"] == p)["max_rel_grad_diff_s2d_vs_strided"]
    print(f"stem {p}: s2d and strided-conv gradients agree to {diff:.1e} (relative)")
  common.write_result(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
