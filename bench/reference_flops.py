"""FLOPs of one alternation of the reference PyTorch BiSSL, counted by PyTorch's FLOP counter.

Used by ``bench/paper_plan.py --reference PATH``; runnable alone:
``python -m bench.reference_flops --reference PATH`` (sizes as the other benches).

The count runs the reference's own code from its checkout (public:
NIPS25-16372/NIPS25_16372_BiSSL): its ``SimCLR`` model with the NT-Xent loss
(``source/models/simclr.py``), its backbone builder (``source/models/misc.py``) and its
implicit-gradient calculator with the layer-wise CG solver (``IJGradCalc`` and
``cg_solver``, ``source/bissl/ij_solvers.py``). The trainer's loops
(``GeneralBiSSLTrainer._lower_train_loop`` and ``._upper_train_loop``) read losses
with ``.item()`` and walk data loaders, so their bodies are restated here, call for
call: a lower step is the SimCLR loss plus the proximal term, its backward, clipping
and LARS; an upper step is the downstream loss at θ_P with its head and backbone
gradients, the implicit solve against the HVP batch, the downstream loss at θ_D with
its two gradients, clipping and SGD. The downstream model is ``DSClassifier``'s
(the reference's backbone and a linear head) built here, since the checkout's
``source/models/downstream.py`` needs torchvision for its detection models.

Everything runs on PyTorch's ``meta`` device: tensors have shapes and no storage, so
the paper's full batch is counted without memory or compute. When ``timm`` is not
installed, a ResNet with timm's layout and layer shapes (``conv1``, ``bn1``,
``maxpool``, ``layer1``–``layer4`` of bottleneck or basic blocks, ``fc``) stands in
for ``timm.create_model``; the FLOPs of a convolution depend only on its shapes.

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products and convolutions
(forward and backward), not element-wise work (BatchNorm, ReLU, the CG's vector
updates, the optimizers); XLA's cost analysis counts element-wise FLOPs too. The
comparison in gradient-equivalents (each implementation's alternation divided by its
own pretext gradient) does not depend on that convention.
"""
import importlib.util
import os
import sys
import types
from typing import Dict

STAGES = ((3, 4, 6, 3), "bottleneck"), ((2, 2, 2, 2), "basic")
ARCH_STAGES = {"resnet50": STAGES[0], "resnet18": STAGES[1]}


def _resnet(torch, arch: str):
  """A ResNet with timm's ``resnet18``/``resnet50`` layout (the stand-in for timm)."""
  nn = torch.nn
  blocks, kind = ARCH_STAGES[arch]
  expansion = 4 if kind == "bottleneck" else 1

  class Block(nn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      cout = planes * expansion
      if kind == "bottleneck":
        convs = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, cout, 1, 1)]
      else:
        convs = [(cin, planes, 3, stride), (planes, cout, 3, 1)]
      layers = []
      for i, (a, b, k, s) in enumerate(convs):
        layers += [nn.Conv2d(a, b, k, s, k // 2, bias=False), nn.BatchNorm2d(b)]
        if i < len(convs) - 1:
          layers.append(nn.ReLU())
      self.body = nn.Sequential(*layers)
      self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      return torch.relu(self.body(x) + self.downsample(x))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.act1 = nn.ReLU()
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin, stages = 64, []
      for i, count in enumerate(blocks):
        planes = 64 * 2**i
        stage = [Block(cin, planes, 1 if i == 0 else 2)]
        cin = planes * expansion
        stage += [Block(cin, planes, 1) for _ in range(count - 1)]
        stages.append(nn.Sequential(*stage))
      self.layer1, self.layer2, self.layer3, self.layer4 = stages
      self.global_pool = nn.AdaptiveAvgPool2d(1)
      self.fc = nn.Linear(cin, 1000)

    def forward(self, x):
      x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.global_pool(x), 1))

  return ResNet()


def _import_reference(torch, reference: str):
  """The reference's ``simclr``, ``misc`` and ``ij_solvers`` modules from its checkout."""
  if not os.path.isdir(os.path.join(reference, "source", "bissl")):
    raise SystemExit(f"reference_flops: {reference!r} is not a checkout of the reference "
                     "BiSSL (no source/bissl in it); pass the repository's root.")
  stand_in = "timm" not in sys.modules and importlib.util.find_spec("timm") is None
  if stand_in:
    stub = types.ModuleType("timm")
    stub.create_model = lambda arch, **_: _resnet(torch, arch)
    sys.modules["timm"] = stub
  sys.path.insert(0, os.path.abspath(reference))
  # pylint: disable=import-outside-toplevel
  import source.types
  if not hasattr(source.types, "DetectionBackbones"):  # see bench/reference_worker.py
    import typing
    source.types.DetectionBackbones = typing.Literal["resnet50"]
  from source.bissl import ij_solvers
  from source.models import misc, simclr
  stand_in = stand_in or getattr(sys.modules["timm"], "__spec__", 0) is None
  return simclr, misc, ij_solvers, stand_in


