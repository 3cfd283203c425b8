"""The brain-age ViT (configs/vit.py) on a CPU: training step, and LRP cost against the input
gradient (issue 24: AttnLRP relevance <= 2x the gradient).

In one run, on the same model (configs/vit.py's ViT at 40 x 50 x 40 x 3, flip average off so
that every method sees one pass), device and batch: the forward pass, the input gradient
(d sum(age) / dx), `lrp.relevance` with AttnLRP and CP-LRP, and one training step (MSE, Adam,
the conv lowering the trainer uses) -- each one jitted function, the median of --repeats calls
after a warm-up call. --mrinet adds the cpu preset's MRInet (patch stem 2, widths 8-16-32-64-32)
with its default composite for comparison.

  python benchmarks/bench_vit.py --batch-size 4 --repeats 10 --out vit.json

Prints a table; --out writes JSON with the device, date and library versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402
import lrp  # noqa: E402
from jax_brainage import models  # noqa: E402
from jax_brainage.train import config as config_lib  # noqa: E402
from jax_brainage.train import config_loading  # noqa: E402

SHAPE = (40, 50, 40, 3)


def _model(preset: str, lowering: str):
  config = config_loading.load_config(str(common.REPO / "configs" / preset))
  kwargs = config_lib.model_kwargs(config, mean_age=50.0, age_scale=10.0)
  kwargs.update(flip_average=False, conv_lowering=lowering)
  return models.get_model(config.model.name, **kwargs)


def _rows(model, composites, batch_size, repeats, train_model):
  x = jax.random.normal(jax.random.key(0), (batch_size, *SHAPE), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(1), x)
  ages = jnp.linspace(20.0, 80.0, batch_size)
  tx = optax.adam(1e-4)
  opt = tx.init(variables["params"])

  def step(params, opt, u):
    loss, g = jax.value_and_grad(
        lambda p: jnp.mean((train_model.apply({"params": p}, u, train=True) - ages) ** 2))(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  fns = {
      "forward": jax.jit(lambda v, u: model.apply(v, u)),
      "gradient": jax.jit(lambda v, u: jax.grad(lambda w: model.apply(v, w).sum())(u)),
  }
  for name, comp in composites.items():
    fns[name] = jax.jit(lambda v, u, comp=comp: lrp.relevance(model.apply, v, u, comp))
  sync = lambda r: jax.block_until_ready(r)
  rows = {name: common.median_seconds(lambda fn=fn: fn(variables, x), sync, steps=repeats,
                                      warmup=1)[0] for name, fn in fns.items()}
  train_step = jax.jit(step)
  rows["train_step"] = common.median_seconds(
      lambda: train_step(variables["params"], opt, x), sync, steps=repeats, warmup=1)[0]
  return rows, models.num_parameters(model, (1, *SHAPE))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch-size", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--mrinet", action="store_true", help="also time the cpu preset's MRInet")
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  args = ap.parse_args(argv)

  runs = {"ViT": ("vit.py", {"attn_lrp": lrp.composites.AttnLRP(),
                             "cp_lrp": lrp.composites.CPLRP()})}
  if args.mrinet:
    runs["MRInet"] = ("cpu.py", {"epsilon_alpha2_beta1": lrp.composites.EpsilonAlpha2Beta1()})
  result = {"benchmark": "bench_vit", **common.environment(), "shape": list(SHAPE),
            "batch_size": args.batch_size, "repeats": args.repeats, "models": {}}
  device = jax.devices()[0]
  print(f"{SHAPE} batch {args.batch_size} on {device.device_kind} ({device.platform}), median of "
        f"{args.repeats}")
  print(f"{'model':<8}{'method':<22}{'s/call':>10}{'volumes/s':>12}{'x gradient':>12}")
  for label, (preset, composites) in runs.items():
    # Relevance with XLA's convolution (what lrp sees), training with the trainer's "auto".
    rows, params = _rows(_model(preset, "xla"), composites, args.batch_size, args.repeats,
                         _model(preset, "auto"))
    g = rows["gradient"]
    for name, t in rows.items():
      print(f"{label:<8}{name:<22}{t:>10.4f}{args.batch_size / t:>12.2f}{t / g:>12.2f}")
    result["models"][label] = {
        "config": preset, "parameters": params, "seconds_per_call": rows,
        "volumes_per_second": {k: args.batch_size / v for k, v in rows.items()},
        "cost_vs_gradient": {k: v / g for k, v in rows.items()}}
  result["target_cost_vs_gradient"] = 2.0
  common.write_result(args.out, result)
  return result


if __name__ == "__main__":
  main()
