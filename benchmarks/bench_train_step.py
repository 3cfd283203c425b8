"""Training throughput (volumes/s) of the trainer's jitted update step, data parallel over all
local devices, for MRInet at 98^3 / 198^3 and SFCN, in float32 and bfloat16.

Measures the step the trainer runs (`jax_brainage.train.trainer.make_train_step`: forward,
loss, backward, Adam update, donated state, explicit shardings) on a device-resident batch, so
the number is the model's ceiling; the input pipeline is benchmarked separately.

    python benchmarks/bench_train_step.py                       # CPU-sized default (MRInet 98^3)
    python benchmarks/bench_train_step.py --cases mrinet-98,mrinet-198,sfcn-98,sfcn-160 \
        --dtypes float32,bfloat16 --batch-size 8 --out results.json       # accelerator
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jax_brainage import models, sharding  # noqa: E402
from jax_brainage.train import config as config_lib  # noqa: E402
from jax_brainage.train import trainer  # noqa: E402

# name -> (model, cube side, loss)
CASES = {
    "mrinet-98": ("mrinet", 98, "mse"),
    "mrinet-198": ("mrinet", 198, "mse"),
    "sfcn-98": ("sfcn", 98, "soft_label"),
    "sfcn-160": ("sfcn", 160, "soft_label"),
    "sfcn_regression-160": ("sfcn_regression", 160, "mse"),
}


def measure(case: str, dtype: str, batch_size: int, steps: int, warmup: int) -> dict:
  name, side, loss = CASES[case]
  config = config_lib.base_config()
  config_lib.set_key(config, "data.cache", "unused")
  config_lib.set_key(config, "model.name", name)
  config_lib.set_key(config, "loss", loss)
  config_lib.set_key(config, "model.compute_dtype", dtype)
  config_lib.set_key(config, "batch_size", batch_size)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh)
  model = models.get_model(name, **config_lib.model_kwargs(config, 50.0))
  schedule = trainer.make_schedule(config.optimizer, 1000)
  tx = trainer.make_optimizer(config.optimizer, schedule)
  init = jax.jit(lambda: trainer.init_state(model, tx, (side,) * 3, 1, 0))
  state_sharding = sharding.state_shardings(mesh, jax.eval_shape(init))
  state = jax.device_put(init(), state_sharding)
  step = jax.jit(trainer.make_train_step(config, model, tx), donate_argnums=(0,),
                 out_shardings=(state_sharding, sharding.replicated(mesh)))
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(mesh, {
      "image": rng.random((batch_size, side, side, side, 1), dtype=np.float32),
      "age": rng.uniform(18, 82, batch_size).astype(np.float32)})
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - t0
  params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
  return {"case": case, "dtype": dtype, "batch_size": batch_size, "params": params,
          "steps": steps, "step_ms": 1e3 * seconds / steps,
          "volumes_per_second": steps * batch_size / seconds, "compile_s": compile_s,
          "loss_finite": bool(np.isfinite(float(metrics["loss"])))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="mrinet-98", help=f"comma list of {sorted(CASES)}")
  parser.add_argument("--dtypes", default="float32", help="comma list of float32,bfloat16")
  parser.add_argument("--batch-size", type=int, default=0,
                      help="global batch (default: 2 per device, at least 4)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--out", type=Path, help="write the results as JSON here")
  args = parser.parse_args(argv)
  batch_size = args.batch_size or max(4, 2 * jax.device_count())
  rows = []
  for case in args.cases.split(","):
    for dtype in args.dtypes.split(","):
      rows.append(measure(case.strip(), dtype.strip(), batch_size, args.steps, args.warmup))
      r = rows[-1]
      print(f"{r['case']:<11} {r['dtype']:<9} batch {r['batch_size']:>3}  params "
            f"{r['params']:>9,}  {r['step_ms']:>9.1f} ms/step  {r['volumes_per_second']:>8.2f} "
            f"volumes/s  (compile {r['compile_s']:.1f} s)", flush=True)
  result = {
      "benchmark": "train_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "platform": jax.devices()[0].platform, "host": platform.node(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": __import__("jaxlib").__version__, "numpy": np.__version__},
      "results": rows,
  }
  if args.out:
    from jax_brainage import fileio
    fileio.write_json(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
