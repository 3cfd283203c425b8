"""Training throughput (volumes/s): this project's jitted train step against PyTorch, same run.

Per case (MRInet at 98^3 and 198^3, SFCN at 160x192x160) and compute dtype (float32, bfloat16):
- jax: the trainer's own step (`train.steps.build_setup`: forward, loss, backward, Adam, donated
  state, explicit shardings, data parallel over all local devices), per conv lowering
  (`--lowerings`; `jit-auto` is what the trainer ships: im2col on CPU, XLA's conv elsewhere);
- torch: the same architecture (`benchmarks/torch_models.py`, same initial weights, same loss,
  Adam with the same learning rate; the fused CUDA Adam on GPU), in the variants a PyTorch user
  would try: `eager`, `compile` (torch.compile of the model), `eager_cl` / `compile_cl`
  (channels_last_3d weights and input); bfloat16 is `torch.autocast` for torch and
  `model.compute_dtype = "bfloat16"` for jax (both keep float32 parameters and optimiser).
Same global batch, data resident on the device, warm-up steps (compilation, autotuning) excluded,
each step synchronised, median of the timed steps. Parameter counts of the two models are
asserted equal. On GPU every measurement runs in its own process (--isolate auto) so that one
framework's memory pool does not starve the other.

  python benchmarks/bench_train.py --size small                    # CPU, a few minutes
  python benchmarks/bench_train.py --size full --batch-size 8 --out train.json   # GPU
  python benchmarks/bench_train.py --cases mrinet-98 --dtypes float32 --torch eager,compile

Sizes: full = the study's inputs; small = scaled-down inputs for a CPU (MRInet 48^3 / 64^3,
SFCN 64x80x64; the table says which); tiny = smoke test. Prints a table; --out writes JSON with
device, date and versions; `speedup_vs_torch` is jax volumes/s over torch's for every variant
(target on GPU, issue 8: >= 1.3x torch.compile).
"""

from __future__ import annotations

import os

# Both frameworks share the accelerator: jax must not grab 75% of it at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from jax_brainage import models, sharding  # noqa: E402
from jax_brainage.train import config as config_lib  # noqa: E402
from jax_brainage.train import config_loading  # noqa: E402
from jax_brainage.train import steps as train_steps  # noqa: E402

# case -> (model name, loss, input (x, y, z) voxels per size)
CASES: dict[str, tuple[str, str, dict[str, tuple[int, int, int]]]] = {
    "mrinet-98": ("mrinet", "mse", {"full": (98,) * 3, "small": (48,) * 3, "tiny": (16,) * 3}),
    "mrinet-198": ("mrinet", "mse", {"full": (198,) * 3, "small": (64,) * 3, "tiny": (20,) * 3}),
    "sfcn-160": ("sfcn", "soft_label",
                 {"full": (160, 192, 160), "small": (64, 80, 64), "tiny": (32, 32, 32)}),
}
# tiny: a narrow SFCN, so the smoke test compiles and runs in seconds.
TINY_SFCN_CHANNELS = (4, 8, 8, 8, 8, 4)
TORCH_VARIANTS = ("eager", "compile", "eager_cl", "compile_cl")
LEARNING_RATE = 5e-4  # the study's Adam learning rate (config.optimizer.learning_rate)


def experiment_config(case: str, dtype: str, batch_size: int, size: str,
                      lowering: str = "auto"):
  """The trainer config of a benchmark case (the base config with the case's model and loss;
  `lowering` is `model.conv_lowering`: "auto" is what the trainer ships)."""
  name, loss, _ = CASES[case]
  config = config_lib.base_config()
  config_loading.set_key(config, "model.conv_lowering", lowering)
  config_loading.set_key(config, "data.cache", "unused")
  config_loading.set_key(config, "model.name", name)
  config_loading.set_key(config, "loss", loss)
  config_loading.set_key(config, "model.compute_dtype", dtype)
  config_loading.set_key(config, "batch_size", batch_size)
  config_loading.set_key(config, "optimizer.learning_rate", LEARNING_RATE)
  if size == "tiny" and name == "sfcn":
    config_loading.set_key(config, "model.conv_features", TINY_SFCN_CHANNELS)
  return config


