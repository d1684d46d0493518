r"""The paper's object detection: Faster R-CNN R50-C4 on VOC07+12, AP50 (BiSSL paper §4.3.1, Table 2).

Run (needs an accelerator; the VOC sets prepared with TFDS first)::

  tfds build voc/2007 --data_dir=$TFDS_DATA_DIR --file_format=array_record
  tfds build voc/2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record
  python -m experiments.main --config=configs/voc_detection.py --workdir=runs/voc_det \
      --config.pretext.checkpoint=/path/to/simclr_resnet50.pth

Without the prepared sets the run stops before any compute (exit status 2) and
names the ``tfds build`` commands. With ``pretext.checkpoint`` unset the ResNet-50
is pretrained with SimCLR on ImageNet first (``imagenet2012``, the paper's 500
epochs; a converted checkpoint skips it).

Settings (Appendix B.6): ResNet-50 cut after res4 (``model.backbone_ends_at='res4'``,
C4, stride 16; res5 joins the pretext head in BiSSL's lower level and is the RoI box
head of the detector, detectron2's ``R50-C4`` sizes, ``detection_sets.detector_config``);
training on VOC2007 train + VOC2012 trainval, model selection on VOC2007 validation,
AP50 (VOC2007 11-point interpolation) on VOC2007 test (``bissl_jax.data.voc_detection``);
images rescaled so their longest edge lies in [196, 320] px, padded to 320×320;
fine-tuning 50 epochs at batch 16; the fine-tuning learning rate and weight decay
chosen per pipeline by a random search over 50 log-uniform pairs in [1e-4, 1e-1] ×
[1e-6, 1e-2]; head warm-up 5 epochs. BiSSL's own settings are the classification
runs' (§4.2: T=500, N_L=20, N_U=8, λ=0.001, δ=10, 5 CG iterations), with the upper
level's batch 16 as fine-tuning's. The paper does not state the head warm-up's and
the upper level's learning rate for detection: 0.02 (detectron2's base rate at batch
16) and weight decay 1e-4 are this config's choice, as are the search's fine-tuning
epochs per trial (10, a fifth of the 50).

Expected (Table 2, SimCLR): Only FT 59.6 ± 0.3, BiSSL+FT 60.6 ± 0.1 AP50.
Cost: not measured (paper size needs an accelerator; docs/detection.md).

``get_config("runlocal")``: a tiny ResNet at 320 px on a few images per split and two
seeds, one or two steps per stage, to check a prepared VOC end to end.
"""
from configs import common


def get_config(arg: str = ""):
  """The paper's VOC07+12 detection config; ``arg`` may be ``runlocal``."""
  config = common.base_config()
  config.data.pretext_dataset = "imagenet2012"
  config.data.downstream_dataset = "voc_detection"
  config.data.image_size = 320
  config.seeds = tuple(range(10))

  config.model.arch = "resnet50"
  config.model.backbone_ends_at = "res4"

  config.head_warmup.epochs = 5
  config.head_warmup.batch_size = 16
  config.head_warmup.lr = 0.02
  config.head_warmup.weight_decay = 1e-4

  config.bissl.downstream_batch_size = 16

  config.finetune.epochs = 50
  config.finetune.batch_size = 16
  config.evaluate.batch_size = 16
  config.search.enabled = True
  config.search.num_configs = 50
  config.search.lr_range = (1e-4, 1e-1)
  config.search.wd_range = (1e-6, 1e-2)
  config.search.epochs = 10

  if "runlocal" in common.parse_arg(arg):
    common.apply_runlocal(config)
    config.data.image_size = 320
    config.data.max_train_examples = 4
    config.model.backbone_ends_at = "res4"
    for stage in (config.head_warmup, config.finetune, config.bissl):
      stage.batch_size = 2
    config.bissl.downstream_batch_size = 2
    config.bissl.pretext_batch_size = 2
    config.pretext.batch_size = 2
    config.evaluate.batch_size = 2
  return config
