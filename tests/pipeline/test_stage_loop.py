"""The one stage loop: resume, interrupts (exception and real signals), non-finite stops.

A toy stage (a parameter vector pulled towards each batch's mean, with data drawn
from an :class:`EpochData`) stands in for a training stage: every check here is
about the loop, not the model, so each test takes well under a second.
"""
import contextlib
import io
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.config_validation import ConfigError
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import run_log
from bissl_jax.pipeline import stage_loop
from bissl_jax.core.state import LevelState
from config_helpers import REPO_ROOT

STEPS_PER_EPOCH, EPOCHS = 3, 4


class Toy:
  """12 examples of 2 features; batches of 4 (3 per epoch)."""

  def __init__(self, poison_after=None):
    self.x = np.arange(24, dtype=np.float32).reshape(12, 2)
    self.calls, self.poison_after = 0, poison_after

  def __len__(self):
    return len(self.x)

  def batch(self, rows):
    self.calls += 1
    x = self.x[rows].copy()
    if self.poison_after is not None and self.calls > self.poison_after:
      x[:] = np.inf  # the parameters become non-finite; the logged loss stays finite
    return {"x": x}


@jax.jit
def _toy_step(state: LevelState, x, rng):
  noise = 0.01 * jax.random.normal(rng, state.params.shape)
  params = state.params - 0.5 * (state.params - x.mean(0)) + noise
  loss = jnp.where(jnp.isfinite(params).all(), jnp.sum((params - x.mean(0)) ** 2), 0.0)
  return LevelState(params, state.batch_stats, state.opt_state, state.step + 1), {"loss": loss}


def _stage(directory, data=None, **changes):
  key = jax.random.key(0)
  fields = dict(
      name="toy/seed0", total_steps=EPOCHS * STEPS_PER_EPOCH,
      step=lambda state, i, batch: _toy_step(state, batch["x"], jax.random.fold_in(key, i)),
      data=stage_loop.EpochData(data or Toy(), 4, seed=7, steps_per_epoch=STEPS_PER_EPOCH),
      steps_per_epoch=STEPS_PER_EPOCH, checkpoint_dir=os.path.join(directory, "ckpt"),
      checkpoint_every=2, fingerprint={"toy.lr": 0.5},
      params_to_check=lambda s: {"toy parameters": (s.params, "Lower config.toy.lr.")},
      loss_fix="Lower config.toy.lr.")
  fields.update(changes)
  return stage_loop.Stage(**fields)


def _fresh():
  return LevelState(jnp.zeros(2), {}, {}, jnp.zeros((), jnp.int32))


def _run(stage):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    try:
      return stage_loop.run_stage(stage, _fresh()), out.getvalue()
    except BaseException as e:  # the output is part of what the tests check
      e.stdout = out.getvalue()
      raise


def _steps(directory):
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("full"))
  result, out = _run(_stage(directory))
  return directory, result, out


def test_uninterrupted_checkpoints_every_two_epochs(uninterrupted):
  directory, result, out = uninterrupted
  assert result.steps_done == EPOCHS * STEPS_PER_EPOCH and result.resumed_from == 0
  assert int(result.state.step) == EPOCHS * STEPS_PER_EPOCH
  assert _steps(directory) == [6]  # epoch 2; the last epoch is not saved (save_last=False)
  assert "[toy/seed0] done: 12/12 steps" in out


def _stop_at(count, exc):
  def callback(done, state, metrics):
    if done == count:
      raise exc
  return callback


@pytest.mark.parametrize("stop_at", [4, 7])  # mid-epoch (epoch 2, step 1) and after a save
def test_keyboard_interrupt_saves_the_last_step_and_resumes_identically(
    uninterrupted, tmp_path, stop_at):
  directory = str(tmp_path)
  with pytest.raises(KeyboardInterrupt) as err:
    _run(_stage(directory, callback=_stop_at(stop_at, KeyboardInterrupt())))
  out = err.value.stdout
  assert stop_at in _steps(directory)
  assert f"interrupted: step {stop_at} of 12 is saved in" in out and "rerun the same" in out
  assert "done:" not in out  # no done line for an interrupted stage
  result, out = _run(_stage(directory))
  assert result.resumed_from == stop_at
  assert f"resuming at step {stop_at} of 12 from" in out
  _assert_same(result.state, uninterrupted[1].state)


def test_a_crash_keeps_the_last_periodic_checkpoint(uninterrupted, tmp_path):
  directory = str(tmp_path)
  with pytest.raises(RuntimeError):
    _run(_stage(directory, callback=_stop_at(8, RuntimeError("boom"))))
  assert _steps(directory) == [6]
  result, _ = _run(_stage(directory))
  assert result.resumed_from == 6
  _assert_same(result.state, uninterrupted[1].state)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_current_step_and_saves_it(uninterrupted, tmp_path, signum):
  directory = str(tmp_path)

  def send_signal(done, state, metrics):
    if done == 5:
      os.kill(os.getpid(), signum)  # handled between steps, never inside one

  before = signal.getsignal(signum)
  with pytest.raises(KeyboardInterrupt) as err:
    _run(_stage(directory, callback=send_signal))
  assert isinstance(err.value, stage_loop.StopRequested)
  assert signal.getsignal(signum) == before  # the loop put the old handler back
  out = err.value.stdout
  assert f"{signal.Signals(signum).name} received: stopping after the current step" in out
  assert "step 5 of 12 is saved" in out and "done:" not in out
  assert 5 in _steps(directory)
  result, _ = _run(_stage(directory))
  _assert_same(result.state, uninterrupted[1].state)


