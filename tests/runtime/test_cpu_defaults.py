"""bissl_jax.runtime.cpu_kernels: the opt-in XLA:CPU flag is added only where it takes effect."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bissl_jax.runtime import cpu_kernels

from config_helpers import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT

# Compiles one convolution and reports whether XLA ran it as a YNNPACK fusion.
PROBE = """
import os, sys
from bissl_jax.runtime import cpu_kernels
if sys.argv[1] == "opt-in":
  print(cpu_kernels.enable_fast_cpu_convolutions())
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # compiled only, never run
text = jax.jit(conv).lower(shape(8, 32, 32, 64), shape(3, 3, 64, 64)).compile().as_text()
print("ynn" if "__ynn_fusion" in text else "xla")
"""


def _fresh_cpu_env():
  """This environment without XLA_FLAGS: a probe process picks its kernels itself.

  Nor the suite's JAX_DISABLE_MOST_OPTIMIZATIONS (tests/conftest.py): the probes compile
  with XLA's full pipeline, as a user's run does, where the fusions under test happen.
  """
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return env


def _probe(mode):
  env = _fresh_cpu_env()
  out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=120).stdout.split()
  return out


def test_default_is_untouched_and_opt_in_moves_convolutions_off_ynnpack():
  assert _probe("default") == ["ynn"]  # importing the module changes nothing
  assert _probe("opt-in") == ["applied", "xla"]


def test_user_flags_and_other_platforms_are_left_alone():
  user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert cpu_kernels.enable_fast_cpu_convolutions(user) == "user XLA_FLAGS already set it"
  assert user == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  gpu = {"JAX_PLATFORMS": "cuda"}
  assert cpu_kernels.enable_fast_cpu_convolutions(gpu).startswith("not a CPU run")
  assert "XLA_FLAGS" not in gpu


def test_too_late_once_the_backend_has_started():
  jax.devices()  # starts the backend in this process
  env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  with pytest.raises(RuntimeError, match="backend has already started"):
    cpu_kernels.enable_fast_cpu_convolutions(env)
  assert env == {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}


def test_apply_follows_the_config_value():
  env = {}
  assert cpu_kernels.apply("default", env) == "default kernels" and env == {}
  assert cpu_kernels.in_effect(env) == "default"
  with pytest.raises(ValueError, match="cpu_kernels must be one of"):
    cpu_kernels.apply("turbo", env)
  jax.devices()  # this process's backend has started: 'fast' cannot take effect
  assert cpu_kernels.apply("fast", env) == "backend already started" and env == {}
  assert cpu_kernels.in_effect({"XLA_FLAGS": "--a=1 " + cpu_kernels.FAST_CPU_FLAG}) == "fast"
  # Another setting of the same option is not the fast kernels; the last one counts.
  other = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert cpu_kernels.in_effect({"XLA_FLAGS": other}) == "default"
  assert cpu_kernels.in_effect(
      {"XLA_FLAGS": f"{cpu_kernels.FAST_CPU_FLAG} {other}"}) == "default"


def test_reconcile_records_the_kernels_in_effect():
  from configs import common  # pylint: disable=import-outside-toplevel
  config = common.base_config()
  assert config.model.cpu_kernels == "fast"  # the library's default
  notice = cpu_kernels.reconcile(config, "cpu", {})
  assert config.model.cpu_kernels == "default"
  assert "cpu_kernels='fast' is not in effect" in notice and "fresh process" in notice
  assert cpu_kernels.reconcile(config, "cpu", {}) is None  # now it says what is in effect
  fast = {"XLA_FLAGS": cpu_kernels.FAST_CPU_FLAG}
  assert "XLA_FLAGS sets" in cpu_kernels.reconcile(config, "cpu", fast)
  assert config.model.cpu_kernels == "fast"
  config.model.cpu_kernels = "default"
  assert cpu_kernels.reconcile(config, "gpu", fast) is None  # off CPU the field is inert
  assert config.model.cpu_kernels == "default"


# M-FAC's batched LAPACK solve under the fast kernels: XLA:CPU 0.10.2 refused its
# column-major Gram stack inside a YNNPACK fusion until mfac solved with the
# transpose. Checked against a float64 NumPy solve of the same system.
MFAC_PROBE = """
import sys
import numpy as np
from bissl_jax.runtime import cpu_kernels
if sys.argv[1] == "fast":
  assert cpu_kernels.enable_fast_cpu_convolutions() == "applied"
import jax, jax.numpy as jnp
from bissl_jax.implicit.solvers import mfac
rs = np.random.RandomState(0)
m, shapes = 20, [(3, 3, 8, 8), (8,), (8,), (16, 8), (5,)] * 12  # the failure needed this many
v = [rs.randn(*s).astype(np.float32) for s in shapes]
g = [rs.randn(m, *s).astype(np.float32) for s in shapes]
lam = 0.5
x, info = jax.jit(lambda g, v: mfac.mfac_solve(g, v, lam))(g, v)
err = 0.0
for gi, vi, xi in zip(g, v, x):  # per leaf: (I + G^T G / (m lam)) x = v
  rows = gi.reshape(m, -1).astype(np.float64)
  a = np.eye(rows.shape[1]) + rows.T @ rows / (m * lam)
  want = np.linalg.solve(a, vi.reshape(-1).astype(np.float64))
  err = max(err, np.abs(np.asarray(xi).reshape(-1) - want).max() / np.abs(want).max())
