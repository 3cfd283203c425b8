"""Roofline per model: FLOPs and bytes per volume of the compiled program, arithmetic intensity,
achieved FLOP/s from a timed step and the fraction of the device's peak.

For MRInet at 98^3 and 198^3 and SFCN at 160x192x160 (float32 and bfloat16 compute) and two
programs per case:
- `train`: the trainer's own jitted update step (`bench_train.JaxStep`: forward, loss, backward,
  Adam), per volume of the global batch;
- `forward`: inference, `model.apply(variables, x)` jitted (what `brainage predict` runs).
Counts come from XLA's cost analysis of the compiled executable (`.lower().compile()
.cost_analysis()`: "flops" and "bytes accessed", per device, divided by the volumes each device
processes). As a cross-check independent of XLA's cost model, `conv_dot_flops` counts the
multiply-adds of every convolution and dot in the program's jaxpr (2 FLOPs each): the dominant
work, exact. The step is timed as in bench_train (median of synchronised steps).

Peaks (dense, no sparsity; vendor data sheets) for the devices this project targets are in
PEAKS; float32 compute is compared with the TF32 tensor-core peak on NVIDIA GPUs, because XLA
and cuDNN run float32 convolutions in TF32 by default there (as PyTorch does for convolutions).
The CPU row is an estimate stated in `cpu_peak` (cores x clock x FLOP/cycle of the vector units,
and an assumed memory bandwidth share); pass --peak-flops / --peak-bandwidth to override.

  python benchmarks/bench_roofline.py --size small                 # CPU
  python benchmarks/bench_roofline.py --size full --batch-size 8 --out roofline.json   # GPU
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.extend  # noqa: E402

import bench_train  # noqa: E402
import common  # noqa: E402
from jax_brainage import sharding  # noqa: E402

# device -> peak FLOP/s by compute dtype, and memory bandwidth (bytes/s). Dense tensor-core
# figures from NVIDIA's data sheets (H100/H200: SXM5 form factor unless named; A100: SXM4).
PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12, "bandwidth": 3.35e12},
    "H100 PCIe": {"bfloat16": 756.5e12, "tf32": 378.0e12, "float32": 51.2e12, "bandwidth": 2.0e12},
    "H100 NVL": {"bfloat16": 835.5e12, "tf32": 417.5e12, "float32": 60.0e12, "bandwidth": 3.9e12},
    "H200": {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12, "bandwidth": 4.8e12},
    "A100 SXM 80GB": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12,
                      "bandwidth": 2.039e12},
    "A100 40GB": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12, "bandwidth": 1.555e12},
    "A100 PCIe 80GB": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12,
                       "bandwidth": 1.935e12},
}
# Assumed CPU memory bandwidth per core (bytes/s): a core's share of a server socket's DRAM
# bandwidth (e.g. ~460 GB/s over 96 cores on a 12-channel DDR5 EPYC is ~5 GB/s; a desktop's
# ~60 GB/s over 8 cores ~7.5 GB/s). An estimate, stated as such in the output.
CPU_BANDWIDTH_PER_CORE = 5e9


def device_peak_name(device_kind: str) -> str | None:
  """The PEAKS row for a jax `device_kind` (e.g. "NVIDIA H100 80GB HBM3" -> "H100 SXM")."""
  kind = device_kind.lower()
  if "h200" in kind:
    return "H200"
  if "h100" in kind:
    return "H100 PCIe" if "pcie" in kind else "H100 NVL" if "nvl" in kind else "H100 SXM"
  if "a100" in kind:
    if "pcie" in kind:
      return "A100 PCIe 80GB" if "80" in kind else "A100 40GB"
    return "A100 40GB" if "40gb" in kind else "A100 SXM 80GB"
  return None


def cpu_peak(cores: int | None = None) -> dict[str, Any]:
  """Estimated CPU peak: cores x clock x FLOP/cycle, and CPU_BANDWIDTH_PER_CORE x cores.

  FLOP/cycle per core for float32: 32 with AVX2/AVX-512 FMA (two 256-bit FMA pipes, or
  AVX-512 double-pumped as on AMD Zen 4; 64 would need two 512-bit pipes), 16 with AVX only;
  bfloat16 doubles it where the CPU has avx512_bf16 (VDPBF16PS), else as float32. The clock is
  /proc/cpuinfo's current "cpu MHz" (a base clock, not boost).
  """
  cores = cores or os.cpu_count() or 1
  flags, mhz = set(), 2000.0
  try:
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split())
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M).group(1))
  except (OSError, AttributeError, ValueError):
    pass
  per_cycle = 32 if ("avx2" in flags and "fma" in flags) or "avx512f" in flags else 16
  bf16 = per_cycle * (2 if "avx512_bf16" in flags else 1)
  hz = mhz * 1e6
  return {"float32": cores * hz * per_cycle, "bfloat16": cores * hz * bf16,
          "bandwidth": cores * CPU_BANDWIDTH_PER_CORE,
          "estimate": f"{cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} FLOP/cycle float32 "
                      f"({bf16} bfloat16); bandwidth {CPU_BANDWIDTH_PER_CORE / 1e9:.0f} GB/s "
                      f"per core (assumed)"}


def conv_dot_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of every convolution and dot_general in a (closed) jaxpr,
  sub-jaxprs (jit, custom_vjp, scan bodies x length) included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval
      out = eqn.outvars[0].aval
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / rhs.shape[out_feature_dim]
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      out = eqn.outvars[0].aval
      total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
    scale = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in sub_jaxprs(eqn.params):
      total += scale * conv_dot_flops(sub)
  return total


def sub_jaxprs(params: dict[str, Any]):
  """The jaxprs held in an equation's parameters (jit, custom_jvp/vjp, cond branches, scan)."""
  for value in params.values():
    for v in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _cost(compiled) -> tuple[float, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0]
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def measure(case: str, dtype: str, batch_size: int, size: str, steps: int, warmup: int,
            peak: dict[str, float]) -> list[dict[str, Any]]:
  step = bench_train.JaxStep(case, dtype, batch_size, size)
  per_device = batch_size / sharding.data_size(step.mesh)  # volumes each device processes
  model = step.setup.model
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  variables = {"params": step.state["params"], **step.state["model_state"]}
  rows = []
  # forward first: the train step donates (deletes) the state the variables point into.
  programs = {
      "forward": (forward, (variables, step.batch["image"]),
                  lambda: forward(variables, step.batch["image"])),
      "train": (step.setup.train_step, (step.state, step.batch), step.run),
  }
  for program, (fn, args, run) in programs.items():
    flops, nbytes = _cost(fn.lower(*args).compile())
    # conv/dot FLOPs of the whole global batch from the jaxpr (not partitioned).
    exact = conv_dot_flops(jax.make_jaxpr(fn)(*args).jaxpr) / batch_size
    median, _ = common.median_seconds(run, jax.block_until_ready, steps=steps, warmup=warmup)
    flops_v, bytes_v = flops / per_device, nbytes / per_device
    achieved = flops_v * batch_size / median
    bandwidth = bytes_v * batch_size / median
    peak_flops = peak.get("tf32" if dtype == "float32" and "tf32" in peak else dtype)
    intensity = flops_v / bytes_v if bytes_v else float("nan")
    attainable = min(peak_flops, intensity * peak["bandwidth"])
    rows.append({
        "case": case, "program": program, "dtype": dtype, "batch_size": batch_size,
        "shape": list(step.shape), "params": step.params,
        "xla_flops_per_volume": flops_v, "xla_bytes_per_volume": bytes_v,
        "conv_dot_flops_per_volume": exact, "intensity_flops_per_byte": intensity,
        "median_step_s": median, "volumes_per_second": batch_size / median,
        "achieved_flops_per_s": achieved, "achieved_bytes_per_s": bandwidth,
        "peak_flops_per_s": peak_flops, "peak_bytes_per_s": peak["bandwidth"],
        "fraction_of_peak_flops": achieved / peak_flops,
        "fraction_of_peak_bandwidth": bandwidth / peak["bandwidth"],
        "roofline_attainable_flops_per_s": attainable,
        "fraction_of_roofline": achieved / attainable,
        "bound": "compute" if intensity * peak["bandwidth"] >= peak_flops else "memory",
    })
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("full", "small", "tiny"), default="small")
  parser.add_argument("--cases", default=",".join(bench_train.CASES))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--batch-size", type=int, default=0,
                      help="global batch (default: 8 on an accelerator, 2 on CPU)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--peak-flops", type=float, default=0.0,
                      help="override the device's peak FLOP/s (for every dtype)")
  parser.add_argument("--peak-bandwidth", type=float, default=0.0,
                      help="override the device's memory bandwidth (bytes/s)")
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  accelerator = device.platform != "cpu"
  name = device_peak_name(device.device_kind)
  if name:
    peak = dict(PEAKS[name], source=f"{name} data sheet (dense)")
  elif device.platform == "cpu":
    peak = cpu_peak()
    peak["source"] = "estimate: " + peak.pop("estimate")
  else:
    peak = {"float32": float("nan"), "bfloat16": float("nan"), "bandwidth": float("nan"),
            "source": f"unknown device {device.device_kind!r}: pass --peak-flops/--peak-bandwidth"}
  if args.peak_flops:
    peak.update({k: args.peak_flops for k in ("float32", "bfloat16", "tf32") if k in peak},
                source="--peak-flops")
  if args.peak_bandwidth:
    peak["bandwidth"] = args.peak_bandwidth
  # Peaks are per device; the step runs data parallel over all of them.
  scaled = {k: v * jax.device_count() if isinstance(v, float) else v for k, v in peak.items()}
  batch_size = args.batch_size or max(8 if accelerator else 2, jax.device_count())
  print(f"device: {jax.device_count()} x {device.device_kind}; peak per device: "
        + ", ".join(f"{k} {v:.3g}" for k, v in peak.items() if isinstance(v, float))
        + f" ({peak['source']})")
  print(f"{'case':<11}{'program':>8}{'dtype':>10}{'GFLOP/vol':>11}{'conv+dot':>10}{'MB/vol':>9}"
        f"{'FLOP/B':>8}{'vol/s':>9}{'TFLOP/s':>9}{'% peak':>8}{'% roofline':>11}  bound")
  rows: list[dict[str, Any]] = []
  for case in [c for c in args.cases.split(",") if c]:
    for dtype in [d for d in args.dtypes.split(",") if d]:
      for r in measure(case, dtype, batch_size, args.size, args.steps, args.warmup, scaled):
        rows.append(r)
        print(f"{r['case']:<11}{r['program']:>8}{r['dtype']:>10}"
              f"{r['xla_flops_per_volume'] / 1e9:>11.2f}{r['conv_dot_flops_per_volume'] / 1e9:>10.2f}"
              f"{r['xla_bytes_per_volume'] / 1e6:>9.1f}{r['intensity_flops_per_byte']:>8.1f}"
              f"{r['volumes_per_second']:>9.2f}{r['achieved_flops_per_s'] / 1e12:>9.3f}"
              f"{100 * r['fraction_of_peak_flops']:>8.2f}{100 * r['fraction_of_roofline']:>11.2f}"
              f"  {r['bound']}", flush=True)
  common.write_result(args.out, {
      "benchmark": "bench_roofline", **common.environment(), "size": args.size,
      "batch_size": batch_size, "peak_per_device": peak, "peaks_table": PEAKS,
      "results": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
