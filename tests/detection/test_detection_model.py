"""The detector's structure, parameter count, loss terms and loss gradient."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.models import resnet
from bissl_jax.detection import boxes as B
from bissl_jax.detection.backbone import c4_features, c4_resnet
from bissl_jax.detection.faster_rcnn import (DetectorConfig, build_detector, count_params,
                                             tiny_config)
from bissl_jax.detection.loss import detection_loss


def _batch(rng, n=2, size=64, dtype=np.float32):
  gt = np.zeros((n, 3, 4), np.float32)
  gt[:, 0] = [6, 5, 26, 30]
  gt[:, 1] = [30, 28, 52, 60]
  return {"images": jnp.asarray(rng.normal(size=(n, size, size, 3)), dtype),
          "image_sizes": jnp.full((n, 2), float(size), dtype),
          "gt_boxes": jnp.asarray(gt, dtype), "gt_classes": jnp.asarray([[1, 7, 0]] * n),
          "gt_valid": jnp.asarray([[True, True, False]] * n)}


def test_c4_backbone_is_the_resnet_truncated_after_res4():
  resnet = c4_resnet((1, 2, 2, 1), "basic", width=8)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  variables = resnet.init(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"conv1", "bn1", "layer1_0", "layer2_0", "layer2_1",
                                      "layer3_0", "layer3_1"}
  c4, stats = c4_features(resnet, variables, x, train=False)
  assert c4.shape == (2, 2, 2, 32)  # Stride 16, 8·4 channels.
  assert stats is variables["batch_stats"]
  # The captured map is the last block's output: its spatial mean is the ResNet's output.
  np.testing.assert_allclose(c4.mean(axis=(1, 2)), resnet.apply(variables, x, train=False),
                             rtol=1e-5, atol=1e-6)
  # By hand: stem (conv, BN, ReLU, max-pool), then the blocks of stages 1–3.
  v, conv = variables["params"], lambda w, y, s, p: jax.lax.conv_general_dilated(
      y, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  bn = lambda y, name, tree=variables: (
      (y - tree["batch_stats"][name]["mean"]) / jnp.sqrt(tree["batch_stats"][name]["var"]
                                                         + 1e-5)
      * tree["params"][name]["scale"] + tree["params"][name]["bias"])
  y = jax.nn.relu(bn(conv(v["conv1"]["kernel"], x, 2, 3), "bn1"))
  y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                            ((0, 0), (1, 1), (1, 1), (0, 0)))
  for name, stride in [("layer1_0", 1), ("layer2_0", 2), ("layer2_1", 1), ("layer3_0", 2),
                       ("layer3_1", 1)]:
    blk = {"params": v[name], "batch_stats": variables["batch_stats"][name]}
    h = jax.nn.relu(bn(conv(blk["params"]["conv1"]["kernel"], y, stride, 1), "bn1", blk))
    h = bn(conv(blk["params"]["conv2"]["kernel"], h, 1, 1), "bn2", blk)
    if "downsample_conv" in blk["params"]:
      y = bn(conv(blk["params"]["downsample_conv"]["kernel"], y, stride, 0), "downsample_bn",
             blk)
    y = jax.nn.relu(h + y)
  np.testing.assert_allclose(c4, y, rtol=1e-4, atol=1e-5)


def test_box_head_holds_the_resnets_fourth_stage():
  det = build_detector(dataclasses.replace(tiny_config(), cifar_stem=False))
  params = jax.eval_shape(lambda k: det.init(k, (64, 64))[0], jax.random.key(0))
  full = jax.eval_shape(lambda k: resnet.resnet18(0.125).init(
      k, jnp.zeros((1, 64, 64, 3)), train=False)["params"], jax.random.key(0))
  res5 = {k: v for k, v in params["box_head"].items() if k.startswith("layer4")}
  assert jax.tree_util.tree_map(lambda a: a.shape, res5["layer4_0"]) == \
      jax.tree_util.tree_map(lambda a: a.shape, full["layer4_0"])
  assert set(params["backbone"]) == {"conv1", "bn1", "layer1_0", "layer2_0", "layer3_0"}


def _bottleneck_stage(in_ch, planes, blocks):
  """(conv weights, BN channels) of a torchvision/detectron2 bottleneck stage."""
  out = 4 * planes
  convs = in_ch * planes + 9 * planes * planes + planes * out + in_ch * out
  bn = 2 * planes + 2 * out
  convs += (blocks - 1) * (out * planes + 9 * planes * planes + planes * out)
  bn += (blocks - 1) * (2 * planes + out)
  return convs, bn


def test_full_size_parameter_count_matches_detectron2_r50_c4():
  det = build_detector(DetectorConfig(num_classes=20))
  params = jax.eval_shape(lambda k: det.init(k, (320, 320))[0], jax.random.key(0))
  # detectron2 R50-C4 by hand. Its ResNet convs have no bias; its FrozenBatchNorm2d
  # holds weight/bias/mean/var as buffers, not parameters (stem + res2 are also frozen,
  # but they are parameters all the same).
  stem_conv, stem_bn = 7 * 7 * 3 * 64, 64
  stages = [_bottleneck_stage(64, 64, 3), _bottleneck_stage(256, 128, 4),
            _bottleneck_stage(512, 256, 6)]
  res5_conv, res5_bn = _bottleneck_stage(1024, 512, 3)
  rpn = (9 * 1024 * 1024 + 1024) + (1024 * 15 + 15) + (1024 * 60 + 60)
  predictor = (2048 * 21 + 21) + (2048 * 80 + 80)
  detectron2 = stem_conv + sum(c for c, _ in stages) + res5_conv + rpn + predictor
  assert detectron2 == 33_176_944  # 23,454,912 convs + 9,515,083 RPN + 206,949 predictor.
  bn_affine = 2 * (stem_bn + sum(b for _, b in stages) + res5_bn)  # Flax params here.
  assert count_params(params) == detectron2 + bn_affine
  assert count_params(params["rpn"]) == rpn
  assert count_params(params["backbone"]) == stem_conv + sum(c for c, _ in stages) + 2 * (
      stem_bn + sum(b for _, b in stages)) == 8_543_296
  assert count_params(params["box_head"]) == res5_conv + 2 * res5_bn + predictor == 15_171_685
  assert count_params(params["backbone"]) + count_params(params["box_head"]) - predictor \
      == 25_557_032 - 2_049_000  # torchvision ResNet-50 (25,557,032) without its fc.


@pytest.mark.slow
def test_loss_terms_at_zero_heads_match_counts():
  """Zero RPN and classifier outputs: BCE is log 2 per sampled anchor, CE log(K+1)."""
  det = build_detector(tiny_config())
  params, stats = det.init(jax.random.key(0), (64, 64))
  zero = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
  params = dict(params, rpn=zero(params["rpn"]))
  params["box_head"] = dict(params["box_head"], cls_score=zero(params["box_head"]["cls_score"]))
  batch = _batch(np.random.default_rng(0))
  _, (terms, _, _) = jax.jit(lambda p, b: detection_loss(det, p, stats, b, jax.random.key(3)))(
      params, batch)
  c = det.config
  anchors = B.grid_anchors(16, 16, 4, c.anchor_sizes, c.aspect_ratios)
  iou = np.asarray(B.box_iou(np.asarray(batch["gt_boxes"][0, :2]), anchors))
  best = iou.max(0)
  pos = (best >= 0.7) | np.any(iou == iou.max(1, keepdims=True), axis=0)
  neg = (best < 0.3) & ~pos
  assert 0 < pos.sum() <= 32  # So every foreground anchor is sampled.
  sampled = pos.sum() + min(64 - pos.sum(), neg.sum())
  # Two identical images, normaliser 64 per image: the per-image sums divided by 64.
  np.testing.assert_allclose(terms["loss_rpn_cls"], np.log(2) * sampled / 64, rtol=1e-5)
  gt = np.asarray(batch["gt_boxes"][0, :2])[iou.argmax(0)[pos]]
  a = anchors[pos]
  aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
  l1 = (np.abs((gt[:, 0] + gw / 2 - a[:, 0] - aw / 2) / aw)
        + np.abs((gt[:, 1] + gh / 2 - a[:, 1] - ah / 2) / ah)
        + np.abs(np.log(gw / aw)) + np.abs(np.log(gh / ah)))
  np.testing.assert_allclose(terms["loss_rpn_loc"], l1.sum() / 64, rtol=1e-4)
  np.testing.assert_allclose(terms["loss_cls"], np.log(11), rtol=1e-5)


@pytest.mark.slow
def test_detection_loss_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    cfg = dataclasses.replace(tiny_config(), width=4, dtype=jnp.float64,
                              rpn_batch_size_per_image=32, roi_batch_size_per_image=16)
    det = build_detector(cfg)
    params, stats = det.init(jax.random.key(0), (32, 32))
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
    rng = np.random.default_rng(1)
    batch = _batch(rng, n=2, size=32, dtype=np.float64)
    batch["gt_boxes"] = batch["gt_boxes"] / 2
    key = jax.random.key(5)
    # The gradient treats proposals and samples as constants: hold them fixed in the
    # finite differences too (they move with the RPN's deltas otherwise).
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda p: detection_loss(det, p, stats, batch, key), has_aux=True))
    (_, (_, _, rois)), grad = value_and_grad(params)
    assert int(rois["valid"].sum()) > 0 and int((rois["classes"] < 10).sum()) > 0
    loss = jax.jit(lambda p: detection_loss(det, p, stats, batch, key, rois=rois)[0])
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    gflat = jax.flatten_util.ravel_pytree(grad)[0]
    assert float(jnp.linalg.norm(gflat)) > 0
    # Small steps: the box deltas of the appended ground-truth RoIs sit next to the
    # L1 kink at 0 (their targets are 0 and the regressor starts near 0).
    eps = 1e-8
    for seed in range(3):
      v = jnp.asarray(np.random.default_rng(seed).normal(size=flat.shape))
      fd = (loss(unravel(flat + eps * v)) - loss(unravel(flat - eps * v))) / (2 * eps)
      np.testing.assert_allclose(float(jnp.dot(gflat, v)), float(fd), rtol=1e-5, atol=1e-7)
    # Every group of parameters receives gradient: RPN, box head and backbone.
    for group in ("backbone", "rpn", "box_head"):
      assert float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(grad[group])[0])) > 0


def test_detect_output_shapes_and_padding():
  det = build_detector(tiny_config())
  params, stats = det.init(jax.random.key(0), (64, 64))
  batch = _batch(np.random.default_rng(2))
  out = jax.jit(det.detect)(params, stats, batch["images"], batch["image_sizes"])
  d = det.config.detections_per_image
  assert out["boxes"].shape == (2, d, 4) and out["valid"].shape == (2, d)
  boxes = np.asarray(out["boxes"])
  assert np.all(boxes >= 0) and np.all(boxes <= 64)
  scores = np.asarray(out["scores"])
  assert np.all(np.diff(np.where(out["valid"], scores, -1), axis=1) <= 1e-7)
  assert np.all(scores[~np.asarray(out["valid"])] == 0)


def test_build_detector_rejects_bad_configs():
  with pytest.raises(ValueError, match="four stages"):
    build_detector(DetectorConfig(stage_sizes=(3, 4, 6)))
  with pytest.raises(ValueError, match="'basic' or 'bottleneck'"):
    build_detector(DetectorConfig(block="dense"))


def test_full_size_loss_and_detect_trace_with_static_shapes():
  """The paper-size detector (R50-C4, VOC sizes) traces end to end; nothing is computed."""
  det = build_detector(DetectorConfig(num_classes=20))
  params, stats = jax.eval_shape(lambda k: det.init(k, (320, 320)), jax.random.key(0))
  n, m = 2, 8
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  batch = {"images": f32(n, 320, 320, 3), "image_sizes": f32(n, 2), "gt_boxes": f32(n, m, 4),
           "gt_classes": jax.ShapeDtypeStruct((n, m), jnp.int32),
           "gt_valid": jax.ShapeDtypeStruct((n, m), jnp.bool_)}
  loss, (terms, new_stats, rois) = jax.eval_shape(
      lambda p, s, b: detection_loss(det, p, s, b, jax.random.key(0)), params, stats, batch)
  assert loss.shape == () and set(terms) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls",
                                              "loss_box_reg"}
  assert rois["boxes"].shape == (n, 512, 4)
  assert jax.tree_util.tree_structure(new_stats) == jax.tree_util.tree_structure(stats)
  out = jax.eval_shape(det.detect, params, stats, batch["images"], batch["image_sizes"])
  assert out["boxes"].shape == (n, 100, 4) and out["classes"].shape == (n, 100)
