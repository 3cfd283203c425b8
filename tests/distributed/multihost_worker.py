"""One process of the multi-process test run (started by `launch/local.py` from the test).

    python tests/distributed/multihost_worker.py --full W_FULL --partial W_PART --log DIR \
        [--simulate SIM]

Joins the run from the BRAINAGE_* environment (`jax_brainage.distributed.initialize`); with
--simulate, opens the training data of a config that simulates a 3-subject cohort into SIM
(the path every process takes when `data.simulate.n > 0`); then trains the shared tiny
experiment twice: into W_PART up to step RESUME_AT (resumed later by the
test on another process count), and into W_FULL to the end. Every file this process writes
through `jax_brainage.fileio` is recorded in DIR/process_<i>.json, with its pid (TensorBoard
event file names carry it), so the test can check that only process 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jax_brainage import distributed  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--full", type=Path, required=True)
  parser.add_argument("--partial", type=Path, required=True)
  parser.add_argument("--log", type=Path, required=True)
  parser.add_argument("--members", type=int, default=None, help="default: the case's")
  parser.add_argument("--simulate", type=Path, default=None)
  args = parser.parse_args()

  distributed.initialize()  # before anything touches JAX
  import jax

  from jax_brainage import fileio
  from jax_brainage.train import trainer
  import multihost_case as case

  jax.config.update("jax_numpy_rank_promotion", "raise")
  written: list[str] = []
  original = fileio.atomic_path

  @contextlib.contextmanager
  def recording_atomic_path(path, suffix=""):
    written.append(str(Path(path).resolve()))
    with original(path, suffix) as tmp:
      yield tmp

  fileio.atomic_path = recording_atomic_path
  config, data = case.make_config(args.members), case.make_data()
  simulated = None
  try:
    if args.simulate:
      from jax_brainage.train import data as data_lib

      opened = data_lib.open_training_data(case.simulate_config(args.simulate))
      simulated = {"subjects": len(opened.source), "image_shape": list(opened.image_shape)}
    partial = trainer.train_and_evaluate(config, args.partial, data=data, quiet=True,
                                         max_steps=case.RESUME_AT)
    full = trainer.train_and_evaluate(config, args.full, data=data, quiet=True)
  finally:
    fileio.atomic_path = original
  fileio.write_json(args.log / f"process_{jax.process_index()}.json", {
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "pid": os.getpid(), "describe": distributed.describe(), "written": written,
      "local_devices": jax.local_device_count(), "devices": jax.device_count(),
      "partial_step": partial["step"], "full_step": full["step"], "simulated": simulated})
  return 0


if __name__ == "__main__":
  sys.exit(main())
