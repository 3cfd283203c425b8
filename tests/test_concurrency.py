"""One writer per directory: a second writer is refused in one line and harms nothing, a killed
holder's lock is taken over, a killed run's temporaries are removed by the next run.

The other writer is a real second process (`python -c` holding `lock.hold`, or killed while
holding it / while writing); the refused writer is the real `brainage train` / `brainage
explain` path. Training is a tiny MRInet on 16^3 synthetic volumes (seconds).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jax_brainage import cli, fileio, lock
from jax_brainage.errors import ConfigError
from jax_brainage.train import data as data_lib
from jax_brainage.train import experiment
from tests.train.conftest import blob_cohort
from tests.train.conftest import tiny_config as trainer_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

# Holds DIR's lock as COMMAND until its stdin closes (or it is killed); prints "held" once it has.
HOLDER = """
import sys
from jax_brainage import lock
with lock.hold(sys.argv[1], sys.argv[2]):
  print("held", flush=True)
  sys.stdin.read()
"""

# A writer killed (SIGKILL) at the rename that would have put TARGET in place.
KILLED_WRITE = """
import os, signal, sys
import nibabel as nib
import numpy as np
from jax_brainage import fileio
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
target = sys.argv[1]
if target.endswith(".nii.gz"):
  fileio.save_nifti(nib.Nifti1Image(np.ones((2, 2, 2), np.float32), np.eye(4)), target)
else:
  fileio.write_json(target, {"x": 1})
"""


def start_holder(directory: Path, command: str) -> subprocess.Popen:
  """Another process that holds `directory`'s lock (until `release`)."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), command], env=ENV,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  line = proc.stdout.readline()
  assert line.strip() == "held", proc.stderr.read()
  return proc


def release(proc: subprocess.Popen) -> None:
  proc.stdin.close()
  assert proc.wait(timeout=60) == 0, proc.stderr.read()
  proc.stdout.close()
  proc.stderr.close()


def kill_while_writing(target: Path) -> None:
  done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], env=ENV,
                        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
  assert done.returncode == -signal.SIGKILL, done.stderr


def dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
  """Every file under `directory` but the lock file: (size, mtime in ns)."""
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*")) if p.is_file() and p.name != lock.LOCK_FILE}


def blob_data() -> data_lib.TrainingData:
  """The trainer tests' learnable synthetic cohort (40 subjects, 16^3)."""
  images, ages = blob_cohort()
  return data_lib.from_arrays(images, ages, ("T1w",), split_seed=0)


def tiny_config(**overrides):
  """The trainer tests' tiny MRInet config, without input summaries."""
  return trainer_config(num_image_summaries=0, **overrides)


def test_second_writer_is_refused_and_the_first_workdir_still_resumes(tmp_path):
  data, config = blob_data(), tiny_config()
  workdir = tmp_path / "run"
  first = experiment.train(config, workdir, data=data, quiet=True, max_steps=3)
  assert first["stopped"] == "max_steps"
  holder = start_holder(workdir, "brainage train")
  try:
    # The holder writes (here: a write of metrics.json killed at its rename, so it stays).
    kill_while_writing(workdir / "metrics.json")
    assert [p.name for p in workdir.iterdir() if fileio.is_temp_name(p.name)]
    before = snapshot(workdir)
    with pytest.raises(ConfigError) as refused:
      experiment.train(config, workdir, data=data, quiet=True)
    assert snapshot(workdir) == before  # refused before writing or cleaning anything
  finally:
    release(holder)
  message = str(refused.value)
  assert "\n" not in message and str(workdir) in message
  assert f"pid {holder.pid} on host {socket.gethostname()} (brainage train" in message
  # The holder is gone: the same call resumes from step 3, removes the leftover and finishes
  # (test_trainer checks that a resumed run ends bit for bit where an uninterrupted one does).
  resumed = experiment.train(config, workdir, data=data, quiet=True)
  assert resumed["stopped"] == "done" and resumed["step"] == 8
  assert [h["epoch"] for h in resumed["history"]] == [1, 2]
  assert json.loads((workdir / "metrics.json").read_text())["step"] == 8
  assert not any(fileio.is_temp_name(p.name) for p in workdir.rglob("*"))
  assert not (workdir / lock.LOCK_FILE).exists()  # released: the lock file is gone


def test_brainage_train_is_refused_in_one_line_while_another_process_trains(tmp_path, capsys):
  """The command line, from config to refusal: exit code 2, one line naming the workdir and the
  holder's pid, host and command; nothing simulated or written."""
  workdir = tmp_path / "run"
  holder = start_holder(workdir, "brainage train")
  try:
    code = cli.main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
                     str(workdir), "--quiet", "--config.data.simulate.out",
                     str(tmp_path / "sim"), "--config.data.cache", str(tmp_path / "cache")])
    assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(workdir) == [lock.LOCK_FILE]
  finally:
    release(holder)
  assert not workdir.exists()  # the holder made it, and removed it again empty
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err
  assert err.startswith(f"brainage train: error: {workdir} is in use by pid {holder.pid} on host "
                        f"{socket.gethostname()} (brainage train, since ")


