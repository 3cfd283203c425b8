"""LRP cost on MRInet: relevance throughput and cost relative to an input gradient.

In one run, on the same model, device and batch: the forward pass, the input gradient
(d sum(age) / dx, the cheapest attribution), and `lrp.relevance` for EpsilonPlusFlat,
EpsilonGammaBox(0, 1) and SequentialPresetA, each one jitted function, timed as the median of
--repeats calls after a warm-up (compile) call. Targets (issue 4): EpsilonPlusFlat <= 1.5x the
gradient, EpsilonGammaBox <= 3x. --zennit also times zennit 0.5.1 (PyTorch, this host's CPU or
CUDA) on the same weights and input.

  python benchmarks/bench_lrp.py --shape 64 --batch-size 2 --repeats 5          # CPU
  python benchmarks/bench_lrp.py --shape 198 --batch-size 4 --out lrp.json      # GPU, study size
  python benchmarks/bench_lrp.py --shape 64 --batch-size 2 --zennit             # vs zennit

Prints a table; --out writes JSON with the device, date and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

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


def _zennit_times(variables, x, repeats, names):
  """Median seconds per zennit relevance call (and a torch input gradient) on the same weights."""
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lrp"))
  import torch_nets  # the zennit cross-check's helpers: torchvision stub, zennit import

  torch_nets.import_zennit()
  import zennit.attribution
  import zennit.composites

  class SamePad3d(tnn.Module):
    def forward(self, u):
      pads = []
      for n in reversed(u.shape[2:]):
        total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
        pads += [total // 2, total - total // 2]
      return F.pad(u, pads, value=-math.inf)

  class Flatten(tnn.Module):
    def forward(self, u):
      return u.permute(0, 2, 3, 4, 1).reshape(u.shape[0], -1)

  p = variables["params"]
  layers, c_in = [], x.shape[-1]
  for i in range(1, 6):
    k = np.asarray(p[f"conv{i}"]["kernel"])
    conv = tnn.Conv3d(c_in, k.shape[-1], k.shape[0], padding=k.shape[0] // 2)
    conv.weight.data = torch.from_numpy(np.array(k.transpose(4, 3, 0, 1, 2)))
    conv.bias.data = torch.from_numpy(np.array(p[f"conv{i}"]["bias"]))
    layers += [conv, tnn.ReLU(), SamePad3d(), tnn.MaxPool3d(3, 2)]
    c_in = k.shape[-1]
  dense = []
  for name in ("dense1", "age_head"):
    k = np.asarray(p[name]["kernel"])
    lin = tnn.Linear(*k.shape)
    lin.weight.data = torch.from_numpy(np.array(k.T))
    lin.bias.data = torch.from_numpy(np.array(p[name]["bias"]))
    dense.append(lin)
  net = tnn.Sequential(*layers, Flatten(), dense[0], tnn.ReLU(), dense[1]).eval()
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  net = net.to(dev)
  xt = torch.from_numpy(np.array(np.asarray(x).transpose(0, 4, 1, 2, 3))).to(dev)

  def sync():
    if dev == "cuda":
      torch.cuda.synchronize()

  def timed(fn):
    fn()
    sync()
    ts = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      sync()
      ts.append(time.perf_counter() - t)
    return statistics.median(ts)

  def grad():
    u = xt.clone().requires_grad_(True)
    net(u).sum().backward()
    return u.grad

  out = {"gradient": timed(grad)}
  zc = {"EpsilonPlusFlat": lambda: zennit.composites.EpsilonPlusFlat(),
        "EpsilonGammaBox": lambda: zennit.composites.EpsilonGammaBox(low=0.0, high=1.0),
        "SequentialPresetA": lambda: zennit.composites.EpsilonAlpha2Beta1()}  # nearest zennit has
  for name in names:
    if name == "SequentialPresetA":
      continue  # zennit has no preset A; not timed
    comp = zc[name]()
    with zennit.attribution.Gradient(net, comp) as attributor:
      def run():
        return attributor(xt, lambda o: o)[1]
      out[name] = timed(run)
  return out, dev


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
  for name in names:
    comp = COMPOSITES[name]()
    fn = jax.jit(lambda v, u, comp=comp: lrp.relevance(model.apply, v, u, comp))
    rows[name] = _time(fn, variables, x, repeats=args.repeats)

  device = jax.devices()[0]
  print(f"MRInet {shape} batch {args.batch_size} on {device.device_kind} ({device.platform}), "
        f"median of {args.repeats}")
  print(f"{'method':<22}{'s/call':>10}{'volumes/s':>12}{'x gradient':>12}")
  g = rows["gradient"]
  for name, t in rows.items():
    print(f"{name:<22}{t:>10.4f}{args.batch_size / t:>12.2f}{t / g:>12.2f}")
  result = {
      "benchmark": "bench_lrp", "model": "MRInet", "shape": list(shape),
      "batch_size": args.batch_size, "repeats": args.repeats,
      "seconds_per_call": rows, "cost_vs_gradient": {k: v / g for k, v in rows.items()},
      "targets": {"EpsilonPlusFlat": 1.5, "EpsilonGammaBox": 3.0},
      "device": device.device_kind, "platform": device.platform,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "versions": {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
                   "python": platform.python_version()},
  }
  if args.zennit:
    zt, zdev = _zennit_times(variables, x, args.repeats, names)
    import torch
    import zennit
    print(f"zennit {zennit.__version__ if hasattr(zennit, '__version__') else '0.5.1'} "
          f"(torch {torch.__version__}, {zdev}):")
    for name, t in zt.items():
      ours = rows.get(name)
      speed = f"{t / ours:>8.2f}x lrp's time" if ours else ""
      print(f"  {name:<20}{t:>10.4f} s/call  {t / zt['gradient']:>6.2f}x its gradient {speed}")
    result["zennit"] = {"device": zdev, "torch": torch.__version__, "seconds_per_call": zt}
  if args.out:
    from jax_brainage import fileio
    fileio.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
