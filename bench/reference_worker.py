"""Worker process of ``bench/compare_reference.py``: the reference PyTorch BiSSL.

Run by the bench with the reference's interpreter (``--reference-python``), never by
hand. It imports the reference from its checkout (``--reference``) and times it
through the reference's own classes and functions:

* ``ClassificationBiSSLTrainer`` (``runs/bissl/classification/train.py``), whose
  ``train_one_epoch`` is one alternation (N_L lower steps, then N_U upper steps);
  ``_lower_train_loop`` and ``_upper_train_loop`` over a one-batch loader give one
  lower and one upper step;
* ``get_hinv_solver`` (``runs/bissl/bissl_utils.py``): ``IJGradCalc`` with the
  layer-wise ``cg_solver``; called alone it is the implicit solve;
* ``SimCLR`` and ``DSClassifier`` (``source/models``) with the ResNet-18 of ``timm``,
  the LARS of ``source/optimizers.py``, the input processors of ``runs/bissl``.

Three things are set up here, not by the reference: the CIFAR stem (a 3×3/1 first
convolution and no max-pool, as bissl_jax's ``cifar_stem=True``; the reference only
builds ImageNet stems); the models are wrapped as its DDP wrapper exposes them
(``.module``, ``.backbone``, ``.head``) without starting a process group; and the name
``DetectionBackbones``, which the checkout's ``source/models/downstream.py`` imports
from its ``source/types.py`` where it is not defined (only detection models use it).
``wandb`` is imported by the trainer for logging only; with logging off it is never
called, and a stub module stands in when it is not installed. The batches (already
augmented and normalised, NHWC float32) come from the bench in an ``.npz`` file;
the upper optimizer is SGD with momentum, the lower one the reference's LARS.

Standard library, numpy and torch only at import; the rest after ``--reference``.
"""
import argparse
import os
import sys
import types

from bench import worker_protocol


def _stub_wandb() -> None:
  try:
    import wandb  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    stub = types.ModuleType("wandb")
    stub.run = None
    stub.log = stub.init = stub.finish = stub.watch = lambda *a, **k: None
    sys.modules["wandb"] = stub


def _patch_missing_names() -> None:
  """The checkout's ``source/models/downstream.py`` imports ``DetectionBackbones``, which
  its ``source/types.py`` does not define; only its detection models use it."""
  import typing  # pylint: disable=import-outside-toplevel
  import source.types  # pylint: disable=import-outside-toplevel
  if not hasattr(source.types, "DetectionBackbones"):
    source.types.DetectionBackbones = typing.Literal["resnet50"]


def _wrap(torch, model):
  class Wrapped(torch.nn.Module):
    def __init__(self, inner):
      super().__init__()
      self.module = inner

    def forward(self, *args, **kwargs):
      return self.module(*args, **kwargs)

  wrapped = Wrapped(model)
  # As wrap_model_for_ddp: the trainer reaches the parts through these attributes.
  object.__setattr__(wrapped, "backbone", model.backbone)
  object.__setattr__(wrapped, "head", model.head)
  return wrapped


def _cifar_stem(torch, backbone, width):
  backbone.conv1 = torch.nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
  backbone.maxpool = torch.nn.Identity()


