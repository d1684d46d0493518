"""Feeding the mesh: per-process rows into global arrays, and device prefetch.

``parallel.shard_batch`` builds the global batch from each process's rows
(checked here with one process against ``jax.device_put``, and with two real
CPU processes that must rebuild the one-process batch); ``prefetch_to_device``
places batches ahead without changing them or their order.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from bissl_jax.runtime import mesh as parallel
from bissl_jax.data import prefetch
from config_helpers import TESTS_DIR

WORKER = os.path.join(TESTS_DIR, "multiprocess_feed_worker.py")


def test_shard_batch_of_one_process_is_the_whole_batch_on_the_mesh():
  mesh = parallel.make_mesh()
  batch = {"image": np.arange(24, dtype=np.uint8).reshape(4, 2, 3),
           "label": np.arange(4, dtype=np.int32)}
  placed = parallel.shard_batch(batch, mesh)
  for key in batch:
    assert placed[key].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(placed[key]), batch[key])
    assert placed[key].dtype == batch[key].dtype
  again = parallel.shard_batch(placed, mesh)  # already placed (prefetched): kept as it is
  assert all(again[k] is placed[k] for k in batch)
  stack = parallel.shard_batch(np.ones((3, 4, 2), np.float32), mesh, batch_axis=1)
  assert stack.sharding == parallel.batch_sharding(mesh, 1) and stack.shape == (3, 4, 2)
  with pytest.raises(ValueError, match="no axis 1"):
    parallel.shard_batch(np.ones(4), mesh, batch_axis=1)


def test_prefetch_places_size_batches_ahead_in_order():
  drawn, placed = [], []

  def source():
    for i in range(5):
      drawn.append(i)
      yield i

  def place(x):
    placed.append(x)
    return -x

  batches = prefetch.prefetch_to_device(source(), 2, place)
  assert next(batches) == 0 and placed == [0, 1, 2]  # the one used and 2 ahead
  assert next(batches) == -1 and placed == [0, 1, 2, 3]
  assert list(batches) == [-2, -3, -4] and drawn == list(range(5))
  assert list(prefetch.prefetch_to_device(range(3), 0, lambda x: x)) == [0, 1, 2]
  with pytest.raises(ValueError, match="device_prefetch"):
    next(prefetch.prefetch_to_device(range(3), -1, lambda x: x))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_assemble_the_one_process_global_batch(tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), outs[i]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  if any(p.returncode == 77 for p in procs):
    pytest.skip("JAX's CPU multi-process backend (gloo) is unavailable here: "
                + " | ".join(log.strip().splitlines()[-1] for log in logs if log.strip()))
  assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
  for i, out in enumerate(outs):
    with open(out) as f:
      record = json.load(f)
    assert record["process"] == i and record["devices"] == 4
    assert record["local_rows"] == [4, 4, 4]  # half of each global batch of 8
    assert record["equal"] == [True, True, True]  # the one-process batch, rebuilt
    for got, want in record["sums"]:
      assert got == want
    assert record["stack_equal"]


def test_how_batches_are_fed_changes_no_stage_fingerprint():
  # The batches are the same for any prefetch depth or worker count, so a run resumes
  # (and reuses its outputs) when only those change.
  import types  # pylint: disable=g-import-not-at-top
  from bissl_jax.config_validation import resolve_config  # pylint: disable=g-import-not-at-top
  from bissl_jax.pipeline import bissl_stage, pretrain, supervised  # pylint: disable=g-import-not-at-top
  from configs import digits_simclr  # pylint: disable=g-import-not-at-top

  def fingerprints(**data):
    config = digits_simclr.get_config("runlocal")
    config.data.update(data)
    ctx = types.SimpleNamespace(config=resolve_config(config), downstream=None)  # classification
    return [bissl_stage.stage_provenance(ctx, 0).fingerprint(),
            pretrain.stage_provenance(ctx, 0, 1, 10).fingerprint(),
            supervised.stage_provenance(ctx, "finetune", seed=0).fingerprint()]

  base = fingerprints()
  assert fingerprints(device_prefetch=0, loader_workers=3) == base
  assert all(a != b for a, b in zip(fingerprints(split_seed=1), base))
