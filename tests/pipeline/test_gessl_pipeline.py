"""GeSSL in the pipeline: the pretext stage (one stage loop) with the task's hooks, the
pretext optimizer by config, the GeSSL configs and their validation."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bissl_jax.tasks.pretext import gessl
from bissl_jax.core import optim
from bissl_jax.runtime import mesh as parallel
from bissl_jax.tasks import pretext
from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.convert import stage_output
from bissl_jax.data import ArrayDataset
from bissl_jax.pipeline import context as context_lib
from bissl_jax.pipeline import pretrain as pretrain_lib
from bissl_jax.pipeline import run_log
from bissl_jax.runtime.seeds import derive_seed
from configs import common, digits_gessl, imagenet_gessl, stl10_gessl
from tests.tasks.test_gessl import FrozenBiasModel


@dataclasses.dataclass(frozen=True)
class StubModel(FrozenBiasModel):
  """FrozenBiasModel with the pipeline's ``init(rng, image_size)``."""
  in_dim: int = 0  # unused: init takes the input size from image_size

  def init(self, rng, image_size):
    k1, k2, k3 = jax.random.split(rng, 3)
    d = image_size * image_size * 3
    params = {"backbone": {"w": jax.random.normal(k1, (d, self.feat_dim)) * 0.3,
                           "b": jax.random.normal(k2, (self.feat_dim,)) * 0.1},
              "pretext_head": {"projector": {
                  "w": jax.random.normal(k3, (self.feat_dim, self.proj_dim)) * 0.5}},
              "downstream_head": {}}
    return params, {"backbone": {}, "pretext_head": {"projector": {}}}


def _context(tmp_path, *, gessl_on=True):
  config = digits_gessl.get_config("runlocal")
  config.data.image_size = 4
  config.pretext.batch_size = 8
  config.pretext.epochs = 2
  config.gessl.update(dict(n_tasks=2, classes_per_task=4, lam=3, inner_params="all",
                           enabled=gessl_on))
  config = validate_config(config, num_devices=1)
  model = StubModel()
  task = context_lib.build_pretext_task(config, model)
  return context_lib.StageContext(
      config=config, workdir=str(tmp_path), model=model, task=task, downstream=None,
      mesh=parallel.make_mesh(), logger=run_log.MetricLogger(str(tmp_path)), image_size=4,
      multilabel=False, num_classes=10)


def _images(n=16, side=4, seed=0):
  rng = np.random.default_rng(seed)
  return ArrayDataset(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
                      np.zeros(n, np.int32), num_classes=10, name="fake")


def test_pretext_stage_trains_gessl_with_its_head_and_mask(tmp_path):
  ctx = _context(tmp_path)
  assert isinstance(ctx.task, gessl.GeSSL) and ctx.task.batch_size == 8
  assert (ctx.task.K, ctx.task.lam, ctx.task.inner_params) == (1, 3, "all")
  directory = str(tmp_path / "pre")
  params, stats = pretrain_lib.pretrain(ctx, _images(), seed=0, directory=directory)
  # The task classifier is initialised by the stage (init_head), trained and exported.
  head = params["pretext_head"]["task_classifier"]
  assert head["kernel"].shape == (4, 4)
  init, _ = ctx.init_variables(jax.random.key(derive_seed(0, "pretext_init")))
  # The frozen leaf gets neither inner nor outer updates (no weight decay either) ...
  np.testing.assert_array_equal(params["backbone"]["b"], init["backbone"]["b"])
  # ... while the trainable ones move, and the model's leaves start from the same init
  # as without GeSSL (the head has its own seed).
  assert float(jnp.max(jnp.abs(params["backbone"]["w"] - init["backbone"]["w"]))) > 1e-5
  fresh = pretrain_lib.init_pretext_state(ctx, optax.identity(), 0)["level"].params
  np.testing.assert_array_equal(fresh["backbone"]["w"], init["backbone"]["w"])
  variables, meta = stage_output.load_export(os.path.join(directory, "output"))
  assert meta["gessl"] is True and "task_classifier" in variables["params"]["pretext_head"]
  # A second call reuses the export: the same weights, no training.
  again, _ = pretrain_lib.pretrain(ctx, _images(), seed=0, directory=directory)
  np.testing.assert_array_equal(again["pretext_head"]["task_classifier"]["kernel"],
                                head["kernel"])
  # The GeSSL fields are part of the output's provenance; without GeSSL they are not.
  assert "gessl.lam" in pretrain_lib.stage_provenance(ctx, 0, 2, 64).fields
  plain = _context(tmp_path / "plain", gessl_on=False)
  assert isinstance(plain.task, pretext.SimCLR)
  assert not any(k.startswith("gessl.")
                 for k in pretrain_lib.stage_provenance(plain, 0, 2, 64).fields)


