"""Faster R-CNN R50-C4 building blocks for BiSSL's detection downstream task (paper §4.3.1)."""
from bissl_jax.detection.boxes import box_iou
from bissl_jax.detection.nms import batched_nms, nms
from bissl_jax.detection.roi_align import roi_align
from bissl_jax.detection.voc_eval import voc_ap
