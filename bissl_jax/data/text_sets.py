"""The text datasets a pipeline config can name, and how each is read (docs/language.md).

Names (``config.data.pretext_dataset`` / ``config.data.downstream_dataset``):

- ``'stdlib_docstrings'`` (pretext): the offline standard-library corpus
  (:func:`bissl_jax.data.text_corpus.pretext_text`), cut into chunks of exactly
  ``data.context`` tokens;
- ``'stdlib_packages'`` (downstream): the offline package-classification task of
  :func:`bissl_jax.data.text_corpus.offline_text` (4 classes, accuracy);
- ``'glue/<task>'`` (downstream): a GLUE task from local files
  (:func:`bissl_jax.data.glue.load_glue`, the thesis's split rule), scored with the
  thesis's metric (``text_metrics.GLUE_METRICS``).

The tokenizer is the original GPT BPE read from ``data.tokenizer_dir`` (``vocab.json``
+ ``merges.txt``, :class:`~bissl_jax.data.text_corpus.BPETokenizer`) or, without it,
a BPE of ``data.vocab_size`` tokens learnt on the offline corpus. Every split is padded
to ``data.context`` tokens, so each step function compiles for one shape.
"""
import dataclasses
import functools
from typing import Dict, Optional

from bissl_jax.data import glue
from bissl_jax.data import text_corpus
from bissl_jax.data.tokens import TokenDataset, chunk_stream

PRETEXT_SETS = ("stdlib_docstrings",)
DOWNSTREAM_SETS = ("stdlib_packages",) + tuple(f"glue/{t}" for t in sorted(glue.GLUE_TASKS))
TEXT_DATASETS = PRETEXT_SETS + DOWNSTREAM_SETS


@dataclasses.dataclass(frozen=True)
class TextTaskSpec:
  """What a downstream text set asks of the model and the evaluation.

  Attributes:
    name: the dataset name.
    kind: 'classification', 'entailment' or 'similarity' (``text_tasks.KINDS``).
    num_classes: classes, or 1 for regression (STS-B).
    metric: the model-selection and headline metric.
    metrics: every reported metric, headline first.
    glue_task: the GLUE task name, or None.
  """
  name: str
  kind: str
  num_classes: int
  metric: str
  metrics: tuple
  glue_task: Optional[str] = None

  @property
  def regression(self) -> bool:
    return self.num_classes == 1


def is_text_dataset(name) -> bool:
  return str(name) in TEXT_DATASETS


def task_spec(name: str) -> TextTaskSpec:
  """The :class:`TextTaskSpec` of a downstream text set."""
  if name == "stdlib_packages":
    return TextTaskSpec(name, "classification", len(text_corpus.DOWNSTREAM_PACKAGES),
                        "accuracy", ("accuracy",))
  if name not in DOWNSTREAM_SETS:
    raise ValueError(f"{name!r} is not a downstream text set; choose one of "
                     f"{DOWNSTREAM_SETS}.")
  task = name.split("/", 1)[1]
  spec = glue.get_glue_spec(task)
  metric = spec.metric
  metrics = (metric,) if metric in ("accuracy", "pearson") else (metric, "accuracy")
  return TextTaskSpec(name, spec.kind, spec.num_classes, metric, metrics, task)


@functools.lru_cache(maxsize=4)
def _offline(vocab_size: int, context: int, max_chars: int) -> dict:
  # Deterministic for one Python version; cached because the tokenizer, the pretext
  # set and the package task are all read from it.
  return text_corpus.offline_text(vocab_size=vocab_size, context=context,
                                  max_chars=max_chars)


def _offline_of(data_cfg) -> dict:
  return _offline(int(data_cfg.vocab_size), int(data_cfg.context), int(data_cfg.max_chars))


@functools.lru_cache(maxsize=4)
def _tokenizer_files(directory: str):
  return text_corpus.BPETokenizer.load(directory)


def tokenizer(data_cfg):
  """The run's tokenizer: the files in ``data.tokenizer_dir`` or the offline BPE."""
  if data_cfg.tokenizer_dir:
    return _tokenizer_files(str(data_cfg.tokenizer_dir))
  return _offline_of(data_cfg)["tokenizer"]


def corpus_fingerprint(data_cfg) -> str:
  """sha256 of the offline corpus text (it changes between Python versions)."""
  return text_corpus.corpus_fingerprint(
      text_corpus.pretext_text(max_chars=int(data_cfg.max_chars)))


def load_pretext(name: str, data_cfg) -> TokenDataset:
  """The pretext chunks of ``name`` (``'stdlib_docstrings'``), tokenised by the run's tokenizer."""
  if name not in PRETEXT_SETS:
    raise ValueError(f"config.data.pretext_dataset={name!r} is not a text pretext set; "
                     f"choose one of {PRETEXT_SETS}.")
  if not data_cfg.tokenizer_dir:
    return _offline_of(data_cfg)["pretext"]
  text = text_corpus.pretext_text(max_chars=int(data_cfg.max_chars))
  return chunk_stream(tokenizer(data_cfg).encode(text), int(data_cfg.context), name=name)


def load_downstream(name: str, data_cfg, special_ids: Dict[str, int]) -> Dict[str, TokenDataset]:
  """``{'train', 'validation', 'test'}`` token datasets of a downstream text set.

  Args:
    name: one of :data:`DOWNSTREAM_SETS`.
    data_cfg: ``config.data``.
    special_ids: the model's ``GPT.special_ids`` (start, [delimiter,] end).

  Raises:
    DatasetNotFoundError: a GLUE task is not in ``data.data_dir``.
  """
  spec = task_spec(name)
  context = int(data_cfg.context)
  if spec.glue_task is None:
    if data_cfg.tokenizer_dir:
      raise ValueError("config.data.downstream_dataset='stdlib_packages' is tokenised by "
                       "the BPE learnt on the offline corpus; unset config.data.tokenizer_dir.")
    return dict(_offline_of(data_cfg)["downstream"])
  tok = tokenizer(data_cfg)
  raw = glue.load_glue(spec.glue_task, source=data_cfg.glue_source,
                       data_dir=data_cfg.data_dir)
  out = {split: glue.encode_glue(spec.glue_task, examples, tok, special_ids,
                                 context=context, length=context)
         for split, examples in raw.items()}
  for split, dataset in out.items():
    if not len(dataset):
      raise ValueError(f"Every example of {name} {split} ({len(raw[split])}) is longer "
                       f"than config.data.context={context} tokens once formatted; raise "
                       f"config.data.context (the original GPT: 512).")
  return out
