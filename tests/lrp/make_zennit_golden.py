"""Writes the zennit golden files in tests/lrp/golden/ (needs torch and zennit 0.5.1).

  python tests/lrp/make_zennit_golden.py            # (re)write tests/lrp/golden/<net>.npz
  python tests/lrp/make_zennit_golden.py --check    # recompute; exit 1 if a file disagrees

One file per net of tests/lrp/torch_nets.py, made deterministically from GOLDEN_SEED: the same
seed gives the same weights, input and (float64) relevance, and the zip is written with fixed
timestamps, so regenerating on an unchanged zennit/torch rewrites identical bytes. Contents:
  input                  [batch, x, y, z, 1] float64, uniform in [low, high]
  output                 [batch] the torch replica's forward output (checks the flax weights)
  variables/<path>       flax variables, e.g. variables/params/conv1/kernel [kx, ky, kz, in, out]
  relevance/<composite>  zennit's relevance [batch, x, y, z, 1], starting from the output itself
  contrast/<composite>   the same starting from f(x) - meta/contrast_reference (one composite)
  meta/...               net, seed, low, high, epsilon, stabilizer, gamma, torch and zennit versions
`tests/lrp/test_zennit.py` checks `lrp` against these files without torch.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN_DIR = HERE / "golden"
GOLDEN_SEED = 0

if str(HERE) not in sys.path:
  sys.path.insert(0, str(HERE))
try:
  from jax_brainage import fileio
except ImportError:  # run as a script from anywhere: the repository root holds the package
  sys.path.insert(0, str(HERE.parents[1]))
  from jax_brainage import fileio

import jax  # noqa: E402

import torch_nets  # noqa: E402


def golden_arrays(net: str, seed: int = GOLDEN_SEED) -> dict[str, np.ndarray]:
  """Everything one golden file holds for `net`, computed with torch and zennit."""
  variables = torch_nets.init_variables(net, seed)
  x = torch_nets.random_input(net, seed)
  output = torch_nets.torch_forward(net, variables, x)
  # The replica must compute the flax net's function before its relevance means anything.
  with jax.enable_x64(True):
    flax_output = np.asarray(torch_nets.flax_model(net).apply(variables, x))
  if not np.allclose(flax_output, output, rtol=1e-10, atol=1e-12):
    raise RuntimeError(f"{net}: torch replica output {output} != flax output {flax_output}")
  arrays = {"input": x, "output": output}
  for name, value in torch_nets.flatten_variables(variables).items():
    arrays[f"variables/{name}"] = value
  for composite in torch_nets.COMPOSITES:
    arrays[f"relevance/{composite}"] = torch_nets.zennit_relevance(net, variables, x, composite)
  arrays[f"contrast/{torch_nets.CONTRAST_COMPOSITE}"] = torch_nets.zennit_relevance(
    net, variables, x, torch_nets.CONTRAST_COMPOSITE, reference=torch_nets.CONTRAST_REFERENCE)
  meta = {
    "net": net, "seed": seed, "low": torch_nets.LOW, "high": torch_nets.HIGH,
    "epsilon": torch_nets.EPSILON, "stabilizer": torch_nets.STABILIZER,
    "gamma": torch_nets.GAMMA, "preset_a_epsilon": torch_nets.PRESET_A_EPSILON,
    "contrast_reference": torch_nets.CONTRAST_REFERENCE,
    **{f"{k}_version": v for k, v in torch_nets.versions().items()},
  }
  for key, value in meta.items():
    arrays[f"meta/{key}"] = np.asarray(value)  # strings as unicode arrays: no pickle needed
  return arrays


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """`np.savez_compressed` with fixed zip timestamps and sorted names, written atomically."""
  with fileio.atomic_path(path) as tmp:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
      for name in sorted(arrays):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asarray(arrays[name]), allow_pickle=False)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        zf.writestr(info, buffer.getvalue())


def check(path: Path, arrays: dict[str, np.ndarray]) -> list[str]:
  """Names whose stored value disagrees with the recomputed one (float64 round-off allowed)."""
  if not path.exists():
    return [f"{path.name}: missing"]
  problems = []
  with np.load(path, allow_pickle=False) as stored:
    if set(stored.files) != set(arrays):
      problems.append(f"{path.name}: keys differ: {sorted(set(stored.files) ^ set(arrays))}")
    for name in sorted(set(stored.files) & set(arrays)):
      new, old = np.asarray(arrays[name]), stored[name]
      if name.startswith("meta/") and name.endswith("_version"):
        continue  # provenance, not a value to compare
      if new.dtype.kind in "fc":
        scale = max(float(np.abs(new).max(initial=0.0)), 1e-300)
        if old.shape != new.shape or np.abs(new - old).max(initial=0.0) > 1e-9 * scale:
          problems.append(f"{path.name}: {name} differs")
      elif not np.array_equal(new, old):
        problems.append(f"{path.name}: {name} differs")
  return problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=GOLDEN_DIR, help="folder for <net>.npz")
  parser.add_argument("--check", action="store_true", help="compare instead of writing")
  parser.add_argument("--nets", nargs="*", default=list(torch_nets.NETS), choices=torch_nets.NETS)
  args = parser.parse_args(argv)
  problems = []
  for net in args.nets:
    arrays = golden_arrays(net)
    path = args.out / f"{net}.npz"
    if args.check:
      problems += check(path, arrays)
    else:
      write_npz(path, arrays)
      print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
  for problem in problems:
    print(problem, file=sys.stderr)
  if args.check and not problems:
    print("golden files reproduce")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
