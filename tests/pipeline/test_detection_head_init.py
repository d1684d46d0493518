"""A fresh detection head starts its res5 from the pretext tail (detectron2's R50-C4, BiSSL
paper App. B.6); classification heads ignore the pretext head.

The stage loops are replaced by one that returns the state they start from, so these
tests see each stage's initialisation without compiling the detector.
"""
import jax
import numpy as np
import pytest

from bissl_jax.convert import stage_output
from bissl_jax.pipeline import comparison
from bissl_jax.pipeline import stage_loop
from bissl_jax.pipeline import supervised
from bissl_jax.pipeline.context import build_context
from bissl_jax.runtime.seeds import derive_seed
from configs import digits_detection, digits_simclr


def _initial_state_only(stage, state):
  return stage_loop.StageResult(state, 0, 0, None)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  return build_context(digits_detection.get_config("runlocal"),
                       str(tmp_path_factory.mktemp("det_head_init")))


def _res5(tree):
  return {k: v for k, v in tree.items() if k.startswith("layer4_")}


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _differs(a, b) -> bool:
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _pretext_model(ctx, key: int):
  params, stats = ctx.init_variables(jax.random.key(key))
  return ({g: params[g] for g in ("backbone", "pretext_head")},
          {g: stats[g] for g in ("backbone", "pretext_head")})


def test_warmup_starts_res5_from_the_pretext_tail(ctx, tmp_path, monkeypatch):
  monkeypatch.setattr(stage_loop, "run_stage", _initial_state_only)
  params, stats = _pretext_model(ctx, 7)
  tail = params["pretext_head"]["backbone_tail"]
  # The head's own initialisation (what fresh_head draws before the copy).
  own = ctx.init_variables(jax.random.key(derive_seed(0, "fresh_head")))[0]["downstream_head"]
  # Without the copy the box head's res5 would be its own draw, not the tail.
  assert _differs(_res5(own["box_head"]), tail)
  warm = comparison.warmed_up_model(ctx, (params, stats), np.zeros(64), seed=0,
                                    directory=str(tmp_path / "warm"))
  head = warm["params"]["downstream_head"]
  _assert_trees_equal(_res5(head["box_head"]), tail)
  # The RPN and the predictor keep their own initialisation.
  _assert_trees_equal(head["rpn"], own["rpn"])
  for name in ("cls_score", "bbox_pred"):
    _assert_trees_equal(head["box_head"][name], own["box_head"][name])
  exported, _ = stage_output.load_export(str(tmp_path / "warm" / "output"))
  _assert_trees_equal(_res5(exported["params"]["downstream_head"]["box_head"]), tail)


def test_finetune_starts_res5_from_the_given_pretext_head(ctx, monkeypatch):
  seen = []
  monkeypatch.setattr(stage_loop, "run_stage",
                      lambda stage, state: seen.append(state) or _initial_state_only(stage, state))
  params, stats = _pretext_model(ctx, 3)
  splits = {"train": np.zeros(64)}  # only its length is read before the (replaced) loop
  supervised.finetune(ctx, comparison.backbone_of(params, stats), splits, lr=1e-3,
                      weight_decay=0.0, epochs=1, seed=1, name="ft",
                      pretext_head=params["pretext_head"])
  level = seen[0]["level"]
  _assert_trees_equal(_res5(level.params["downstream_head"]["box_head"]),
                      params["pretext_head"]["backbone_tail"])
  _assert_trees_equal(level.params["backbone"], params["backbone"])


def test_detection_refuses_a_model_without_a_pretext_tail(ctx):
  with pytest.raises(ValueError, match="backbone_tail.*pretext or BiSSL output"):
    supervised.fresh_head(ctx, 0, pretext_head={"projector": {}})


def test_provenance_records_the_head_init_for_detection_only(ctx, tmp_path):
  fields = supervised.stage_provenance(ctx, "head_warmup", seed=0).fields
  assert fields["downstream_head_init"] == "from_pretext_head"
  cls_ctx = build_context(digits_simclr.get_config("runlocal"), str(tmp_path))
  cls_fields = supervised.stage_provenance(cls_ctx, "finetune", seed=0).fields
  assert "downstream_head_init" not in cls_fields
  # Classification ignores a pretext head: its fresh head is bit for bit the same.
  params, _ = cls_ctx.init_variables(jax.random.key(5))
  _assert_trees_equal(supervised.fresh_head(cls_ctx, 2, params["pretext_head"]),
                      supervised.fresh_head(cls_ctx, 2))
