"""Multi-host training on JAX's multi-controller runtime, tried on one machine.

Two processes x two CPU devices (gloo collectives on 127.0.0.1, started by `launch/local.py`)
train the tiny experiment of `multihost_case.py`; the reference is the same experiment trained by
one process with four devices (this pytest process). Checked: the per-step training loss, the
validation history and the final parameters agree to float tolerance; a run stopped by the
2-process job resumes in one 4-device process and ends where the uninterrupted run ends; only
process 0 writes config, split, metrics and TensorBoard files.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import multihost_case as case  # noqa: E402

from jax_brainage.train import checkpoint as ckpt_lib  # noqa: E402
from jax_brainage.train import trainer  # noqa: E402

PROCESSES, CPU_DEVICES = 2, 2
TIMEOUT_S = 240


def _load_launcher():
  spec = importlib.util.spec_from_file_location("brainage_launch_local",
                                                ROOT / "launch" / "local.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def _scalars(workdir: Path) -> dict[str, dict[int, float]]:
  """TensorBoard scalars {tag: {step: value}} read with tensorboard's own event reader."""
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto import event_pb2

  out: dict[str, dict[int, float]] = {}
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    for record in RawEventFileLoader(str(path)).Load():
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
  return out


def _latest_state(workdir: Path) -> tuple[int, dict]:
  """The latest checkpoint's state as numpy, restored onto one device from orbax's own metadata
  (independent of the trainer's shardings and of the process count that wrote it)."""
  manager = ocp.CheckpointManager(
      ckpt_lib.checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler()})
  step = manager.latest_step()
  meta = manager.item_metadata(step)["state"]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  manager.close()
  return step, jax.tree.map(np.asarray, state["state"])


