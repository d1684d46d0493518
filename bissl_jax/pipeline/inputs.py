"""Before any compute: every input checkpoint a run reads must fit its model.

A stage output records the model fields it was made with (its provenance); those
are compared with the config. An output without provenance is compared by the
shapes of its backbone against the model's. Either way a mismatch raises one
:class:`~bissl_jax.config_validation.ConfigError` naming the field to change
(``model.arch``, ``model.width_multiplier``, ``model.cifar_stem``, and
``data.image_size`` where it shapes the weights: a ViT's position embeddings).
PyTorch ``.pth`` files are checked by the converter, which names the same fields.
"""
from typing import List

import jax

from bissl_jax.config_validation import STAGE_INPUTS, ConfigError, _get
from bissl_jax.convert import stage_output
from bissl_jax.pipeline import provenance
from bissl_jax.pipeline.context import StageContext, is_vit

# The fields that decide whether weights fit the model.
MODEL_FIELDS = ("model.arch", "model.width_multiplier", "model.cifar_stem")
VIT_FIELDS = ("data.image_size", "model.lora_rank")


def input_fields(config) -> List[str]:
  """The checkpoint-path fields the run's stages read."""
  if config.stages == "all":
    return ["pretext.checkpoint"]
  field = STAGE_INPUTS.get(config.stages)
  return [field] if field else []


def check_inputs(ctx: StageContext) -> None:
  """Raises ConfigError if an input checkpoint of the run cannot fit ``ctx.model``."""
  problems = []
  for field in input_fields(ctx.config):
    path = _get(ctx.config, field)
    if not path:
      continue
    if stage_output.is_export(path):  # a missing path is named where it is loaded
      problems += export_problems(ctx, field, str(path))
  if problems:
    raise ConfigError("An input checkpoint does not fit the model (nothing was "
                      "computed):\n  " + "\n  ".join(problems))


def export_problems(ctx: StageContext, field: str, path: str) -> List[str]:
  """Why the stage output at ``path`` (named by ``config.<field>``) cannot fit the model."""
  _, meta = stage_output.load_export_meta(path)
  saved = (meta.get(provenance.RECORD_KEY) or {}).get("fields") or {}
  names = MODEL_FIELDS + (VIT_FIELDS if is_vit(ctx.config) else ())
  if any(name in saved for name in names):
    out = []
    for name in names:
      try:
        want = _get(ctx.config, name)
      except (AttributeError, KeyError):
        continue
      if name in saved and provenance.normalise(saved[name]) != provenance.normalise(want):
        out.append(f"config.{name}={want!r}, but config.{field}={path} was made with "
                   f"{saved[name]!r}: set --config.{name}={saved[name]!r} or point "
                   f"config.{field} at a matching checkpoint.")
    return out
  return _shape_problems(ctx, field, path)


def _shape_problems(ctx: StageContext, field: str, path: str) -> List[str]:
  """Compares backbone shapes when the output records no model fields."""
  variables, _ = stage_output.load_export(path)
  params, _ = jax.eval_shape(lambda: ctx.model.init(jax.random.key(0), ctx.image_size))

  def shapes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), tuple(x.shape)) for p, x in leaves]

  got = shapes(variables["params"].get("backbone", {}))
  want = shapes(params["backbone"])
  if [n for n, _ in got] != [n for n, _ in want]:
    return [f"config.{field}={path} holds another backbone than config.model.arch="
            f"{ctx.config.model.arch!r} (different layers): set config.model.arch to the "
            f"checkpoint's architecture."]
  for (name, g), (_, w) in zip(got, want):
    if g == w:
      continue
    if len(g) == 4 and g[:2] != w[:2]:  # only the stem differs in kernel size: 3x3 or 7x7
      return [f"config.{field}={path}: its stem {name} is {g[0]}x{g[1]}, the model's "
              f"{w[0]}x{w[1]}: set --config.model.cifar_stem={g[0] == 3}."]
    ratio = g[-1] / w[-1] * float(ctx.config.model.width_multiplier)
    return [f"config.{field}={path}: {name} has shape {g}, the model's {w}: its width "
            f"matches --config.model.width_multiplier={ratio:g}."]
  return []
