"""Interrupting and resuming BiSSL and pretraining ends in the uninterrupted state."""
import contextlib
import io
import os

import jax
import numpy as np
import pytest

from bissl_jax.core import alternation as ts
from bissl_jax.runtime.errors import NonFiniteError
from bissl_jax.pipeline import bissl_stage
from bissl_jax.pipeline import build_context
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import load_data
from bissl_jax.pipeline import pretrain
from configs import digits_simclr

pytestmark = pytest.mark.slow  # about a minute: several short BiSSL and pretext runs

ALTERNATIONS = 4


class Crash(RuntimeError):
  """Stands in for a crash mid-run."""


def _config():
  # The runlocal config itself (T=4, checkpoints every 2), so the compiled BiSSL step
  # is shared with test_pipeline.py when both run in one process.
  config = digits_simclr.get_config("runlocal")
  assert config.bissl.alternations == ALTERNATIONS and config.bissl.checkpoint_every == 2
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = _config()
  workdir = str(tmp_path_factory.mktemp("resume"))
  splits, pretext_set = load_data(config, need_pretext=True, need_downstream=True)
  ctx = build_context(config, workdir)
  params, stats = ctx.init_variables(jax.random.key(0))
  warm = {"params": params, "batch_stats": stats}
  return ctx, warm, pretext_set, splits["train"]


def _run(setup, directory, callback=None):
  ctx, warm, pretext_set, train = setup
  with contextlib.redirect_stdout(io.StringIO()):
    return bissl_stage.run_bissl(ctx, warm, pretext_set, train, seed=0, directory=directory,
                                 name="bissl/test", callback=callback)


def _stop_after(count, exc):
  def callback(done, state, metrics):
    if done == count:
      raise exc
  return callback


def _assert_states_equal(a: ts.BilevelState, b: ts.BilevelState):
  paths_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(paths_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("full"))
  return directory, _run(setup, directory)


def test_uninterrupted_run_checkpoints_and_advances(uninterrupted):
  directory, out = uninterrupted
  state = out.state
  cfg = _config().bissl
  assert int(state.alternation) == ALTERNATIONS
  assert int(state.lower.step) == ALTERNATIONS * cfg.lower_steps
  assert int(state.upper.step) == ALTERNATIONS * cfg.upper_steps
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  assert ckpt.all_steps() == [2, 4]
  _, extra = ckpt.restore(state)
  ckpt.close()
  assert extra["steps"] == ALTERNATIONS
  # Lower stack: 64 images / batch 32 = 2 batches per epoch; each alternation takes
  # N_L=2, then 1 for the HVP (a new epoch each time): 2 epochs per alternation.
  assert extra["data"]["lower"] == {"epoch": 2 * ALTERNATIONS - 1, "cursor": 1}


@pytest.mark.parametrize("interrupt, saved_at", [(Crash("boom"), 2), (KeyboardInterrupt(), 3)])
def test_interrupted_run_resumes_to_the_same_state(setup, uninterrupted, tmp_path,
                                                   interrupt, saved_at):
  directory = str(tmp_path / "bissl")
  with pytest.raises(type(interrupt)):
    _run(setup, directory, callback=_stop_after(3, interrupt))
  # A crash keeps the last periodic checkpoint; Ctrl-C also saves the last
  # completed alternation.
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  assert ckpt.latest_step() == saved_at
  ckpt.close()
  assert not checkpoint.is_export(os.path.join(directory, "output"))
  resumed_from = []
  out = _run(setup, directory, callback=lambda done, *_: resumed_from.append(done))
  assert resumed_from[0] == saved_at + 1  # nothing before the checkpoint was redone
  _assert_states_equal(out.state, uninterrupted[1].state)
  exported, _ = checkpoint.load_export(os.path.join(directory, "output"))
  _assert_states_equal(exported["params"], uninterrupted[1].params)


