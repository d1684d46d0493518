"""End-to-end pipeline on the tiny digits config, checkpoints, search and result tables."""
import contextlib
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.evaluation import metrics as metrics_lib
from bissl_jax.core.state import LevelState
from bissl_jax.pipeline import bissl_stage
from bissl_jax.pipeline import build_context
from bissl_jax.pipeline import checkpoint
from bissl_jax.pipeline import load_data
from bissl_jax.pipeline import results as results_lib
from bissl_jax.pipeline import run
from bissl_jax.pipeline import run_log
from bissl_jax.pipeline import search
from bissl_jax.pipeline import supervised
from config_helpers import override
from configs import digits_simclr


def tiny_config(**changes):
  return override(digits_simclr.get_config("runlocal"), **changes)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
  """One full comparison (2 seeds, both pipelines); stdout captured."""
  workdir = str(tmp_path_factory.mktemp("e2e"))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = run(tiny_config(), workdir)
  return workdir, results, out.getvalue()


def _tree_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # shares a full two-seed comparison run (about a minute)
def test_comparison_writes_results(comparison):
  workdir, results, stdout = comparison
  for name in ("results.json", "results.md", "metrics.jsonl", "config.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(workdir, "tensorboard")))
  # The config asked for the fast CPU kernels, but this process's backend had started
  # without them: the run records the kernels it used (cpu_defaults.reconcile).
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["cpu_kernels"] == "default"
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk["pipelines"].keys() == {"baseline", "bissl"}
  for pipeline in on_disk["pipelines"].values():
    assert set(pipeline["per_seed"]) == {"0", "1"}
    for metric in ("top1", "top5"):
      values = [m[metric] for m in pipeline["per_seed"].values()]
      assert all(0.0 <= v <= 1.0 for v in values)
      # Independent recomputation of mean ± sample std.
      assert pipeline["summary"][metric]["mean"] == pytest.approx(np.mean(values))
      assert pipeline["summary"][metric]["std"] == pytest.approx(np.std(values, ddof=1))
  diff = on_disk["difference"]["top1"]
  assert diff == pytest.approx(on_disk["pipelines"]["bissl"]["summary"]["top1"]["mean"]
                               - on_disk["pipelines"]["baseline"]["summary"]["top1"]["mean"])
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| Only FT |" in table and "| BiSSL+FT |" in table and "Avg Diff" in table
  assert table in stdout  # the table is printed too
  # One progress report per stage and seed.
  for label in ("pretext/seed0", "finetune/baseline/seed0", "head_warmup/seed0",
                "bissl/seed0", "finetune/bissl/seed1"):
    assert f"[{label}] done:" in stdout, label
  assert "ETA" in stdout
  # Training curves are drawn at the end of the run, as valid PNGs.
  assert results["plots"], "no training-curve plots were written"
  from PIL import Image
  for path in results["plots"]:
    with Image.open(path) as image:
      assert image.format == "PNG" and min(image.size) > 100


@pytest.mark.slow  # shares a full two-seed comparison run (about a minute)
def test_metrics_log_has_every_stage(comparison):
  workdir = comparison[0]
  records = run_log.read_metrics(workdir)
  stages = {r["stage"] for r in records}
  assert {"pretext/seed0", "head_warmup/seed0", "bissl/seed0", "finetune/baseline/seed0",
          "finetune/bissl/seed1/val"} <= stages
  bissl = run_log.read_metrics(workdir, "bissl/seed1")
  assert [r["step"] for r in bissl] == [1, 2, 3, 4]  # log_every=1, four alternations
  for key in ("lower_loss", "upper_loss", "theta_distance"):
    assert all(math.isfinite(r[key]) for r in bissl), key
  # The residual is logged for the alternations that recomputed it (residual_every).
  checked = [r for r in bissl if r["residual_checks"] > 0]
  assert checked and all(math.isfinite(r["cg_residual"]) for r in checked)
  assert all("cg_residual" not in r for r in bissl if r["residual_checks"] == 0)


@pytest.mark.slow  # shares a full two-seed comparison run (about a minute)
def test_finetuned_checkpoint_restores_and_reproduces_test_metrics(comparison):
  workdir = comparison[0]
  directory = os.path.join(workdir, "seed0", "baseline", "finetune")
  variables, meta = checkpoint.load_export(os.path.join(directory, "output"))
  assert meta["stage"] == "finetune" and meta["pipeline"] == "baseline"
  with open(os.path.join(directory, "evaluation.json")) as f:
    recorded = json.load(f)
  config = tiny_config()
  splits, _ = load_data(config, need_pretext=False, need_downstream=True)
  ctx = build_context(config, str(os.path.join(workdir, "reeval")))
  again = supervised.evaluate(ctx, variables["params"], variables["batch_stats"],
                              splits["test"])
  assert again["top1"] == recorded["test"]["top1"]
  assert again["top5"] == recorded["test"]["top5"]
  # And the metric itself, recomputed with NumPy from the logits.
  logits = supervised.predict(ctx, variables["params"], variables["batch_stats"],
                              splits["test"])
  assert again["top1"] == pytest.approx(np.mean(logits.argmax(1) == splits["test"].labels))


@pytest.mark.slow  # shares a full two-seed comparison run (about a minute)
def test_bissl_output_equals_final_checkpointed_state(comparison):
  workdir = comparison[0]
  directory = os.path.join(workdir, "seed1", "bissl")
  theta_p, meta = checkpoint.load_export(os.path.join(directory, "bissl", "output"))
  assert meta["stage"] == "bissl" and meta["alternations"] == 4
  warm, _ = checkpoint.load_export(os.path.join(directory, "head_warmup", "output"))
  ctx = build_context(tiny_config(), str(os.path.join(workdir, "reload")))
  state = bissl_stage.load_final_state(ctx, warm, os.path.join(directory, "bissl"))
  assert int(state.alternation) == 4
  _tree_equal(theta_p["params"], state.lower.params)
  _tree_equal(theta_p["batch_stats"], state.lower.batch_stats)
  # θ_P moved away from the pretext backbone it started from.
  pretext, _ = checkpoint.load_export(os.path.join(workdir, "seed1", "pretext", "output"))
  assert bissl_stage.tree_max_abs_diff(pretext["params"]["backbone"],
                                       state.lower.params["backbone"]) > 0


@pytest.mark.slow  # shares a full two-seed comparison run (about a minute)
def test_rerun_resumes_without_training(comparison):
  workdir, results, _ = comparison
  lines_before = len(run_log.read_metrics(workdir))
  with contextlib.redirect_stdout(io.StringIO()):
    again = run(tiny_config(), workdir)
  assert again["pipelines"] == results["pipelines"]
  assert len(run_log.read_metrics(workdir)) == lines_before  # nothing was retrained


@pytest.mark.slow  # shares a full two-seed comparison run (about a minute)
def test_single_stages_chain(comparison, tmp_path):
  """Each stage alone, fed the previous stage's exported output."""
  config = tiny_config(seeds=(0,))
  config.finetune.bissl_lr = 0.02  # distinguishable from finetune.lr
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    config.stages = "pretext"
    pre = run(config, str(tmp_path / "pretext"))["output"]
    config.stages, config.pretext.checkpoint = "head_warmup", pre
    warm = run(config, str(tmp_path / "warmup"))["output"]
    config.stages, config.bissl.init_checkpoint = "bissl", warm
    theta_p = run(config, str(tmp_path / "bissl"))["output"]
    config.stages, config.finetune.init_checkpoint = "finetune", theta_p
    tuned = run(config, str(tmp_path / "finetune"))
    config.stages, config.evaluate.checkpoint = "evaluate", tuned["output"]
    evaluated = run(config, str(tmp_path / "evaluate"))
  assert tuned["lr"] == 0.02 and tuned["pipeline"] == "bissl"
  assert evaluated["test"]["top1"] == pytest.approx(tuned["test"]["top1"])
  assert 0.0 <= evaluated["validation"]["top1"] <= 1.0
  # The stage-wise pretext model is the comparison's seed-0 pretext model.
  a, _ = checkpoint.load_export(pre)
  b, _ = checkpoint.load_export(os.path.join(comparison[0], "seed0", "pretext", "output"))
  _tree_equal(a, b)


# ----------------------------------------------------------------------------- units

def test_export_and_run_checkpoint_roundtrip(tmp_path):
  key = jax.random.key(3)
  tree = {"w": jax.random.normal(key, (3, 4)), "n": jnp.int32(7), "k": jax.random.key(5),
          "nested": (jnp.arange(3.0), {"empty": {}})}
  checkpoint.export(str(tmp_path / "out"), tree, {"stage": "x"})
  restored, meta = checkpoint.load_export(str(tmp_path / "out"), template=tree)
  assert meta["stage"] == "x" and meta["format"] == checkpoint.EXPORT_FORMAT
  np.testing.assert_array_equal(jax.random.key_data(restored["k"]), jax.random.key_data(tree["k"]))
  _tree_equal({k: v for k, v in restored.items() if k != "k"},
              {k: v for k, v in tree.items() if k != "k"})

  state = LevelState({"a": jnp.ones(2)}, {"s": jnp.zeros(1)}, (jnp.int32(4),), jnp.int32(0))
  ckpt = checkpoint.RunCheckpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state.replace(params={"a": jnp.full(2, float(step))}), {"step": step})
  assert ckpt.all_steps() == [2, 3]  # older steps pruned
  got, extra = ckpt.restore(state, step=2)
  assert isinstance(got, LevelState) and extra == {"step": 2}
  np.testing.assert_array_equal(got.params["a"], [2.0, 2.0])
  ckpt.close()
  # No temporary directories are left behind (orbax renames atomically).
  assert not [p for p in os.listdir(tmp_path / "ckpt") if "tmp" in p]


