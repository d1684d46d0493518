"""The detection downstream task: Faster R-CNN heads on a C4 backbone, inside BiSSL."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax.core import alternation as ts
from bissl_jax.core import state as bilevel
from bissl_jax.core.params import init_params
from bissl_jax.data.synthetic_detection import make_split
from bissl_jax.detection.faster_rcnn import DetectorConfig, build_detector
from bissl_jax.detection.loss import LOSS_TERMS, detection_loss
from bissl_jax.models import resnet
from bissl_jax.tasks import pretext
from bissl_jax.tasks.augment import normalize
from bissl_jax.tasks.downstream.classification import Classification
from bissl_jax.tasks.downstream.detection import (box_head_from_pretext_tail,
                                                  make_detection_task)
from tests.core import test_train_state as tt

IMG = 32
KW = dict(width_multiplier=0.0625, cifar_stem=True)
# A detector sized for 32-px canvases: C4 is 8×8 (cifar stem: stride 4), small budgets.
CONFIG = DetectorConfig(num_classes=10, anchor_sizes=(8.0, 16.0), rpn_batch_size_per_image=32,
                        pre_nms_topk_train=64, post_nms_topk_train=16, pre_nms_topk_test=64,
                        post_nms_topk_test=16, roi_output_size=4, roi_sampling_ratio=2,
                        roi_batch_size_per_image=16, detections_per_image=8)


def _task():
  model = resnet.build_model("resnet18", backbone_ends_at="res4", **KW)
  return model, make_detection_task(model, IMG, CONFIG)


def _labels(split):
  return {"boxes": split["gt_boxes"], "classes": split["gt_classes"],
          "valid": split["gt_valid"]}


def _data(n=4, seed=0):
  return make_split(n, "train", canvas=IMG, max_objects=2, min_size=8, max_size=16, seed=seed)


def test_the_task_takes_res5_from_the_model_and_refuses_a_model_without_c4():
  model, task = _task()
  assert (task.config.stage_sizes, task.config.block, task.config.width) == (
      (2, 2, 2, 2), "basic", 4)
  with pytest.raises(ValueError, match="backbone_ends_at='res4'"):
    make_detection_task(resnet.build_model("resnet18", **KW), IMG, CONFIG)


def test_init_params_builds_the_detector_head_from_the_reserved_key():
  model, task = _task()
  params, stats = init_params(model, task, jax.random.PRNGKey(0), IMG)
  head = params["downstream_head"]
  expected = task.init_head(model.head_rng(jax.random.PRNGKey(0)), params, stats)
  jax.tree_util.tree_map(np.testing.assert_array_equal, head, expected)
  assert set(head) == {"rpn", "box_head"}
  assert set(head["box_head"]) == {"layer4_0", "layer4_1", "cls_score", "bbox_pred"}
  # res5 of the box head has the pretext tail's shapes; 10 classes + background.
  shapes = lambda t: jax.tree_util.tree_map(jnp.shape, t)
  tail = params["pretext_head"][resnet.TAIL_KEY]
  assert shapes({k: head["box_head"][k] for k in tail}) == shapes(dict(tail))
  assert head["box_head"]["cls_score"]["kernel"].shape == (32, 11)


@pytest.mark.slow
def test_loss_and_gradient_equal_the_detection_packages_on_its_own_backbone():
  """The task (model.features → heads) against detection_loss with the detector's own
  C4 ResNet (capture_intermediates) given the same θ: an independent path to C4."""
  model, task = _task()
  params, stats = init_params(model, task, jax.random.PRNGKey(0), IMG)
  data, key = _data(), jax.random.PRNGKey(7)
  inputs = task.prepare(key, data["images"], train=True)
  theta, head, bb_stats = params["backbone"], params["downstream_head"], stats["backbone"]

  def task_loss(theta, head):
    total, terms, new_stats = task.loss_terms(theta, head, bb_stats, inputs, _labels(data))
    return total, (terms, new_stats)
  (loss, (terms, new_stats)), grads = jax.value_and_grad(task_loss, (0, 1), has_aux=True)(
      theta, head)

  detector = build_detector(task.config)
  _, head_stats = detector.init_heads(jax.random.PRNGKey(1), (1, 8, 8, 16))
  batch = {"images": normalize(jnp.asarray(data["images"], jnp.float32) / 255.0),
           "image_sizes": jnp.asarray(data["image_sizes"]), "gt_boxes": data["gt_boxes"],
           "gt_classes": data["gt_classes"], "gt_valid": data["gt_valid"]}

  def package_loss(theta, head):
    p = {"backbone": theta, **head}
    s = {"backbone": bb_stats, **head_stats}
    total, (terms, new, _) = detection_loss(detector, p, s, batch, key, train=True)
    return total, (terms, new["backbone"])
  (ref, (ref_terms, ref_stats)), ref_grads = jax.value_and_grad(
      package_loss, (0, 1), has_aux=True)(theta, head)

  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  for name in LOSS_TERMS:
    np.testing.assert_allclose(terms[name], ref_terms[name], rtol=1e-6, atol=1e-8)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  jax.tree_util.tree_map(close, grads, ref_grads)
  jax.tree_util.tree_map(close, new_stats, ref_stats)
  # Gradients reach every module of θ (the C4 backbone) and of φ_D.
  for group in (grads[0], grads[1]["rpn"], grads[1]["box_head"]):
    for name, sub in group.items():
      assert float(jnp.linalg.norm(ravel_pytree(sub)[0])) > 0, name
  assert all(float(terms[n]) > 0 for n in LOSS_TERMS)


def test_logits_are_fixed_size_detections_and_the_loss_depends_only_on_inputs():
  model, task = _task()
  params, stats = init_params(model, task, jax.random.PRNGKey(0), IMG)
  data = _data()
  inputs = task.prepare(None, data["images"], train=False)
  out = jax.jit(task.logits)(params["backbone"], params["downstream_head"],
                             stats["backbone"], inputs)
  assert {k: v.shape for k, v in out.items()} == {
      "boxes": (4, 8, 4), "scores": (4, 8), "classes": (4, 8), "valid": (4, 8)}
  # Same inputs (same sampling key), same loss; another key samples other anchors.
  loss = lambda k: task.loss(params["backbone"], params["downstream_head"], stats["backbone"],
                             task.prepare(k, data["images"], train=True), _labels(data))[0]
  a, b = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
  assert float(loss(a)) == float(loss(a)) != float(loss(b))


def test_res5_of_the_box_head_is_copied_exactly_from_the_pretext_tail():
  model, task = _task()
  params, _ = init_params(model, task, jax.random.PRNGKey(0), IMG)
  tail = params["pretext_head"][resnet.TAIL_KEY]
  head = params["downstream_head"]
  copied = box_head_from_pretext_tail(head, params["pretext_head"])
  for name in tail:
    jax.tree_util.tree_map(np.testing.assert_array_equal, copied["box_head"][name], tail[name])
    assert not np.array_equal(ravel_pytree(head["box_head"][name])[0],
                              ravel_pytree(tail[name])[0])  # it did change
  for name in ("cls_score", "bbox_pred"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, copied["box_head"][name],
                           head["box_head"][name])
  jax.tree_util.tree_map(np.testing.assert_array_equal, copied["rpn"], head["rpn"])
  with pytest.raises(ValueError, match="same ResNet"):
    box_head_from_pretext_tail(head, {resnet.TAIL_KEY: {"layer4_0": {}}})


@pytest.mark.slow
def test_one_bissl_alternation_with_the_detection_task_on_a_c4_boundary():
  model, task = _task()
  setup = tt.make_setup(model=model, task=pretext.SimCLR(model, image_size=16), upper_steps=2,
                        lower_steps=1)
  setup = dataclasses.replace(setup, downstream=task)
  params, stats = init_params(model, task, jax.random.PRNGKey(0), IMG)
  state = bilevel.init_bilevel_state(setup, params, stats)
  data = _data(n=6, seed=1)
  rng = np.random.default_rng(0)
  per_step = lambda x: x.reshape((2, 3) + x.shape[1:])  # N_U = 2 steps of 3 images
  # Labels are a tree of (N_U, b, ...) arrays; the core hands each step its rows.
  batches = bilevel.AlternationBatches(
      pretext=rng.integers(0, 256, size=(1, 4, 16, 16, 3), dtype=np.uint8),
      hvp=rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8),
      downstream_images=per_step(data["images"]),
      downstream_labels=jax.tree_util.tree_map(per_step, _labels(data)))
  new, metrics = ts.make_alternation_fn(setup)(state, batches, jax.random.PRNGKey(1))
  for name in ("upper_loss", "v_ig_norm", "v_norm", "upper_grad_norm"):
    assert np.isfinite(float(metrics[name])), name
  assert float(metrics["v_ig_norm"]) > 0
  moved = lambda a, b: float(jnp.abs(ravel_pytree(a)[0] - ravel_pytree(b)[0]).max()) > 0
  assert moved(new.upper.params["backbone"], state.upper.params["backbone"])
  assert moved(new.upper.params["downstream_head"]["rpn"],
               state.upper.params["downstream_head"]["rpn"])
  assert moved(new.upper.params["downstream_head"]["box_head"],
               state.upper.params["downstream_head"]["box_head"])


@dataclasses.dataclass(frozen=True)
class _DictLabels(Classification):
  """Classification reading its class ids from a tree of labels."""

  def loss(self, backbone_params, head_params, backbone_stats, inputs, labels, *, train=True):
    return super().loss(backbone_params, head_params, backbone_stats, inputs, labels["class"],
                        train=train)


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["per_step", "fused"])
def test_labels_may_be_a_tree_and_arrays_give_the_same_alternation(driver):
  setup = tt.make_setup(stage_driver=driver, upper_steps=2)
  batches = tt.make_batches(setup)
  tree = batches._replace(downstream_labels={"class": batches.downstream_labels,
                                             "unused": np.zeros((2, 6, 3), np.float32)})
  as_tree = dataclasses.replace(setup, downstream=_DictLabels(**vars(setup.downstream)))
  state = tt.make_state(setup)
  run = lambda s, b: ts.make_alternation_fn(s)(state, b, jax.random.PRNGKey(1))
  (new_a, m_a), (new_t, m_t) = run(setup, batches), run(as_tree, tree)
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree_util.tree_map(same, new_t.upper.params, new_a.upper.params)
  same(m_t["upper_loss"], m_a["upper_loss"])
