"""LRP cost on MRInet: relevance throughput and cost relative to an input gradient.

In one run, on the same model, device and batch: the forward pass, the input gradient
(d sum(age) / dx, the cheapest attribution), and `lrp.relevance` for EpsilonPlusFlat,
EpsilonGammaBox(0, 1) and SequentialPresetA, each one jitted function, timed as the median of
--repeats calls after a warm-up (compile) call. Targets (issue 4): EpsilonPlusFlat <= 1.5x the
gradient, EpsilonGammaBox <= 3x. --zennit also times zennit (PyTorch, CUDA when available, else
this host's CPU) on the same weights and input: its input gradient and the same three
composites (preset A as a zennit LayerMapComposite: alpha1beta0 on convolutions, epsilon 0.1 on
dense layers), its relevance throughput, its cost relative to its own gradient, this library's
speed-up over it (target on GPU, issue 8: >= 3x) and how far the two relevance maps are apart
(relative L2; they implement the same rules, so this should be float32 rounding).

  python benchmarks/bench_lrp.py --shape 64 --batch-size 2 --repeats 5          # CPU
  python benchmarks/bench_lrp.py --shape 198 --batch-size 4 --out lrp.json      # GPU, study size
  python benchmarks/bench_lrp.py --shape 64 --batch-size 2 --zennit             # vs zennit

Prints a table; --out writes JSON with the device, date and library versions.
"""

from __future__ import annotations

import argparse
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

COMPOSITES = {
    "EpsilonPlusFlat": lambda: lrp.composites.EpsilonPlusFlat(),
    "EpsilonGammaBox": lambda: lrp.composites.EpsilonGammaBox(0.0, 1.0),
    "SequentialPresetA": lambda: lrp.composites.SequentialPresetA(),
}


def _model():
  from jax_brainage.models.mrinet import MRInet
  return MRInet()


