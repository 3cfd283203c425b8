"""Training throughput (volumes/s) of one jitted Adam update step, per model and compute dtype.

The step is the trainer's without augmentation: uint8 images -> float32 [0, 1] on device,
forward in train mode (dropout, BatchNorm statistics), the model's training loss (MSE, or KL to
soft labels for SFCN), gradients, optax Adam (lr 5e-4) update; parameters, optimiser state and
BatchNorm statistics are donated. Data stay on the device (the input pipeline is not measured).

  python benchmarks/bench_train_step.py                       # all models, fp32 and bf16
  python benchmarks/bench_train_step.py --models mrinet98 --dtypes fp32 --batch-size 2 \
      --steps 5 --out bench.json                              # a short CPU run

  python benchmarks/bench_train_step.py --models sfcn --shape 32,32,32 --batch-size 2 \
      --steps 2                                               # smoke test of the SFCN path

Models: mrinet98 (MRInet, 98^3, MNI 2 mm), mrinet198 (MRInet, 198^3, FreeSurfer 1 mm),
sfcn (SFCN, 160x192x160, 70 one-year bins), sfcn_regression (SFCN trunk, one output).
Prints a table; --out writes JSON with the device, date and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jax_brainage import fileio, models  # noqa: E402

CASES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "mrinet98": ("mrinet", (98, 98, 98)),
    "mrinet198": ("mrinet", (198, 198, 198)),
    "sfcn": ("sfcn", (160, 192, 160)),
    "sfcn_regression": ("sfcn_regression", (160, 192, 160)),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LEARNING_RATE = 5e-4


def make_step(model, tx):
  """(state, images uint8, ages) -> (state, loss): one Adam update; not yet jitted."""

  def step(state, images, ages):
    x = images.astype(jnp.float32) / 255.0
    dropout_key = jax.random.fold_in(state["rng"], state["step"])

    def loss_fn(params):
      variables = {"params": params, **state["model_state"]}
      outputs, new_model_state = model.apply(
          variables, x, train=True, rngs={"dropout": dropout_key},
          mutable=list(state["model_state"]))
      return models.training_loss(model, outputs, ages), new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "model_state": dict(new_model_state), "opt_state": opt_state,
            "rng": state["rng"]}, loss

  return step


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None
  except Exception:  # cost analysis is optional and backend-dependent
    return None


def _peak_bytes(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def run_case(case: str, dtype: str, batch_size: int, steps: int, warmup: int, channels: int,
             shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
  """Compiles and times one (model, dtype); `shape` overrides the model's input size (voxels)."""
  name, default_shape = CASES[case]
  shape = shape or default_shape
  model = models.get_model(name, dtype=DTYPES[dtype])
  input_shape = (batch_size, *shape, channels)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, input_shape, dtype=np.uint8))
  ages = jax.device_put(rng.uniform(20, 80, batch_size).astype(np.float32))
  tx = optax.adam(LEARNING_RATE)

  def init_state(images):
    variables = model.init(jax.random.key(0), images[:1].astype(jnp.float32))
    params = variables.pop("params")
    return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": dict(variables),
            "opt_state": tx.init(params), "rng": jax.random.key(1)}

  state = jax.jit(init_state)(images)
  num_params = sum(int(p.size) for p in jax.tree.leaves(state["params"]))

  t0 = time.perf_counter()
  compiled = jax.jit(make_step(model, tx), donate_argnums=0).lower(state, images, ages).compile()
  compile_s = time.perf_counter() - t0

  for _ in range(warmup):
    state, loss = compiled(state, images, ages)
  jax.block_until_ready(state)
  times = []
  t_all = time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    state, loss = compiled(state, images, ages)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  jax.block_until_ready(state)
  total = time.perf_counter() - t_all
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"{case} {dtype}: non-finite loss {float(loss)}")

  flops = _flops(compiled)
  step_s = statistics.median(times)
  return {
      "model": case, "architecture": name, "input_shape": list(input_shape[1:]),
      "dtype": dtype, "batch_size": batch_size, "steps": steps, "params": num_params,
      "compile_s": round(compile_s, 3),
      "step_ms_median": round(1e3 * step_s, 3), "step_ms_mean": round(1e3 * total / steps, 3),
      "volumes_per_s": round(batch_size * steps / total, 3),
      "gflops_per_s": round(flops / step_s / 1e9, 2) if flops else None,
      "flops_per_step": flops, "peak_memory_bytes": _peak_bytes(jax.devices()[0]),
      "final_loss": float(loss),
  }


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  import jaxlib
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": device.device_kind, "platform": device.platform,
      "num_devices": jax.device_count(), "host_cpus": os.cpu_count(),
      "host": platform.node(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "numpy": np.__version__},
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="mrinet98,mrinet198,sfcn",
                      help=f"comma-separated, from {sorted(CASES)}")
  parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
  parser.add_argument("--batch-size", type=int, default=8, help="volumes per step")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--channels", type=int, default=1, help="input sequences")
  parser.add_argument("--shape", default="",
                      help="X,Y,Z voxels for every model instead of its own (quick CPU checks)")
  parser.add_argument("--out", default="", help="write results as JSON here")
  args = parser.parse_args(argv)
  cases = [c for c in args.models.split(",") if c]
  dtypes = [d for d in args.dtypes.split(",") if d]
  for c in cases:
    if c not in CASES:
      parser.error(f"--models: unknown model {c!r} (choose from {sorted(CASES)})")
  for d in dtypes:
    if d not in DTYPES:
      parser.error(f"--dtypes: unknown dtype {d!r} (choose from {sorted(DTYPES)})")
  if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.channels < 1:
    parser.error("--batch-size, --steps and --channels must be >= 1, --warmup >= 0")
  shape = None
  if args.shape:
    try:
      shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
      shape = ()
    if len(shape) != 3 or min(shape) < 1:
      parser.error(f"--shape: expected X,Y,Z (positive integers), got {args.shape!r}")

  env = environment()
  print(f"# {env['device']} ({env['platform']}, {env['num_devices']} device(s)), {env['date']}, "
        f"jax {env['versions']['jax']}, flax {env['versions']['flax']}")
  header = (f"{'model':<16} {'input':<12} {'dtype':<5} {'batch':>5} {'params':>10} "
            f"{'compile s':>9} {'step ms':>9} {'vol/s':>8} {'GFLOP/s':>9}")
  print(header)
  print("-" * len(header))
  rows = []
  for case in cases:
    for dtype in dtypes:
      try:
        row = run_case(case, dtype, args.batch_size, args.steps, args.warmup, args.channels,
                       shape)
      except Exception as e:  # e.g. out of memory at 198^3: record it, go on with the rest
        row = {"model": case, "dtype": dtype, "batch_size": args.batch_size,
               "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(f"{case:<16} {'':<12} {dtype:<5} {args.batch_size:>5}  failed: {row['error']}")
      else:
        size = "x".join(str(s) for s in row["input_shape"][:3])
        gflops = f"{row['gflops_per_s']:.1f}" if row["gflops_per_s"] is not None else "-"
        print(f"{case:<16} {size:<12} {dtype:<5} {row['batch_size']:>5} {row['params']:>10,} "
              f"{row['compile_s']:>9.1f} {row['step_ms_median']:>9.1f} "
              f"{row['volumes_per_s']:>8.2f} {gflops:>9}")
      rows.append(row)
      sys.stdout.flush()
  if args.out:
    fileio.write_json(args.out, {"benchmark": "train_step", "optimizer": "adam",
                                 "learning_rate": LEARNING_RATE, "environment": env,
                                 "results": rows})
    print(f"wrote {args.out}")
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