def test_sample_configs_is_log_uniform_and_reproducible():
  pairs = search.sample_configs(2000, lr_range=(1e-4, 1.0), wd_range=(1e-5, 1e-2), seed=1)
  assert pairs == search.sample_configs(2000, lr_range=(1e-4, 1.0), wd_range=(1e-5, 1e-2),
                                        seed=1)
  lr = np.log10([p[0] for p in pairs])
  wd = np.log10([p[1] for p in pairs])
  assert lr.min() >= -4 and lr.max() <= 0 and wd.min() >= -5 and wd.max() <= -2
  # Log-uniform: each decade holds about a quarter of the LRs.
  counts = np.histogram(lr, bins=[-4, -3, -2, -1, 0])[0]
  assert np.all(np.abs(counts / len(lr) - 0.25) < 0.04)


def test_random_search_picks_best_and_resumes(tmp_path):
  calls = []

  def objective(lr, wd):  # best near lr = 0.01; loss breaks exact-score ties
    calls.append((lr, wd))
    return round(-abs(math.log10(lr) + 2.0), 1), wd

  path = str(tmp_path / "search.json")
  result = search.random_search(objective, num_configs=12, lr_range=(1e-4, 1.0),
                                wd_range=(1e-5, 1e-2), seed=0, record_path=path)
  scores = [(round(-abs(math.log10(t.lr) + 2.0), 1), -t.weight_decay) for t in result.trials]
  best = result.trials[int(np.argmax([s[0] * 1e6 + s[1] for s in scores]))]
  assert (result.lr, result.weight_decay) == (best.lr, best.weight_decay)
  assert len(calls) == 12
  again = search.random_search(objective, num_configs=12, lr_range=(1e-4, 1.0),
                               wd_range=(1e-5, 1e-2), seed=0, record_path=path)
  assert len(calls) == 12 and again == result  # every trial came from the record
  assert search.select([search.Trial(1, 1, float("nan"), 0), search.Trial(2, 1, 0.1, 9)]).lr == 2


