"""Data parallelism over every local device with a one-axis mesh (SPEC §8).

Step functions are written for the *global* batch. Placing the batch with a
``NamedSharding`` over the ``'data'`` axis and the parameters replicated lets
``jax.jit`` partition the computation, so SimCLR's NT-Xent, BatchNorm statistics
and Hessian-vector products all see the whole global batch (the PyTorch reference
averaged per-GPU HVPs and lost the cross-device curvature). ``jax.pmap`` is in
maintenance in current JAX; this module uses the mesh form instead.
"""
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (default: every device)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Sharding that splits axis ``batch_axis`` over the data axis."""
  spec = [None] * batch_axis + [DATA_AXIS]
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
  """Places every leaf of ``tree`` with its ``batch_axis`` split over the devices.

  Use ``batch_axis=1`` for stacks of batches shaped ``(steps, batch, ...)``.
  """
  sharding = batch_sharding(mesh, batch_axis)
  return jax.device_put(tree, sharding)


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


def initialize_multihost(**kwargs) -> None:
  """Calls ``jax.distributed.initialize`` for multi-host runs (no-op on one host).

  On Cloud TPU pods and SLURM clusters the arguments are discovered automatically;
  elsewhere pass ``coordinator_address``, ``num_processes`` and ``process_id``.
  """
  if kwargs or _looks_multihost():
    jax.distributed.initialize(**kwargs)


def _looks_multihost() -> bool:
  import os
  return any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                        "JAX_COORDINATOR_ADDRESS"))