print(err, float(info.residual))
"""


@pytest.mark.parametrize("kernels", ["default", "fast"])
def test_mfac_solves_under_both_cpu_kernels(kernels):
  env = _fresh_cpu_env()
  proc = subprocess.run([sys.executable, "-c", MFAC_PROBE, kernels], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  err, residual = map(float, proc.stdout.split())
  assert err < 1e-4 and residual < 1e-4


# One BiSSL alternation on a tiny MLP whose implicit-gradient solver starts from a
# constant zero (a Richardson iteration written as a Python loop, so XLA sees the whole
# unrolled chain of Hessian-vector products). Under jaxlib 0.10.2's YNNPACK *dot*
# fusions (`--xla_cpu_experimental_ynn_fusion_type=dot,...`, this library's fast flag
# until it was found) this program returned inf or NaN implicit gradients, or different
# numbers from one process to the next; the fast flag now leaves the matrix products to
# XLA. The default kernels are the reference.
ZERO_START_PROBE = """
import sys
import numpy as np
from bissl_jax.runtime import cpu_kernels
if sys.argv[1] == "fast":
  assert cpu_kernels.enable_fast_cpu_convolutions() == "applied"
import flax.linen as nn
import jax, jax.numpy as jnp
from bissl_jax.core import alternation, state as bilevel
from bissl_jax.core.params import init_params
from bissl_jax.implicit import solvers
from bissl_jax.implicit.solvers.base import finish
from bissl_jax.implicit.solvers.spec import SolverSpec
from bissl_jax.models import resnet
from bissl_jax.tasks import pretext
from bissl_jax.tasks.downstream import classification
from configs import common

def richardson(matvec, b, *, init=None, maxiter=4, tol=0.0, unroll=None):
  x = jax.tree_util.tree_map(jnp.zeros_like, b)
  for _ in range(maxiter):
    x = jax.tree_util.tree_map(lambda xi, bi, ai: xi + 0.5 * (bi - ai), x, b, matvec(x))
  return x, finish(matvec, b, x, x, maxiter, jnp.inf, curvature_tracked=False)

solvers.register(SolverSpec(name="zero_start", solve=richardson, summary="a probe"))

class Backbone(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Dense(6)(x.reshape((x.shape[0], -1)))
    return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))

model = resnet.BisslModel(backbone=Backbone(), projector=resnet.MLPHead((8, 8, 4)),
                          predictor=None)
cfg = common.base_config().bissl.to_dict()
cfg.update(lam=1e-3, damping=100.0, solver="zero_start", cg_iters=4, lower_steps=2,
           upper_steps=2, alternations=4, lower_lr=0.5, upper_lr=0.05, upper_weight_decay=0.0,
           residual_every=1)
setup = bilevel.BisslSetup.from_config(model, pretext.SimCLR(model), cfg,
                                       downstream=classification.Classification(model, 4,
                                                                                num_classes=3))
state = bilevel.init_bilevel_state(setup, *init_params(model, setup.downstream,
                                                       jax.random.PRNGKey(0), 4))
leaves, tdef = jax.tree_util.tree_flatten(state.lower.params["backbone"])
keys = jax.random.split(jax.random.PRNGKey(100), len(leaves))
moved = [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
state = state.replace(lower=state.lower.replace(params={
    **state.lower.params, "backbone": jax.tree_util.tree_unflatten(tdef, moved)}))
rng = np.random.default_rng(0)
img = lambda *s: rng.integers(0, 256, size=s + (4, 4, 3), dtype=np.uint8)
batches = bilevel.AlternationBatches(
    pretext=img(2, 8), hvp=img(8), downstream_images=img(2, 6),
    downstream_labels=rng.integers(0, 3, size=(2, 6)).astype(np.int32))
_, metrics = alternation.make_alternation_fn(setup)(state, batches, jax.random.PRNGKey(1))
print(float(metrics["v_ig_norm"]), float(metrics["cg_residual"]))
"""


def test_the_fast_kernels_agree_with_the_default_on_a_zero_start_solve():
  env = _fresh_cpu_env()
  runs = {}
  for kernels in ("default", "fast"):
    proc = subprocess.run([sys.executable, "-c", ZERO_START_PROBE, kernels], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs[kernels] = np.array(proc.stdout.split(), dtype=np.float64)
  assert np.all(np.isfinite(runs["default"])) and runs["default"][1] < 1.0
  np.testing.assert_allclose(runs["fast"], runs["default"], rtol=1e-4)