def test_pretext_optimizer_by_name():
  p = {"w": jnp.array([1.0, -2.0]), "m": jnp.ones((2, 2))}
  g = {"w": jnp.array([0.5, 0.25]), "m": jnp.full((2, 2), 0.1)}
  sgd = optim.by_name("sgd", 0.1, momentum=0.9, weight_decay=1e-4)
  u, _ = sgd.update(g, sgd.init(p), p)
  for k in p:  # coupled decay on every leaf, vectors included (PyTorch SGD)
    np.testing.assert_allclose(u[k], -0.1 * (g[k] + 1e-4 * p[k]), rtol=1e-6)
  lars = optim.by_name("lars", 0.1, momentum=0.9, weight_decay=1e-4)
  ref = optim.lars(0.1, weight_decay=1e-4, momentum=0.9)
  a, _ = lars.update(g, lars.init(p), p)
  b, _ = ref.update(g, ref.init(p), p)
  for k in p:
    np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="lars"):
    optim.by_name("nadam", 0.1, momentum=0.9, weight_decay=0.0)


@pytest.mark.parametrize("module,arg", [
    (stl10_gessl, ""), (stl10_gessl, "runlocal"), (stl10_gessl, "task=byol"),
    (imagenet_gessl, ""), (imagenet_gessl, "runlocal"), (imagenet_gessl, "epochs=100"),
    (digits_gessl, ""), (digits_gessl, "runlocal")])
def test_gessl_configs_build_validate_and_wrap_the_task(module, arg):
  config = module.get_config(arg)
  resolved = validate_config(config, num_devices=1)
  g = resolved.gessl
  assert g.enabled and g.n_tasks * g.classes_per_task == resolved.pretext.batch_size
  assert resolved.pretext.optimizer == "sgd" and resolved.pretext.momentum == 0.9
  assert resolved.pretext.weight_decay == 1e-4
  assert set(config.probe) == {"epochs", "batch_size", "lr", "final_lr"}
  if module is not digits_gessl:  # the paper's settings (Appendix C, G.5, §6.2)
    assert (g.K, g.lam, g.second_level_loss, g.first_order) == (1, 10 if not arg == "runlocal"
                                                               else 2, "kl", False)
    if arg != "runlocal":
      assert (g.n_tasks, g.classes_per_task, g.num_views, g.inner_params) == (8, 16, 5, "all")
      assert g.fd_radius == 0.01  # AID-FD (G.4)
      assert config.probe.epochs == 500
  if arg == "runlocal":  # the one runlocal shrink, GeSSL's part included
    again = common.apply_runlocal(config.copy_and_resolve_references(),
                                  pretext_epochs=config.pretext.epochs)
    for block in ("model", "pretext", "gessl", "bissl"):
      assert again[block].to_dict() == config[block].to_dict()
    assert (config.data.image_size, g.n_tasks, g.classes_per_task) == (8, 2, 16)
  model = context_lib.build_model(resolved)
  task = context_lib.build_pretext_task(resolved, model)
  assert isinstance(task, gessl.GeSSL) and task.batch_size == resolved.pretext.batch_size
  assert (task.num_views, task.fd_radius) == (g.num_views, g.fd_radius)
  assert type(task.base).__name__.lower() == resolved.pretext.task


def test_gessl_validation_names_the_fields():
  config = stl10_gessl.get_config()
  config.pretext.batch_size = 64
  config.gessl.num_views = 1
  config.gessl.second_level_loss = "l2"
  config.pretext.optimizer = "nadam"
  with pytest.raises(ConfigError) as err:
    validate_config(config, num_devices=1)
  for text in ("config.pretext.batch_size=64", "config.gessl.num_views=1",
               "config.gessl.second_level_loss='l2'", "config.pretext.optimizer='nadam'"):
    assert text in str(err.value)
  mae = stl10_gessl.get_config()
  mae.pretext.task = "mae"
  with pytest.raises(ConfigError, match="wraps one of"):
    validate_config(mae, num_devices=1)
  off = stl10_gessl.get_config()  # disabled: the GeSSL block is not checked
  off.gessl.enabled = False
  off.gessl.num_views = 1
  validate_config(off, num_devices=1)