def test_nonfinite_parameters_stop_with_the_stage_named(tmp_path):
  directory = str(tmp_path)
  # Batches 1-7 are clean; batch 8 (epoch 3, step 2) turns the parameters to inf.
  with pytest.raises(NonFiniteError) as err:
    _run(_stage(directory, data=Toy(poison_after=7), checkpoint_every=1))
  message = str(err.value)
  assert "toy parameters" in message and "toy/seed0" in message
  assert "step 9 of 12" in message and "Lower config.toy.lr." in message
  assert "done:" not in err.value.stdout
  assert _steps(directory) == [3, 6]  # nothing non-finite was saved


def test_nonfinite_loss_is_caught_on_logged_steps(tmp_path):
  def nan_loss(state, i, batch):
    state, metrics = _toy_step(state, batch["x"], jax.random.key(i))
    return state, dict(metrics, loss=jnp.nan if i == 4 else metrics["loss"])

  with pytest.raises(NonFiniteError, match=r"Non-finite loss at step 5 of 12 of toy/seed0"):
    _run(_stage(str(tmp_path), step=nan_loss))


def test_the_finite_check_finds_any_bad_entry_across_leaf_groups(monkeypatch):
  """Every leaf position and group boundary, against NumPy: leaves of mixed float dtypes
  (and an integer leaf, never checked) split into groups of at most 10 entries."""
  monkeypatch.setattr(stage_loop, "_GROUP_ENTRIES", 10)
  shapes = [(3,), (2, 2), (5,), (4, 6), (1,), (7,)]  # 24 entries form a group alone
  dtypes = [jnp.float32, jnp.bfloat16, jnp.float32, jnp.float16, jnp.float32, jnp.bfloat16]
  clean = {f"leaf{i}": jnp.ones(s, d) for i, (s, d) in enumerate(zip(shapes, dtypes))}
  clean["count"] = jnp.arange(3)
  assert stage_loop.is_finite(clean)
  for name in [k for k in clean if k != "count"]:
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      leaf = clean[name]
      tree = dict(clean, **{name: leaf.reshape(-1).at[-1].set(bad).reshape(leaf.shape)})
      expected = all(np.isfinite(np.asarray(x, np.float32)).all() for x in tree.values())
      assert stage_loop.is_finite(tree) == expected == False, (name, bad)  # noqa: E712
  assert stage_loop.is_finite({})


def test_divergence_hook_returns_the_state_quietly(tmp_path):
  seen = []
  result, out = _run(_stage(str(tmp_path), data=Toy(poison_after=7), checkpoint_dir=None,
                            on_divergence=lambda state, e: seen.append(str(e))))
  assert result.diverged is not None and seen and "toy parameters" in seen[0]
  assert result.steps_done == 9 and "done:" not in out


def test_a_resume_keeps_one_metric_record_per_step(tmp_path):
  directory = str(tmp_path)
  logger = run_log.MetricLogger(directory, tensorboard=False)
  logger.write("other/stage", 11, {"loss": 1.0})
  with pytest.raises(RuntimeError):  # a crash after step 8: steps 7 and 8 are redone
    _run(_stage(directory, logger=logger, callback=_stop_at(8, RuntimeError("boom"))))
  assert [r["step"] for r in run_log.read_metrics(directory, "toy/seed0")] == list(range(1, 9))
  _run(_stage(directory, logger=logger))
  assert [r["step"] for r in run_log.read_metrics(directory, "toy/seed0")] == list(range(1, 13))
  assert len(run_log.read_metrics(directory, "other/stage")) == 1


def test_resume_with_another_fingerprint_is_refused(tmp_path):
  directory = str(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    _run(_stage(directory, callback=_stop_at(2, KeyboardInterrupt())))
  with pytest.raises(ConfigError, match=r"\['toy.lr'\]"):
    _run(_stage(directory, fingerprint={"toy.lr": 0.1}))


def test_epoch_data_resumes_mid_epoch():
  full = stage_loop.EpochData(Toy(), 4, seed=3, steps_per_epoch=STEPS_PER_EPOCH)
  expected = [full.batch(i)["x"] for i in range(8)]
  part = stage_loop.EpochData(Toy(), 4, seed=3, steps_per_epoch=STEPS_PER_EPOCH)
  for i in range(5):
    part.batch(i)
  position = part.position(5)
  again = stage_loop.EpochData(Toy(), 4, seed=3, steps_per_epoch=STEPS_PER_EPOCH)
  again.restore(position, 5)
  for i in range(5, 8):
    np.testing.assert_array_equal(again.batch(i)["x"], expected[i])
  assert sorted(np.concatenate(expected[3:6])[:, 0]) == list(range(0, 24, 2))  # one epoch


def test_progress_prints_done_only_when_completed(capsys):
  progress = run_log.Progress(4, "demo", use_tqdm=False)
  progress.update(1)
  progress.close(completed=False)
  progress.close()  # a second close prints nothing either
  assert "done" not in capsys.readouterr().out


def test_convert_does_not_import_the_pipeline():
  repo = REPO_ROOT
  code = ("import sys; import bissl_jax.convert; "
          "assert not [m for m in sys.modules if m.startswith('bissl_jax.pipeline')], "
          "sorted(m for m in sys.modules if m.startswith('bissl_jax.pipeline')); "
          "import bissl_jax.pipeline.checkpoint, bissl_jax.pipeline; print('ok')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
