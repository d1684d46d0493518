"""One of two CPU processes of tests/data/test_parallel_feed.py (run as a script).

Usage: ``python multiprocess_feed_worker.py PORT PROCESS_ID OUT.json``. With two
CPU devices per process (4 in all), each process loads only its rows of a
global batch (``EpochData``'s default shard: JAX's process index and count) and
``parallel.shard_batch`` assembles the global array. It writes what it saw to
``OUT.json``; exit code 77 means the CPU multi-process backend is unavailable.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

BATCH = 8


class Toy:
  """16 examples of 3 features: example i is (3i, 3i+1, 3i+2)."""

  def __len__(self):
    return 16

  def batch(self, rows):
    return {"x": np.arange(48, dtype=np.float32).reshape(16, 3)[rows]}


def main(port: str, process_id: str, out: str) -> None:
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=int(process_id), initialization_timeout=60)
  except Exception as err:  # pylint: disable=broad-except
    print(f"CPU multi-process backend unavailable: {err!r}", flush=True)
    sys.exit(77)
  from bissl_jax.runtime import mesh as parallel  # pylint: disable=g-import-not-at-top
  from bissl_jax.pipeline import stage_loop  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  local = stage_loop.EpochData(Toy(), BATCH, seed=3, steps_per_epoch=2)
  whole = stage_loop.EpochData(Toy(), BATCH, seed=3, steps_per_epoch=2, process_index=0,
                               process_count=1)
  record = {"process": jax.process_index(), "devices": jax.device_count(),
            "local_rows": [], "equal": [], "sums": [], "stack_equal": None}
  for step in range(3):  # crosses an epoch
    rows, want = local.batch(step)["x"], whole.batch(step)["x"]
    placed = parallel.shard_batch({"x": rows}, mesh)["x"]
    record["local_rows"].append(int(rows.shape[0]))
    record["equal"].append(bool(placed.shape == want.shape
                                and np.array_equal(parallel.to_host(placed), want)))
    # A reduction over the whole global batch (a cross-process all-reduce).
    weights = jnp.arange(BATCH, dtype=jnp.float32)[:, None]
    total = jax.jit(lambda x: jnp.sum(x * weights), out_shardings=parallel.replicated(mesh))(
        placed)
    record["sums"].append([float(np.asarray(total.addressable_data(0))),
                           float(np.sum(want * np.arange(BATCH)[:, None]))])
  stack = np.arange(2 * BATCH * 3, dtype=np.float32).reshape(2, BATCH, 3)
  rows = BATCH // 2
  mine = stack[:, jax.process_index() * rows:(jax.process_index() + 1) * rows]
  placed = parallel.shard_batch(mine, mesh, batch_axis=1)
  record["stack_equal"] = bool(np.array_equal(parallel.to_host(placed), stack))
  with open(out, "w") as f:
    json.dump(record, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