def _assert_states_close(a: dict, b: dict) -> None:
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert len(flat_a) == len(flat_b)
  for path, x in flat_a:
    y = flat_b[path]
    assert x.shape == y.shape, jax.tree_util.keystr(path)
    if np.issubdtype(x.dtype, np.floating):
      np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 2-process job (full run + run stopped at RESUME_AT) and the 1-process reference."""
  root = tmp_path_factory.mktemp("multihost")
  full, partial, log = root / "full_2x2", root / "partial_2x2", root / "log"
  simulated = root / "simulated"
  launcher = _load_launcher()
  output = io.StringIO()
  result = launcher.launch(
      [sys.executable, str(HERE / "multihost_worker.py"), "--full", str(full),
       "--partial", str(partial), "--log", str(log), "--simulate", str(simulated)],
      PROCESSES, CPU_DEVICES, timeout_s=TIMEOUT_S, cwd=ROOT, sink=output,
      env={"XLA_FLAGS": "", "PYTHONPATH": str(ROOT)})
  assert result.status == 0, f"multi-process job failed {result}:\n{output.getvalue()[-6000:]}"
  # Every process ended (the launcher stops stragglers in any case).
  assert all(code == 0 for code in result.returncodes)

  assert jax.device_count() == PROCESSES * CPU_DEVICES and jax.process_count() == 1
  reference = root / "reference_1x4"
  config, data = case.make_config(), case.make_data()
  ref_result = trainer.train_and_evaluate(config, reference, data=data, quiet=True)
  logs = [json.loads((log / f"process_{i}.json").read_text()) for i in range(PROCESSES)]
  return dict(full=full, partial=partial, reference=reference, ref_result=ref_result,
              logs=logs, config=config, data=data, simulated=simulated)


def test_processes_joined_one_run(runs):
  for i, log in enumerate(runs["logs"]):
    assert log["process_index"] == i and log["process_count"] == PROCESSES
    assert log["local_devices"] == CPU_DEVICES and log["devices"] == PROCESSES * CPU_DEVICES
    assert log["describe"].startswith(f"process {i} of {PROCESSES}")
    assert log["full_step"] == case.EPOCHS * case.STEPS_PER_EPOCH
    assert log["partial_step"] == case.RESUME_AT


def test_loss_trajectory_and_parameters_match_one_process(runs):
  multi, single = _scalars(runs["full"]), _scalars(runs["reference"])
  steps = list(range(1, case.EPOCHS * case.STEPS_PER_EPOCH + 1))
  assert sorted(multi["train/loss"]) == steps == sorted(single["train/loss"])
  compared = [t for t in single if t.startswith(("train/loss", "train/mae", "val/"))]
  assert "val/loss" in compared and set(compared) <= set(multi)
  for tag in compared:
    assert sorted(multi[tag]) == sorted(single[tag]), tag
    np.testing.assert_allclose([multi[tag][s] for s in sorted(multi[tag])],
                               [single[tag][s] for s in sorted(single[tag])],
                               rtol=2e-5, err_msg=tag)
  # Training did something: the loss trajectory is not flat (else equality proves little).
  loss = [single["train/loss"][s] for s in steps]
  assert max(loss) > 1.2 * min(loss)

  step_m, state_m = _latest_state(runs["full"])
  step_s, state_s = _latest_state(runs["reference"])
  assert step_m == step_s == steps[-1]
  _assert_states_close(state_m, state_s)
  if case.members_supported():
    # Two members with their own parameters (leading member axis), trained in one step.
    kernel = jax.tree.leaves(state_m["params"])[0]
    assert kernel.shape[0] == 2 and not np.allclose(kernel[0], kernel[1])

  metrics_m = json.loads((runs["full"] / "metrics.json").read_text())
  metrics_s = json.loads((runs["reference"] / "metrics.json").read_text())
  assert metrics_m["best_step"] == metrics_s["best_step"]
  np.testing.assert_allclose([h["val_loss"] for h in metrics_m["history"]],
                             [h["val_loss"] for h in metrics_s["history"]], rtol=2e-5)


def test_resume_on_a_different_process_count(runs):
  partial = runs["partial"]
  step, _ = _latest_state(partial)
  assert step == case.RESUME_AT
  # The 2-process checkpoint (written collectively) resumes in 1 process with 4 devices.
  result = trainer.train_and_evaluate(runs["config"], partial, data=runs["data"], quiet=True)
  assert result["step"] == case.EPOCHS * case.STEPS_PER_EPOCH
  assert result["best_step"] == runs["ref_result"]["best_step"]
  np.testing.assert_allclose([h["val_loss"] for h in result["history"]],
                             [h["val_loss"] for h in runs["ref_result"]["history"]], rtol=2e-5)
  _, resumed = _latest_state(partial)
  _, reference = _latest_state(runs["reference"])
  _assert_states_close(resumed, reference)
  # The resumed part's per-step losses continue the uninterrupted trajectory.
  resumed_loss = _scalars(partial)["train/loss"]
  ref_loss = _scalars(runs["reference"])["train/loss"]
  later = [s for s in sorted(ref_loss) if s > case.RESUME_AT]
  np.testing.assert_allclose([resumed_loss[s] for s in later], [ref_loss[s] for s in later],
                             rtol=2e-5)


def test_only_process_zero_writes_logs_and_reports(runs):
  logs = runs["logs"]
  full = str(runs["full"].resolve())
  written0 = {Path(p).name for p in logs[0]["written"] if p.startswith(full)}
  assert {"config.json", "split.json", "metrics.json"} <= written0
  assert logs[1]["written"] == []
  events = sorted((runs["full"] / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1
  # TensorBoard names its event file ...<hostname>.<pid>.<n>: process 0's.
  assert f".{logs[0]['pid']}." in events[0].name
  assert f".{logs[1]['pid']}." not in events[0].name


def test_process_zero_alone_simulates_and_prepares_the_cohort(runs):
  """`data.simulate.n > 0` on two processes: process 0 writes the cohort and its cache while
  process 1 waits at a barrier; then both read the same 3 subjects."""
  root = str(runs["simulated"].resolve())
  logs = runs["logs"]
  written0 = {Path(p).relative_to(root).parts[0] for p in logs[0]["written"]
              if p.startswith(root)}
  # the cache is written in a hidden temporary directory (.cache.tmp-*) renamed into place
  assert "sim" in written0 and {n.lstrip(".").split(".")[0] for n in written0} == {"sim", "cache"}
  assert not [p for p in logs[1]["written"] if p.startswith(root)]
  for log in logs:
    assert log["simulated"] == {"subjects": 3, "image_shape": [50, 50, 50]}
  assert len(list((runs["simulated"] / "sim").glob("sub-*/anat/*_T1w.nii.gz"))) == 3
