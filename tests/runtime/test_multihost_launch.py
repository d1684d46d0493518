"""How a multi-process run is started and how it reports a lost process (no processes started).

``mesh.initialize_multihost`` reads the process count, index and heartbeat timeout
from ``BISSL_JAX_*`` variables (JAX reads ``JAX_COORDINATOR_ADDRESS`` itself) and
refuses a malformed one with a message; ``mesh.lost_peer_message`` turns the errors
raised when another process of the run has gone into one message. The real two-process
runs are in tests/pipeline/test_multiprocess_run.py.
"""
import jax
import pytest

from bissl_jax import cli
from bissl_jax.runtime import errors
from bissl_jax.runtime import mesh


@pytest.fixture
def no_launch_env(monkeypatch):
  for name in (mesh.NUM_PROCESSES_ENV, mesh.PROCESS_ID_ENV, mesh.HEARTBEAT_ENV,
               mesh.DISTRIBUTED_ENV,
               "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS",
               "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


def test_one_host_without_launch_variables_initializes_nothing(no_launch_env, monkeypatch):
  mesh.initialize_multihost()
  monkeypatch.setenv(mesh.DISTRIBUTED_ENV, "0")
  monkeypatch.setenv(mesh.HEARTBEAT_ENV, "5")
  mesh.initialize_multihost()
  assert no_launch_env == []
  monkeypatch.setenv(mesh.DISTRIBUTED_ENV, "1")  # a TPU pod slice: JAX detects the rest
  mesh.initialize_multihost()
  assert no_launch_env == [{"heartbeat_timeout_seconds": 5}]


def test_launch_variables_reach_jax_distributed_initialize(no_launch_env, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")  # read by JAX itself
  monkeypatch.setenv(mesh.NUM_PROCESSES_ENV, "2")
  monkeypatch.setenv(mesh.PROCESS_ID_ENV, "1")
  monkeypatch.setenv(mesh.HEARTBEAT_ENV, " 7 ")
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # the CPU collectives setting is left alone
  mesh.initialize_multihost()
  assert no_launch_env == [{"num_processes": 2, "process_id": 1,
                            "heartbeat_timeout_seconds": 7}]
  mesh.initialize_multihost(process_id=0)  # an argument wins over its variable
  assert no_launch_env[-1]["process_id"] == 0


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_a_malformed_launch_variable_is_named_with_its_fix(no_launch_env, monkeypatch, value):
  monkeypatch.setenv(mesh.PROCESS_ID_ENV, value)
  with pytest.raises(errors.LaunchError, match=f"{mesh.PROCESS_ID_ENV}=.*non-negative integer"):
    mesh.initialize_multihost()
  assert no_launch_env == []
  message = cli.user_error_message(errors.LaunchError("x"))
  assert message == "error: x"  # printed alone, exit status 2


def test_lost_peer_errors_become_one_message(monkeypatch):
  gloo = ValueError("UNKNOWN: Gloo all-reduce failed: [pair.cc:547] Connection closed by peer "
                    "[127.0.0.1]:45236")
  assert mesh.lost_peer_message(gloo) is None  # one process: no peer to lose
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  message = mesh.lost_peer_message(gloo)
  assert message.startswith("error: process 1 of 2 lost contact with another process")
  assert "Connection closed by peer" in message and "Rerun every process" in message
  assert cli.user_error_message(gloo) == message
  assert mesh.lost_peer_message(ValueError("shapes do not match")) is None  # a bug: traceback


@pytest.mark.parametrize("env, several", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),               # one SLURM task: a single-process job
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({mesh.NUM_PROCESSES_ENV: "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, True),
    ({mesh.NUM_PROCESSES_ENV: "1", "JAX_COORDINATOR_ADDRESS": "h:1"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, True),
    ({mesh.DISTRIBUTED_ENV: "1"}, True),            # a TPU pod slice
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, True),
    ({"TPU_WORKER_HOSTNAMES": "a"}, False),
])
def test_launched_as_several_processes_reads_the_launch_variables(no_launch_env, monkeypatch,
                                                                  env, several):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert mesh.launched_as_several_processes() is several


def test_the_study_refuses_a_multi_process_launch(no_launch_env, monkeypatch, tmp_path):
  """The study stops before anything runs or is written (its grid is measured on one
  device); the GeSSL comparison runs across processes (tests/pipeline/
  test_multiprocess_gessl.py)."""
  from bissl_jax.pipeline import study  # pylint: disable=g-import-not-at-top
  from configs import study_digits  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(mesh.NUM_PROCESSES_ENV, "2")
  with pytest.raises(errors.LaunchError, match="The study runs as one process.*start it once"):
    study.run_study(study_digits.get_config("runlocal"), str(tmp_path / "study"))
  assert not list(tmp_path.iterdir())


def test_only_the_writer_process_writes_records(monkeypatch, tmp_path):
  """Records (search trials, cells, evaluations) are written by process 0 alone."""
  from bissl_jax.pipeline import results  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(mesh, "is_writer", lambda: False)
  results.write_json(str(tmp_path / "a" / "record.json"), {"x": 1})
  assert not list(tmp_path.iterdir())
  monkeypatch.setattr(mesh, "is_writer", lambda: True)
  results.write_json(str(tmp_path / "a" / "record.json"), {"x": 1})
  assert results.read_json(str(tmp_path / "a" / "record.json")) == {"x": 1}
