"""Faster R-CNN R50-C4 building blocks for BiSSL's detection downstream task (paper §4.3.1).

Public functions: :func:`box_iou`, :func:`nms`, :func:`batched_nms`, :func:`roi_align`,
:func:`voc_ap`, the model builder :func:`build_detector` (with :class:`DetectorConfig`
and :func:`tiny_config`) and the loss :func:`detection_loss`. Conventions are in
``docs/detection.md`` and in :mod:`bissl_jax.detection.boxes`.
"""
from bissl_jax.detection.boxes import box_iou, decode_boxes, encode_boxes, grid_anchors
from bissl_jax.detection.faster_rcnn import (Detector, DetectorConfig, build_detector,
                                             tiny_config)
from bissl_jax.detection.loss import detection_loss
from bissl_jax.detection.nms import batched_nms, nms
from bissl_jax.detection.roi_align import roi_align
from bissl_jax.detection.voc_eval import voc_ap

__all__ = ["Detector", "DetectorConfig", "batched_nms", "box_iou", "build_detector",
           "decode_boxes", "detection_loss", "encode_boxes", "grid_anchors", "nms",
           "roi_align", "tiny_config", "voc_ap"]
