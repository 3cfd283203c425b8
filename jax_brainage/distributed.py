"""Multi-host start-up on JAX's own multi-controller runtime (`jax.distributed`).

Every process of a multi-host run executes the same program (`brainage train ...`); before the
first JAX computation each one calls `initialize()`, which connects it to the others through
`jax.distributed.initialize`. From then on `jax.devices()` lists the devices of all processes,
`jax_brainage.sharding` lays arrays over all of them, every process loads only its rows of each
global batch, orbax writes checkpoints collectively and only process 0 writes logs and reports.

Where the settings come from, first match wins:

1. arguments of `initialize(...)` (e.g. from `brainage --coordinator HOST:PORT ...`);
2. environment variables `BRAINAGE_COORDINATOR` (host:port of process 0's coordinator service),
   `BRAINAGE_NUM_PROCESSES`, `BRAINAGE_PROCESS_ID`, and optionally `BRAINAGE_LOCAL_DEVICE_IDS`
   ("0,1") and `BRAINAGE_CPU_DEVICES` (fake CPU devices per process, for trying the multi-host
   path on one machine);
3. the cluster JAX detects by itself: SLURM (inside `srun` with more than one task: one process
   per task, by default one GPU per task), Open MPI (`mpirun`), Cloud TPU VMs (pods and slices).

Nothing found: a single process, and `initialize()` does nothing (so the same command runs on a
laptop). `BRAINAGE_DISTRIBUTED=off` disables the detection (e.g. independent tasks of a SLURM
array), `=on` makes a missing setting an error instead of a single-process run.

On CPU the processes exchange data with gloo collectives (TCP); when the coordinator is a
loopback address (the local launcher, the CI test), gloo is bound to 127.0.0.1 as well, so a
local multi-process run never opens a socket on another interface.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import time
from typing import Any, Sequence

from jax_brainage.errors import ConfigError

ENV_COORDINATOR = "BRAINAGE_COORDINATOR"
ENV_NUM_PROCESSES = "BRAINAGE_NUM_PROCESSES"
ENV_PROCESS_ID = "BRAINAGE_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "BRAINAGE_LOCAL_DEVICE_IDS"
ENV_CPU_DEVICES = "BRAINAGE_CPU_DEVICES"
ENV_MODE = "BRAINAGE_DISTRIBUTED"  # auto (default) | on | off
ENV_TIMEOUT = "BRAINAGE_INIT_TIMEOUT"  # seconds to wait for all processes (default 300)


@dataclasses.dataclass(frozen=True)
class Settings:
  """How this process joins a multi-process run.

  Attributes:
    coordinator: "host:port" of process 0's coordinator service; None when JAX detects it from
      the cluster (`cluster`).
    num_processes, process_id: None when JAX detects them from the cluster.
    local_device_ids: accelerator ids this process uses (None: JAX's default: all local devices,
      or one GPU per task under SLURM / Open MPI).
    cpu_devices: fake CPU devices of this process (None: the platform's default).
    cluster: "explicit" (arguments or BRAINAGE_* variables), or the detected cluster ("slurm",
      "ompi", "tpu").
  """

  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None = None
  cpu_devices: int | None = None
  cluster: str = "explicit"

  @property
  def loopback(self) -> bool:
    """Whether every process runs on this machine behind a loopback coordinator address."""
    return self.coordinator is not None and _is_loopback(self.coordinator.rsplit(":", 1)[0])


# What `initialize` did in this process (None: not called yet, or single process).
_STATE: dict[str, Any] = {"settings": None, "called": False}


# ---------------------------------------------------------------------------------------------
# Reading and checking the settings (pure: no JAX runtime touched).
# ---------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
  host = host.strip("[]")
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _parse_int(value: Any, name: str, minimum: int) -> int:
  try:
    number = int(str(value).strip())
  except ValueError:
    raise ConfigError(f"{name}={value!r} is not an integer") from None
  if number < minimum:
    raise ConfigError(f"{name}={number} must be >= {minimum}")
  return number


def _parse_coordinator(value: str, name: str) -> str:
  value = str(value).strip()
  host, sep, port = value.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"{name}={value!r} must be HOST:PORT with a port in 1..65535 "
                      "(the address of process 0, reachable from every process)")
  return value


def _parse_ids(value: Any, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    value = [value]
  if isinstance(value, str):
    value = [v for v in value.replace(" ", "").split(",") if v]
  ids = tuple(_parse_int(v, name, 0) for v in value)
  if not ids or len(set(ids)) != len(ids):
    raise ConfigError(f"{name}={value!r} must list distinct device ids, e.g. 0,1")
  return ids


def detect_cluster(environ: dict[str, str] | None = None) -> str | None:
  """The multi-process cluster environment this process runs in, as JAX would detect it.

  Returns "slurm" (a step of more than one task, i.e. inside `srun -n N`, N > 1), "ompi"
  (launched by Open MPI's `mpirun`), "tpu" (a Cloud TPU VM: JAX asks the TPU metadata for its
  worker number and the pod's size), or None. Only environment variables and local device
  files are read; nothing is contacted.
  """
  env = os.environ if environ is None else environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(k in env for k in slurm):
    try:
      if int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    except ValueError:
      pass
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "ompi"
  if environ is None and _tpu_chips() > 0:
    return "tpu"
  if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"):
    return "tpu"
  return None


def _tpu_chips() -> int:
  """Number of TPU chips on this host (from PCI device files; 0 elsewhere)."""
  try:
    from jax._src import hardware_utils
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return int(chips)
  except Exception:  # noqa: BLE001 -- private helper: absent or changed means "no TPU known"
    return 0


def resolve(coordinator: str | None = None, num_processes: int | str | None = None,
            process_id: int | str | None = None,
            local_device_ids: int | str | Sequence[int] | None = None,
            cpu_devices: int | str | None = None,
            environ: dict[str, str] | None = None) -> Settings | None:
  """The settings `initialize` would use, or None for a single-process run.

  Arguments win over BRAINAGE_* environment variables, which win over the detected cluster.
  Raises ConfigError (one line naming the setting) on a malformed or incomplete setting.
  """
  env = os.environ if environ is None else environ
  mode = env.get(ENV_MODE, "auto").strip().lower() or "auto"
  if mode not in ("auto", "on", "off"):
    raise ConfigError(f"{ENV_MODE}={env[ENV_MODE]!r} must be auto, on or off")

  def pick(value: Any, var: str) -> tuple[Any, str]:
    flag = {ENV_COORDINATOR: "--coordinator", ENV_NUM_PROCESSES: "--num-processes",
            ENV_PROCESS_ID: "--process-id", ENV_LOCAL_DEVICE_IDS: "--local-device-ids",
            ENV_CPU_DEVICES: "--cpu-devices"}[var]
    if value is not None:
      return value, flag
    raw = env.get(var)
    if raw in (None, ""):
      return None, f"{flag} (or {var})"  # named so in a "not set" message
    return raw, var

  coordinator, c_name = pick(coordinator, ENV_COORDINATOR)
  num_processes, n_name = pick(num_processes, ENV_NUM_PROCESSES)
  process_id, p_name = pick(process_id, ENV_PROCESS_ID)
  local_device_ids, l_name = pick(local_device_ids, ENV_LOCAL_DEVICE_IDS)
  cpu_devices, d_name = pick(cpu_devices, ENV_CPU_DEVICES)

  cpu = _parse_int(cpu_devices, d_name, 1) if cpu_devices is not None else None
  ids = _parse_ids(local_device_ids, l_name) if local_device_ids is not None else None
  n = _parse_int(num_processes, n_name, 1) if num_processes is not None else None
  p = _parse_int(process_id, p_name, 0) if process_id is not None else None
  c = _parse_coordinator(coordinator, c_name) if coordinator is not None else None
  if n is not None and p is not None and p >= n:
    raise ConfigError(f"{p_name}={p} must be smaller than {n_name}={n} (ids run 0..{n - 1})")

  if mode == "off":
    if c is not None or (n or 1) > 1:
      raise ConfigError(f"{ENV_MODE}=off but a multi-process run was requested "
                        f"({c_name if c is not None else n_name})")
    return None if cpu is None else Settings(None, 1, 0, ids, cpu, "single")

  if c is not None or n is not None or p is not None:
    if n == 1 and c is None:
      return None if cpu is None else Settings(None, 1, 0, ids, cpu, "single")
    missing = [name for value, name in ((c, c_name), (n, n_name), (p, p_name)) if value is None]
    cluster = detect_cluster(environ)
    if missing and cluster is None:
      raise ConfigError(f"multi-process run: {missing[0]} is not set (give the coordinator "
                        "address, the number of processes and this process's id)")
    return Settings(c, n, p, ids, cpu, "explicit" if not missing else cluster)

  cluster = detect_cluster(environ)
  if cluster is not None:
    return Settings(None, None, None, ids, cpu, cluster)
  if mode == "on":
    raise ConfigError(f"{ENV_MODE}=on but no cluster was detected and {ENV_COORDINATOR} is not "
                      "set")
  return None if cpu is None else Settings(None, 1, 0, ids, cpu, "single")


# ---------------------------------------------------------------------------------------------
# Joining the run.
# ---------------------------------------------------------------------------------------------


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # noqa: BLE001 -- private API moved: assume not (JAX raises itself if so)
    return False


def _bind_gloo_to_loopback() -> None:
  """CPU collectives (gloo over TCP) on 127.0.0.1 only: a local run stays on this machine.

  JAX's default gloo set-up picks the address of the host name, which on some machines is an
  external interface. The CPU backend is created lazily, after `jax.distributed.initialize`,
  so re-registering its factory here takes effect.
  """
  try:
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge
    from jax._src.lib import _jax
  except ImportError:
    return

  def make_cpu_client():
    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=jax_distributed.global_state.client, hostname="127.0.0.1")
    return xla_bridge.make_cpu_client(collectives=collectives)

  try:
    xla_bridge.register_backend_factory("cpu", make_cpu_client, priority=0, fail_quietly=False)
  except Exception:  # noqa: BLE001 -- keep JAX's default when its internals changed
    pass


def _host_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def check_port_free(address: str) -> None:
  """ConfigError if process 0 cannot listen on the coordinator's port."""
  host, port = _host_port(address)
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host if _is_loopback(host) else "", port))
    except OSError as e:
      raise ConfigError(f"distributed: process 0 cannot serve the coordinator on port {port} "
                        f"({e.strerror or e}); choose another port in --coordinator") from None