def test_two_processes_racing_for_one_directory_get_one_lock(tmp_path):
  racers = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), f"racer {i}"],
                             env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(4)]
  time.sleep(0.5)
  for proc in racers:
    proc.stdin.close()
  outcomes = [(proc.wait(timeout=60), proc.stdout.read(), proc.stderr.read()) for proc in racers]
  for proc in racers:
    proc.stdout.close()
    proc.stderr.close()
  # Whoever came while one held it was refused; nobody ran while another held it. The ones that
  # came after the holder let go may have held it in turn.
  winners = [o for o in outcomes if o[0] == 0]
  losers = [o for o in outcomes if o[0] != 0]
  assert winners and all(o[1] == "held\n" for o in winners)
  assert all("is in use by pid" in o[2] and "racer" in o[2] for o in losers)


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path, capsys):
  holder = start_holder(tmp_path, "brainage explain")
  holder.kill()  # kill -9 while holding: the record stays, the kernel drops the flock
  holder.wait()
  for stream in (holder.stdin, holder.stdout, holder.stderr):
    stream.close()
  stale = lock.read_holder(tmp_path)
  assert stale.pid == holder.pid and stale.command == "brainage explain"
  with lock.hold(tmp_path, "brainage train") as me:
    assert lock.read_holder(tmp_path) == me and me.pid == os.getpid()
  err = capsys.readouterr().err
  assert f"took over the stale lock of pid {holder.pid}" in err and "brainage explain" in err
  assert lock.read_holder(tmp_path) is None and os.listdir(tmp_path) == []


def test_without_flock_the_record_decides(tmp_path, monkeypatch, capsys):
  """File systems without flock: a live pid of this host refuses, a dead one is stale, another
  host's record refuses (its pid cannot be checked from here)."""
  monkeypatch.setattr(lock, "fcntl", None)
  path = tmp_path / lock.LOCK_FILE
  host = socket.gethostname()
  sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
  try:
    path.write_text(lock.Holder(sleeper.pid, host, "brainage demo", time.time()).to_json())
    with pytest.raises(ConfigError, match=f"in use by pid {sleeper.pid} on host"):
      with lock.hold(tmp_path, "brainage train"):
        pass
  finally:
    sleeper.stdin.close()
    sleeper.wait()
  path.write_text(lock.Holder(12345, "elsewhere", "brainage train", time.time()).to_json())
  with pytest.raises(ConfigError, match="another host") as info:
    with lock.hold(tmp_path, "brainage train"):
      pass
  assert "\n" not in str(info.value)
  gone = dead_pid()
  path.write_text(lock.Holder(gone, host, "brainage train", time.time() - 60).to_json())
  with lock.hold(tmp_path, "brainage train") as me:
    assert json.loads(path.read_text())["pid"] == me.pid == os.getpid()
    # Nested in the same thread: one lock, the record stays the outer holder's.
    with lock.hold(tmp_path, "brainage demo") as inner:
      assert inner == me
    assert lock.read_holder(tmp_path) == me
  assert f"took over the stale lock of pid {gone}" in capsys.readouterr().err
  assert not path.exists()


def test_a_killed_explains_temporaries_are_removed_by_the_next_run(tmp_path, capsys):
  """Explain writes every map with fileio.save_nifti; killed in the middle it leaves
  `.<name>.XXXX.nii.gz` and `.<name>.XXXX.nii.gz.tmp`. The next `brainage explain` on that
  --out removes them as soon as it holds the lock (here it then fails on a missing workdir),
  and leaves the user's files and the finished maps alone."""
  out = tmp_path / "explain"
  anat = out / "sub-0001" / "anat"
  kill_while_writing(anat / "sub-0001_model-mrinet_seq-T1w_relevance.nii.gz")
  kill_while_writing(out / "explain.json")
  left = sorted(p.name for p in out.rglob(".*") if p.is_file())
  assert len(left) == 3 and all(fileio.is_temp_name(n) for n in left)
  assert {n.endswith(".nii.gz") for n in left} == {True, False}
  users = [anat / "sub-0002_model-mrinet_seq-T1w_relevance.nii.gz", out / "notes.nii.gz.tmp",
           out / ".todo.tmp"]
  for p in users:
    p.write_text("mine")
  code = cli.main(["explain", "--workdir", str(tmp_path / "no-such-workdir"), "--data",
                   str(tmp_path), "--out", str(out), "--quiet"])
  err = capsys.readouterr().err
  assert code == 2 and "no-such-workdir" in err
  assert "removed 3 temporary file(s) an interrupted run left" in err
  assert not [p for p in out.rglob("*") if fileio.is_temp_name(p.name)]
  assert all(p.read_text() == "mine" for p in users)
