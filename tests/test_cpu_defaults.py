"""bissl_jax.cpu_defaults: the opt-in XLA:CPU flag is added only where it takes effect."""
import os
import subprocess
import sys

import jax
import pytest

from bissl_jax import cpu_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one convolution and reports whether XLA ran it as a YNNPACK fusion.
PROBE = """
import os, sys
from bissl_jax import cpu_defaults
if sys.argv[1] == "opt-in":
  print(cpu_defaults.enable_fast_cpu_convolutions())
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # compiled only, never run
text = jax.jit(conv).lower(shape(8, 32, 32, 64), shape(3, 3, 64, 64)).compile().as_text()
print("ynn" if "__ynn_fusion" in text else "xla")
"""


def _probe(mode):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=120).stdout.split()
  return out


def test_default_is_untouched_and_opt_in_moves_convolutions_off_ynnpack():
  assert _probe("default") == ["ynn"]  # importing the module changes nothing
  assert _probe("opt-in") == ["applied", "xla"]


def test_user_flags_and_other_platforms_are_left_alone():
  user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert cpu_defaults.enable_fast_cpu_convolutions(user) == "user XLA_FLAGS already set it"
  assert user == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  gpu = {"JAX_PLATFORMS": "cuda"}
  assert cpu_defaults.enable_fast_cpu_convolutions(gpu).startswith("not a CPU run")
  assert "XLA_FLAGS" not in gpu


def test_too_late_once_the_backend_has_started():
  jax.devices()  # starts the backend in this process
  env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  with pytest.raises(RuntimeError, match="backend has already started"):
    cpu_defaults.enable_fast_cpu_convolutions(env)
  assert env == {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