def _wait_for_coordinator(settings: Settings, timeout_s: float) -> None:
  """Waits until process 0's coordinator accepts connections; ConfigError after `timeout_s`."""
  host, port = _host_port(settings.coordinator)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConfigError(f"distributed: could not join the run at {settings.coordinator} as "
                          f"process {settings.process_id} of {settings.num_processes}: no "
                          f"coordinator answered within {timeout_s:g} s ({e.strerror or e}); is "
                          "process 0 running and the address reachable?") from None
      time.sleep(0.2)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None,
               cpu_devices: int | None = None, *,
               timeout_s: int | None = None) -> Settings | None:
  """Joins this process to a multi-process JAX run (or does nothing for a single process).

  Call it first thing, before any JAX computation (the `brainage` command does). Idempotent:
  further calls return the settings of the first one (and raise ConfigError if they ask for a
  different run).

  Args:
    coordinator: "host:port" of process 0 (every process passes the same); env
      BRAINAGE_COORDINATOR. Not needed under SLURM, Open MPI or on Cloud TPU VMs.
    num_processes, process_id: size of the run and this process's id in 0..num_processes-1;
      env BRAINAGE_NUM_PROCESSES / BRAINAGE_PROCESS_ID.
    local_device_ids: accelerators this process drives (e.g. its GPU); env
      BRAINAGE_LOCAL_DEVICE_IDS. Default: JAX's (one GPU per task under SLURM, else all).
    cpu_devices: number of CPU devices this process exposes (sets `jax_num_cpu_devices`); env
      BRAINAGE_CPU_DEVICES. For trying the multi-host path on one machine.
    timeout_s: how long to wait for all processes to connect (default 300 s, env
      BRAINAGE_INIT_TIMEOUT).
  Returns:
    the settings used, or None for a single-process run.
  Raises:
    ConfigError: malformed or incomplete settings; JAX already computed something in this
      process; the coordinator could not be reached in time.
  """
  settings = resolve(coordinator, num_processes, process_id, local_device_ids, cpu_devices)
  if _STATE["called"]:
    previous = _STATE["settings"]
    if settings != previous:
      raise ConfigError(f"distributed: already initialised as {_short(previous)}; cannot "
                        f"re-initialise as {_short(settings)} in the same process")
    return previous
  import jax

  if settings is None:
    _STATE.update(called=True, settings=None)
    return None
  if settings.cpu_devices is not None:
    if _backends_initialized():
      raise ConfigError("distributed: --cpu-devices must be set before JAX's first computation "
                        "(call jax_brainage.distributed.initialize first)")
    jax.config.update("jax_num_cpu_devices", int(settings.cpu_devices))
  if settings.cluster == "single":
    _STATE.update(called=True, settings=settings)
    return settings
  if jax.distributed.is_initialized():
    # Somebody (e.g. a notebook) already joined a run: respect it.
    _STATE.update(called=True, settings=settings)
    return settings
  if _backends_initialized():
    raise ConfigError("distributed: JAX already computed in this process; call "
                      "jax_brainage.distributed.initialize() before anything else")
  timeout = timeout_s if timeout_s is not None else _parse_int(
      os.environ.get(ENV_TIMEOUT, "300"), ENV_TIMEOUT, 1)
  kwargs: dict[str, Any] = dict(coordinator_address=settings.coordinator,
                                num_processes=settings.num_processes,
                                process_id=settings.process_id,
                                initialization_timeout=int(timeout))
  if settings.local_device_ids is not None:
    kwargs["local_device_ids"] = list(settings.local_device_ids)
  if settings.loopback:
    # The coordinator service listens on loopback only (JAX's default binds every interface).
    kwargs["coordinator_bind_address"] = settings.coordinator
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _bind_gloo_to_loopback()
  elif settings.cpu_devices is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if settings.coordinator is not None and settings.process_id is not None:
    # JAX aborts the whole process (no exception) when the coordinator cannot be reached or
    # its port cannot be bound: check first, and say which setting is wrong in one line.
    if settings.process_id == 0:
      check_port_free(kwargs.get("coordinator_bind_address") or settings.coordinator)
    else:
      _wait_for_coordinator(settings, float(timeout))
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError, TypeError) as e:
    where = settings.coordinator or f"the {settings.cluster} cluster's coordinator"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"distributed: could not join the run at {where} as process "
                      f"{settings.process_id} of {settings.num_processes}: {first}") from e
  _STATE.update(called=True, settings=settings)
  return settings


def _short(settings: Settings | None) -> str:
  if settings is None:
    return "a single process"
  if settings.cluster == "single":
    return f"a single process with {settings.cpu_devices} CPU devices"
  return (f"process {settings.process_id} of {settings.num_processes} "
          f"({settings.cluster}, coordinator {settings.coordinator})")


def shutdown() -> None:
  """Leaves the multi-process run (at the end of a program; optional, JAX does it at exit)."""
  import jax

  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def describe() -> str:
  """One line for logs: process i of n, host, local / global devices, coordinator."""
  import jax

  devices = jax.devices()
  local = jax.local_devices()
  kind = devices[0].device_kind if devices else "?"
  settings = _STATE["settings"]
  how = ""
  if settings is not None and settings.cluster not in ("single",):
    how = f"; {settings.cluster}"
    if settings.coordinator:
      how += f" coordinator {settings.coordinator}"
  return (f"process {jax.process_index()} of {jax.process_count()} on {socket.gethostname()}: "
          f"{len(local)} local of {len(devices)} global {devices[0].platform} devices "
          f"({kind}){how}")