def test_resume_with_changed_config_is_refused(setup, uninterrupted, tmp_path):
  directory = str(tmp_path / "bissl")
  with pytest.raises(Crash):
    _run(setup, directory, callback=_stop_after(2, Crash()))
  ctx, *rest = setup
  ctx.config.unlock()
  ctx.config.bissl.lam = 0.01
  ctx.config.reuse = "strict"  # the default, 'recompute', would start the stage afresh
  try:
    with pytest.raises(ValueError, match="lam"):
      _run((ctx, *rest), directory)
  finally:
    ctx.config.bissl.lam = 0.001
    ctx.config.reuse = "recompute"


class NanAfter:
  """A pretext set whose images become NaN after ``good_calls`` batch() calls."""

  def __init__(self, dataset, good_calls):
    self.dataset, self.good_calls, self.calls = dataset, good_calls, 0

  def __len__(self):
    return len(self.dataset)

  def batch(self, indices):
    out = dict(self.dataset.batch(indices))
    images = out["image"].astype(np.float32) / 255.0
    if self.calls >= self.good_calls:
      images[..., 0, 0, :] = np.nan
    self.calls += 1
    out["image"] = images
    return out


def test_nan_in_data_stops_without_saving(setup, tmp_path):
  ctx, warm, pretext_set, train = setup
  directory = str(tmp_path / "bissl")
  ctx.config.unlock()
  ctx.config.bissl.checkpoint_every = 1
  try:
    # Two batch() calls per alternation (N_L lower batches, then the HVP batch):
    # alternation 0 is clean, alternation 1 sees NaN.
    with pytest.raises(NonFiniteError, match="alternation 1"):
      _run((ctx, warm, NanAfter(pretext_set, good_calls=2), train), directory)
  finally:
    ctx.config.bissl.checkpoint_every = 2
  ckpt = checkpoint.RunCheckpointer(os.path.join(directory, "ckpt"))
  assert ckpt.all_steps() == [1]  # the clean alternation only
  ckpt.close()
  assert not checkpoint.is_export(os.path.join(directory, "output"))


def test_pretraining_resumes_mid_stage(setup, tmp_path):
  ctx, _, pretext_set, _ = setup
  with contextlib.redirect_stdout(io.StringIO()):
    full = pretrain.pretrain(ctx, pretext_set, seed=3, directory=str(tmp_path / "a"))
    pretrain.pretrain(ctx, pretext_set, seed=3, directory=str(tmp_path / "b"))
  # Drop the finished output: the rerun must continue from the epoch-1 checkpoint.
  import shutil
  shutil.rmtree(tmp_path / "b" / "output")
  ckpt = checkpoint.RunCheckpointer(str(tmp_path / "b" / "ckpt"))
  assert ckpt.all_steps() == [2]  # after epoch 1 of 2 (2 steps per epoch)
  ckpt.close()
  with contextlib.redirect_stdout(io.StringIO()) as out:
    resumed = pretrain.pretrain(ctx, pretext_set, seed=3, directory=str(tmp_path / "b"))
  assert "start: 2/4" in out.getvalue()  # 2 steps per epoch, one epoch already done
  _assert_states_equal(resumed, full)


def test_streamed_pretext_set_resumes_to_the_in_memory_state(setup, uninterrupted, tmp_path):
  """The lower level streamed through Grain (PNG files of the same images), stopped by
  Ctrl-C after alternation 3 and resumed, ends in the in-memory run's state."""
  import PIL.Image  # pylint: disable=import-outside-toplevel
  from bissl_jax.data import image_records  # pylint: disable=import-outside-toplevel
  ctx, warm, pretext_set, train = setup
  paths = []
  for i, image in enumerate(pretext_set.images):
    paths.append(str(tmp_path / f"{i}.png"))
    PIL.Image.fromarray(image).save(paths[-1])
  records = image_records.FolderRecords(paths, pretext_set.labels, pretext_set.num_classes,
                                        image_size=pretext_set.image_size, name="png")
  streamed = (ctx, warm, records, train)
  directory = str(tmp_path / "bissl")
  with pytest.raises(KeyboardInterrupt):
    _run(streamed, directory, callback=_stop_after(3, KeyboardInterrupt()))
  assert os.path.isdir(os.path.join(directory, "ckpt", "3", checkpoint.ITERATORS))
  out = _run(streamed, directory)
  _assert_states_equal(out.state, uninterrupted[1].state)