def random_batch(shape: tuple[int, ...], batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """`image` float32 `[batch, x, y, z, 1]` in [0, 1] and `age` float32 `[batch]` (18-82 years)."""
  rng = np.random.default_rng(seed)
  return {"image": rng.random((batch_size, *shape, 1), dtype=np.float32),
          "age": rng.uniform(18, 82, batch_size).astype(np.float32)}


class JaxStep:
  """The trainer's jitted update step for a case, its sharded state and a device-resident batch.

  Attributes: setup (`train.steps.Setup`), state, batch, params (trainable count), mesh.
  `run()` does one step (the state is donated and replaced) and returns the metrics.
  """

  def __init__(self, case: str, dtype: str, batch_size: int, size: str, shape=None, mesh=None,
               lowering: str = "auto"):
    config = experiment_config(case, dtype, batch_size, size, lowering)
    self.shape = tuple(shape or CASES[case][2][size])
    self.mesh = mesh or sharding.make_mesh()
    sharding.check_batch_size(batch_size, self.mesh)
    self.setup = train_steps.build_setup(config, self.shape, 1, 50.0, 1000, self.mesh)
    self.state = jax.device_put(self.setup.init(0), self.setup.state_sharding)
    self.batch = sharding.global_batch(self.mesh, random_batch(self.shape, batch_size))
    self.params = sum(int(x.size) for x in jax.tree.leaves(self.state["params"]))
    self.batch_size = batch_size

  def run(self):
    self.state, metrics = self.setup.train_step(self.state, self.batch)
    return metrics

  def initial_variables(self) -> dict[str, Any]:
    """Host copies of the initial parameters (and BatchNorm statistics), for torch."""
    state = self.setup.init(0)
    return jax.tree.map(np.asarray, {"params": state["params"], **state["model_state"]})


def measure_jax(case: str, dtype: str, batch_size: int, size: str, steps: int,
                warmup: int, lowering: str = "auto") -> dict[str, Any]:
  step = JaxStep(case, dtype, batch_size, size, lowering=lowering)
  t0 = time.perf_counter()
  jax.block_until_ready(step.run())
  compile_s = time.perf_counter() - t0
  median, times = common.median_seconds(step.run, jax.block_until_ready, steps=steps,
                                        warmup=max(warmup - 1, 0))
  metrics = jax.device_get(step.run())
  return {"framework": "jax", "variant": f"jit-{lowering}", "params": step.params, "compile_s": compile_s,
          "median_step_s": median, "step_s": times, "loss": float(metrics["loss"])}


def measure_torch(case: str, dtype: str, batch_size: int, size: str, variant: str, steps: int,
                  warmup: int) -> dict[str, Any]:
  import torch

  import torch_models

  name, loss_name, _ = CASES[case]
  shape = CASES[case][2][size]
  # The flax model and its initial weights, built by the trainer's own code (no jit, no step).
  config = experiment_config(case, dtype, batch_size, size)
  model = models.get_model(name, **config_lib.model_kwargs(config, 50.0))
  state = train_steps.init_state(model, train_steps.make_optimizer(
      config.optimizer, train_steps.make_schedule(config.optimizer, 1000)), shape, 1, 0)
  variables = jax.tree.map(np.asarray, {"params": state["params"], **state["model_state"]})
  jax_params = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  # PyTorch at its best: cuDNN picks its fastest convolution algorithms (XLA autotunes too).
  torch.backends.cudnn.benchmark = True
  net = torch_models.load_flax_variables(torch_models.from_flax(name, model, shape), variables)
  torch_params = torch_models.num_parameters(net)
  assert torch_params == jax_params, f"{case}: torch {torch_params} vs jax {jax_params} parameters"
  channels_last = variant.endswith("_cl")
  memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
  net = net.to(device=device, memory_format=memory_format).train()
  batch = random_batch(shape, batch_size)
  x = torch_models.to_torch_input(batch["image"]).to(device=device, memory_format=memory_format)
  age = torch.from_numpy(batch["age"]).to(device)
  centers = model.bins.centers if loss_name == "soft_label" else None
  loss_fn = torch_models.make_loss(loss_name, centers, float(config.soft_label_sigma))
  opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE,
                         **({"fused": True} if device == "cuda" else {}))
  forward = torch.compile(net) if variant.startswith("compile") else net
  bf16 = dtype == "bfloat16"

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      out = forward(x)
    loss = loss_fn(out, age)
    loss.backward()
    opt.step()
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  t0 = time.perf_counter()
  sync(step())
  compile_s = time.perf_counter() - t0
  median, times = common.median_seconds(step, sync, steps=steps, warmup=max(warmup - 1, 0))
  loss = float(step().detach().cpu())
  return {"framework": "torch", "variant": variant, "params": torch_params,
          "compile_s": compile_s, "median_step_s": median, "step_s": times, "loss": loss,
          "torch_device": common.torch_device_name(device)}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """One row: spec = {case, dtype, batch_size, size, framework, variant, steps, warmup}."""
  row = {k: spec[k] for k in ("case", "dtype", "batch_size", "size", "framework", "variant")}
  name, _, shapes = CASES[spec["case"]]
  row.update(model=name, shape=list(shapes[spec["size"]]))
  try:
    args = (spec["case"], spec["dtype"], spec["batch_size"], spec["size"])
    if spec["framework"] == "jax":
      lowering = spec["variant"].removeprefix("jit-")
      row.update(measure_jax(*args, spec["steps"], spec["warmup"], lowering))
    else:
      row.update(measure_torch(*args, spec["variant"], spec["steps"], spec["warmup"]))
    row["volumes_per_second"] = spec["batch_size"] / row["median_step_s"]
    row["loss_finite"] = bool(np.isfinite(row["loss"]))
  except AssertionError:
    raise
  except Exception as e:  # noqa: BLE001 - an OOM or a compile failure is a result, not a crash
    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    traceback.print_exc()
  return row


