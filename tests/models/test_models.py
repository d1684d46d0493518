"""ResNet / MLP heads / BisslModel: shapes, parameter counts, names, and PyTorch numerics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bissl_jax.models import resnet

try:  # optional ([torch] extra): only the PyTorch-reference tests need it
  import torch
  import torch.nn.functional as F
except ImportError:
  torch = F = None

requires_torch = pytest.mark.torch  # skipped without torch (tests/conftest.py)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("arch,expected", [("resnet50", 23_508_032), ("resnet18", 11_176_512)])
def test_backbone_parameter_count_matches_torchvision(arch, expected):
  # torchvision's counts without the 1000-way fc layer.
  model = resnet.build_model(arch)
  params, _ = jax.eval_shape(lambda k: model.init(k, 64), jax.random.key(0))
  assert _count(params["backbone"]) == expected


def test_timm_names_and_shapes():
  model = resnet.build_model("resnet50", predictor="256-256-256")
  params, stats = jax.eval_shape(lambda k: model.init(k, 64), jax.random.key(0))
  bb = params["backbone"]
  assert set(bb) == {"conv1", "bn1"} | {f"layer{i}_{j}" for i, n in
                                        zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)}
  assert bb["conv1"]["kernel"].shape == (7, 7, 3, 64)  # HWIO, no bias
  assert set(bb["conv1"]) == {"kernel"}
  block = bb["layer2_0"]
  assert set(block) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                        "downsample_conv", "downsample_bn"}
  assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert "downsample_conv" not in bb["layer2_1"]
  assert set(stats["backbone"]["bn1"]) == {"mean", "var"}
  proj = params["pretext_head"]["projector"]
  assert set(proj) == {"dense_0", "bn_1", "dense_3", "bn_4", "dense_6"}
  assert proj["dense_0"]["kernel"].shape == (2048, 256)
  assert set(proj["dense_6"]) == {"kernel"}  # final layer has no bias
  assert set(params["pretext_head"]) == {"projector", "predictor"}
  assert params["downstream_head"] == {}  # the downstream task's (tasks/downstream/heads.py)


# ----------------------------------------------------------------------------- torch reference

def _t(x):
  return torch.from_numpy(np.asarray(x, np.float32).copy())


def _torch_conv(x, kernel, stride, pad):
  return F.conv2d(x, _t(kernel).permute(3, 2, 0, 1), stride=stride, padding=pad)


def _torch_bn(x, p, s, train, new_stats, key):
  mean, var = _t(s["mean"]).clone(), _t(s["var"]).clone()
  y = F.batch_norm(x, mean, var, _t(p["scale"]), _t(p["bias"]), training=train,
                   momentum=0.1, eps=1e-5)
  new_stats[key] = mean.numpy()  # running mean updated in place by torch
  return y


def _torch_resnet(x, params, stats, net: resnet.ResNet, train):
  """Independent forward with PyTorch ops (torchvision's ResNet v1.5 layout)."""
  new = {}
  if net.cifar_stem:
    x = F.relu(_torch_bn(_torch_conv(x, params["conv1"]["kernel"], 1, 1),
                         params["bn1"], stats["bn1"], train, new, "bn1"))
  else:
    x = F.relu(_torch_bn(_torch_conv(x, params["conv1"]["kernel"], 2, 3),
                         params["bn1"], stats["bn1"], train, new, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
  for i, n in enumerate(net.stage_sizes):
    for j in range(n):
      name = f"layer{i + 1}_{j}"
      p, s = params[name], stats[name]
      stride = 2 if (i > 0 and j == 0) else 1
      bn = lambda y, k: _torch_bn(y, p[k], s[k], train, new, f"{name}/{k}")
      if net.block == "basic":
        y = F.relu(bn(_torch_conv(x, p["conv1"]["kernel"], stride, 1), "bn1"))
        y = bn(_torch_conv(y, p["conv2"]["kernel"], 1, 1), "bn2")
      else:
        y = F.relu(bn(_torch_conv(x, p["conv1"]["kernel"], 1, 0), "bn1"))
        y = F.relu(bn(_torch_conv(y, p["conv2"]["kernel"], stride, 1), "bn2"))
        y = bn(_torch_conv(y, p["conv3"]["kernel"], 1, 0), "bn3")
      if "downsample_conv" in p:
        x = bn(_torch_conv(x, p["downsample_conv"]["kernel"], stride, 0), "downsample_bn")
      x = F.relu(y + x)
  return x.mean(dim=(2, 3)), new


def _randomize(tree, seed):
  """Non-trivial BN scales/biases/statistics so eval mode is a real test."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  rng = np.random.default_rng(seed)
  out = [np.asarray(x) + 0.2 * rng.standard_normal(x.shape).astype(np.float32) if x.ndim == 1
         else np.asarray(x) for x in leaves]
  out = [np.abs(x) + 0.5 if x.ndim == 1 and i % 2 else x for i, x in enumerate(out)]
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in out])


@requires_torch
@pytest.mark.parametrize("net,image", [
    (resnet.ResNet(stage_sizes=(1, 1), block="basic", width=4), 15),
    (resnet.ResNet(stage_sizes=(1, 2), block="bottleneck", width=4, cifar_stem=True), 8),
])
@pytest.mark.parametrize("train", [False, True])
def test_resnet_matches_pytorch_ops(net, image, train):
  x = np.random.default_rng(0).standard_normal((3, image, image, 3)).astype(np.float32)
  variables = net.init(jax.random.key(1), x, train=False)
  params, stats = variables["params"], _randomize(variables["batch_stats"], 2)
  if train:
    out, mutated = net.apply({"params": params, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
    new_stats = mutated["batch_stats"]
  else:
    out = net.apply({"params": params, "batch_stats": stats}, x, train=False)
  ref, ref_means = _torch_resnet(_t(x).permute(0, 3, 1, 2), params, stats, net, train)
  np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)
  if train:  # running means follow PyTorch's momentum-0.1 update
    for key, mean in ref_means.items():
      path = key.split("/")
      got = new_stats
      for k in path:
        got = got[k]
      np.testing.assert_allclose(got["mean"], mean, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- heads and bundle

def test_mlp_head_matches_numpy_in_eval_mode():
  head = resnet.MLPHead(features=(6, 5, 4))
  x = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
  variables = head.init(jax.random.key(0), x, train=False)
  stats = _randomize(variables["batch_stats"], 3)
  params = _randomize(variables["params"], 4)
  out = head.apply({"params": params, "batch_stats": stats}, x, train=False)
  y = x
  for i in range(2):
    d, b, s = params[f"dense_{3 * i}"], params[f"bn_{3 * i + 1}"], stats[f"bn_{3 * i + 1}"]
    y = y @ np.asarray(d["kernel"]) + np.asarray(d["bias"])
    y = (y - s["mean"]) / np.sqrt(s["var"] + 1e-5) * b["scale"] + b["bias"]
    y = np.maximum(y, 0)
  y = y @ np.asarray(params["dense_6"]["kernel"])
  np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)


def test_parse_mlp_spec_and_errors():
  assert resnet.parse_mlp_spec("256-256-256") == (256, 256, 256)
  assert resnet.parse_mlp_spec("8192") == (8192,)
  for bad in ("", "256-x", "256--256", "0-4"):
    with pytest.raises(ValueError, match="MLP spec"):
      resnet.parse_mlp_spec(bad)
  with pytest.raises(ValueError, match="resnet18"):
    resnet.build_model("vgg16")
  with pytest.raises(ValueError, match="Predictor output"):
    resnet.build_model("resnet18", projector="8-4", predictor="8-5")


def test_bissl_model_apply_helpers():
  model = resnet.BisslModel(
      backbone=resnet.ResNet(stage_sizes=(1, 1), block="basic", width=4, cifar_stem=True),
      projector=resnet.MLPHead((8, 6)), predictor=resnet.MLPHead((5, 6)))
  hash(model)  # usable as a static jit argument
  assert model == resnet.BisslModel(model.backbone, model.projector, model.predictor)
  params, stats = model.init(jax.random.key(0), image_size=8, channels=3)
  assert set(params) == {"backbone", "pretext_head", "downstream_head"}
  assert set(stats) == {"backbone", "pretext_head"}
  assert set(stats["pretext_head"]) == {"projector", "predictor"}
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  h, same = model.features(params["backbone"], stats["backbone"], x, train=False)
  assert h.shape == (4, 8)
  assert same is stats["backbone"]
  h_train, new = model.features(params["backbone"], stats["backbone"], x, train=True)
  moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), new, stats["backbone"])
  assert all(jax.tree_util.tree_leaves(moved))
  z, _ = model.project(params["pretext_head"]["projector"], stats["pretext_head"]["projector"],
                       h_train, train=True)
  p, _ = model.predict(params["pretext_head"]["predictor"], stats["pretext_head"]["predictor"],
                       z, train=True)
  assert z.shape == (4, 6) and p.shape == (4, 6)


@pytest.mark.parametrize("arch,width,stem,feat", [("resnet18", 0.125, False, 64),
                                                   ("resnet50", 0.25, True, 512)])
def test_backbone_output_shapes(arch, width, stem, feat):
  model = resnet.build_model(arch, width_multiplier=width, cifar_stem=stem)
  params, stats = jax.eval_shape(lambda k: model.init(k, image_size=32), jax.random.key(0))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  h, new = jax.eval_shape(lambda p, s, x: model.features(p, s, x, train=True),
                          params["backbone"], stats["backbone"], x)
  assert h.shape == (2, feat)
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(stats["backbone"])


def test_the_task_head_keeps_the_key_schedule_of_checkpoints():
  # Before the tasks owned their heads, ResNet's init split its key in four and gave
  # the fourth to a PyTorch-initialised Dense: old workdirs resume on the same tree.
  from bissl_jax.core.params import init_params
  from bissl_jax.tasks.downstream.classification import Classification
  model = resnet.build_model("resnet18", width_multiplier=0.0625, cifar_stem=True)
  rng = jax.random.key(3)
  params, _ = init_params(model, Classification(model, 8, num_classes=5), rng, 8)
  expected = _OldLinearHead().init(jax.random.split(rng, 4)[3], jnp.zeros((1, 32)))["params"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["downstream_head"], expected)


class _OldLinearHead(nn.Module):
  """The model-owned head as it was: a PyTorch-initialised Dense named ``dense``."""

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return nn.Dense(5, kernel_init=init, name="dense")(x)
