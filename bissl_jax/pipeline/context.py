"""What every pipeline stage shares: config, model, tasks, mesh, logger.

A :class:`StageContext` is built once per :func:`bissl_jax.pipeline.run` call by
:func:`build_context`. The stages' jitted step functions live in a process-wide
cache keyed by everything they close over (model, tasks, image size, mesh,
hyperparameters), so every seed, pipeline and search trial, and later runs in the
same process, reuse the same compiled executables.
"""
import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.core.params import init_params
from bissl_jax.tasks.downstream import classification as downstream_lib
from bissl_jax.models import gpt
from bissl_jax.evaluation import detection_metrics
from bissl_jax.evaluation import metrics as metrics_lib
from bissl_jax.models import resnet
from bissl_jax.runtime import mesh as parallel
from bissl_jax.tasks import pretext as pretext_lib
from bissl_jax.evaluation import text_metrics
from bissl_jax.tasks.downstream import text as text_tasks
from bissl_jax.models import vit_bundle
from bissl_jax.config_validation import ConfigError, resolve_config
from bissl_jax.convert import mae as convert_mae
from bissl_jax.data import detection_sets
from bissl_jax.data import text_sets
from bissl_jax.tasks.downstream.detection import make_detection_task
from bissl_jax.tasks.pretext.next_token import NextToken
from bissl_jax.pipeline import run_log
from bissl_jax.runtime.seeds import derive_seed


_FUNCTION_CACHE: Dict[Any, Any] = {}


@dataclasses.dataclass
class StageContext:
  """Shared, read-only state of one pipeline run.

  Attributes:
    config: the resolved pipeline config (``config_validation.resolve_config``).
    workdir: the run directory.
    model: the model (:class:`bissl_jax.core.protocols.Model`).
    task: the pretext task (:class:`bissl_jax.core.protocols.PretextTask`).
    downstream: the downstream task (:class:`bissl_jax.core.protocols.DownstreamTask`)
      of the head warm-up, BiSSL's upper level, fine-tuning and evaluation.
    mesh: the 1-D device mesh the batches are split over.
    logger: the metric logger.
    image_size: input side in pixels.
    multilabel: the downstream task is multi-label (mAP, sigmoid loss).
    num_classes: downstream classes.
    metric_names: the reported test metrics, headline first (None: the image
      metrics of ``results.metric_names``).
    scorer: ``scorer(outputs, labels) -> {metric: value, 'score', 'loss'}`` on a
      whole split (None: ``bissl_jax.evaluation.metrics.classification_metrics``); text tasks
      score with the GLUE metrics.
  """
  config: Any
  workdir: str
  model: Any
  task: Any
  downstream: Any
  mesh: Any
  logger: run_log.MetricLogger
  image_size: int
  multilabel: bool
  num_classes: int
  metric_names: Optional[Tuple[str, ...]] = None
  scorer: Optional[Callable[[Any, Any], dict]] = None

  def cached(self, key, build: Callable[[], Any]):
    """A process-wide cached ``build()`` for ``key`` and this context's static parts.

    ``key`` must name every other value ``build`` closes over.
    """
    mesh_key = (tuple(d.id for d in self.mesh.devices.flat), self.mesh.axis_names)
    full_key = (key, self.model, self.task, self.downstream, self.image_size, mesh_key)
    if full_key not in _FUNCTION_CACHE:
      _FUNCTION_CACHE[full_key] = build()
    return _FUNCTION_CACHE[full_key]

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def shard(self, tree, batch_axis: int = 0):
    """This process's rows of a batch as a global array on the mesh, split along
    ``batch_axis`` (``parallel.shard_batch``)."""
    return parallel.shard_batch(tree, self.mesh, batch_axis)

  def replicate(self, tree):
    return parallel.replicate(tree, self.mesh)

  def device_feed(self) -> dict:
    """``{'place', 'device_prefetch'}`` for ``stage_loop.epoch_data``: streamed batches
    are placed with :meth:`shard`, ``config.data.device_prefetch`` of them ahead."""
    return {"place": self.shard,
            "device_prefetch": int(self.config.data.get("device_prefetch", 0))}

  def init_variables(self, key):
    """The model's groups and the downstream task's head under jit (compiled once per
    run): ``(params, batch_stats)`` (``bissl_jax.core.params.init_params``)."""
    fn = self.cached(("model_init",), lambda: jax.jit(
        lambda k: init_params(self.model, self.downstream, k, self.image_size)))
    return fn(key)


def is_text(config) -> bool:
  """``config.model.arch`` names a GPT (``bissl_jax.models.gpt.CONFIGS``): a language run."""
  return config.model.arch in gpt.CONFIGS


def is_vit(config) -> bool:
  """``config.model.arch`` names a ViT (``bissl_jax.models.vit_bundle.ARCHITECTURES``)."""
  return config.model.arch in vit_bundle.ARCHITECTURES


def uses_lora(config) -> bool:
  """A ViT with LoRA adapters: the base weights are frozen after pretext pretraining."""
  return is_vit(config) and int(config.model.get("lora_rank", 0) or 0) > 0