def _time(fn, *args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)  # compile + warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _zennit_times(model, variables, x, repeats, names, relevance):
  """Median seconds per zennit relevance call (and a torch input gradient) on the same weights,
  and how far zennit's relevance is from `relevance[name]` (this library's, same input).

  The torch MRInet is `benchmarks/torch_models.TorchMRInet` with the flax weights copied in;
  the composites are zennit's own (SequentialPresetA as the study's iNNvestigate preset A, built
  as in the zennit cross-check tests: alpha1beta0 on convolutions, epsilon 0.1 on dense layers).
  """
  import torch

  import torch_models
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lrp"))
  import torch_nets  # the zennit cross-check's helpers: torchvision stub, preset A

  torch_nets.import_zennit()
  import zennit.attribution
  import zennit.composites

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  net = torch_models.from_flax("mrinet", model, x.shape[1:4], x.shape[-1])
  net = torch_models.load_flax_variables(net, variables).eval().to(dev)
  xt = torch_models.to_torch_input(np.asarray(x)).to(dev)

  def sync():
    if dev == "cuda":
      torch.cuda.synchronize()

  def timed(fn):
    out = fn()
    sync()
    ts = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      sync()
      ts.append(time.perf_counter() - t)
    return statistics.median(ts), out

  def grad():
    u = xt.clone().requires_grad_(True)
    net(u).sum().backward()
    return u.grad

  times = {"gradient": timed(grad)[0]}
  agreement = {}
  zc = {"EpsilonPlusFlat": lambda: zennit.composites.EpsilonPlusFlat(),
        "EpsilonGammaBox": lambda: zennit.composites.EpsilonGammaBox(low=0.0, high=1.0),
        "SequentialPresetA": lambda: torch_nets.zennit_composite("SequentialPresetA", False)}
  for name in names:
    with zennit.attribution.Gradient(net, zc[name]()) as attributor:
      # zennit's output is [batch] (MRInet's age): the relevance starts at the age itself.
      times[name], rel = timed(lambda: attributor(xt, lambda o: o)[1])
    ours = np.asarray(relevance[name], np.float64)
    theirs = np.moveaxis(rel.detach().float().cpu().numpy(), 1, -1).astype(np.float64)
    agreement[name] = {
        "max_abs_difference": float(np.abs(ours - theirs).max()),
        "max_abs_relevance": float(np.abs(ours).max()),
        "relative_l2": float(np.linalg.norm(ours - theirs) / np.linalg.norm(ours)),
        "sum_lrp": float(ours.sum()), "sum_zennit": float(theirs.sum())}
  return times, agreement, dev


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="64", help="cube side or X,Y,Z (voxels)")
  ap.add_argument("--batch-size", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--composites", default=",".join(COMPOSITES))
  ap.add_argument("--zennit", action="store_true", help="also time zennit on the same weights")
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  args = ap.parse_args(argv)

  side = [int(s) for s in args.shape.split(",")]
  shape = tuple(side * 3 if len(side) == 1 else side)
  names = [n for n in args.composites.split(",") if n]
  model = _model()
  x = jax.random.uniform(jax.random.key(0), (args.batch_size, *shape, 1), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(1), x)
  # Realistic activations: no dead layers from the random init.

  forward = jax.jit(lambda v, u: model.apply(v, u))
  gradient = jax.jit(lambda v, u: jax.grad(lambda w: model.apply(v, w).sum())(u))
  rows = {"forward": _time(forward, variables, x, repeats=args.repeats),
          "gradient": _time(gradient, variables, x, repeats=args.repeats)}
  relevance = {}
  for name in names:
    comp = COMPOSITES[name]()
    fn = jax.jit(lambda v, u, comp=comp: lrp.relevance(model.apply, v, u, comp))
    rows[name] = _time(fn, variables, x, repeats=args.repeats)
    relevance[name] = np.asarray(fn(variables, x))

  device = jax.devices()[0]
  print(f"MRInet {shape} batch {args.batch_size} on {device.device_kind} ({device.platform}), "
        f"median of {args.repeats}")
  print(f"{'method':<22}{'s/call':>10}{'volumes/s':>12}{'x gradient':>12}")
  g = rows["gradient"]
  for name, t in rows.items():
    print(f"{name:<22}{t:>10.4f}{args.batch_size / t:>12.2f}{t / g:>12.2f}")
  result = {
      "benchmark": "bench_lrp", **common.environment(*(("torch", "zennit") if args.zennit else ())),
      "model": "MRInet", "shape": list(shape), "batch_size": args.batch_size,
      "repeats": args.repeats, "seconds_per_call": rows,
      "volumes_per_second": {k: args.batch_size / v for k, v in rows.items()},
      "cost_vs_gradient": {k: v / g for k, v in rows.items()},
      "targets": {"EpsilonPlusFlat": 1.5, "EpsilonGammaBox": 3.0},
  }
  if args.zennit:
    zt, agreement, zdev = _zennit_times(model, variables, x, args.repeats, names, relevance)
    import torch
    print(f"zennit {result['versions']['zennit']} (torch {torch.__version__}, {zdev}), same weights "
          f"and input:")
    print(f"{'method':<22}{'s/call':>10}{'volumes/s':>12}{'x gradient':>12}{'lrp speed-up':>14}"
          f"{'rel. L2 diff':>14}")
    for name, t in zt.items():
      ours = rows.get(name)
      diff = agreement.get(name, {}).get("relative_l2")
      print(f"{name:<22}{t:>10.4f}{args.batch_size / t:>12.2f}{t / zt['gradient']:>12.2f}"
            f"{t / ours:>13.2f}x" + (f"{diff:>14.2e}" if diff is not None else ""))
    result["zennit"] = {
        "device": zdev, "torch": torch.__version__, "seconds_per_call": zt,
        "volumes_per_second": {k: args.batch_size / v for k, v in zt.items()},
        "cost_vs_gradient": {k: v / zt["gradient"] for k, v in zt.items()},
        "agreement_with_lrp": agreement}
    result["speedup_vs_zennit"] = {k: zt[k] / rows[k] for k in zt}
    result["speedup_targets"] = {k: 3.0 for k in names}
  common.write_result(args.out, result)
  return result


if __name__ == "__main__":
  main()
