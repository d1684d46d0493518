"""The unrolled Threefry lowering on CPU: no loops left, and the very same bits.

The reference is independent of JAX: the Threefry-2x32 (20 rounds) known-answer vectors
published with Random123 (Salmon et al., SC'11) and a NumPy implementation written here
from that specification.
"""
import subprocess
import sys

import jax
import jax.extend.random  # noqa: F401
import jax.numpy as jnp
import numpy as np
import pytest

import bissl_jax  # noqa: F401  (applies the lowering)
from bissl_jax.runtime import cpu_random

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# Random123's kat_vectors for threefry2x32_20: (key, counter) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0)),
]


def _threefry_numpy(key, x0, x1):
  """Threefry-2x32, 20 rounds, on uint32 arrays (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    k = [np.uint32(key[0]), np.uint32(key[1])]
    k.append(k[0] ^ k[1] ^ np.uint32(0x1BD11BDA))
    x = [x0.astype(np.uint32) + k[0], x1.astype(np.uint32) + k[1]]
    for block in range(5):
      for r in _ROTATIONS[block % 2]:
        x[0] = x[0] + x[1]
        x[1] = ((x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))) ^ x[0]
      x[0] = x[0] + k[(block + 1) % 3]
      x[1] = x[1] + k[(block + 2) % 3] + np.uint32(block + 1)
  return x


def test_the_numpy_reference_gives_the_published_vectors():
  for key, count, expected in KNOWN_ANSWERS:
    out = _threefry_numpy(key, np.array([count[0]]), np.array([count[1]]))
    assert (int(out[0][0]), int(out[1][0])) == expected


def _hash(keypair, count):
  return jax.extend.random.threefry_2x32(keypair, count)


def test_unrolled_hash_matches_the_reference_bit_for_bit():
  assert cpu_random.unroll_threefry_on_cpu() in ("applied", "not needed")
  rng = np.random.default_rng(0)
  for key, count, expected in KNOWN_ANSWERS:
    out = jax.jit(_hash)(jnp.asarray(key, jnp.uint32), jnp.asarray(count, jnp.uint32))
    assert tuple(int(v) for v in out) == expected
  key = rng.integers(0, 2**32, size=2, dtype=np.uint32)
  count = rng.integers(0, 2**32, size=2 * 999, dtype=np.uint32)
  out = np.asarray(jax.jit(_hash)(jnp.asarray(key), jnp.asarray(count)))
  half = count.size // 2
  x0, x1 = _threefry_numpy(key, count[:half], count[half:])
  np.testing.assert_array_equal(out, np.concatenate([x0, x1]))


def test_random_draws_lower_without_loops_on_cpu():
  if cpu_random.unroll_threefry_on_cpu() != "applied":
    pytest.skip("this JAX already lowers Threefry unrolled on CPU")

  def draw(key):
    a, b = jax.random.split(key)
    return jax.random.uniform(a, (8,)), jax.random.randint(b, (3,), 0, 10)
  text = jax.jit(draw).lower(jax.random.PRNGKey(0)).as_text()
  assert "stablehlo.while" not in text


def test_a_process_without_the_lowering_draws_the_same_numbers():
  """The rolled loop (JAX's own CPU lowering, in a process that never imports the
  package) and the unrolled one give identical augmentation-style draws."""
  program = ("import jax, numpy as np\n"
             "k = jax.random.PRNGKey(7)\n"
             "ks = jax.random.split(k, 5)\n"
             "u = jax.vmap(lambda q: jax.random.uniform(q, (4, 3)))(ks)\n"
             "p = jax.random.permutation(ks[0], 33)\n"
             "n = jax.random.normal(ks[1], (17,))\n"
             "print(np.asarray(u).tobytes().hex(), np.asarray(p).tobytes().hex(),"
             " np.asarray(n).tobytes().hex())\n")
  rolled = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True, timeout=120).stdout.split()
  unrolled = subprocess.run([sys.executable, "-c", "import bissl_jax\n" + program],
                            capture_output=True, text=True, check=True, timeout=120)
  assert unrolled.stdout.split() == rolled
