"""Fine-tuning against training from scratch on a small cohort from another "scanner".

A model pretrained on the cpu preset's cohort (`--pretrained W`, e.g. `brainage train --config
configs/cpu.py --workdir W`) meets cohort B: older (40-82 years instead of 18-82; the same ageing
model, `reference_brain_age` 18), from a noisier scanner with stronger bias fields and intensity
scaling (noise 0.06 instead of 0.03, bias 0.16 instead of 0.08, scale SD 0.2 instead of 0.1).
Only `--n` subjects of B are labelled (80/10/10 split); `--n-test` more, never trained on,
measure each model:

- zero-shot: the pretrained model as it is;
- scratch: configs/cpu.py trained on B alone (`--epochs`);
- fine-tuned: the same config and epochs, `--config.init_from W`, every layer at the preset's
  learning rate x `--lr-ratio`;
- fine-tuned, discriminative: the output layer at the preset's learning rate, the loaded layers
  at `--pretrained-lr-scale` times it (`config.finetune.pretrained_lr_scale`).

    python benchmarks/bench_finetune.py --pretrained runs/cpu --out finetune.json [--work DIR]

Prints one table and writes the numbers (with device and date) as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from jax_brainage import fileio  # noqa: E402
from jax_brainage.data import simulate  # noqa: E402
from jax_brainage.data.simulation.config import CohortConfig  # noqa: E402

# Cohort B: another age range and scanner (see the module docstring).
SCANNER_B = {"age_min": 40.0, "reference_brain_age": 18.0, "noise_sd": 0.06,
             "bias_field_sd": 0.16, "intensity_scale_sd": 0.2}
PREPARE = ["--sequences", "T1w,FLAIR,swi", "--scaling", "zscore", "--bias-sigma", "20",
           "--shape", "40,50,40"]


def brainage(*args: str) -> float:
  """Runs `python -m jax_brainage ARGS` (the `brainage` command); returns its wall seconds."""
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-m", "jax_brainage", *args], check=True,
                 env=dict(os.environ, PYTHONPATH=str(common.REPO)))
  return time.perf_counter() - t0


def mae(predictions: Path) -> float:
  with open(predictions, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  err = [abs(float(r["predicted_age"]) - float(r["age"])) for r in rows]
  return float(np.mean(err))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pretrained", required=True, help="workdir of the cpu-preset model")
  p.add_argument("--work", default="finetune-work", help="where cohorts and runs go")
  p.add_argument("--out", default=None, help="JSON results")
  p.add_argument("--n", type=int, default=300, help="labelled subjects of cohort B")
  p.add_argument("--n-test", type=int, default=300, help="test subjects of cohort B")
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--lr-ratio", type=float, default=0.2,
                 help="fine-tuning learning rate / the preset's")
  p.add_argument("--pretrained-lr-scale", type=float, default=0.1,
                 help="discriminative fine-tuning: loaded layers' learning rate / the head's")
  args = p.parse_args(argv)
  work = Path(args.work)
  timing: dict[str, float] = {}
  cohorts = {}
  for name, seed, n in (("train", 11, args.n), ("test", 12, args.n_test)):
    config = CohortConfig(seed=seed, n=n, resolution_mm=4, **SCANNER_B)
    t0 = time.perf_counter()
    cohorts[name] = simulate.write_cohort(work / f"cohort-b-{name}", config)
    timing[f"simulate_{name}"] = time.perf_counter() - t0
  cache = work / "cohort-b-cache"
  if not (cache / "index.json").is_file():
    timing["prepare"] = brainage("prepare", "--data", str(cohorts["train"]), "--out", str(cache),
                                 "--quiet", *PREPARE)
  cpu = str(common.REPO / "configs" / "cpu.py")
  lr = 5e-4 * args.lr_ratio
  runs = {
      "scratch": [],
      "finetuned": ["--config.init_from", str(args.pretrained),
                    "--config.optimizer.learning_rate", repr(lr)],
      "finetuned_discriminative": ["--config.init_from", str(args.pretrained),
                                   "--config.finetune.pretrained_lr_scale",
                                   repr(args.pretrained_lr_scale)],
  }
  results: dict[str, dict[str, float]] = {}
  for name, extra in runs.items():
    workdir = work / name
    timing[f"train_{name}"] = brainage(
        "train", "--config", cpu, "--workdir", str(workdir), "--quiet",
        "--config.data.cache", str(cache), "--config.num_epochs", str(args.epochs), *extra)
    metrics = json.loads((workdir / "metrics.json").read_text())
    results[name] = {"best_val_mae": metrics["best_val_mae"], "best_step": metrics["best_step"]}
  for name, workdir in (("zero_shot", Path(args.pretrained)),
                        *((name, work / name) for name in runs)):
    out = work / f"predictions-{name}.tsv"
    if not out.is_file():
      brainage("predict", "--workdir", str(workdir), "--data", str(cohorts["test"]), "--out",
               str(out))
    results.setdefault(name, {})["test_mae"] = mae(out)
  record = {"environment": common.environment(), "cohort_b": SCANNER_B,
            "n_labelled": args.n, "n_test": args.n_test, "epochs": args.epochs,
            "finetune_learning_rate": lr, "pretrained_lr_scale": args.pretrained_lr_scale,
            "results": results, "seconds": timing}
  print(f"{'model':26s} {'val MAE':>8s} {'test MAE':>9s}   (years; cohort B, {args.n} labelled, "
        f"{args.n_test} test)")
  for name, r in results.items():
    print(f"{name:26s} {r.get('best_val_mae', float('nan')):8.2f} {r['test_mae']:9.2f}")
  if args.out:
    fileio.write_json(args.out, fileio.jsonable(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())
