"""Training N ensemble members: one vmapped step (the trainer's member step) vs N sequential
single-model steps, and (with several devices) members spread over the mesh's 'ensemble' axis.

Every row times one update of all N members (each on its own batch of B volumes) with the
trainer's own compiled steps (`train.members.build_member_setup` / `train.steps.build_setup`),
the state donated as in training; reported as member-steps/s (N / seconds) and volumes/s
(N * B / seconds). Rows:

- sequential:    N calls of the single-model step, one device (what N separate runs do per step)
- vmap-N:        the member step over all N members at once, one device
- vmap-1 groups: the member step forced to width 1 (the trainer's memory fallback), one device
- ensemble-axis: the member step on all devices, members over 'ensemble' (needs >1 device and
                 N divisible by the axis), the batch over 'data'

    python benchmarks/bench_ensemble.py --members 4 --side 32 --batch 4 --out ens.json
    python benchmarks/bench_ensemble.py --model mrinet --side 98 --members 10 --batch 8  # GPU

On CPU the fake devices share the host's cores: the ensemble-axis row shows the code path, not a
speed-up (set BENCH_CPU_DEVICES, default 4).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
  jax.config.update("jax_num_cpu_devices", int(os.environ.get("BENCH_CPU_DEVICES", "4")))

import numpy as np  # noqa: E402

import common  # noqa: E402
from jax_brainage import sharding  # noqa: E402
from jax_brainage.train import config as config_lib  # noqa: E402
from jax_brainage.train import config_checks  # noqa: E402
from jax_brainage.train import members as train_members  # noqa: E402
from jax_brainage.train import steps as train_steps  # noqa: E402

MEAN_AGE = 50.0
TOTAL_STEPS = 10_000


def make_config(model: str, members: int, batch: int, width: int = 0, mesh_size: int = 0,
                lowering: str = "auto"):
  c = config_lib.base_config()
  c.model.conv_lowering = lowering
  c.data.cache = "/unused-benchmark"
  c.model.name = "mrinet"
  if model == "tiny":
    c.model.conv_features = (8, 8, 16, 16, 8)
    c.model.dense_features = 16
  c.batch_size = batch
  c.ensemble.members = members
  c.ensemble.vmap_width = width
  c.ensemble.mesh_size = mesh_size
  config_checks.validate(c)
  return c


def _images(shape: tuple[int, ...], seed: int) -> np.ndarray:
  return np.random.default_rng(seed).random(shape, np.float32)


def member_case(config, side: int, mesh) -> tuple[Callable[[], Any], dict[str, Any]]:
  """All members updated once by the trainer's member step(s) on `mesh`."""
  shape = (side,) * 3
  setup = train_members.build_member_setup(config, shape, 1, MEAN_AGE, TOTAL_STEPS, mesh)
  seeds = train_members.member_seeds(config)
  states = setup.split(jax.device_put(setup.init(seeds), setup.state_sharding))
  b = int(config.batch_size)
  spec = sharding.batch_sharding(mesh, members=True)
  batches = []
  for g in setup.groups:
    w = g.stop - g.start
    batches.append(jax.device_put({
        "image": _images((w, b, *shape, 1), g.start),
        "age": np.full((w, b), 50.0, np.float32), "index": np.zeros((w, b), np.int32),
        "aug_seed": np.zeros((w, b, 2), np.uint32), "mask": np.ones((w, b), bool)}, spec))

  def run():
    metrics = None
    for g, step in enumerate(setup.train_steps):
      states[g], metrics = step(states[g], batches[g])
    return metrics

  info = {"vmap_width": setup.width, "groups": len(setup.groups),
          "mesh": {k: int(v) for k, v in mesh.shape.items()},
          "needed_bytes_per_device": setup.memory["needed_bytes_per_device"]}
  return run, info