@pytest.fixture(scope="module")
def searched_with_variant(tmp_path_factory):
  """One seed with the learning-rate search on and an M-FAC variant: ``(workdir, results)``.

  One run serves the search's test and the variants' test (each would run a whole
  comparison of its own); the variant fine-tunes with the BiSSL pipeline's chosen values.
  """
  workdir = tmp_path_factory.mktemp("search_variant")
  config = tiny_config(seeds=(0,))
  with config.unlocked():
    config.search.enabled = True
    config.bissl_variants = {"mfac": {"solver": "mfac", "damping": 0.0}}
  with contextlib.redirect_stdout(io.StringIO()):
    results = run(config, str(workdir))
  return workdir, results


@pytest.mark.slow  # shares a one-seed comparison with search and a variant (about 2 min)
def test_comparison_with_search_uses_the_chosen_hyperparameters(searched_with_variant):
  tmp_path, results = searched_with_variant
  for pipeline in ("baseline", "bissl"):
    with open(tmp_path / "search" / f"{pipeline}.json") as f:
      record = json.load(f)
    assert len(record["trials"]) == 2
    chosen = results["pipelines"][pipeline]["hyperparams"]
    assert chosen == {"lr": record["best"]["lr"], "weight_decay": record["best"]["weight_decay"]}
    with open(tmp_path / "seed0" / pipeline / "finetune" / "evaluation.json") as f:
      assert json.load(f)["lr"] == chosen["lr"]


