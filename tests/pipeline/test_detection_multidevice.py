"""A detection stage data-parallel over 2 simulated CPU devices equals the 1-device run.

The head warm-up of the runlocal detection config (4 steps of 16 canvases: RPN and
res5 box head on a frozen C4 backbone, the four-term loss with its anchor and RoI
sampling) runs in a subprocess with ``--xla_force_host_platform_device_count=2``,
once on a 1-device mesh and once split over both devices.

Tolerance: every head parameter within 1e-4 (absolute) of the 1-device run. The two
differ only by the order of cross-device sums (the box head's batch statistics over
the RoIs, the loss means); Adam divides each gradient entry by its own scale, so an
entry whose gradient is near zero can move differently by a fraction of a step on
round-off alone. 1e-4 is 1/30 of one step (learning rate 3e-3) and under 1 % of how
far the warm-up moves the head (0.012); measured: at most 3.8e-5, in res5's first
convolution, every other leaf within 3e-6.
"""
import os
import subprocess
import sys
import textwrap

import pytest
from config_helpers import REPO_ROOT

SCRIPT = textwrap.dedent("""
    import dataclasses, os, sys, tempfile
    sys.path.insert(0, os.getcwd())
    import jax, numpy as np
    assert jax.device_count() == 2, jax.devices()
    from bissl_jax.pipeline import supervised
    from bissl_jax.pipeline.context import build_context
    from bissl_jax.pipeline.datasets import load_data
    from bissl_jax.runtime import mesh as parallel
    from configs import digits_detection

    config = digits_detection.get_config('runlocal')
    splits, _ = load_data(config, need_pretext=False, need_downstream=True)
    ctx = build_context(config, tempfile.mkdtemp())
    params, stats = ctx.init_variables(jax.random.key(0))
    backbone = {'params': params['backbone'], 'batch_stats': stats['backbone']}
    heads = {}
    for n in (1, 2):
      c = dataclasses.replace(ctx, mesh=parallel.make_mesh(jax.devices()[:n]))
      assert c.mesh.size == n
      heads[n] = jax.device_get(supervised.warmup_head(
          c, backbone, splits['train'], seed=0, name=f'warmup{n}',
          pretext_head=params['pretext_head']))
    start = jax.device_get(supervised.fresh_head(ctx, 0, params['pretext_head']))
    moved, worst = 0.0, 0.0
    for a, b, s in zip(*(jax.tree_util.tree_leaves(t) for t in (heads[1], heads[2], start))):
      moved = max(moved, float(np.max(np.abs(a - s))))
      worst = max(worst, float(np.max(np.abs(a - b))))
    print('moved', moved, 'largest difference', worst)
    assert moved > 5e-3, moved  # the warm-up trained the head
    assert worst < 1e-4, worst
    print('DETECTION_MULTI_DEVICE_OK')
""")


@pytest.mark.slow  # a subprocess compiling the detector's warm-up step for two meshes
def test_detection_warmup_on_2_devices_matches_1_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "DETECTION_MULTI_DEVICE_OK" in proc.stdout, (
      proc.stdout[-2000:], proc.stderr[-4000:])