def sequential_case(config, side: int, mesh) -> tuple[Callable[[], Any], dict[str, Any]]:
  """N single-model states, each updated by the single-model step in turn."""
  shape = (side,) * 3
  single = make_config("tiny" if config.model.conv_features else "mrinet", 1,
                       int(config.batch_size), lowering=config.model.conv_lowering)
  setup = train_steps.build_setup(single, shape, 1, MEAN_AGE, TOTAL_STEPS, mesh)
  seeds = train_members.member_seeds(config)
  states = [jax.device_put(setup.init(s), setup.state_sharding) for s in seeds]
  b = int(config.batch_size)
  spec = sharding.batch_sharding(mesh)
  batches = [jax.device_put({
      "image": _images((b, *shape, 1), m), "age": np.full((b,), 50.0, np.float32),
      "index": np.zeros((b,), np.int32), "aug_seed": np.zeros((b, 2), np.uint32),
      "mask": np.ones((b,), bool)}, spec) for m in range(len(seeds))]

  def run():
    metrics = None
    for m in range(len(states)):
      states[m], metrics = setup.train_step(states[m], batches[m])
    return metrics

  return run, {"vmap_width": 1, "groups": len(seeds),
               "mesh": {k: int(v) for k, v in mesh.shape.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--members", type=int, default=4, help="ensemble members N (default 4)")
  p.add_argument("--model", choices=("tiny", "mrinet"), default="tiny",
                 help="tiny: MRInet (8,8,16,16,8) channels; mrinet: the published network")
  p.add_argument("--side", type=int, default=32, help="cube side in voxels (default 32)")
  p.add_argument("--batch", type=int, default=4, help="volumes per member and step")
  p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
  p.add_argument("--lowering", choices=("auto", "xla", "im2col"), default="auto",
                 help="model.conv_lowering (auto: im2col on CPU, XLA's conv on accelerators)")
  p.add_argument("--out", help="write the result as JSON here")
  args = p.parse_args(argv)
  cfg = lambda **kw: make_config(args.model, n, args.batch, lowering=args.lowering, **kw)

  n, one = args.members, sharding.make_mesh(1, jax.devices()[:1])
  cases = [
      ("sequential", lambda: sequential_case(cfg(), args.side, one)),
      (f"vmap-{n}", lambda: member_case(cfg(width=n), args.side, one)),
      ("vmap-1 groups", lambda: member_case(cfg(width=1), args.side, one)),
  ]
  devices = jax.device_count()
  axis = max((e for e in range(2, devices + 1) if devices % e == 0 and n % e == 0
              and args.batch % (devices // e) == 0), default=0)
  if axis:
    cases.append((f"ensemble-axis {axis}x{devices // axis}", lambda: member_case(
        cfg(mesh_size=axis), args.side, sharding.make_mesh(axis))))

  rows = []
  print(f"{n} members, {args.model} MRInet, {args.side}^3, batch {args.batch} per member, "
        f"conv lowering {args.lowering}; "
        f"{jax.devices()[0].device_kind} x{devices}")
  print(f"{'case':<24}{'ms/step':>10}{'member-steps/s':>16}{'volumes/s':>12}  layout")
  for name, build in cases:
    run, info = build()
    median, times = common.median_seconds(run, jax.block_until_ready, steps=args.steps,
                                          warmup=args.warmup)
    row = {"case": name, "seconds_per_step": median, "times": times,
           "member_steps_per_second": n / median,
           "volumes_per_second": n * args.batch / median, **info}
    rows.append(row)
    print(f"{name:<24}{1e3 * median:>10.1f}{row['member_steps_per_second']:>16.2f}"
          f"{row['volumes_per_second']:>12.1f}  width {info['vmap_width']}, "
          f"{info['groups']} group(s), mesh {info['mesh']}")
  seq = rows[0]["seconds_per_step"]
  for row in rows:
    row["speedup_vs_sequential"] = seq / row["seconds_per_step"]
  result = {"benchmark": "bench_ensemble", **common.environment(), "members": n,
            "model": args.model, "lowering": args.lowering, "side": args.side, "batch_per_member": args.batch,
            "steps": args.steps, "rows": rows}
  common.write_result(args.out, result)
  return result


if __name__ == "__main__":
  main()