def test_markdown_table_layout():
  per_seed = {"baseline": {0: {"top1": 0.5, "top5": 0.9, "score": 0.5},
                           1: {"top1": 0.7, "top5": 0.9, "score": 0.7}},
              "bissl": {0: {"top1": 0.8, "top5": 1.0, "score": 0.8},
                        1: {"top1": 0.8, "top5": 1.0, "score": 0.8}}}
  res = results_lib.build_results(per_seed, multilabel=False,
                                  hyperparams={"baseline": {"lr": 0.1, "weight_decay": 1e-4}},
                                  info={"seeds": [0, 1]})
  assert res["pipelines"]["baseline"]["summary"]["top1"] == metrics_lib.summarize([0.5, 0.7])
  text = results_lib.to_markdown(res)
  assert "| Only FT | 60.0 ± 14.1 | 90.0 ± 0.0 | 2 | 0.1 | 0.0001 |" in text
  assert "| Avg Diff | +20.0 | +10.0 |" in text


def test_progress_reports_rate_and_eta(capsys):
  with run_log.Progress(20, "demo", items_per_step=8, use_tqdm=False) as progress:
    for _ in range(20):
      progress.update(1, loss=0.5)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "[demo] start: 0/20 steps (compiling…)"
  assert len([l for l in lines if "ETA" in l]) == 10  # every 10%
  assert "20/20 steps (100%)" in lines[-2] and "img/s" in lines[-2] and "loss 0.5" in lines[-2]
  assert lines[-1].startswith("[demo] done: 20/20 steps")
  with run_log.Progress(5, "bar", initial=2, use_tqdm=True) as progress:
    progress.update(3)
  err = capsys.readouterr().err
  assert "bar" in err and "5/5" in err  # tqdm draws on stderr
  # A first step slow enough to trigger a line (it compiles) shows no ETA from it.
  import time as time_lib
  with run_log.Progress(10, "slow", use_tqdm=False) as progress:
    progress._last_print -= 60  # pylint: disable=protected-access  (as if 60 s passed)
    progress.update(1)
    progress._last_print -= 60  # pylint: disable=protected-access
    time_lib.sleep(0.01)
    progress.update(1)
  lines = capsys.readouterr().out.splitlines()
  assert "first step compiled in" in lines[1] and "ETA" not in lines[1]
  assert "ETA" in lines[2]


def test_pretext_weights_fill_missing_heads_and_reject_wrong_widths(tmp_path, capsys):
  from bissl_jax import convert
  from bissl_jax.models import resnet
  simclr = resnet.build_model("resnet18", width_multiplier=0.0625,
                              cifar_stem=True, projector="16-16-16")
  byol = resnet.build_model("resnet18", width_multiplier=0.0625,
                            cifar_stem=True, projector="16-16-16", predictor="8-16")
  params, stats = simclr.init(jax.random.key(1), 8)
  path = str(tmp_path / "pretext")
  checkpoint.export(path, {"params": params, "batch_stats": stats}, {"stage": "pretext"})
  fresh_params, fresh_stats = byol.init(jax.random.key(2), 8)
  kwargs = dict(arch="resnet18", cifar_stem=True, width_multiplier=0.0625,
                fresh_params=fresh_params, fresh_stats=fresh_stats)
  got, got_stats = convert.load_pretext_model(path, **kwargs)
  _tree_equal(got["backbone"], params["backbone"])
  _tree_equal(got["pretext_head"]["projector"], params["pretext_head"]["projector"])
  _tree_equal(got["pretext_head"]["predictor"], fresh_params["pretext_head"]["predictor"])
  _tree_equal(got_stats["backbone"], stats["backbone"])
  assert "has no predictor: initialising it afresh" in capsys.readouterr().out
  wide = resnet.build_model("resnet18", width_multiplier=0.0625,
                            cifar_stem=True, projector="32-32-32")
  wide_params, wide_stats = wide.init(jax.random.key(3), 8)
  with pytest.raises(ValueError, match=r"config\.model\.projector='32-32-32'"):
    convert.load_pretext_model(path, **dict(kwargs, fresh_params=wide_params,
                                            fresh_stats=wide_stats),
                               head_specs={"projector": "32-32-32"})


