"""A tiny stage loop run as a subprocess by ``test_signals.py``: ``python signal_stress_stage.py DIR``.

Prints ``ready`` once the signal handlers are installed, runs a 20-epoch toy stage (1,000 steps of ~8 ms)
(checkpoints in ``DIR/ckpt``) and prints the final parameters' bytes as hex.
Exit status 130 after SIGINT/SIGTERM, as the command line does.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bissl_jax.core.state import LevelState
from bissl_jax.pipeline import stage_loop

STEPS_PER_EPOCH, EPOCHS = 50, 20


class Data:
  def __init__(self):
    self.x = np.arange(400, dtype=np.float32).reshape(200, 2)

  def __len__(self):
    return len(self.x)

  def batch(self, rows):
    return {"x": self.x[rows]}


@jax.jit
def _step(state, x, rng):
  params = state.params - 0.3 * (state.params - x.mean(0)) + 0.01 * jax.random.normal(rng, (2,))
  return LevelState(params, {}, {}, state.step + 1), {"loss": jnp.sum(params ** 2)}


def main(directory):
  stage_loop.install_stop_handlers()
  print("ready", flush=True)
  key = jax.random.key(0)

  def step(state, i, batch):
    time.sleep(0.008)  # a step long enough for a signal to land inside one
    return _step(state, batch["x"], jax.random.fold_in(key, i))

  stage = stage_loop.Stage(
      name="stress", total_steps=EPOCHS * STEPS_PER_EPOCH, step=step,
      data=stage_loop.EpochData(Data(), 4, seed=3, steps_per_epoch=STEPS_PER_EPOCH),
      steps_per_epoch=STEPS_PER_EPOCH, checkpoint_dir=os.path.join(directory, "ckpt"),
      checkpoint_every=1, save_last=True, fingerprint={"stress.lr": 0.3},
      params_to_check=lambda s: {"parameters": (s.params, "")}, show={})
  fresh = LevelState(jnp.zeros(2), {}, {}, jnp.zeros((), jnp.int32))
  try:
    result = stage_loop.run_stage(stage, fresh)
  except KeyboardInterrupt:
    sys.stdout.flush()
    sys.exit(130)
  print("final", np.asarray(result.state.params).tobytes().hex(), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