def main(argv=None):
  worker_protocol.redirect_prints()
  parser = argparse.ArgumentParser()
  parser.add_argument("--reference", required=True)
  parser.add_argument("--batches", required=True)
  parser.add_argument("--arch", default="resnet18")
  parser.add_argument("--lower-steps", type=int, default=20)
  parser.add_argument("--upper-steps", type=int, default=8)
  parser.add_argument("--cg-iters", type=int, default=5)
  parser.add_argument("--lam", type=float, default=0.001)
  parser.add_argument("--damping", type=float, default=10.0)
  parser.add_argument("--temperature", type=float, default=0.5)
  parser.add_argument("--threads", type=int, default=0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cifar-stem", type=int, default=1)
  parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda.")
  args = parser.parse_args(argv)

  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  _stub_wandb()
  sys.path.insert(0, os.path.abspath(args.reference))
  try:
    # pylint: disable=import-outside-toplevel
    _patch_missing_names()
    from runs.bissl.bissl_utils import get_hinv_solver
    from runs.bissl.classification.model import get_upper_input_processor
    from runs.bissl.classification.train import ClassificationBiSSLTrainer
    from runs.bissl.model import get_lower_input_processor_tupled
    from source.models.downstream import DSClassifier
    from source.models.simclr import SimCLR
    from source.optimizers import get_optimizer
  except Exception as e:  # pylint: disable=broad-except
    worker_protocol.fail(f"cannot import the reference from {args.reference}: "
                         f"{type(e).__name__}: {e}")

  data = np.load(args.batches)
  device = torch.device(args.device)
  to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)
  pretext = [(to_t(v1), to_t(v2)) for v1, v2 in zip(data["pretext_v1"], data["pretext_v2"])]
  hvp = (to_t(data["hvp_v1"]), to_t(data["hvp_v2"]))
  down = [(to_t(x), torch.from_numpy(y.astype(np.int64)).to(device))
          for x, y in zip(data["down_images"], data["down_labels"])]
  num_classes = int(data["num_classes"])

  model_p = SimCLR(args.arch, proj_mlp="256-256-256", temp=args.temperature)
  model_d = DSClassifier(args.arch, n_classes=num_classes)
  width = model_p.backbone.conv1.out_channels
  if args.cifar_stem:
    _cifar_stem(torch, model_p.backbone, width)
    _cifar_stem(torch, model_d.backbone, width)
  model_d.backbone.load_state_dict(model_p.backbone.state_dict())
  model_p, model_d = _wrap(torch, model_p.to(device)), _wrap(torch, model_d.to(device))

  # Lower: LARS on everything (the pretext optimizer); upper: SGD with momentum.
  opt_p = get_optimizer("lars", [dict(params=model_p.parameters(), weight_decay=1e-6)],
                        lr=0.3, momentum=0.9)
  opt_d = get_optimizer("sgd", [dict(params=model_d.parameters(), weight_decay=5e-4)],
                        lr=0.03, momentum=0.9)
  solver_args = types.SimpleNamespace(hinv_solver="cg", cg_lam_dampening=args.damping,
                                      cg_iter_num=args.cg_iters, cg_verbose=0)
  ij = get_hinv_solver(solver_args, lower_backbone=model_p.backbone,
                       lower_criterion=model_p.forward)

  class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
      self.items = items

    def __len__(self):
      return len(self.items)

    def __getitem__(self, i):
      return self.items[i]

  b = pretext[0][0].shape[0]
  lower_items = [((v1[i], v2[i]), 0) for v1, v2 in pretext for i in range(b)]
  upper_items = [(x[i], y[i]) for x, y in down for i in range(x.shape[0])]
  loader = lambda items, bs: torch.utils.data.DataLoader(
      _ListDataset(items), batch_size=bs, shuffle=False, drop_last=True, num_workers=0)
  trainer = ClassificationBiSSLTrainer(
      optimizers={"upper": opt_d, "lower": opt_p},
      models={"upper": model_d, "lower": model_p},
      dataloaders={"upper": loader(upper_items, down[0][0].shape[0]),
                   "lower": loader(lower_items, b)},
      device=device, ij_grad_calc=ij, verbose=False,
      input_processors={"upper": get_upper_input_processor(device),
                        "lower": get_lower_input_processor_tupled(device)},
      num_iters={"upper": args.upper_steps, "lower": args.lower_steps})

  lam = float(args.lam)
  lower_batch = (pretext[0], 0)
  hvp_batch = (hvp, 0)
  backbone_params = tuple(model_p.backbone.parameters())
  gen = torch.Generator().manual_seed(args.seed)
  vecs = tuple((torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in backbone_params)

  def gradient():
    return torch.autograd.grad(model_p(pretext[0]), backbone_params)

  def solve():
    return ij(lower_input=hvp, vecs=vecs, lam=lam)

  def lower_step():
    trainer._lower_train_loop(dataloader=[lower_batch], lam=lam, epoch=0)  # pylint: disable=protected-access

  def upper_step():
    trainer._upper_train_loop(dataloader=[down[0]], lam=lam, epoch=0,  # pylint: disable=protected-access
                              lower_input=hvp_batch)

  def alternation():
    trainer.train_one_epoch(lam)

  contenders = {"gradient": gradient, "solve": solve, "lower step": lower_step,
                "upper step": upper_step, "alternation": alternation}
  # The upper loop's running sums are set by train_one_epoch; start them for lone steps.
  trainer.loss_d_ij_avg = trainer.loss_d_classic_avg = 0.0
  info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "backbone_parameters": int(sum(p.numel() for p in backbone_params))}
  try:
    import torchvision  # pylint: disable=import-outside-toplevel
    info["torchvision"] = torchvision.__version__
  except ImportError:
    pass
  sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda x: x)
  worker_protocol.serve(contenders, wait=sync, info=info)


if __name__ == "__main__":
  main()
