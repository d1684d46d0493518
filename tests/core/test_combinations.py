"""Every pretext task × Hessian mode × solver either runs or is refused before compute.

Validation walks every combination (cheap). Each accepted combination of a task with a
Hessian mode (with an operator solver), and each task with every gradient-window
solver, is then traced through one lower step, the stage's operator build and one
upper step with ``jax.eval_shape``: tracing is where a combination the validation
let through would fail (e.g. a Gauss–Newton operator for a task without outputs), and
it computes nothing.
"""
import jax
import jax.numpy as jnp
import pytest

from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.core import hessian
from bissl_jax.core import lower as lower_level
from bissl_jax.core import state as bilevel
from bissl_jax.core import upper as upper_level
from bissl_jax.implicit import solvers
from bissl_jax.pipeline.context import build_context
from config_helpers import override
from configs import digits_mae_lora, digits_simclr, text_gpt


def _config(task: str):
  if task == "mae":
    config = digits_mae_lora.get_config("runlocal")
  elif task == "next_token":
    config = text_gpt.get_config("runlocal")
  else:
    config = digits_simclr.get_config("runlocal")
    if task == "byol":
      override(config, **{"pretext.task": "byol", "model.predictor": config.model.projector})
    if task == "gessl":
      override(config, **{"gessl.enabled": True})
  return override(config, **{"bissl_variants": {}, "bissl.warm_start": False,
                             "bissl.cg_tol": 0.0, "bissl.cg_iters": 1,
                             "bissl.head_in_implicit": False})


TASKS = ("simclr", "byol", "mae", "next_token", "gessl")


def _with(task, mode, solver):
  return override(_config(task), **{"bissl.hessian_mode": mode, "bissl.solver": solver})


def _accepted(task, mode, solver) -> bool:
  try:
    validate_config(_with(task, mode, solver), num_devices=1)
    return True
  except ConfigError as e:
    # Refused: the message names the fields that clash.
    assert "config.bissl.hessian_mode" in str(e) or "config.bissl.solver" in str(e), str(e)
    return False


def test_validation_walks_every_combination():
  verdicts = {(t, m, s): _accepted(t, m, s) for t in TASKS for m in hessian.HESSIAN_MODES
              for s in solvers.names()}
  # The case a user met mid-trace is refused up front; the supported ones are not.
  assert not verdicts[("mae", "gauss_newton", "layerwise_cg")]
  assert not verdicts[("next_token", "gauss_newton", "cg")]
  assert not verdicts[("gessl", "gauss_newton", "minres")]
  assert verdicts[("simclr", "gauss_newton", "cg")] and verdicts[("byol", "gauss_newton", "cg")]
  # A solver that needs no operator makes the Hessian mode irrelevant.
  assert all(verdicts[(t, m, "mfac")] for t in TASKS for m in hessian.HESSIAN_MODES)
  assert all(verdicts[(t, m, s)] for t in TASKS for m in ("linearize", "jvp")
             for s in solvers.names())


def _abstract_batch(ctx, config, batch, train_images=True):
  """ShapeDtypeStructs of one raw batch of the run's data."""
  if ctx.task.__class__.__name__ == "NextToken" or getattr(ctx.downstream, "input_key",
                                                            "image") == "tokens":
    return jax.ShapeDtypeStruct((batch, int(config.data.context)), jnp.int32)
  size = int(config.data.image_size)
  return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)


def _trace_one_alternation(task, mode, solver, tmp_path):
  config = validate_config(_with(task, mode, solver), num_devices=1)
  ctx = build_context(config, str(tmp_path))
  setup = bilevel.BisslSetup.from_config(ctx.model, ctx.task, config.bissl,
                                         downstream=ctx.downstream)
  # The configs' own pretext batch (GeSSL needs n_tasks × classes_per_task images).
  pretext = _abstract_batch(ctx, config, int(config.pretext.batch_size))
  downstream = _abstract_batch(ctx, config, 4)
  labels = jax.ShapeDtypeStruct((4,), jnp.int32)

  def one_alternation(key, pretext, hvp, images, labels):
    params, stats = ctx.init_variables(key)
    if hasattr(ctx.task, "init_head"):
      params = ctx.task.init_head(key, params)
    state = bilevel.init_bilevel_state(setup, params, stats)
    state, _ = lower_level.lower_step(setup, state, pretext, key)
    operator, lam = upper_level.prepare_stage(setup, state, hvp, key)
    state, metrics = upper_level.upper_step(setup, state, operator, lam, images, labels, key)
    return metrics["upper_loss"]
  return jax.eval_shape(one_alternation, jax.random.key(0), pretext, pretext, downstream,
                        labels)


TRACED = [(t, m, "cg") for t in TASKS for m in hessian.HESSIAN_MODES] + [
    (t, "linearize", s) for t in TASKS for s in solvers.names()
    if not solvers.get(s).needs_operator]


@pytest.mark.slow  # about 10 s of tracing each (ResNet-18, ViT, GPT), nothing computed
@pytest.mark.parametrize("task,mode,solver", TRACED, ids=["-".join(c) for c in TRACED])
def test_every_accepted_combination_traces(task, mode, solver, tmp_path):
  if not _accepted(task, mode, solver):
    pytest.skip("refused by validation (checked above)")
  out = _trace_one_alternation(task, mode, solver, tmp_path)
  assert out.shape == ()


def test_a_predictor_that_cannot_meet_the_projector_is_refused():
  config = override(_config("byol"), **{"model.predictor": "8-8-99"})
  with pytest.raises(ConfigError, match="config.model.predictor='8-8-99'.*projector"):
    validate_config(config, num_devices=1)
