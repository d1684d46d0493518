"""Data parallelism over every local device with a one-axis mesh (docs/sources.md, "Multi-device").

Step functions are written for the *global* batch. Placing the batch with a
``NamedSharding`` over the ``'data'`` axis and the parameters replicated lets
``jax.jit`` partition the computation, so SimCLR's NT-Xent, BatchNorm statistics
and Hessian-vector products all see the whole global batch (the PyTorch reference
averaged per-GPU HVPs and lost the cross-device curvature). ``jax.pmap`` is in
maintenance in current JAX; this module uses the mesh form instead.

With several processes (multi-host), each process loads only its rows of every
global batch and :func:`shard_batch` assembles the global array from them.
"""
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (default: every device).

  With several processes the devices are put in process order, so process ``p``
  of ``P`` holds rows ``[p·B/P, (p+1)·B/P)`` of a batch of ``B``, the rows its data
  loader reads (``bissl_jax.data.process_shard``).
  """
  devices = jax.devices() if devices is None else list(devices)
  if len({d.process_index for d in devices}) > 1:
    devices = sorted(devices, key=lambda d: d.process_index)  # stable: local order kept
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Sharding that splits axis ``batch_axis`` over the data axis."""
  spec = [None] * batch_axis + [DATA_AXIS]
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def _mesh_processes(mesh: Mesh) -> list:
  return sorted({d.process_index for d in mesh.devices.flat})


def shard_batch(tree: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
  """The global batch, split over the devices, from every process's own rows.

  Each leaf of ``tree`` holds this process's rows of the batch along
  ``batch_axis`` (all of them with one process); the global array has
  ``process_count`` times as many (``jax.make_array_from_process_local_data``).
  Leaves already placed with this sharding (prefetched batches) are kept as
  they are. Use ``batch_axis=1`` for stacks of batches shaped ``(steps, batch, ...)``.
  """
  sharding = batch_sharding(mesh, batch_axis)
  processes = _mesh_processes(mesh)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  todo = [i for i, x in enumerate(leaves)
          if not (isinstance(x, jax.Array) and x.sharding == sharding)]
  local = [np.asarray(leaves[i]) if not isinstance(leaves[i], jax.Array) else leaves[i]
           for i in todo]
  shapes = [_global_shape(x.shape, batch_axis, len(processes)) for x in local]
  if len(processes) > 1:
    for shape in shapes[:1]:
      _check_process_rows(sharding, shape, batch_axis, processes)
  if todo:
    for i, x in zip(todo, jax.make_array_from_process_local_data(sharding, local, shapes)):
      leaves[i] = x
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _global_shape(shape: tuple, batch_axis: int, processes: int) -> tuple:
  if len(shape) <= batch_axis:
    raise ValueError(f"A batch leaf of shape {shape} has no axis {batch_axis} to split "
                     f"over the devices.")
  return shape[:batch_axis] + (shape[batch_axis] * processes,) + shape[batch_axis + 1:]


def _check_process_rows(sharding: NamedSharding, shape: tuple, batch_axis: int,
                        processes: list) -> None:
  """The rows this process's devices hold must be the rows its loader read."""
  rows = shape[batch_axis] // len(processes)
  first = processes.index(jax.process_index()) * rows
  held = sorted({(index[batch_axis].start or 0, index[batch_axis].stop or shape[batch_axis])
                 for index in sharding.addressable_devices_indices_map(shape).values()})
  if held[0][0] != first or held[-1][1] != first + rows:
    raise ValueError(
        f"Process {jax.process_index()}'s devices hold rows [{held[0][0]}, {held[-1][1]}) of "
        f"the batch, but its loader reads rows [{first}, {first + rows}) "
        f"(bissl_jax.data.process_shard): build the mesh with parallel.make_mesh(), which "
        f"orders the devices by process.")


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array as NumPy on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a full copy of ``tree`` on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_divisible(batch_size: int, field: str, mesh: Optional[Mesh] = None) -> None:
  """Raises ValueError if ``batch_size`` does not split evenly over the devices.

  Args:
    batch_size: the global batch size.
    field: the config field it came from, named in the message.
    mesh: the mesh; default all devices.
  """
  n = mesh.devices.size if mesh is not None else jax.device_count()
  if batch_size <= 0 or batch_size % n:
    raise ValueError(
        f"{field}={batch_size} must be a positive multiple of the device count ({n}): "
        f"set {field} to a multiple of {n}, e.g. {max(n, (batch_size // n) * n or n)}.")


# What ``jax.distributed.initialize`` does not read from the environment by itself
# (it reads ``JAX_COORDINATOR_ADDRESS``, and detects everything on TPU pods, SLURM and
# Open MPI): the process count and index for a launch by hand (docs/scale.md).
NUM_PROCESSES_ENV = "BISSL_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "BISSL_JAX_PROCESS_ID"
# Seconds without a heartbeat after which the coordination service declares a process
# dead and the others stop with an error instead of waiting forever in a collective.
HEARTBEAT_ENV = "BISSL_JAX_HEARTBEAT_TIMEOUT"
# Set to 1 where JAX detects the cluster itself but none of the variables above is set
# (a Cloud TPU pod slice): initialize with no arguments.
DISTRIBUTED_ENV = "BISSL_JAX_DISTRIBUTED"


def initialize_multihost(**kwargs) -> None:
  """Calls ``jax.distributed.initialize`` for multi-host runs (no-op on one host).

  On Cloud TPU pods (with ``BISSL_JAX_DISTRIBUTED=1``), SLURM and Open MPI the
  arguments are discovered automatically; elsewhere set ``JAX_COORDINATOR_ADDRESS``
  (host:port of process 0), ``BISSL_JAX_NUM_PROCESSES`` and ``BISSL_JAX_PROCESS_ID``
  in every process, or pass ``coordinator_address``, ``num_processes`` and
  ``process_id``. ``BISSL_JAX_HEARTBEAT_TIMEOUT`` (seconds, JAX's default 100) is how
  long the others wait for a process that died alone. On CPU the collectives between
  processes use gloo.

  Raises:
    LaunchError: one of the variables above is not a non-negative integer.
  """
  for key, env in (("num_processes", NUM_PROCESSES_ENV), ("process_id", PROCESS_ID_ENV),
                   ("heartbeat_timeout_seconds", HEARTBEAT_ENV)):
    if key not in kwargs and os.environ.get(env, "").strip():
      kwargs[key] = _env_int(env)
  if not (set(kwargs) - {"heartbeat_timeout_seconds"} or _looks_multihost()):
    return  # one host (a heartbeat timeout alone starts nothing)
  if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def _env_int(env: str) -> int:
  value = os.environ[env].strip()
  if not value.isdigit():
    from bissl_jax.runtime.errors import LaunchError  # pylint: disable=g-import-not-at-top
    raise LaunchError(f"{env}={value!r} is not a non-negative integer: set it to one "
                     "(docs/scale.md, \"How to launch\").")
  return int(value)


# What the cluster launchers JAX detects set in every process (SLURM, Open MPI, a
# Cloud TPU pod slice) and the coordinator that JAX reads itself.
_LAUNCHER_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                  "JAX_COORDINATOR_ADDRESS")