def check_model_and_task(config) -> None:
  vit, task = is_vit(config), config.pretext.task
  if is_text(config) != (task == "next_token"):
    raise ConfigError(f"config.pretext.task={task!r} with config.model.arch="
                      f"{config.model.arch!r}: a GPT ({sorted(gpt.CONFIGS)}) is pretrained "
                      f"with 'next_token', and 'next_token' needs a GPT.")
  if is_text(config):
    for field in ("pretext_dataset", "downstream_dataset"):
      if not text_sets.is_text_dataset(config.data[field]):
        raise ConfigError(f"config.data.{field}={config.data[field]!r}: a GPT reads text; "
                          f"choose one of {text_sets.TEXT_DATASETS}.")
    return
  if vit and task != "mae":
    raise ConfigError(f"config.pretext.task={task!r}: a ViT (config.model.arch="
                      f"{config.model.arch!r}) is pretrained with 'mae' only; set "
                      f"config.pretext.task='mae'.")
  if not vit and task == "mae":
    raise ConfigError(f"config.pretext.task='mae' needs a ViT; set config.model.arch to one "
                      f"of {vit_bundle.ARCHITECTURES}.")
  if vit:
    patch = int(config.model.arch.rsplit("patch", 1)[1])
    if int(config.data.image_size) % patch:
      raise ConfigError(f"config.data.image_size={config.data.image_size} is not a multiple "
                        f"of the patch size {patch} of {config.model.arch}; change one.")
    if int(config.model.lora_rank) < 0:
      raise ConfigError(f"config.model.lora_rank={config.model.lora_rank}: must be >= 0 "
                        f"(0: no adapters).")


def build_model(config, *, lora: bool = True):
  """The model of ``config.model`` (backbone and pretext head).

  Args:
    config: the run config.
    lora: False builds a ViT without its adapters (every backbone leaf trains): the
      model of pretext pretraining (:func:`pretraining_context`).
  """
  check_model_and_task(config)
  m = config.model
  if is_text(config):
    return build_text_model(config)
  if is_vit(config):
    return vit_bundle.build_vit_model(
        m.arch, decoder="mae", decoder_width=m.decoder_width,
        decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
        lora_rank=int(m.lora_rank) if lora else 0, lora_alpha=m.lora_alpha,
        lora_targets=tuple(m.lora_targets), posemb=m.posemb, drop_path_rate=m.drop_path,
        remat=m.remat, dtype=m.dtype, pool=m.pool, train_norms=m.train_norms)
  predictor = m.predictor or (m.projector if config.pretext.task == "byol" else None)
  return resnet.build_model(m.arch, width_multiplier=m.width_multiplier, cifar_stem=m.cifar_stem,
                            projector=m.projector, predictor=predictor,
                            backbone_ends_at=m.get("backbone_ends_at", "res5"),
                            dtype=m.get("dtype", "float32"))


def uses_gessl(config) -> bool:
  """``config.gessl.enabled``: the pretext task is wrapped in GeSSL (docs/gessl.md)."""
  block = config.get("gessl") if hasattr(config, "get") else None
  return bool(block is not None and block.get("enabled", False))


def build_text_model(config) -> gpt.GPT:
  """The GPT of ``config.model.arch`` sized to the tokenizer and ``data.context``.

  The special-token rows and the output width follow the downstream task
  (``bissl_jax.data.text_sets.task_spec``).
  """
  spec = text_sets.task_spec(config.data.downstream_dataset)
  vocab = text_sets.tokenizer(config.data).vocab_size
  sizes = gpt.gpt_config(config.model.arch, vocab_size=vocab,
                         context=int(config.data.context))
  return gpt.GPT(sizes, num_special=text_tasks.NUM_SPECIAL[spec.kind],
                 dtype=config.model.dtype,
                 remat=bool(config.model.remat))


def build_downstream_task(config, model, image_size: int, multilabel: bool,
                          num_classes: int):
  """The downstream task with its head: ``text_tasks.TextTask`` for a GPT, Faster R-CNN
  detection for a detection set (``bissl_jax.data.detection_sets``), else image
  classification with ``num_classes`` outputs."""
  if detection_sets.is_detection_dataset(config.data.downstream_dataset):
    return make_detection_task(model, image_size, detection_sets.detector_config(
        config.data.downstream_dataset, image_size))
  if is_text(config):
    spec = text_sets.task_spec(config.data.downstream_dataset)
    return text_tasks.TextTask(model, spec.kind, regression=spec.regression,
                               lm_weight=float(config.model.lm_weight),
                               dropout=float(config.model.dropout),
                               num_outputs=spec.num_classes)
  return downstream_lib.Classification(
      model, image_size, multilabel, num_classes=num_classes,
      head_init="trunc_normal" if is_vit(config) else "torch_linear")