def count(reference: str, size, lower_steps: int, upper_steps: int, cg_iters: int,
          num_classes: int = 10, damping: float = 10.0, lam: float = 0.001) -> Dict:
  """FLOPs of the reference's pretext gradient, steps and one alternation (meta device).

  Returns:
    ``{'gradient', 'lower step', 'upper step', 'solve', 'alternation': FLOPs,
    'note': a sentence for the table}``.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  if size.arch not in ARCH_STAGES:
    raise SystemExit("reference_flops: the reference builds only resnet18/resnet50; use "
                     "--small or the full size.")
  if size.width != 1:
    raise SystemExit(f"reference_flops: the reference builds full-width ResNets; got width "
                     f"{size.width:g}: pass --width 1.")
  simclr, misc, ij_solvers, stand_in = _import_reference(torch, reference)
  device = torch.device("meta")
  with device:
    model_p = simclr.SimCLR(size.arch, proj_mlp="256-256-256", temp=0.5)
    backbone_d, features = misc.ConvBackbone(size.arch)
    head_d = torch.nn.Linear(features, num_classes)  # DSClassifier's head
    side, b, bd = size.image_size, size.pretext_batch, size.downstream_batch
    views = (torch.randn(b, 3, side, side), torch.randn(b, 3, side, side))
    hvp_views = (torch.randn(b, 3, side, side), torch.randn(b, 3, side, side))
    images, labels = torch.randn(bd, 3, side, side), torch.zeros(bd, dtype=torch.long)
  lower_params = tuple(model_p.backbone.parameters())
  ij = ij_solvers.IJGradCalc(solver=ij_solvers.cg_solver, parameters=lower_params,
                             criterion=model_p.forward, lam_dampening=damping,
                             solver_kwargs=dict(iter_num=cg_iters, verbose=False))
  loss_fn = torch.nn.CrossEntropyLoss()

  def gradient():
    return torch.autograd.grad(model_p(views), lower_params)

  def lower_step():  # _lower_train_loop's body; LARS and clipping are element-wise
    loss = model_p(views) + 0.5 * lam * sum(
        torch.sum((p - q.detach())**2) for p, q in zip(lower_params, backbone_d.parameters()))
    loss.backward()

  def solve(vecs):
    return ij(lower_input=hvp_views, vecs=vecs, lam=lam)

  def upper_step():  # _get_upper_grads, then _upper_train_loop's classic gradients
    loss_p = loss_fn(head_d(model_p.backbone(images)), labels)
    torch.autograd.grad(loss_p, tuple(head_d.parameters()), retain_graph=True)
    vecs = torch.autograd.grad(loss_p, lower_params)
    solve(vecs)
    loss_d = loss_fn(head_d(backbone_d(images)), labels)
    torch.autograd.grad(loss_d, tuple(backbone_d.parameters()), retain_graph=True)
    torch.autograd.grad(loss_d, tuple(head_d.parameters()))

  with device:
    probe = tuple(torch.randn(p.shape) for p in lower_params)
  out = {}
  for name, fn in (("gradient", gradient), ("lower step", lower_step),
                   ("solve", lambda: solve(probe)), ("upper step", upper_step)):
    counter = FlopCounterMode(display=False)
    with counter:
      fn()
    out[name] = float(counter.get_total_flops())
  out["alternation"] = lower_steps * out["lower step"] + upper_steps * out["upper step"]
  timm_note = ("a ResNet of timm's layout standing in for timm, which is not installed"
               if stand_in else "timm's ResNet")
  out["note"] = (
      f"Reference: its own SimCLR, backbone builder and IJGradCalc/cg_solver from the "
      f"checkout ({timm_note}), the trainer's step bodies restated, counted by "
      f"torch.utils.flop_counter.FlopCounterMode on the meta device at the full batch "
      f"(no extrapolation); it counts convolutions and matrix products only, while XLA "
      f"also counts element-wise FLOPs. Reference pretext gradient: "
      f"{out['gradient'] / 1e9:.4g} GFLOP; its alternation: "
      f"{out['alternation'] / out['gradient']:.4g} of its own pretext gradients; its solve "
      f"({cg_iters} iterations): {out['solve'] / out['gradient']:.4g}.")
  return out


def main(argv=None):
  from bench import alternation_cost  # pylint: disable=import-outside-toplevel
  from bench import common  # pylint: disable=import-outside-toplevel

  def add_arguments(parser):
    alternation_cost.add_stage_arguments(parser)
    parser.add_argument("--reference", required=True)
  args = common.parse_args(argv, __doc__, add_arguments)
  # Recorded beside the plan that uses it (docs/benchmarks/runs/paper_plan.md).
  args.doc = args.doc or os.path.join(common.RUNS_DIR, "paper_plan.md")
  flops = count(args.reference, args.size, *alternation_cost.stage_sizes(args))
  grad = flops["gradient"]
  rows = [[name, flops[name] / 1e9, flops[name] / grad]
          for name in ("gradient", "lower step", "solve", "upper step", "alternation")]
  table = common.Table(title=f"Reference PyTorch BiSSL FLOPs — {common.describe(args.size)}",
                       columns=["part", "GFLOP", "pretext gradients"], rows=rows,
                       notes=[flops["note"]])
  return common.finish("reference_flops", [table], args)


if __name__ == "__main__":
  main()