def measure_isolated(spec: dict[str, Any]) -> dict[str, Any]:
  """`measure(spec)` in a fresh process (its device memory is returned when it exits)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "row.json"
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec),
                           "--out", str(out)], check=False)
    if out.exists():
      return json.loads(out.read_text())
  row = {k: spec[k] for k in ("case", "dtype", "batch_size", "size", "framework", "variant")}
  row["error"] = f"worker process exited with status {proc.returncode}"
  return row


def add_speedups(rows: list[dict[str, Any]]) -> None:
  """jax volumes/s over each torch variant's, for the same case and dtype (in the jax row)."""
  for row in rows:
    if row["framework"] != "jax" or "volumes_per_second" not in row:
      continue
    row["speedup_vs_torch"] = {
        r["variant"]: row["volumes_per_second"] / r["volumes_per_second"] for r in rows
        if r["framework"] == "torch" and r["case"] == row["case"] and r["dtype"] == row["dtype"]
        and "volumes_per_second" in r}


def print_table(rows: list[dict[str, Any]], header: bool = True) -> None:
  if header:
    print(f"{'case':<11}{'shape':>14}{'dtype':>10}{'framework':>10}{'variant':>12}{'batch':>6}"
          f"{'params':>11}{'ms/step':>10}{'volumes/s':>11}{'compile s':>10}  jax speed-up")
  for r in rows:
    shape = "x".join(str(s) for s in r.get("shape", []))
    head = (f"{r['case']:<11}{shape:>14}{r['dtype']:>10}{r['framework']:>10}{r['variant']:>12}"
            f"{r['batch_size']:>6}")
    if "error" in r:
      print(f"{head}  failed: {r['error']}")
      continue
    speed = ", ".join(f"{k} {v:.2f}x" for k, v in r.get("speedup_vs_torch", {}).items())
    print(f"{head}{r['params']:>11,}{1e3 * r['median_step_s']:>10.1f}"
          f"{r['volumes_per_second']:>11.2f}{r['compile_s']:>10.1f}  {speed}", flush=True)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=("full", "small", "tiny"), default="small")
  parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--torch", default=None,
                      help=f"torch variants, comma list of {TORCH_VARIANTS} or 'none' "
                           "(default: all on GPU, eager,eager_cl,compile on CPU)")
  parser.add_argument("--lowerings", default="auto",
                      help="jax conv lowerings (model.conv_lowering), comma list of "
                           "auto,xla,im2col; auto = im2col on CPU, XLA's conv on accelerators")
  parser.add_argument("--batch-size", type=int, default=0,
                      help="global batch (default: 8 on an accelerator, 2 on CPU; a multiple "
                           "of the device count)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps, compilation included")
  parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                      help="one process per measurement (auto: on GPU)")
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:  # child of --isolate: one measurement, JSON row to --out
    common.write_result(args.out, measure(json.loads(args.worker)))
    return 0

  platform_name = jax.devices()[0].platform
  accelerator = platform_name != "cpu"
  batch_size = args.batch_size or max(8 if accelerator else 2, jax.device_count())
  if args.torch is None:
    variants = list(TORCH_VARIANTS) if accelerator else ["eager", "eager_cl", "compile"]
  else:
    variants = [] if args.torch == "none" else [v for v in args.torch.split(",") if v]
  for v in variants:
    if v not in TORCH_VARIANTS:
      parser.error(f"--torch: unknown variant {v!r} (choose from {TORCH_VARIANTS})")
  lowerings = [v for v in args.lowerings.split(",") if v]
  for v in lowerings:
    if v not in models.lowering.LOWERINGS:
      parser.error(f"--lowerings: unknown lowering {v!r} (choose from {models.lowering.LOWERINGS})")
  isolate = args.isolate == "yes" or (args.isolate == "auto" and accelerator)
  rows: list[dict[str, Any]] = []
  for case in [c for c in args.cases.split(",") if c]:
    if case not in CASES:
      parser.error(f"--cases: unknown case {case!r} (choose from {list(CASES)})")
    for dtype in [d for d in args.dtypes.split(",") if d]:
      jax_rows = [("jax", f"jit-{lowering}") for lowering in lowerings]
      for framework, variant in jax_rows + [("torch", v) for v in variants]:
        spec = dict(case=case, dtype=dtype, batch_size=batch_size, size=args.size,
                    framework=framework, variant=variant, steps=args.steps, warmup=args.warmup)
        rows.append(measure_isolated(spec) if isolate else measure(spec))
        print_table(rows[-1:], header=len(rows) == 1)
  add_speedups(rows)
  print("\nsummary (jax speed-up = jax volumes/s / torch volumes/s, same case and dtype):")
  print_table(rows)
  extra = ["torch"] if variants else []
  result = {"benchmark": "bench_train", **common.environment(*extra), "size": args.size,
            "batch_size": batch_size, "steps": args.steps, "warmup": args.warmup,
            "learning_rate": LEARNING_RATE, "isolated": isolate, "results": rows}
  if variants:
    import torch
    result["torch_device"] = common.torch_device_name(
        "cuda" if torch.cuda.is_available() else "cpu")
  common.write_result(args.out, result)
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
