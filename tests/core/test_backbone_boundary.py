"""The backbone boundary as data: ``backbone_ends_at`` moves ResNet stages into φ_P."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bissl_jax.config_validation import ConfigError, validate_config
from bissl_jax.core import alternation as ts
from bissl_jax.core import state as bilevel
from bissl_jax.core.params import init_params
from bissl_jax.models import resnet
from bissl_jax.tasks import pretext
from configs import digits_mae_lora
import test_train_state as tt

KW = dict(width_multiplier=0.0625, cifar_stem=True)
TAIL = resnet.TAIL_KEY


def _models(predictor=None):
  full = resnet.build_model("resnet18", predictor=predictor, **KW)
  c4 = resnet.build_model("resnet18", predictor=predictor, backbone_ends_at="res4", **KW)
  return full, c4


def _as_full(c4_tree):
  """A C4 model's tree with the tail's stages put back into the backbone."""
  head = dict(c4_tree["pretext_head"])
  tail = head.pop(TAIL)
  return {**c4_tree, "backbone": {**c4_tree["backbone"], **tail}, "pretext_head": head}


def test_res5_moves_from_the_backbone_into_the_pretext_head():
  full, c4 = _models()
  (pf, sf), (pc, sc) = full.init(jax.random.key(0), 8), c4.init(jax.random.key(0), 8)
  assert {k for k in pf["backbone"] if k.startswith("layer4")} == set(pc["pretext_head"][TAIL])
  assert not any(k.startswith("layer4") for k in pc["backbone"])
  # The same network, partitioned differently: the same leaves, bit for bit.
  jax.tree_util.tree_map(np.testing.assert_array_equal, _as_full(pc), pf)
  jax.tree_util.tree_map(np.testing.assert_array_equal, _as_full(sc), sf)


@pytest.mark.parametrize("name,grouping", [("simclr", "joint"), ("simclr", "per_view"),
                                           ("byol", "per_view")])
def test_the_pretext_loss_and_gradient_do_not_depend_on_the_boundary(name, grouping):
  full, c4 = _models(predictor="256-256-256" if name == "byol" else None)
  (pf, sf), (pc, sc) = full.init(jax.random.key(1), 8), c4.init(jax.random.key(1), 8)
  tf = pretext.make_pretext_task(name, full, bn_grouping=grouping)
  tc = pretext.make_pretext_task(name, c4, bn_grouping=grouping)
  views = tuple(jax.random.normal(k, (4, 8, 8, 3)) for k in jax.random.split(jax.random.key(2)))
  target_f = tf.init_target(pf, sf) if tf.has_target else None
  target_c = tc.init_target(pc, sc) if tc.has_target else None
  (lf, af), gf = jax.value_and_grad(tf.loss, has_aux=True)(pf, sf, views, target_f)
  (lc, ac), gc = jax.value_and_grad(tc.loss, has_aux=True)(pc, sc, views, target_c)
  np.testing.assert_allclose(lc, lf, rtol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree_util.tree_map(close, _as_full(gc), gf)
  jax.tree_util.tree_map(close, _as_full(ac["batch_stats"]), af["batch_stats"])


def test_bissl_with_a_c4_boundary_solves_over_c4_and_trains_res5_in_the_lower_level():
  _, c4 = _models()
  setup = tt.make_setup(model=c4, task=pretext.SimCLR(c4), upper_steps=1)
  params, stats = init_params(c4, setup.downstream, jax.random.PRNGKey(0), tt.IMG)
  # The downstream head reads the pooled C4 map: its width is res4's.
  assert params["downstream_head"]["dense"]["kernel"].shape[0] == 4 * 2 ** 2
  state = bilevel.init_bilevel_state(setup, params, stats)
  assert TAIL not in state.upper.params and TAIL in state.lower.params["pretext_head"]
  new, metrics = ts.make_alternation_fn(setup)(state, tt.make_batches(setup),
                                               jax.random.PRNGKey(1))
  assert np.all(np.isfinite(np.asarray(metrics["v_ig_norm"])))
  moved = lambda a, b: float(jnp.abs(ravel_pytree(a)[0] - ravel_pytree(b)[0]).max()) > 0
  assert moved(new.lower.params["pretext_head"][TAIL], state.lower.params["pretext_head"][TAIL])
  assert moved(new.upper.params["backbone"], state.upper.params["backbone"])


def test_a_moved_boundary_is_refused_for_a_vit():
  config = digits_mae_lora.get_config("runlocal")
  config.model.backbone_ends_at = "res4"
  with pytest.raises(ConfigError, match="model.backbone_ends_at"):
    validate_config(config)