def text_scorer(spec: text_sets.TextTaskSpec, task) -> Callable[[Any, Any], dict]:
  """Scores a whole split's outputs: the task's metrics, 'score' (the headline) and 'loss'.

  The loss is the task loss alone (cross-entropy or MSE), without the auxiliary LM term.
  """
  def score(outputs, labels) -> dict:
    if spec.glue_task is not None:
      out = text_metrics.glue_scores(spec.glue_task, outputs, labels)
    else:
      out = {"accuracy": metrics_lib.top_k_accuracy(outputs, labels, 1)}
    out["score"] = float(out[spec.metric])
    out["loss"] = float(task.task_loss(jnp.asarray(outputs, jnp.float32), jnp.asarray(labels)))
    return out

  return score


def build_pretext_task(config, model):
  """The pretext task of ``config.pretext`` for ``model``, wrapped in GeSSL if
  ``config.gessl.enabled`` ("SimCLR + GeSSL", "BYOL + GeSSL")."""
  p = config.pretext
  if p.task == "next_token":
    return NextToken(model)
  kwargs = {"simclr": {"temperature": p.temperature, "bn_grouping": p.bn_grouping},
            "byol": {"ema_decay": p.ema_decay, "bn_grouping": p.bn_grouping},
            "mae": {"mask_ratio": p.mask_ratio, "norm_pix_loss": p.norm_pix_loss}}[p.task]
  task = pretext_lib.make_pretext_task(p.task, model, image_size=config.data.image_size,
                                       **kwargs)
  if uses_gessl(config):
    from bissl_jax.tasks.pretext import gessl  # pylint: disable=g-import-not-at-top
    task = gessl.from_config(task, config.gessl, image_size=config.data.image_size)
  return task


def pretraining_context(ctx: "StageContext") -> "StageContext":
  """The context of pretext pretraining (stage 1): the model without LoRA adapters.

  Stage 1 trains the base weights, which the later stages freeze under the adapters;
  without LoRA this is ``ctx`` itself.
  """
  if not uses_lora(ctx.config):
    return ctx
  model = build_model(ctx.config, lora=False)
  return dataclasses.replace(
      ctx, model=model, task=build_pretext_task(ctx.config, model),
      downstream=build_downstream_task(ctx.config, model, ctx.image_size, ctx.multilabel,
                                       ctx.num_classes))


def with_fresh_adapters(ctx: "StageContext", params, batch_stats, seed: int):
  """Pretext weights of the base model, in the tree of ``ctx.model`` (with its LoRA).

  The adapters are freshly initialised from ``seed`` (B = 0, so the model computes the
  base model's function); without LoRA ``(params, batch_stats)`` are returned as they
  are. Leaves of ``ctx.model`` the weights lack (e.g. a decoder a checkpoint did not
  have) keep their initial values.

  Returns:
    ``(params, batch_stats)``, each ``{'backbone', 'pretext_head'}``.
  """
  if not is_vit(ctx.config):
    return params, batch_stats
  fresh, fresh_stats = ctx.init_variables(jax.random.key(derive_seed(seed, "lora_init")))
  groups = ("backbone", "pretext_head")
  merged = convert_mae.merge_pretrained({g: fresh[g] for g in groups},
                                        {g: params.get(g, {}) for g in groups})
  return merged, {g: fresh_stats[g] for g in groups}


def build_context(config, workdir: str) -> StageContext:
  """Model, pretext and downstream tasks, mesh and logger of a run.

  ``config`` is resolved here (``bissl.upper_lr`` and the other placeholders filled),
  so every stage reads final values whether or not the caller validated it.
  """
  from bissl_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = resolve_config(config)
  image_size = int(config.data.image_size)
  detection = detection_sets.is_detection_dataset(config.data.downstream_dataset)
  if is_text(config):
    spec = text_sets.task_spec(config.data.downstream_dataset)
    num_classes, multilabel = spec.num_classes, False
    metric_names = spec.metrics
  elif detection:
    num_classes = detection_sets.num_classes(config.data.downstream_dataset)
    multilabel, metric_names = False, (detection_metrics.AP50,)
  else:
    spec = data_lib.get_spec(config.data.downstream_dataset, config.data.get("data_dir"))
    num_classes, multilabel, metric_names = spec.num_classes, bool(spec.multilabel), None
  model = build_model(config)
  downstream = build_downstream_task(config, model, image_size, multilabel, num_classes)
  return StageContext(
      config=config, workdir=workdir, model=model, task=build_pretext_task(config, model),
      downstream=downstream, mesh=parallel.make_mesh(), logger=run_log.MetricLogger(workdir),
      image_size=image_size, multilabel=multilabel, num_classes=num_classes,
      metric_names=metric_names,
      scorer=(text_scorer(spec, downstream) if is_text(config) else
              detection_metrics.ap50_scorer(num_classes) if detection else None))


def check_size(num_examples: int, batch_size: int, field: str, what: str) -> int:
  """Steps per epoch (remainder dropped); ConfigError if the set is smaller than a batch."""
  if num_examples < batch_size:
    from bissl_jax.config_validation import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(
        f"config.{field}={batch_size} exceeds the {num_examples} examples of {what}: "
        f"set config.{field} to at most {num_examples} (the split sizes follow "
        f"config.data.max_train_examples and config.data.val_fraction).")
  return num_examples // batch_size
