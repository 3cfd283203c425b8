"""LRP cost on a small ViT: AttnLRP and CP-LRP relevance against the input gradient, and against
LXT (PyTorch) on the same weights, in one run.

The ViT of tests/lrp/transformer_nets.py at benchmark size (default: 32x32x3 images, 4x4 patches:
64 tokens, dim 64, 4 heads, 4 pre-norm blocks, MLP 128, mean over tokens, one output), float32.
Timed as the median of --repeats calls after a warm-up call: the jitted forward pass, the
jitted input gradient (d sum(y) / dx), jitted `lrp.relevance` with get("attnlrp") and
get("cp-lrp"); with --lxt, LXT's efficient AttnLRP and CP-LRP (Gradient*Input with
lxt.efficient.rules; torch, this host's CPU, torch.set_num_threads as --threads) and LXT's
explicit AttnLRP functions, with the relative L2 distance of their maps to this library's.
Target (issue 24): AttnLRP relevance <= 2x the input gradient on CPU.

  python benchmarks/bench_lrp_transformer.py --lxt --out vit_lrp.json

Prints a table; --out writes JSON with the device, date and library versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import lrp  # noqa: E402

NETS = Path(__file__).resolve().parents[1] / "tests" / "lrp" / "transformer_nets.py"


def _nets():
  spec = importlib.util.spec_from_file_location("_bench_transformer_nets", NETS)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # flax's dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def _median_time(fn, repeats):
  fn()  # warm-up (compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--image", type=int, default=32)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--lxt", action="store_true")
  ap.add_argument("--out")
  args = ap.parse_args(argv)

  nets = _nets()
  model = nets.ViT(dim=args.dim, depth=args.depth, mlp=2 * args.dim, heads=args.heads)
  variables, x = nets.init(model, (args.batch_size, args.image, args.image, 3),
                           dtype=jnp.float32)
  fwd = jax.jit(model.apply)
  grad = jax.jit(jax.grad(lambda v, u: model.apply(v, u).sum(), argnums=1))
  attn = jax.jit(lambda v, u: lrp.relevance(model.apply, v, u, lrp.composites.get("attnlrp")))
  cp = jax.jit(lambda v, u: lrp.relevance(model.apply, v, u, lrp.composites.get("cp-lrp")))
  rows = {}
  for name, f in (("forward", fwd), ("input gradient", grad), ("lrp AttnLRP", attn),
                  ("lrp CP-LRP", cp)):
    rows[name] = _median_time(lambda f=f: jax.block_until_ready(f(variables, x)), args.repeats)
  maps = {"attnlrp": np.asarray(attn(variables, x)), "cplrp": np.asarray(cp(variables, x))}
  dist = {}
  if args.lxt:
    import torch

    torch.set_num_threads(args.threads)
    replica = nets.TorchReplica(jax.tree.map(np.asarray, variables), eps=1e-6,
                                heads=args.heads)
    replica.p = jax.tree.map(lambda t: t.float(), replica.p)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    for mode, label, ref in (("attnlrp", "LXT AttnLRP (efficient)", "attnlrp"),
                             ("cplrp", "LXT CP-LRP (efficient)", "cplrp"),
                             ("explicit", "LXT AttnLRP (explicit)", "attnlrp")):
      f = replica.relevance_fn("vit", mode)
      rows[label] = _median_time(lambda f=f: f(xt), args.repeats)
      r = f(xt).numpy()
      dist[label] = float(np.linalg.norm(r - maps[ref]) / np.linalg.norm(maps[ref]))
    rows["torch input gradient"] = _median_time(
        lambda: torch.autograd.grad(_plain(replica, xt).sum(), xt), args.repeats)
  g = rows["input gradient"]
  print(f"ViT {args.image}^2 px, {(args.image // 4) ** 2} tokens, dim {args.dim}, depth "
        f"{args.depth}, batch {args.batch_size}, {common.cpu_name()}")
  for name, t in rows.items():
    extra = f"  rel. L2 to lrp {dist[name]:.1e}" if name in dist else ""
    print(f"  {name:26s} {t * 1e3:9.2f} ms  {t / g:5.2f}x input gradient{extra}")
  if args.out:
    out = {"environment": common.environment("jax", "flax", "torch", "lxt"), "args": vars(args),
           "seconds": rows, "relative_l2": dist}
    common.write_result(args.out, out)


def _plain(replica, xt):
  """The torch ViT without any LRP rule (its plain input gradient is the torch baseline)."""
  E = replica.E
  saved = (E.stop_gradient, E.identity_rule_implicit)
  E.stop_gradient = lambda t: t
  E.identity_rule_implicit = lambda fn, t: fn(t)
  try:
    return replica.vit(xt, "plain")
  finally:
    E.stop_gradient, E.identity_rule_implicit = saved


if __name__ == "__main__":
  main()
