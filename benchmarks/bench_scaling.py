"""Scale-out: per-device throughput and weak scaling of the trainer's step, and the time to
retrain the study's full multi-level ensemble on one H100 and on eight.

Weak scaling: the trainer's own jitted update step (`bench_train.JaxStep`: forward, MSE,
backward, Adam; data parallel over a `sharding.make_mesh` of the first n devices) with a fixed
per-device batch, for n = 1, 2, 4, ... up to the devices present. Reported: step time,
volumes/s, volumes/s per device, and efficiency = per-device throughput at n / at 1. On CPU the
devices are fake (`jax_num_cpu_devices`, default 4) and share the same cores: there the
efficiency measures the partitioning overhead of the program, not a speed-up. Real GPUs/TPUs
give real scaling.

Estimate: the workload is 3 sequences x 10 members = 30 MRInets at 198^3, each trained for
50 epochs over 2111 subjects, validated every epoch on the validation split (264 subjects,
80/10/10 of the study's 2637). Cost per volume of the train step and of the forward pass:
- FLOPs: every convolution and dot of the program's jaxpr (exact; 2 per multiply-add) and
  XLA's cost analysis of the compiled program on this device;
- bytes: XLA's cost analysis (on CPU it fuses less than on GPU: an upper bound there), and an
  activation-traffic floor (ACTIVATION_PASSES x the bytes of every conv and pool output; stated
  assumption);
one H100 (SXM, data sheet: 494.7 TFLOP/s dense TF32, which XLA uses for float32 convolutions,
989.4 bfloat16, 3.35 TB/s) at a stated achieved fraction of peak FLOP/s and of bandwidth:
time = max(FLOPs / (peak x f_flops), bytes / (bandwidth x f_bandwidth)) (roofline). With a GPU
present, --measure-full also times the real step at 198^3 (batch 8) and uses that instead. Eight
GPUs: the members are independent and the data-parallel gradient all-reduce is a few MB per
step, so time_8 = time_1 / (8 x efficiency), efficiency measured by the weak-scaling run on real
GPUs, else the stated assumption EIGHT_GPU_EFFICIENCY (with the all-reduce cost computed).

  python benchmarks/bench_scaling.py --out scaling.json                    # CPU: 1, 2, 4 fake
  python benchmarks/bench_scaling.py --size full --per-device-batch 4 --measure-full  # GPUs
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
  # Fake CPU devices for the weak-scaling rows (only the CPU backend sees this setting).
  jax.config.update("jax_num_cpu_devices", int(os.environ.get("BENCH_CPU_DEVICES", "4")))

import jax.numpy as jnp  # noqa: E402

import bench_roofline  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
from jax_brainage import sharding  # noqa: E402
from jax_brainage.train import steps as train_steps  # noqa: E402

# The study's full multi-level ensemble (paper.md / cohort.md).
STUDY = {"sequences": 3, "members": 10, "train_subjects": 2111, "val_subjects": 264,
         "epochs": 50, "shape": (198, 198, 198)}
H100 = dict(bench_roofline.PEAKS["H100 SXM"], name="H100 SXM")
# Assumptions of the estimate (stated in the output).
ACHIEVED_FLOPS_FRACTION = 0.30      # of the dense TF32 / bf16 tensor-core peak (3-D convs with
                                    # 1-64 channels keep tensor cores far from full)
ACHIEVED_BANDWIDTH_FRACTION = 0.60  # of HBM bandwidth for conv / pool / elementwise kernels
ACTIVATION_PASSES = 6               # train step: each activation written and read forward, read
                                    # again and its gradient written and read backward
EIGHT_GPU_EFFICIENCY = 0.95         # independent members + a few-MB all-reduce per step
NVLINK_BYTES_PER_S = 450e9          # H100 NVLink, one direction per GPU (900 GB/s both ways)


# ---------------------------------------------------------------------------------------------
# Weak scaling.
# ---------------------------------------------------------------------------------------------


def weak_scaling(case: str, dtype: str, size: str, per_device_batch: int, counts: list[int],
                 steps: int, warmup: int) -> list[dict[str, Any]]:
  """Median step time of the trainer's step on meshes of the first n devices, n in counts."""
  rows = []
  for n in counts:
    mesh = sharding.make_mesh(devices=jax.devices()[:n])
    batch = per_device_batch * n
    step = bench_train.JaxStep(case, dtype, batch, size, mesh=mesh)
    median, times = common.median_seconds(step.run, jax.block_until_ready, steps=steps,
                                          warmup=warmup)
    rows.append({"case": case, "dtype": dtype, "shape": list(step.shape), "devices": n,
                 "global_batch": batch, "per_device_batch": per_device_batch,
                 "median_step_s": median, "step_s": times, "volumes_per_second": batch / median,
                 "volumes_per_second_per_device": batch / median / n})
    del step
  base = rows[0]["volumes_per_second_per_device"]
  for r in rows:
    r["efficiency"] = r["volumes_per_second_per_device"] / base
    # Total throughput relative to one device: n x efficiency. On fake CPU devices sharing the
    # cores, ~1.0 means the partitioned program costs no more than the single-device one.
    r["speedup"] = r["volumes_per_second"] / rows[0]["volumes_per_second"]
  return rows


