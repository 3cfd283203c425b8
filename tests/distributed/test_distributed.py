"""Settings of `jax_brainage.distributed` and the local launcher's process handling.

Settings are checked against the documented precedence (arguments > BRAINAGE_* > cluster) and
the environment variables SLURM / Open MPI / Cloud TPU set; the launcher against what `ps`
would show: every process it started (and their children) is gone when it returns.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from jax_brainage import distributed
from jax_brainage.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SLURM_2_TASKS = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]",
                 "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def _launcher():
  spec = importlib.util.spec_from_file_location("brainage_launch_local_t",
                                                ROOT / "launch" / "local.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped by its parent) is not running.
  try:
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
  except OSError:
    return False


# ---------------------------------------------------------------------------------------------
# Settings.
# ---------------------------------------------------------------------------------------------


def test_nothing_set_is_a_single_process_run():
  assert distributed.resolve(environ={}) is None
  assert distributed.resolve(num_processes=1, environ={}) is None
  # A one-task SLURM step is not a multi-process run either.
  assert distributed.resolve(environ=dict(SLURM_2_TASKS, SLURM_NTASKS="1")) is None


def test_environment_variables_and_arguments_take_precedence_in_order():
  env = {"BRAINAGE_COORDINATOR": "10.0.0.1:1234", "BRAINAGE_NUM_PROCESSES": "4",
         "BRAINAGE_PROCESS_ID": "3", "BRAINAGE_LOCAL_DEVICE_IDS": "0, 1",
         "BRAINAGE_CPU_DEVICES": "2"}
  s = distributed.resolve(environ=env)
  assert s == distributed.Settings("10.0.0.1:1234", 4, 3, (0, 1), 2, "explicit")
  assert not s.loopback
  s = distributed.resolve("127.0.0.1:999", 2, 0, environ=env)
  assert (s.coordinator, s.num_processes, s.process_id) == ("127.0.0.1:999", 2, 0)
  assert s.loopback and s.local_device_ids == (0, 1)
  # Explicit settings win over a detected cluster.
  s = distributed.resolve(environ=dict(SLURM_2_TASKS, **env))
  assert s.cluster == "explicit" and s.num_processes == 4


@pytest.mark.parametrize("env, cluster", [
    (SLURM_2_TASKS, "slurm"),
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}, "tpu"),
])
def test_clusters_are_detected_and_left_to_jax(env, cluster):
  assert distributed.detect_cluster(env) == cluster
  s = distributed.resolve(environ=env)
  # JAX's own cluster detection fills coordinator, size and id.
  assert s == distributed.Settings(None, None, None, None, None, cluster)
  # Only the coordinator given: the rest still comes from the cluster.
  s = distributed.resolve(coordinator="node1:5000", environ=env)
  assert s.coordinator == "node1:5000" and s.num_processes is None and s.cluster == cluster


def test_off_and_on_modes():
  assert distributed.resolve(environ=dict(SLURM_2_TASKS, BRAINAGE_DISTRIBUTED="off")) is None
  with pytest.raises(ConfigError, match="BRAINAGE_DISTRIBUTED=on"):
    distributed.resolve(environ={"BRAINAGE_DISTRIBUTED": "on"})
  with pytest.raises(ConfigError, match="BRAINAGE_COORDINATOR"):
    distributed.resolve(environ={"BRAINAGE_DISTRIBUTED": "off",
                                 "BRAINAGE_COORDINATOR": "h:1", "BRAINAGE_NUM_PROCESSES": "2",
                                 "BRAINAGE_PROCESS_ID": "0"})
  with pytest.raises(ConfigError, match="BRAINAGE_DISTRIBUTED='maybe'"):
    distributed.resolve(environ={"BRAINAGE_DISTRIBUTED": "maybe"})


@pytest.mark.parametrize("kwargs, env, culprit", [
    ({"coordinator": "node1"}, {}, "--coordinator='node1' must be HOST:PORT"),
    ({}, {"BRAINAGE_COORDINATOR": "node1:99999", "BRAINAGE_NUM_PROCESSES": "2",
          "BRAINAGE_PROCESS_ID": "0"}, "BRAINAGE_COORDINATOR='node1:99999'"),
    ({}, {"BRAINAGE_NUM_PROCESSES": "two"}, "BRAINAGE_NUM_PROCESSES='two' is not an integer"),
    ({"num_processes": 2, "process_id": 2, "coordinator": "h:1"}, {},
     "--process-id=2 must be smaller than --num-processes=2"),
    ({"num_processes": 2, "process_id": 0}, {},
     "--coordinator (or BRAINAGE_COORDINATOR) is not set"),
    ({"coordinator": "h:1", "num_processes": 2}, {},
     "--process-id (or BRAINAGE_PROCESS_ID) is not set"),
    ({"local_device_ids": "0,0"}, {}, "must list distinct device ids"),
    ({}, {"BRAINAGE_CPU_DEVICES": "0"}, "BRAINAGE_CPU_DEVICES=0 must be >= 1"),
])
def test_bad_settings_are_one_line_config_errors_naming_the_setting(kwargs, env, culprit):
  with pytest.raises(ConfigError) as info:
    distributed.resolve(**kwargs, environ=env)
  message = str(info.value)
  assert culprit in message and "\n" not in message


def test_cpu_devices_alone_configure_a_single_process():
  s = distributed.resolve(cpu_devices=3, environ={})
  assert s == distributed.Settings(None, 1, 0, None, 3, "single")


def test_describe_and_initialize_in_a_single_process(monkeypatch):
  for key in list(os.environ):
    if key.startswith(("BRAINAGE_", "SLURM_", "OMPI_", "TPU_")):
      monkeypatch.delenv(key)
  # Nothing to join: initialize is a no-op, as often as one likes ...
  assert distributed.initialize() is None
  assert distributed.initialize() is None
  # ... but asking for another run afterwards is an error, not silently ignored.
  with pytest.raises(ConfigError, match="already initialised"):
    distributed.initialize(cpu_devices=2)
  line = distributed.describe()
  assert line.startswith("process 0 of 1 on ")
  assert f"{jax.local_device_count()} local of {jax.device_count()} global cpu devices" in line


def test_initialize_reports_an_unreachable_coordinator_in_one_line(tmp_path):
  # Process 1 of 2 waits for a coordinator on a loopback port nobody serves; a 1 s timeout.
  port = _launcher().free_port()
  env = dict(os.environ, BRAINAGE_COORDINATOR=f"127.0.0.1:{port}",
             BRAINAGE_NUM_PROCESSES="2", BRAINAGE_PROCESS_ID="1", BRAINAGE_INIT_TIMEOUT="1",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, "-m", "jax_brainage", "batches", "--cache", "c"], env=env,
                        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("brainage: error: distributed: could not join the run at "
                         f"127.0.0.1:{port} as process 1 of 2")


# ---------------------------------------------------------------------------------------------
# The local launcher.
# ---------------------------------------------------------------------------------------------

# Each process writes its pid and its child's pid, then process 0 fails (exit 3) while process 1
# and its child would sleep for a minute.
_SCRIPT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
i = os.environ["BRAINAGE_PROCESS_ID"]
open(os.path.join(sys.argv[1], f"pids_{i}"), "w").write(f"{os.getpid()} {child.pid}")
e = os.environ
print("coordinator", e["BRAINAGE_COORDINATOR"], "of", e["BRAINAGE_NUM_PROCESSES"],
      "cpu", e["BRAINAGE_CPU_DEVICES"], "platform", e["JAX_PLATFORMS"], flush=True)
if i == "0" and sys.argv[2] == "fail":
  time.sleep(0.5)
  sys.exit(3)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["fail", "timeout"])
def test_launcher_stops_every_process_and_child_on_failure_or_timeout(tmp_path, mode):
  launcher = _launcher()
  out = io.StringIO()
  start = time.monotonic()
  result = launcher.launch([sys.executable, "-c", _SCRIPT, str(tmp_path), mode], 2, 3,
                           timeout_s=20 if mode == "fail" else 3, sink=out)
  assert time.monotonic() - start < 50  # nobody waited for the 60 s sleeps
  if mode == "fail":
    assert result.status == 3 and not result.timed_out and result.returncodes[0] == 3
  else:
    assert result.status == launcher.TIMEOUT_STATUS and result.timed_out
  pids = [int(p) for i in range(2) for p in (tmp_path / f"pids_{i}").read_text().split()]
  deadline = time.monotonic() + 5
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(_alive(p) for p in pids)
  lines = out.getvalue().splitlines()
  for i in range(2):
    assert f"[p{i}] coordinator 127.0.0.1:{result.port} of 2 cpu 3 platform cpu" in lines


def test_launcher_runs_brainage_through_the_distributed_entry_point():
  launcher = _launcher()
  assert launcher.process_command(["brainage", "train", "--config", "c.py"]) == [
      sys.executable, "-m", "jax_brainage", "train", "--config", "c.py"]
  assert launcher.process_command(["python", "x.py"]) == ["python", "x.py"]


def test_a_busy_coordinator_port_is_a_one_line_error():
  import socket

  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot serve the coordinator on port {port}"):
      distributed.check_port_free(f"127.0.0.1:{port}")
  distributed.check_port_free(f"127.0.0.1:{port}")  # free again once closed
