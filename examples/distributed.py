"""Multi-process jobs: joining JAX's distributed runtime, and agreeing across processes.

JAX trains on many GPUs and machines as one program run by one Python process
per host (or per GPU), all executing the same jitted steps on global arrays
(the "multi-controller" model). :func:`initialize` joins a job before JAX
touches a device; the training loop then needs a few agreements that a
single process takes for granted, which live here:

* :func:`initialize` -- ``jax.distributed.initialize`` from the first launch
  description that applies:

  1. the command line: ``--coordinator-address HOST:PORT --num-processes N
     --process-id I`` (:class:`examples.config.Config`);
  2. the environment: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
     ``JAX_PROCESS_ID`` (``scripts/launch_local.sh`` sets them);
  3. a cluster that JAX detects by itself: SLURM (``srun``, ``SLURM_NTASKS``
     > 1) or Open MPI (``mpirun``, ``OMPI_COMM_WORLD_SIZE`` > 1).

  Nothing of these: a single-process job (nothing is initialised). A
  coordinator that does not answer fails after ``--init-timeout`` seconds,
  and a process whose peers stop sending heartbeats fails after
  ``--heartbeat-timeout`` seconds, each with an error naming the job.
* :class:`AnyProcess` -- "did any process get SIGTERM?", agreed by all
  processes one step later (without it one process would checkpoint while
  the others went on with the next step, and both would wait for ever).
* :func:`gather_host` and :func:`broadcast_json` -- host-side data of every
  process on every process (evaluation metadata), and process 0's result on
  every process (metrics computed once).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import time
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

__all__ = ["Launch", "resolve_launch", "initialize", "AnyProcess", "gather_host",
           "broadcast_json", "ENV_VARS"]

#: The environment variables of a plain multi-process launch (JAX's names).
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins a job: what ``jax.distributed.initialize`` is given.

  ``None`` fields are left to JAX's cluster detection (``source`` "slurm" or
  "open mpi").
  """

  source: str  # "command line", "environment", "slurm", "open mpi"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def describe(self) -> str:
    if self.num_processes is None:
      return f"a {self.source} job (coordinator, size and rank from its environment)"
    return (f"process {self.process_id} of {self.num_processes} with coordinator "
            f"{self.coordinator_address} ({self.source})")


def _int(name: str, value, lo: int) -> int:
  try:
    v = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r}: expected an integer") from None
  if v < lo:
    raise ValueError(f"{name}={value!r}: must be >= {lo}")
  return v


def _explicit(source: str, names: tuple[str, str, str], values: tuple) -> Launch:
  given = [n for n, v in zip(names, values) if v not in (None, "")]
  if len(given) != 3:
    missing = [n for n in names if n not in given]
    raise ValueError(f"a multi-process launch needs {', '.join(names)}; {', '.join(given)} "
                     f"{'is' if len(given) == 1 else 'are'} set but {', '.join(missing)} "
                     f"{'is' if len(missing) == 1 else 'are'} not")
  address = str(values[0])
  if not _ADDRESS.match(address):
    raise ValueError(f"{names[0]}={address!r}: expected HOST:PORT, e.g. 127.0.0.1:12355")
  n = _int(names[1], values[1], 1)
  i = _int(names[2], values[2], 0)
  if i >= n:
    raise ValueError(f"{names[2]}={i}: must be < {names[1]}={n}")
  return Launch(source, address, n, i)


def resolve_launch(cfg=None, environ: Mapping[str, str] | None = None) -> Launch | None:
  """The launch this process belongs to (see the module docstring), or ``None``.

  Args:
    cfg: a config with ``coordinator_address``, ``num_processes`` and
      ``process_id`` (``None`` or absent: not given on the command line).
    environ: the environment (default ``os.environ``).

  Raises:
    ValueError: a launch described in part (e.g. an address without a process
      count), or with a value out of range -- naming the variable and value.
  """
  env = os.environ if environ is None else environ
  opts = tuple(getattr(cfg, f, None) for f in ("coordinator_address", "num_processes",
                                                 "process_id"))
  if any(v is not None for v in opts):
    return _explicit("command line", ("--coordinator-address", "--num-processes",
                                      "--process-id"), opts)
  if any(env.get(k) for k in ENV_VARS):
    return _explicit("environment", ENV_VARS, tuple(env.get(k) for k in ENV_VARS))
  if _int("SLURM_NTASKS", env.get("SLURM_NTASKS", "1") or "1", 1) > 1:
    return Launch("slurm")
  if _int("OMPI_COMM_WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", "1") or "1", 1) > 1:
    return Launch("open mpi")
  return None