# ---------------------------------------------------------------------------------------------
# Cost per volume at 198^3 and the retraining estimate.
# ---------------------------------------------------------------------------------------------


def _xla_cost(compiled) -> tuple[float, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def _activation_bytes(jaxpr) -> float:
  """Bytes of every convolution and max-pool (reduce_window) output in a jaxpr."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("conv_general_dilated", "reduce_window_max"):
      aval = eqn.outvars[0].aval
      total += math.prod(aval.shape) * aval.dtype.itemsize
    for sub in bench_roofline.sub_jaxprs(eqn.params):
      total += _activation_bytes(sub)
  return total


def volume_cost(dtype: str, shape: tuple[int, int, int], batch: int = 1) -> dict[str, Any]:
  """FLOPs and bytes per volume of MRInet's train step and forward pass at `shape`, from
  abstract shapes (nothing of the size of a volume is allocated; XLA compiles for one device)."""
  config = bench_train.experiment_config("mrinet-198", dtype, batch, "full")
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  setup = train_steps.build_setup(config, shape, 1, 50.0, 1000, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {
      "image": jax.ShapeDtypeStruct((batch, *shape, 1), jnp.float32, sharding=batch_sharding),
      "age": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=batch_sharding)}
  state = setup.abstract_state
  variables = {"params": state["params"], **state["model_state"]}
  forward = jax.jit(lambda v, x: setup.model.apply(v, x, train=False))
  out: dict[str, Any] = {"dtype": dtype, "shape": list(shape),
                         "params": sum(int(x.size) for x in jax.tree.leaves(state["params"]))}
  for program, fn, args in (("train", setup.train_step, (state, abstract_batch)),
                            ("forward", forward, (variables, abstract_batch["image"]))):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    flops, nbytes = _xla_cost(fn.lower(*args).compile())
    out[program] = {"conv_dot_flops": bench_roofline.conv_dot_flops(jaxpr) / batch,
                    "xla_flops": flops / batch, "xla_bytes": nbytes / batch,
                    "activation_bytes": _activation_bytes(jaxpr) / batch}
  fwd_act = out["forward"]["activation_bytes"]
  out["train"]["traffic_floor_bytes"] = ACTIVATION_PASSES * fwd_act
  out["forward"]["traffic_floor_bytes"] = 2 * fwd_act  # written once, read once
  return out


def _roofline_seconds(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
  return max(flops / (peak_flops * ACHIEVED_FLOPS_FRACTION),
             nbytes / (bandwidth * ACHIEVED_BANDWIDTH_FRACTION))


def retrain_estimate(cost: dict[str, Any], measured_volumes_per_s: float | None = None,
                     eight_gpu_efficiency: float | None = None) -> dict[str, Any]:
  """Hours to retrain the study's ensemble on one H100 and on eight, from per-volume costs."""
  models = STUDY["sequences"] * STUDY["members"]
  train_volumes = models * STUDY["train_subjects"] * STUDY["epochs"]
  val_volumes = models * STUDY["val_subjects"] * STUDY["epochs"]
  dtype = cost["dtype"]
  peak = H100["tf32" if dtype == "float32" else dtype]
  tr, fw = cost["train"], cost["forward"]
  flops_total = train_volumes * tr["conv_dot_flops"] + val_volumes * fw["conv_dot_flops"]
  per_volume = {
      "floor": (_roofline_seconds(tr["conv_dot_flops"], tr["traffic_floor_bytes"], peak,
                                  H100["bandwidth"]),
                _roofline_seconds(fw["conv_dot_flops"], fw["traffic_floor_bytes"], peak,
                                  H100["bandwidth"])),
      "xla_bytes": (_roofline_seconds(tr["xla_flops"], tr["xla_bytes"], peak, H100["bandwidth"]),
                    _roofline_seconds(fw["xla_flops"], fw["xla_bytes"], peak,
                                      H100["bandwidth"])),
  }
  if measured_volumes_per_s:
    # Forward ~ 1/3 of a train step (conv/dot FLOPs ratio of the two programs).
    ratio = fw["conv_dot_flops"] / tr["conv_dot_flops"]
    per_volume["measured"] = (1.0 / measured_volumes_per_s, ratio / measured_volumes_per_s)
  # All-reduce of the gradients (float32) per step on 8 GPUs vs the step's compute time.
  grad_bytes = 4.0 * cost["params"]
  allreduce_s = 2 * 7 / 8 * grad_bytes / NVLINK_BYTES_PER_S
  efficiency = eight_gpu_efficiency or EIGHT_GPU_EFFICIENCY
  out = {"models": models, "train_volumes": train_volumes, "val_volumes": val_volumes,
         "total_conv_dot_flops": flops_total, "peak_flops_per_s": peak,
         "bandwidth_bytes_per_s": H100["bandwidth"], "device": H100["name"],
         "achieved_flops_fraction": ACHIEVED_FLOPS_FRACTION,
         "achieved_bandwidth_fraction": ACHIEVED_BANDWIDTH_FRACTION,
         "activation_passes": ACTIVATION_PASSES, "eight_gpu_efficiency": efficiency,
         "eight_gpu_efficiency_source": "measured" if eight_gpu_efficiency else "assumed",
         "allreduce_seconds_per_step_8gpu": allreduce_s, "estimates": {}}
  for basis, (train_s, fwd_s) in per_volume.items():
    seconds = train_volumes * train_s + val_volumes * fwd_s
    out["estimates"][basis] = {"train_seconds_per_volume": train_s,
                               "forward_seconds_per_volume": fwd_s,
                               "hours_1gpu": seconds / 3600,
                               "hours_8gpu": seconds / 3600 / (8 * efficiency)}
  return out


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default="mrinet-198", choices=sorted(bench_train.CASES))
  parser.add_argument("--size", default="", choices=("", "full", "small", "tiny"),
                      help="volume size of the weak-scaling rows (default: full on an "
                           "accelerator, tiny on CPU)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--per-device-batch", type=int, default=0,
                      help="volumes per device (default 4 on an accelerator, 2 on CPU)")
  parser.add_argument("--devices", default="", help="device counts, e.g. 1,2,4,8 "
                      "(default: powers of two up to all devices)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--estimate-dtypes", default="float32,bfloat16",
                      help="compute dtypes of the retraining estimate ('' to skip it)")
  parser.add_argument("--measure-full", action="store_true",
                      help="on an accelerator: time the real step at 198^3, batch 8 per device, "
                           "and base the estimate on it")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  accelerator = device.platform != "cpu"
  size = args.size or ("full" if accelerator else "tiny")
  per_device = args.per_device_batch or (4 if accelerator else 2)
  n_all = jax.device_count()
  counts = ([int(c) for c in args.devices.split(",") if c] if args.devices
            else [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= n_all])
  print(f"device: {n_all} x {device.device_kind} ({device.platform}"
        + ("; fake CPU devices sharing the same cores" if not accelerator else "") + ")")

  rows = weak_scaling(args.case, args.dtype, size, per_device, counts, args.steps, args.warmup)
  print(f"\nweak scaling: {args.case} at {'x'.join(map(str, rows[0]['shape']))}, {args.dtype}, "
        f"{per_device} volumes per device")
  print(f"{'devices':>8}{'batch':>7}{'step ms':>10}{'vol/s':>10}{'vol/s/dev':>11}"
        f"{'efficiency':>12}{'speedup':>9}")
  for r in rows:
    print(f"{r['devices']:>8}{r['global_batch']:>7}{1e3 * r['median_step_s']:>10.1f}"
          f"{r['volumes_per_second']:>10.2f}{r['volumes_per_second_per_device']:>11.2f}"
          f"{r['efficiency']:>12.2f}{r['speedup']:>9.2f}")

  estimates = []
  measured = None
  if args.measure_full and accelerator:
    full = weak_scaling("mrinet-198", args.dtype, "full", 8, [1], args.steps, args.warmup)[0]
    measured = full["volumes_per_second"]
    print(f"\nmeasured: MRInet 198^3 {args.dtype}, batch 8 on one {device.device_kind}: "
          f"{measured:.1f} volumes/s")
  real_8 = None
  if accelerator and rows[-1]["devices"] >= 8 and size == "full":
    real_8 = next(r["efficiency"] for r in rows if r["devices"] == 8)
  for dtype in [d for d in args.estimate_dtypes.split(",") if d]:
    cost = volume_cost(dtype, STUDY["shape"])
    est = retrain_estimate(cost, measured if dtype == args.dtype else None, real_8)
    estimates.append({"cost": cost, **est})
  if estimates:
    s = STUDY
    print(f"\nretraining the study's ensemble: {s['sequences']} sequences x {s['members']} "
          f"members, {s['train_subjects']} training subjects, {s['epochs']} epochs, "
          f"198^3 (+ validation of {s['val_subjects']} subjects per epoch)")
    print(f"assumptions: {H100['name']} peak (dense) x {ACHIEVED_FLOPS_FRACTION} achieved, "
          f"{H100['bandwidth'] / 1e12:.2f} TB/s x {ACHIEVED_BANDWIDTH_FRACTION} achieved; "
          f"traffic floor = {ACTIVATION_PASSES} x activation bytes per train step; "
          f"8 GPUs at efficiency {estimates[0]['eight_gpu_efficiency']:.2f} "
          f"({estimates[0]['eight_gpu_efficiency_source']}; gradient all-reduce "
          f"{1e6 * estimates[0]['allreduce_seconds_per_step_8gpu']:.0f} us per step)")
    print(f"{'dtype':>9}{'basis':>11}{'GFLOP/vol':>11}{'GB/vol':>8}{'ms/vol':>8}"
          f"{'h 1xH100':>10}{'h 8xH100':>10}")
    for e in estimates:
      tr = e["cost"]["train"]
      for basis, v in e["estimates"].items():
        nbytes = {"floor": tr["traffic_floor_bytes"], "xla_bytes": tr["xla_bytes"]}.get(basis)
        flops = tr["xla_flops"] if basis == "xla_bytes" else tr["conv_dot_flops"]
        print(f"{e['cost']['dtype']:>9}{basis:>11}{flops / 1e9:>11.1f}"
              + (f"{nbytes / 1e9:>8.2f}" if nbytes else f"{'':>8}")
              + f"{1e3 * v['train_seconds_per_volume']:>8.2f}{v['hours_1gpu']:>10.2f}"
              f"{v['hours_8gpu']:>10.2f}")
  common.write_result(args.out, {
      "benchmark": "bench_scaling", **common.environment(), "case": args.case, "size": size,
      "dtype": args.dtype, "per_device_batch": per_device, "weak_scaling": rows,
      "measured_full_volumes_per_second": measured, "study": {**STUDY, "shape": [198] * 3},
      "retrain_estimates": estimates})
  return 0


if __name__ == "__main__":
  sys.exit(main())
