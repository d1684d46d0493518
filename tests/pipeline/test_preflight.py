"""Errors up front, once: every unusable input of a run named together, exit 2, no traceback.

Each case runs the real command line in a subprocess, and checks that nothing was
written and that the start-up banner (printed once the inputs are fine) never came.
"""
import contextlib
import os
import subprocess
import sys

import pytest

from bissl_jax import cli
from bissl_jax.pipeline import preflight

from config_helpers import REPO_ROOT  # noqa: E402

REPO = REPO_ROOT
BANNER = "bissl-jax: backend"


def _run(args, cwd):
  return subprocess.run([sys.executable, "-m", "bissl_jax", "run", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))


def _assert_stopped_up_front(proc):
  assert proc.returncode == cli.USER_ERROR_STATUS, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr and BANNER not in proc.stdout
  assert "The run cannot start" in proc.stderr


@contextlib.contextmanager
def _unwritable_dir(path):
  """A directory this process cannot write: read-only bits, or (as root, whom the bits
  do not stop) a read-only tmpfs mounted there."""
  os.makedirs(path)
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    try:
      yield "no permission"
    finally:
      os.chmod(path, 0o755)
    return
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", path],
                           capture_output=True, check=False)
  if mounted.returncode != 0:
    pytest.skip("running as root, and cannot mount a read-only tmpfs here")
  try:
    yield "read-only file system"
  finally:
    subprocess.run(["umount", path], check=False)


def test_unwritable_workdirs_are_named_before_anything_runs(tmp_path):
  a_file = tmp_path / "results.txt"
  a_file.write_text("not a directory")
  with _unwritable_dir(str(tmp_path / "locked")) as why:
    problems = {
        str(a_file): "is a file",
        str(a_file / "run"): f"lies under the file {a_file}",
        str(tmp_path / "locked" / "run"): why,
    }
    for workdir, expected in problems.items():
      assert expected in " ".join(preflight.workdir_problems(workdir)), workdir
    proc = _run([f"--workdir={tmp_path / 'locked' / 'run'}"], tmp_path)
  _assert_stopped_up_front(proc)
  assert why in proc.stderr and "choose another --workdir" in proc.stderr
  assert preflight.workdir_problems(str(tmp_path / "new" / "run")) == []


def test_missing_weights_and_missing_data_named_together(tmp_path):
  workdir = tmp_path / "run"
  proc = _run([f"--workdir={workdir}", "--config.data.downstream_dataset=dtd",
               f"--config.data.data_dir={tmp_path / 'no_data'}",
               f"--config.pretext.checkpoint={tmp_path / 'weights.pth'}"], tmp_path)
  _assert_stopped_up_front(proc)
  assert "'dtd' (downstream" in proc.stderr and "tfds build dtd" in proc.stderr
  assert (f"config.pretext.checkpoint={tmp_path / 'weights.pth'}: no such file or directory"
          in proc.stderr)
  assert not workdir.exists()


def test_a_config_error_is_printed_once_not_once_per_variant(tmp_path):
  proc = _run([f"--workdir={tmp_path / 'run'}", "--config.bissl.lam=-1"], tmp_path)
  assert proc.returncode == cli.USER_ERROR_STATUS and "Traceback" not in proc.stderr
  # The offline default has two variant rows; each used to repeat the base's problem.
  assert proc.stderr.count("the regularisation weight λ must be >= 0") == 1, proc.stderr
  # A problem that only a variant has (M-FAC's damping 0 with λ < 0) is still named.
  assert "in config.bissl_variants.mfac" in proc.stderr


def test_glue_on_the_original_gpt_names_data_weights_and_tokenizer(tmp_path):
  proc = _run([f"--workdir={tmp_path / 'run'}", "--config=configs/glue_gpt.py:sst2",
               f"--config.data.data_dir={tmp_path / 'glue'}"], REPO)
  _assert_stopped_up_front(proc)
  err = proc.stderr
  assert "GLUE sst2 is not available locally" in err and "tfds build glue/sst2" in err
  assert "config.pretext.checkpoint is unset" in err and "config.data.tokenizer_dir is unset" in err
  assert "dataset_info.json" not in err and "TFDS's default" not in err  # no TFDS warning
  assert not (tmp_path / "run").exists()


def test_tokenizer_dir_and_torch_weights_checked_on_the_files(tmp_path, monkeypatch):
  from configs import glue_gpt
  config = glue_gpt.get_config("sst2")
  config.data.tokenizer_dir = str(tmp_path)
  (tmp_path / "vocab.json").write_text("{}")
  assert preflight.tokenizer_problems(config) == [
      f"config.data.tokenizer_dir={tmp_path}: merges.txt not found; point it at the GPT "
      f"files ({preflight._GPT_FILES})."]
  (tmp_path / "merges.txt").write_text("")
  assert preflight.tokenizer_problems(config) == []
  weights = tmp_path / "pytorch_model.bin"
  weights.write_bytes(b"")
  config.pretext.checkpoint = str(weights)
  monkeypatch.setattr(preflight, "_torch_installed", lambda: False)
  [problem] = preflight.weight_problems(config)
  assert "torch is not installed" in problem and "--from-torch" in problem
  head = tmp_path / "head.pth"  # the official files come as backbone.pth,head.pth
  config.pretext.checkpoint = f"{weights},{head}"
  problems = preflight.weight_problems(config)
  assert len(problems) == 2 and f"no such file or directory {head}" in problems[0]


def test_banner_says_resumed_only_when_something_was_saved(tmp_path):
  from bissl_jax.pipeline import runner
  assert not runner._has_earlier_run(str(tmp_path))
  (tmp_path / "config.json").write_text("{}")  # a run stopped before its first save
  (tmp_path / "metrics.jsonl").write_text("")
  (tmp_path / "seed0" / "pretext" / "ckpt").mkdir(parents=True)  # an empty checkpoint dir
  assert not runner._has_earlier_run(str(tmp_path))
  (tmp_path / "seed0" / "pretext" / "ckpt" / "3").mkdir()
  assert runner._has_earlier_run(str(tmp_path))


def test_redirected_stdout_keeps_its_order_with_stderr():
  script = ("import sys; from bissl_jax import cli; cli.line_buffered_output(); "
            "print('first'); print('second', file=sys.stderr); print('third')")
  proc = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=120,
                        env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
                             "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert proc.stdout.split() == ["first", "second", "third"]
