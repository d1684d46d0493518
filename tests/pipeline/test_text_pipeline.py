"""Language runs through the one pipeline: Adam's weight-decay mask, the text configs end to end."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.core.params import init_params
from bissl_jax.tasks.downstream.text import TextTask
from bissl_jax.models import gpt
from bissl_jax.core import optim
from bissl_jax.core import partition
from bissl_jax.core import protocols
from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.convert import stage_output
from bissl_jax.pipeline import datasets as datasets_lib
from bissl_jax.pipeline import runner
from bissl_jax.pipeline import search as search_lib
from bissl_jax.pipeline.context import build_context
from configs import glue_gpt, text_gpt
from tests.data.test_glue_data import _rows, _write_jsonl


def _no_decay(path) -> bool:
  """By name, as the thesis states it: biases and LayerNorm parameters get no decay."""
  names = [str(getattr(k, "key", k)) for k in path]
  return names[-1] == "bias" or any(n.startswith("ln_") for n in names)


def test_adam_decays_kernels_and_embeddings_but_not_biases_or_norms():
  model = gpt.GPT(gpt.gpt_config("gpt_micro"), num_special=3)
  params, _ = init_params(model, TextTask(model, "entailment"), jax.random.PRNGKey(0), 0)
  rng = np.random.default_rng(0)
  grads = jax.tree_util.tree_map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  lr, wd = 0.1, 0.01
  tx = partition.level_optimizer({g: optim.by_name("adam", lr, weight_decay=wd)
                                  for g in params}, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Hand computation of Adam's first step (bias-corrected m = g, v = g²) with
  # decoupled decay: Δ = −lr·(g / (|g| + ε) + wd·p·[decayed]).
  checked = {"decayed": 0, "not decayed": 0}
  for (path, u), p, g in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                             jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(grads)):
    decayed = not _no_decay(path)
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    expected = -lr * (g / (np.abs(g) + 1e-8) + (wd * p if decayed else 0.0))
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
    checked["decayed" if decayed else "not decayed"] += 1
  # Kernels, token/position embeddings and special rows decay; biases and LN do not.
  assert checked == {"decayed": 8, "not decayed": 9}, checked
  # β₂: 'adam' is Adam's 0.999, 'adamw' BiSSLight's 0.95; they differ from step 2 on.
  x, g = jnp.ones(3), jnp.asarray([1.0, -2.0, 0.5])
  second = {}
  for name in ("adam", "adamw"):
    t = optim.by_name(name, lr, weight_decay=0.0)
    _, s = t.update(g, t.init(x), x)
    second[name] = np.asarray(t.update(2 * g, s, x)[0])
  for name, b2 in (("adam", 0.999), ("adamw", 0.95)):
    m = (0.9 * 0.1 * g + 0.1 * 2 * g) / (1 - 0.9 ** 2)
    v = (b2 * (1 - b2) * g ** 2 + (1 - b2) * 4 * g ** 2) / (1 - b2 ** 2)
    np.testing.assert_allclose(second[name], -lr * m / (np.sqrt(v) + 1e-8), rtol=1e-4)


def test_optimizer_names_are_validated():
  config = text_gpt.get_config("runlocal")
  validate_config(config)
  for field in ("finetune.optimizer", "head_warmup.optimizer", "pretext.optimizer",
                "bissl.upper_optimizer_name"):
    bad = text_gpt.get_config("runlocal")
    group, leaf = field.split(".")
    bad[group][leaf] = "adagrad"
    with pytest.raises(ConfigError, match=rf"config\.{field}='adagrad'"):
      validate_config(bad)
  bad = text_gpt.get_config("runlocal")
  bad.pretext.task = "simclr"  # a GPT is pretrained with next_token only
  with pytest.raises(ConfigError, match="next_token"):
    build_context(bad, "/unused")


def test_grid_search_tries_every_pair_once():
  pairs = search_lib.grid_configs((1e-3, 1e-2), (0.0001, 0.01))
  assert pairs == [(1e-3, 1e-4), (1e-3, 1e-2), (1e-2, 1e-4), (1e-2, 1e-2)]
  seen = []
  result = search_lib.random_search(lambda lr, wd: (seen.append((lr, wd)) or -abs(lr - 1e-2),
                                                     0.0),
                                    num_configs=99, lr_range=(1, 1), wd_range=(1, 1), seed=0,
                                    pairs=pairs)
  assert seen == pairs and result.lr == 1e-2


def test_glue_gpt_has_the_thesis_settings_for_every_task():
  for task in glue_gpt.GLUE_TASKS:
    config = validate_config(glue_gpt.get_config(task))
    b = config.bissl
    assert (b.alternations, b.lower_steps, b.upper_steps, b.lam, b.lower_lr) == (
        200, 20, 4, 0.1, 5e-6)
    assert config.data.downstream_dataset == f"glue/{task}" and config.model.arch == "gpt"
    assert {config.pretext.optimizer, config.head_warmup.optimizer, b.lower_optimizer_name,
            b.upper_optimizer_name, config.finetune.optimizer} == {"adam"}
    assert config.finetune.batch_size == b.pretext_batch_size == 64
    assert config.head_warmup.epochs == (0.1 if task in ("sst2", "qnli", "qqp") else 0.5)
    assert len(search_lib.grid_configs(config.search.lr_grid, config.search.wd_grid)) == 32
    validate_config(glue_gpt.get_config(f"{task},runlocal"))
  with pytest.raises(ValueError, match="needs one GLUE task"):
    glue_gpt.get_config("")


def _write_glue(root, task, n_train=100, n_test=40):
  _write_jsonl(root, task, "train", _rows(n_train, task))
  _write_jsonl(root, task, "validation", _rows(n_test, task, offset=50))  # ≤ 32 tokens


def test_glue_gpt_runlocal_builds_data_and_tasks_for_every_task(tmp_path):
  for task in glue_gpt.GLUE_TASKS:
    _write_glue(tmp_path, task)
    config = glue_gpt.get_config(f"{task},runlocal")
    config.data.data_dir = str(tmp_path)
    config = validate_config(config)
    splits, pretext_set = datasets_lib.load_data(config, True, True)
    ctx = build_context(config, str(tmp_path / f"run_{task}"))
    ctx.logger.close()
    tokens = splits["train"].tokens
    assert tokens.shape[1:] == ((2, 32) if ctx.downstream.kind == "similarity" else (32,))
    assert ctx.downstream.regression == (task == "stsb")
    assert ctx.downstream.num_outputs == (1 if task == "stsb" else 2)
    assert ctx.metric_names[0] == {"cola": "matthews", "mrpc": "f1", "qqp": "f1",
                                   "stsb": "pearson"}.get(task, "accuracy")
    assert len(splits["train"]) == 64 and len(splits["test"]) == 40  # max_train_examples
    assert pretext_set.tokens.shape[1] == 32
    assert protocols.input_key(ctx.task) == protocols.input_key(ctx.downstream) == "tokens"


def _check_run(workdir, results, metric):
  assert set(results["pipelines"]) == {"baseline", "bissl"}
  assert results["metric"] == metric
  for p in results["pipelines"].values():
    assert len(p["per_seed"]) == 2
    assert all(np.isfinite(m[metric]) for m in p["per_seed"].values())
  # BiSSL moved the backbone away from the pretext model it started from.
  pre, _ = stage_output.load_export(os.path.join(workdir, "seed0", "pretext", "output"))
  bissl, _ = stage_output.load_export(os.path.join(workdir, "seed0", "bissl", "bissl", "output"))
  moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                 pre["params"]["backbone"], bissl["params"]["backbone"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  assert pre["params"]["pretext_head"] == {}  # next_token: the pretext head is empty


@pytest.mark.slow
def test_text_gpt_runlocal_runs_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  config = text_gpt.get_config("runlocal")
  results = runner.run(config, workdir)
  _check_run(workdir, results, "accuracy")
  assert "corpus_fingerprint" in results
  # The reported accuracy is the one of the exported fine-tuned model, recomputed here
  # from the GPT's own forward pass on the test tokens.
  ctx = build_context(validate_config(config), str(tmp_path / "check"))
  ctx.logger.close()
  splits, _ = datasets_lib.load_data(validate_config(config), False, True)
  variables, _ = stage_output.load_export(os.path.join(workdir, "seed1", "bissl", "finetune",
                                                       "output"))
  p = variables["params"]
  hidden, mask = ctx.model.hidden(p["backbone"], jnp.asarray(splits["test"].tokens),
                                  p["downstream_head"]["special_embeddings"])
  logits = ctx.downstream.head_outputs(p["downstream_head"], gpt.end_state(hidden, mask))
  accuracy = float(np.mean(np.argmax(np.asarray(logits), 1) == splits["test"].labels))
  assert accuracy == pytest.approx(results["pipelines"]["bissl"]["per_seed"]["1"]["accuracy"])
  with open(os.path.join(workdir, "results.md")) as f:
    assert "Test accuracy (%)" in f.read()


@pytest.mark.slow
def test_glue_gpt_runlocal_runs_stsb_end_to_end(tmp_path):
  _write_glue(tmp_path, "stsb")
  config = glue_gpt.get_config("stsb,runlocal")
  config.data.data_dir = str(tmp_path)
  config.search.enabled = True   # the thesis's grid (shrunk to 2 × 1 pairs)
  workdir = str(tmp_path / "run")
  results = runner.run(config, workdir)
  _check_run(workdir, results, "pearson")
  with open(os.path.join(workdir, "search", "baseline.json")) as f:
    trials = json.load(f)["trials"]
  assert [(t["lr"], t["weight_decay"]) for t in trials] == [
      (lr, wd) for lr in glue_gpt.LR_GRID[-2:] for wd in glue_gpt.WD_GRID[-1:]]