def initialize(cfg=None, environ: Mapping[str, str] | None = None) -> Launch | None:
  """Joins the multi-process job this process was launched into, if any.

  Must run before anything touches a JAX device. A second call (the runtime
  already initialised, e.g. by the caller) does nothing.

  Args:
    cfg: a config with the launch options and ``init_timeout`` /
      ``heartbeat_timeout`` seconds (absent: 300 / 100, JAX's defaults).
    environ: the environment (default ``os.environ``).

  Returns:
    The :class:`Launch` joined, or ``None`` for a single-process run.

  Raises:
    ValueError: see :func:`resolve_launch`.
    RuntimeError: the job could not be joined within the timeout (the
      coordinator did not answer, or not all processes came), naming it.
  """
  launch = resolve_launch(cfg, environ)
  if launch is None or jax.distributed.is_initialized():
    return launch
  init_timeout = int(getattr(cfg, "init_timeout", 300))
  heartbeat = int(getattr(cfg, "heartbeat_timeout", 100))
  log.info("joining %s; waiting up to %d s for all processes", launch.describe(), init_timeout)
  if launch.coordinator_address is not None and launch.process_id != 0:
    # JAX's client aborts the process (a C++ fatal error blaming "another task")
    # when the coordinator never answers: check it can be reached first.
    _wait_for_coordinator(launch, init_timeout)
  try:
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
        process_id=launch.process_id, initialization_timeout=init_timeout,
        heartbeat_timeout_seconds=heartbeat)
  except Exception as e:  # the runtime raises RuntimeError / XlaRuntimeError / ValueError
    raise RuntimeError(
        f"could not join {launch.describe()} within --init-timeout {init_timeout} s: is the "
        f"coordinator (process 0) running and reachable, and were all processes started? "
        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e})"
    ) from e
  log.info("joined: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return launch


def _wait_for_coordinator(launch: Launch, timeout: float) -> None:
  host, port = launch.coordinator_address.rsplit(":", 1)
  host = host.strip("[]")
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=2.0).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f"{launch.describe()}: no coordinator answered at {launch.coordinator_address} "
            f"within --init-timeout {timeout:g} s ({e}); start process 0 with the same "
            "address, or check the address and port") from None
      time.sleep(0.5)  # process 0 may not have started yet


class AnyProcess:
  """The largest of every process's code, agreed by every process one step later.

  Each step every process calls :meth:`vote` with its own code (e.g. 0: go
  on, 1: got SIGINT, 2: got SIGTERM); the call returns the maximum over all
  processes of the codes of the *previous* call, the same value on every
  process, so all of them act on it at the same step. The reduction is a
  tiny jitted max over the mesh, dispatched asynchronously; reading the
  previous one keeps one step in flight. With one process the code is
  returned at once.
  """

  def __init__(self, mesh: Mesh):
    self.multi = jax.process_count() > 1
    self._pending = None
    if self.multi:
      self._sharding = NamedSharding(mesh, P(mesh.axis_names))
      self._shape = (mesh.size,)
      self._local = len(self._sharding.addressable_devices)
      self._max = jax.jit(lambda c: c.max(), out_shardings=NamedSharding(mesh, P()))

  def vote(self, code: int) -> int:
    if not self.multi:
      return int(code)
    local = np.full((self._local,), int(code), np.int32)
    arr = jax.make_array_from_process_local_data(self._sharding, local, self._shape)
    previous, self._pending = self._pending, self._max(arr)
    return 0 if previous is None else int(previous)


def gather_host(tree, process_count: int | None = None):
  """Each process's host arrays (same structure, leading axis the batch rows) on every
  process, concatenated in process order -- the rows of the global batch."""
  if (process_count or jax.process_count()) == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def broadcast_json(value=None):
  """Process 0's JSON-serialisable ``value`` on every process (others pass anything)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = (np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0
          else np.zeros(0, np.uint8))
  n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  buf = np.zeros(n, np.uint8)
  buf[:data.size] = data
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())
