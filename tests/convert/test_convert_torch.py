"""PyTorch <-> Flax weight conversion, checked against timm-layout torch reference nets."""
import collections

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip(
    "torch", reason="the PyTorch converter tests need the [torch] extra: pip install -e '.[torch]'")
from torch import nn  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bissl_jax import convert  # noqa: E402
from bissl_jax.models import resnet  # noqa: E402
from bissl_jax.convert import __main__ as convert_cli  # noqa: E402
from bissl_jax.runtime.errors import USER_ERROR_STATUS  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------- torch reference
# timm's resnet18/resnet50 layout and semantics: same attribute names, stride on the
# bottleneck's 3x3 conv, shortcut nn.Sequential(conv1x1, bn), global average pooling.


def _downsample(inplanes, outplanes, stride):
  if stride == 1 and inplanes == outplanes:
    return None
  return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                       nn.BatchNorm2d(outplanes))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(inplanes, planes, stride)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = _downsample(inplanes, planes * 4, stride)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """timm ResNet with ``fc = Flatten`` (as the BiSSL reference builds its backbone)."""

  def __init__(self, block, stage_sizes, width=64, cifar_stem=False):
    super().__init__()
    if cifar_stem:
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
      self.maxpool = nn.Identity()
    else:
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.bn1 = nn.BatchNorm2d(width)
    inplanes = width
    for i, n in enumerate(stage_sizes):
      blocks = []
      for j in range(n):
        blocks.append(block(inplanes, width * 2**i, 2 if i > 0 and j == 0 else 1))
        inplanes = width * 2**i * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return x.mean(dim=(2, 3))


def torch_resnet(arch, width, cifar_stem=False):
  if arch == "resnet18":
    return TorchResNet(BasicBlock, (2, 2, 2, 2), width, cifar_stem)
  return TorchResNet(Bottleneck, (3, 4, 6, 3), width, cifar_stem)


def torch_mlp(spec, in_features):
  """The BiSSL reference's MLPProjector: (Linear, BN1d, ReLU) x n, Linear(bias=False)."""
  f = [in_features] + [int(s) for s in spec.split("-")]
  layers = []
  for i in range(len(f) - 2):
    layers += [nn.Linear(f[i], f[i + 1]), nn.BatchNorm1d(f[i + 1]), nn.ReLU(True)]
  layers.append(nn.Linear(f[-2], f[-1], bias=False))
  return nn.Sequential(*layers)