def test_whole_resnet_weights_load_into_a_c4_model(tmp_path):
  # The detection configs' boundary: a whole ResNet's stage output (as a converted
  # checkpoint is) gives θ its stages up to res4 and the pretext tail its res5.
  from bissl_jax import convert
  from bissl_jax.models import resnet
  kw = dict(width_multiplier=0.0625, cifar_stem=True, projector="16-16-16")
  whole = resnet.build_model("resnet18", **kw)
  c4 = resnet.build_model("resnet18", backbone_ends_at="res4", **kw)
  params, stats = whole.init(jax.random.key(1), 8)
  path = str(tmp_path / "pretext")
  checkpoint.export(path, {"params": params, "batch_stats": stats}, {"stage": "pretext"})
  fresh_params, fresh_stats = c4.init(jax.random.key(2), 8)
  got, got_stats = convert.load_pretext_model(
      path, arch="resnet18", cifar_stem=True, width_multiplier=0.0625,
      fresh_params=fresh_params, fresh_stats=fresh_stats)
  for loaded, source in ((got, params), (got_stats, stats)):
    assert set(loaded["backbone"]) == set(source["backbone"]) - {"layer4_0", "layer4_1"}
    _tree_equal(loaded["backbone"], {k: source["backbone"][k] for k in loaded["backbone"]})
    _tree_equal(loaded["pretext_head"]["backbone_tail"],
                {k: source["backbone"][k] for k in ("layer4_0", "layer4_1")})
  _tree_equal(got["pretext_head"]["projector"], params["pretext_head"]["projector"])
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
      {k: v for k, v in fresh_params.items() if k != "downstream_head"})


def test_bissl_variants_add_rows_on_the_same_seeds(searched_with_variant):
  tmp_path, results = searched_with_variant
  pipelines = results["pipelines"]
  assert set(pipelines) == {"baseline", "bissl", "bissl_mfac"}
  assert pipelines["bissl_mfac"]["label"] == "BiSSL+FT (mfac)"
  assert list(pipelines["bissl_mfac"]["per_seed"]) == ["0"]
  # The variant ran its own BiSSL stage from the same warm-up, with its own solver.
  mfac_out, _ = checkpoint.load_export(str(tmp_path / "seed0" / "bissl_mfac" / "bissl" / "output"))
  plain_out, _ = checkpoint.load_export(str(tmp_path / "seed0" / "bissl" / "bissl" / "output"))
  assert bissl_stage.tree_max_abs_diff(mfac_out["params"], plain_out["params"]) > 0
  assert "BiSSL+FT (mfac)" in (tmp_path / "results.md").read_text()
  # It fine-tuned with the values the search chose for the BiSSL pipeline.
  with open(tmp_path / "seed0" / "bissl_mfac" / "finetune" / "evaluation.json") as f:
    assert json.load(f)["lr"] == pipelines["bissl"]["hyperparams"]["lr"]


def test_residual_warning_is_printed_once_and_explains():
  metrics = {"cg_residual": np.array([0.5, 3.0]), "cg_min_curvature": np.array([-2.0])}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert bissl_stage.warn_if_residual_above_one("bissl/seed0", 3, metrics) == [True]
    assert bissl_stage.warn_if_residual_above_one(
        "bissl/seed0", 4, {"cg_residual": np.array([0.5]), "cg_min_curvature": [1.0]}) == []
  text = out.getvalue()
  assert text.count("warning") == 1 and "1.75 > 1" in text and "solver='minres'" in text