def _looks_multihost() -> bool:
  return os.environ.get(DISTRIBUTED_ENV, "").strip() == "1" or any(
      k in os.environ for k in _LAUNCHER_VARS)


# What a collective or the coordination service raises when another process of the
# run has gone (killed, crashed, its host lost): XLA:CPU's gloo, the GPU/TPU runtimes.
_LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer",
                    "stopped sending heartbeats", "tasks are unhealthy", "Gloo all-reduce failed",
                    "Gloo all-gather failed", "Barrier timed out")


def lost_peer_message(err: BaseException) -> Optional[str]:
  """The message for an error caused by another process of the run stopping, else None."""
  if not any(s in str(err) for s in _LOST_PEER_SIGNS) or jax.process_count() <= 1:
    return None
  return (f"error: process {jax.process_index()} of {jax.process_count()} lost contact with "
          f"another process of this run (it stopped, was killed or its host went down), so it "
          f"stops too.\n{str(err).splitlines()[0][:300]}\nRerun every process with the same "
          "command (same --workdir): the run resumes from its last checkpoint.")


def sync_processes(name: str) -> None:
  """Waits until every process of the run reaches the barrier ``name`` (no-op alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def is_writer() -> bool:
  """True on the one process that writes the run's files (process 0; alone, always).

  Every process of a multi-process run computes the same records, so only one
  writes them: several processes renaming the same temporary file on a shared file
  system would race.
  """
  return jax.process_index() == 0


def launched_as_several_processes() -> bool:
  """Whether this process's environment starts it as one of several (the launch
  variables that :func:`initialize_multihost` reads, with a count above 1)."""
  env = os.environ
  for name in (NUM_PROCESSES_ENV,) + _LAUNCHER_VARS[:2]:  # the process counts
    value = env.get(name, "").strip()
    if value.isdigit() and int(value) > 1:
      return True
  if env.get(NUM_PROCESSES_ENV, "").strip() == "1":
    return False
  return ("," in env.get("TPU_WORKER_HOSTNAMES", "")
          or env.get(DISTRIBUTED_ENV, "").strip() == "1"
          or bool(env.get("JAX_COORDINATOR_ADDRESS", "").strip()))


def refuse_several_processes(command: str, why: str) -> None:
  """Stops ``command`` (a single-process experiment) started as one of several processes.

  Raises:
    LaunchError: the launch variables ask for several processes.
  """
  if launched_as_several_processes():
    from bissl_jax.runtime.errors import LaunchError  # pylint: disable=g-import-not-at-top
    raise LaunchError(
        f"{command} runs as one process ({why}), but this one was started as one of "
        f"several ({NUM_PROCESSES_ENV}, JAX_COORDINATOR_ADDRESS, {DISTRIBUTED_ENV}, SLURM or "
        "Open MPI with more than one task): start it once, without those variables. "
        "`bissl-jax run` and `bissl-jax gessl` run across processes (docs/scale.md).")