def randomize(module, seed):
  """Random weights, BN affine parameters and running statistics, so a mix-up shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
        m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
        m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
      elif isinstance(m, (nn.Conv2d, nn.Linear)):
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                       * (2.0 / m.weight[0].numel()) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    # Small last-BN gains in each residual branch (cf. timm's zero_init_last) keep the
    # residual stream O(1) through 16 blocks, so an absolute 1e-4 stays meaningful.
    for m in module.modules():
      last = getattr(m, "bn3", None) or (getattr(m, "bn2", None)
                                         if isinstance(m, BasicBlock) else None)
      if last is not None:
        last.weight.mul_(0.2)
  return module


def calibrate(net, x, seed):
  """Running statistics near the true ones for ``x``, randomly perturbed.

  Purely random running statistics make a deep net's eval-mode activations grow to
  ~1e3, where float32 round-off alone exceeds an absolute 1e-4; starting from the
  batch statistics keeps the activations O(1) while every statistic stays random.
  """
  bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
  for m in bns:
    m.momentum = 1.0  # running statistics := this batch's statistics
  net.train()
  with torch.no_grad():
    net(torch.from_numpy(x))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in bns:
      n = m.num_features
      m.running_mean.add_(torch.randn(n, generator=gen) * m.running_var.sqrt() * 0.3)
      m.running_var.mul_(torch.rand(n, generator=gen) + 0.5)
      m.momentum = 0.1
      m.num_batches_tracked.zero_()
  return net


def flax_forward(module, params, stats, x, train):
  """Output and (train mode: updated) statistics; jit is faster than op-by-op here."""
  @jax.jit
  def run(params, stats, x):
    variables = {"params": params, "batch_stats": stats}
    if train:
      out, mutated = module.apply(variables, x, train=True, mutable=["batch_stats"])
      return out, mutated["batch_stats"]
    return module.apply(variables, x, train=False), stats
  out, new_stats = run(params, stats, x)
  return np.asarray(out), new_stats


def assert_same_tensors(a, b):
  assert set(a) == set(b), set(a) ^ set(b)
  assert list(a) == list(b)  # PyTorch's module order, too
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ backbone numerics


@pytest.mark.parametrize("arch,width_multiplier,cifar_stem,size", [
    ("resnet18", 0.25, False, 64),
    ("resnet18", 0.125, True, 16),
    ("resnet50", 0.125, False, 64),
])
def test_backbone_matches_torch_in_eval_and_train_mode(arch, width_multiplier,
                                                        cifar_stem, size):
  x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
  x_nhwc = x.transpose(0, 2, 3, 1)
  net = randomize(torch_resnet(arch, int(64 * width_multiplier), cifar_stem), seed=1)
  net = calibrate(net, x, seed=2)
  params, stats = convert.torch_to_flax(net.state_dict(), arch=arch,
                                        cifar_stem=cifar_stem,
                                        width_multiplier=width_multiplier)
  assert set(params) == {"backbone"} and set(stats) == {"backbone"}
  flax_net = resnet.ARCHITECTURES[arch](width_multiplier, cifar_stem)

  net.eval()
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()
  got, _ = flax_forward(flax_net, params["backbone"], stats["backbone"], x_nhwc, False)
  assert 1e-2 < np.abs(expected).max() < 20  # O(1): an absolute 1e-4 is meaningful
  np.testing.assert_allclose(got, expected, **TOL)

  net.train()  # batch statistics; also updates running_mean with momentum 0.1
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()
  got, new_stats = flax_forward(flax_net, params["backbone"], stats["backbone"],
                                x_nhwc, True)
  np.testing.assert_allclose(got, expected, **TOL)
  np.testing.assert_allclose(np.asarray(new_stats["layer1_0"]["bn2"]["mean"]),
                             net.layer1[0].bn2.running_mean.numpy(), **TOL)


# ------------------------------------------------------------------------ head numerics


@pytest.mark.parametrize("train", [False, True])
def test_projector_and_predictor_match_torch(train):
  width_multiplier, feat = 0.125, 64  # resnet18 at width 8 has 64 features
  backbone = randomize(torch_resnet("resnet18", 8), seed=2)
  projector = randomize(torch_mlp("32-32-16", feat), seed=3)
  predictor = randomize(torch_mlp("24-16", 16), seed=4)
  head = nn.Sequential(collections.OrderedDict(projector=projector, predictor=predictor))
  state_dict = {**backbone.state_dict(), **head.state_dict()}
  params, stats = convert.torch_to_flax(state_dict, arch="resnet18",
                                        width_multiplier=width_multiplier)
  assert set(params["pretext_head"]) == {"projector", "predictor"}

  h = np.random.default_rng(1).normal(size=(6, feat)).astype(np.float32)
  head.train(train)
  with torch.no_grad():
    z_expected = projector(torch.from_numpy(h))
    p_expected = predictor(z_expected).numpy()
  z, _ = flax_forward(resnet.MLPHead(features=(32, 32, 16)),
                      params["pretext_head"]["projector"],
                      stats["pretext_head"]["projector"], h, train)
  p, _ = flax_forward(resnet.MLPHead(features=(24, 16)),
                      params["pretext_head"]["predictor"],
                      stats["pretext_head"]["predictor"], z, train)
  np.testing.assert_allclose(z, z_expected.numpy(), **TOL)
  np.testing.assert_allclose(p, p_expected, **TOL)


# --------------------------------------------------------------------------- round trip


def _tiny_checkpoint(seed=5):
  """A resnet18 at width 8 with the reference SimCLR head, as separate state dicts."""
  backbone = randomize(torch_resnet("resnet18", 8), seed=seed)
  head = nn.Sequential(collections.OrderedDict(
      projector=randomize(torch_mlp("32-32-16", 64), seed=seed + 1)))
  return backbone.state_dict(), head.state_dict()


def test_round_trip_gives_identical_tensors():
  backbone_sd, head_sd = _tiny_checkpoint()
  original = collections.OrderedDict(**backbone_sd, **head_sd)
  params, stats = convert.torch_to_flax([backbone_sd, head_sd], arch="resnet18",
                                        width_multiplier=0.125)
  exported = convert.flax_to_torch(params, stats, arch="resnet18")
  assert "bn1.num_batches_tracked" in exported
  assert exported["bn1.num_batches_tracked"].dtype == torch.int64
  assert exported["bn1.num_batches_tracked"].shape == ()
  assert_same_tensors(exported, original)
  # numpy input gives the same variables as torch input
  params_np, _ = convert.torch_to_flax({k: v.numpy() for k, v in original.items()},
                                       arch="resnet18", width_multiplier=0.125)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_np)):
    np.testing.assert_array_equal(a, b)


def test_flax_model_variables_export_and_reload():
  model = resnet.build_model("resnet18", width_multiplier=0.125,
                             projector="16-8", predictor="8-8")
  # The BisslModel's variable tree (downstream head included) with random values.
  shapes = jax.eval_shape(lambda k: model.init(k, 32), jax.random.key(0))
  rng = np.random.default_rng(0)
  params, stats = jax.tree_util.tree_map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  stats = jax.tree_util.tree_map(np.abs, stats)  # running variances are never negative
  exported = convert.flax_to_torch(params, stats, arch="resnet18")
  assert not any(k.startswith("fc.") for k in exported)  # downstream head not exported
  net = torch_resnet("resnet18", 8)
  net.load_state_dict({k: v for k, v in exported.items()
                       if not k.startswith(("projector.", "predictor."))})
  back, back_stats = convert.torch_to_flax(exported, arch="resnet18",
                                           width_multiplier=0.125)
  for name in ("backbone", "pretext_head"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, back[name], params[name])
    jax.tree_util.tree_map(np.testing.assert_array_equal, back_stats[name], stats[name])


def test_prefixes_are_stripped_and_ignorable_keys_ignored():
  backbone_sd, head_sd = _tiny_checkpoint()
  plain, _ = convert.torch_to_flax([backbone_sd, head_sd], arch="resnet18",
                                   width_multiplier=0.125)
  # A whole DDP-wrapped BYOL-style model: backbone./head. prefixes, EMA target copies,
  # and a supervised classifier.
  whole = {"module.backbone." + k: v for k, v in backbone_sd.items()}
  whole.update({"module.head." + k: v for k, v in head_sd.items()})
  whole.update({"module.backbone_target." + k: v for k, v in backbone_sd.items()})
  whole["module.backbone.fc.weight"] = torch.zeros(10, 64)
  auto, _ = convert.torch_to_flax(whole, arch="resnet18", width_multiplier=0.125)
  jax.tree_util.tree_map(np.testing.assert_array_equal, auto, plain)
  # An explicit prefix selects only that part.
  only_backbone, _ = convert.torch_to_flax(whole, arch="resnet18",
                                           width_multiplier=0.125,
                                           prefix="module.backbone.")
  assert set(only_backbone) == {"backbone"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, only_backbone["backbone"],
                         plain["backbone"])
  with pytest.raises(ValueError, match="no key starts with prefix='encoder.'"):
    convert.torch_to_flax(whole, arch="resnet18", width_multiplier=0.125,
                          prefix="encoder.")


# ------------------------------------------------------------------------------- errors


def test_missing_key_is_named():
  backbone_sd, _ = _tiny_checkpoint()
  del backbone_sd["layer3.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"^layer3\.1\.bn2\.running_var missing"):
    convert.torch_to_flax(backbone_sd, arch="resnet18", width_multiplier=0.125)


def test_wrong_shape_is_named():
  backbone_sd, head_sd = _tiny_checkpoint()
  head_sd["projector.1.running_mean"] = torch.zeros(31)
  with pytest.raises(ValueError, match=r"projector\.1\.running_mean has shape \(31,\), "
                                       r"expected \(32,\)"):
    convert.torch_to_flax([backbone_sd, head_sd], arch="resnet18",
                          width_multiplier=0.125)
  with pytest.raises(ValueError, match="conv1.weight has shape .*width_multiplier=0.125"):
    convert.torch_to_flax(backbone_sd, arch="resnet18", width_multiplier=0.25)
  with pytest.raises(ValueError, match="conv1.weight has shape .*cifar_stem=False"):
    convert.torch_to_flax(backbone_sd, arch="resnet18", width_multiplier=0.125,
                          cifar_stem=True)


def test_wrong_arch_is_named_both_ways():
  r18 = torch_resnet("resnet18", 8).state_dict()
  with pytest.raises(ValueError, match=r"^layer1\.0\.conv3\.weight missing: is this a "
                                       r"resnet18 checkpoint\? you passed arch='resnet50'"):
    convert.torch_to_flax(r18, arch="resnet50", width_multiplier=0.125)
  r50 = torch_resnet("resnet50", 8).state_dict()
  with pytest.raises(ValueError, match=r"^unexpected key layer1\.0\.conv3\.weight for .*: is "
                                       r"this a resnet50 checkpoint\?"):
    convert.torch_to_flax(r50, arch="resnet18", width_multiplier=0.125)
  with pytest.raises(ValueError, match="arch='resnet34' is not supported"):
    convert.torch_to_flax(r18, arch="resnet34")


def test_head_only_file_asks_for_the_backbone():
  _, head_sd = _tiny_checkpoint()
  with pytest.raises(ValueError, match="no backbone keys.*together with its backbone"):
    convert.torch_to_flax(head_sd, arch="resnet18", width_multiplier=0.125)


def test_numpy_state_dict_needs_no_torch(monkeypatch):
  backbone_sd, _ = _tiny_checkpoint()
  arrays = {k: v.numpy() for k, v in backbone_sd.items()}
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch fails
  params, _ = convert.torch_to_flax(arrays, arch="resnet18", width_multiplier=0.125)
  assert params["backbone"]["conv1"]["kernel"].shape == (7, 7, 3, 8)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
    convert.flax_to_torch(params, {"backbone": {}}, arch="resnet18")


# ---------------------------------------------------------------------------- files/CLI


def test_cli_both_ways_and_load_pretrained(tmp_path, capsys):
  backbone_sd, head_sd = _tiny_checkpoint()
  torch.save(backbone_sd, tmp_path / "bb.pth")
  torch.save(head_sd, tmp_path / "head.pth")
  out_dir = tmp_path / "converted"
  assert convert_cli.main(["--from-torch", str(tmp_path / "bb.pth"),
                           str(tmp_path / "head.pth"), "--arch", "resnet18",
                           "--width-multiplier", "0.125", "--out", str(out_dir)]) == 0
  info = __import__("json").loads((out_dir / "conversion.json").read_text())
  assert info["arch"] == "resnet18" and info["projector"] == "32-32-16"
  assert len(info["provenance"]["sources"]) == 2

  # load_pretrained: the directory, the .pth files, and a comma-separated pair agree.
  from_dir = convert.load_pretrained(out_dir, arch="resnet18", width_multiplier=0.125)
  from_pth = convert.load_pretrained(f"{tmp_path / 'bb.pth'},{tmp_path / 'head.pth'}",
                                     arch="resnet18", width_multiplier=0.125)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_dir, from_pth)
  with pytest.raises(ValueError, match="holds arch='resnet18'"):
    convert.load_pretrained(out_dir, arch="resnet50")

  pth = tmp_path / "back.pth"
  assert convert_cli.main(["--to-torch", str(out_dir), "--arch", "resnet18",
                           "--out", str(pth)]) == 0
  assert_same_tensors(torch.load(pth, weights_only=True),
                      collections.OrderedDict(**backbone_sd, **head_sd))
  assert convert_cli.main(["--to-torch", str(out_dir), "--arch", "resnet18",
                           "--out", str(pth), "--backbone-only", "--overwrite"]) == 0
  assert_same_tensors(torch.load(pth, weights_only=True), backbone_sd)
  # errors are reported, not raised
  assert convert_cli.main(["--from-torch", str(tmp_path / "bb.pth"), "--arch",
                           "resnet50", "--out", str(tmp_path / "x")]) == USER_ERROR_STATUS
  assert "is this a resnet18 checkpoint?" in capsys.readouterr().err
  assert convert_cli.main(["--from-torch", str(tmp_path / "bb.pth"), "--arch",
                           "resnet18", "--width-multiplier", "0.125",
                           "--out", str(out_dir)]) == USER_ERROR_STATUS
  assert "--overwrite" in capsys.readouterr().err


def test_head_widths_given_are_checked_and_absent_heads_left_out():
  backbone_sd, head_sd = _tiny_checkpoint()
  with pytest.raises(ValueError, match=r"projector\.0\.weight has shape \(32, 64\), "
                                       r"expected \(256, 64\).*projector is 32-32-16"):
    convert.torch_to_flax([backbone_sd, head_sd], arch="resnet18",
                          width_multiplier=0.125, projector="256-256-256")
  # The pipeline passes its configured widths; a backbone-only file still loads.
  params, stats = convert.torch_to_flax(backbone_sd, arch="resnet18",
                                        width_multiplier=0.125, projector="256-256-256",
                                        predictor="256-256-256")
  assert set(params) == set(stats) == {"backbone"}


def test_stage_output_exports_to_torch(tmp_path):
  from bissl_jax.pipeline import checkpoint  # the pipeline's stage-output format
  backbone_sd, head_sd = _tiny_checkpoint()
  params, stats = convert.torch_to_flax([backbone_sd, head_sd], arch="resnet18",
                                        width_multiplier=0.125)
  params["downstream_head"] = {"dense": {"kernel": np.ones((64, 3), np.float32),
                                         "bias": np.zeros(3, np.float32)}}
  checkpoint.export(str(tmp_path / "output"), {"params": params, "batch_stats": stats},
                    {"stage": "bissl", "arch": "resnet18"})
  pth = tmp_path / "theta_p.pth"
  assert convert_cli.main(["--to-torch", str(tmp_path / "output"), "--arch",
                           "resnet18", "--out", str(pth)]) == 0
  assert_same_tensors(torch.load(pth, weights_only=True),
                      collections.OrderedDict(**backbone_sd, **head_sd))
  with pytest.raises(ValueError, match="holds arch='resnet18'"):
    convert.load_variables(tmp_path / "output", arch="resnet50")


# ------------------------------------------------------------ bad files and values

@pytest.mark.parametrize("content", ["random", "text", "truncated", "empty"])
def test_a_file_that_is_not_a_pytorch_checkpoint_is_named(tmp_path, content):
  path = tmp_path / "weights.pth"
  if content == "random":
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  elif content == "text":
    path.write_text("these are not weights\n" * 20)
  elif content == "empty":
    path.write_bytes(b"")
  else:
    backbone_sd, _ = _tiny_checkpoint()
    torch.save(backbone_sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    convert.torch_to_flax(str(path), arch="resnet18", width_multiplier=0.125)


def test_nonfinite_weights_are_refused():
  backbone_sd, _ = _tiny_checkpoint()
  backbone_sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
  with pytest.raises(ValueError, match=r"NaN/Inf values in layer2\.0\.conv1\.weight"):
    convert.torch_to_flax(backbone_sd, arch="resnet18", width_multiplier=0.125)


def test_negative_running_variance_is_refused():
  backbone_sd, _ = _tiny_checkpoint()
  backbone_sd["bn1.running_var"][3] = -0.5
  with pytest.raises(ValueError, match=r"negative BatchNorm running variances in bn1"):
    convert.torch_to_flax(backbone_sd, arch="resnet18", width_multiplier=0.125)
