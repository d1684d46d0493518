"""``bissl-jax convert --config=... --workdir=...``: the model from the run's config."""
import json
import os

import pytest

torch = pytest.importorskip(
    "torch", reason="writing the .pth input needs torch: pip install -e '.[torch]'")
pytestmark = pytest.mark.torch

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bissl_jax import convert  # noqa: E402
from bissl_jax.convert import __main__ as convert_cli  # noqa: E402
from bissl_jax.convert import pretext_weights  # noqa: E402
from bissl_jax.runtime.errors import USER_ERROR_STATUS  # noqa: E402
from bissl_jax.models import resnet  # noqa: E402

CONFIG = "configs/digits_simclr.py:runlocal"  # resnet18, width 1/16, CIFAR stem, 16-16-16


def _model():
  return resnet.build_model("resnet18", width_multiplier=0.0625, cifar_stem=True,
                            projector="16-16-16")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A random resnet18 of the runlocal config's shape, as a .pth file, and its variables."""
  shapes = jax.eval_shape(lambda k: _model().init(k, 8), jax.random.key(3))
  rng = np.random.default_rng(0)
  params, stats = jax.tree_util.tree_map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  stats = jax.tree_util.tree_map(np.abs, stats)  # running variances are never negative
  params = {k: params[k] for k in ("backbone", "pretext_head")}
  path = str(tmp_path_factory.mktemp("pth") / "simclr.pth")
  torch.save(convert.flax_to_torch(params, stats, arch="resnet18"), path)
  return path, params


def test_the_config_gives_the_model_and_the_workdir_the_place(weights, tmp_path, capsys):
  path, params = weights
  workdir = str(tmp_path / "run")
  # No --arch, --width-multiplier, --cifar-stem or --out: all from the config.
  assert convert_cli.main(["--from-torch", path, f"--config={CONFIG}",
                           f"--workdir={workdir}"]) == 0
  out = os.path.join(workdir, convert_cli.WORKDIR_WEIGHTS)
  info = json.loads(open(os.path.join(out, "conversion.json")).read())
  assert (info["arch"], info["width_multiplier"], info["cifar_stem"]) == ("resnet18", 0.0625, True)
  printed = capsys.readouterr().out
  assert (f"bissl-jax run --config={CONFIG} --workdir={workdir} "
          f"--config.pretext.checkpoint={out}") in printed
  # What the run then loads for pretext.checkpoint: the same tensors, the config's heads.
  fresh_params, fresh_stats = _model().init(jax.random.key(0), 8)
  loaded, _ = pretext_weights.load_pretext_model(
      out, arch="resnet18", cifar_stem=True, width_multiplier=0.0625,
      fresh_params=fresh_params, fresh_stats=fresh_stats)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_explicit_flags_win_and_their_mismatch_is_reported(weights, tmp_path, capsys):
  path, _ = weights
  # --width-multiplier 0.125 overrides the config's 1/16: the weights no longer fit.
  assert convert_cli.main(["--from-torch", path, f"--config={CONFIG}",
                           "--width-multiplier", "0.125",
                           "--out", str(tmp_path / "w")]) == USER_ERROR_STATUS
  assert "error:" in capsys.readouterr().err
  # The old flags alone still work.
  assert convert_cli.main(["--from-torch", path, "--arch", "resnet18", "--cifar-stem",
                           "--width-multiplier", "0.0625", "--out", str(tmp_path / "old")]) == 0


def test_missing_model_or_destination_is_a_usage_error(weights, tmp_path, capsys):
  path, _ = weights
  with pytest.raises(SystemExit) as exit_info:
    convert_cli.main(["--from-torch", path, "--out", str(tmp_path / "x")])
  assert exit_info.value.code == 2
  assert "give --arch (resnet18 or resnet50) or --config=FILE" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    convert_cli.main(["--from-torch", path, f"--config={CONFIG}"])
  assert "give --out (or --workdir)" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    convert_cli.main(["--from-torch", path, "--config=configs/digits_mae_lora.py"])
  assert "converts ResNet weights" in capsys.readouterr().err
