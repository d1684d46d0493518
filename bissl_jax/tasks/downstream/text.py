"""GLUE-style downstream tasks on GPT (thesis §2.3.5, §7.1): formatting and losses.

Three input formats, with s, d, e the start, delimiter and end tokens:

- ``classification``: ``[s, x, e]``;
- ``entailment``: ``[s, premise, d, hypothesis, e]``;
- ``similarity``: both ``[s, a, d, b, e]`` and ``[s, b, d, a, e]``; each goes through
  the transformer, the two end-token states are summed and fed to the output layer,
  and the auxiliary LM loss is the mean of the two orders' losses.

The fine-tuning (and upper-level) loss is ``L_task + ν·L_GPT`` with ν = 0.5, L_task
the cross-entropy or, for regression (STS-B), the mean squared error, and L_GPT
next-token prediction on the formatted input over all V + S rows. Dropout 0.1 is
applied to the end-token state before the output layer.

:class:`TextTask` follows :class:`bissl_jax.core.protocols.DownstreamTask`: its
``prepare`` draws the dropout mask (all randomness in ``prepare``), and ``loss`` /
``logits`` read the special-token rows from the head parameters they are given.
Formatting (:func:`format_examples`) runs on the host, once, when a dataset is
built; sequences longer than the context are dropped there.
"""
import dataclasses
from typing import ClassVar, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bissl_jax.models.gpt import GPT, PAD, end_state
from bissl_jax.tasks.pretext.next_token import next_token_loss
from bissl_jax.types import PyTree

KINDS = ("classification", "entailment", "similarity")
NUM_SPECIAL = {"classification": 2, "entailment": 3, "similarity": 3}


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"Unknown text task kind {kind!r}; choose one of {KINDS}.")


def format_one(kind: str, special_ids: dict, a: Sequence[int],
               b: Optional[Sequence[int]] = None) -> list:
  """The model input(s) of one example as lists of ids (two lists for similarity)."""
  _check_kind(kind)
  s, e = special_ids["start"], special_ids["end"]
  if kind == "classification":
    if b is not None:
      raise ValueError("classification takes one text per example; use 'entailment' "
                       "or 'similarity' for pairs.")
    return [[s, *a, e]]
  if b is None:
    raise ValueError(f"{kind} needs two texts per example.")
  d = special_ids["delimiter"]
  if kind == "entailment":
    return [[s, *a, d, *b, e]]
  return [[s, *a, d, *b, e], [s, *b, d, *a, e]]


def format_examples(kind: str, special_ids: dict, first: Sequence[Sequence[int]],
                    second: Optional[Sequence[Sequence[int]]] = None, *,
                    context: int, length: Optional[int] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Formats tokenised examples into one ``PAD``-padded int32 array.

  Args:
    kind: one of :data:`KINDS`.
    special_ids: ``GPT.special_ids``.
    first, second: token ids of each example's text(s) (``second`` for pairs).
    context: the model's context k; longer formatted inputs are dropped (thesis §7.1.1).
    length: padded length (default: the longest kept input).

  Returns:
    ``(tokens, kept)``: tokens ``(N', L)`` or, for similarity, ``(N', 2, L)``;
    ``kept`` the int64 indices of the examples that fit.
  """
  if second is not None and len(second) != len(first):
    raise ValueError(f"{len(first)} first texts but {len(second)} second texts.")
  rows, kept = [], []
  for i, a in enumerate(first):
    seqs = format_one(kind, special_ids, list(a), None if second is None else list(second[i]))
    if max(len(q) for q in seqs) <= context:
      rows.append(seqs)
      kept.append(i)
  width = length or max([len(q) for r in rows for q in r], default=1)
  if width > context:
    raise ValueError(f"length {width} exceeds the context {context}.")
  out = np.full((len(rows), 2 if kind == "similarity" else 1, width), PAD, np.int32)
  for i, seqs in enumerate(rows):
    for j, q in enumerate(seqs):
      if len(q) > width:
        raise ValueError(f"example {kept[i]} has {len(q)} tokens, more than length={width}.")
      out[i, j, :len(q)] = q
  if kind != "similarity":
    out = out[:, 0]
  return out, np.asarray(kept, np.int64)


@dataclasses.dataclass(frozen=True)
class TextTask:
  """GPT fine-tuning objective for one GLUE-style task.

  Attributes:
    model: the :class:`bissl_jax.models.gpt.GPT` bundle (``num_special`` ≥ what ``kind``
      uses).
    kind: 'classification', 'entailment' or 'similarity'.
    regression: MSE on a scalar output (STS-B) instead of cross-entropy.
    lm_weight: ν of the auxiliary language-modelling loss (0.5).
    dropout: dropout rate before the output layer (0.1).
    num_outputs: width of the output layer: classes, or 1 for regression.
  """
  model: GPT
  kind: str = "classification"
  regression: bool = False
  lm_weight: float = 0.5
  dropout: float = 0.1
  num_outputs: int = 2
  input_key: ClassVar[str] = "tokens"   # the batch entry prepare reads (protocols.input_key)

  def __post_init__(self):
    _check_kind(self.kind)
    if self.model.num_special < NUM_SPECIAL[self.kind]:
      raise ValueError(f"{self.kind} needs {NUM_SPECIAL[self.kind]} special tokens; the "
                       f"model has num_special={self.model.num_special}.")
    if self.num_outputs < 1:
      raise ValueError(f"num_outputs must be >= 1, got {self.num_outputs}.")
    if self.regression and self.num_outputs != 1:
      raise ValueError(f"regression needs num_outputs=1, got {self.num_outputs}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")

  def init_head(self, rng: jax.Array, params: PyTree, batch_stats: PyTree) -> PyTree:
    """φ_D: the special-token rows and the output layer (normal(0.02), zero bias)."""
    del params, batch_stats
    cfg = self.model.config
    k_special, k_out = jax.random.split(rng)
    normal = nn.initializers.normal(cfg.init_std)
    return {
        "special_embeddings": normal(k_special, (self.model.num_special, cfg.width),
                                     jnp.float32),
        "output": {"kernel": normal(k_out, (cfg.width, self.num_outputs), jnp.float32),
                   "bias": jnp.zeros((self.num_outputs,), jnp.float32)},
    }

  def head_outputs(self, head_params: PyTree, feats: jax.Array) -> jax.Array:
    """The output layer: ``feats W_d + b`` ``(B, num_outputs)``, float32."""
    out = head_params["output"]
    return (feats.astype(jnp.float32) @ out["kernel"] + out["bias"]).astype(jnp.float32)

  def prepare(self, rng, tokens, *, train: bool) -> dict:
    """``{'tokens'}`` plus, when ``train``, ``'keep'``: the scaled dropout mask ``(B, d)``."""
    tokens = jnp.asarray(tokens)
    expected = 3 if self.kind == "similarity" else 2
    if tokens.ndim != expected:
      raise ValueError(f"{self.kind} expects tokens of rank {expected} "
                       f"({'(B, 2, T)' if expected == 3 else '(B, T)'}); got {tokens.shape}.")
    if not train or self.dropout == 0.0:
      return {"tokens": tokens}
    keep_prob = 1.0 - self.dropout
    keep = jax.random.bernoulli(rng, keep_prob, (tokens.shape[0], self.model.config.width))
    return {"tokens": tokens, "keep": keep.astype(jnp.float32) / keep_prob}

  def _forward(self, backbone_params, head_params, inputs, train: bool,
               features_only: bool = False):
    """``(outputs, L_GPT)``: outputs ``(B, C)`` or ``(B,)`` for regression."""
    tokens = inputs["tokens"]
    special = head_params["special_embeddings"]
    flat = tokens.reshape(-1, tokens.shape[-1])  # similarity: both orders in one batch
    hidden, mask = self.model.hidden(backbone_params, flat, special)
    lm = next_token_loss(self.model.lm_logits(backbone_params, hidden, special), flat)
    feats = end_state(hidden, mask).astype(jnp.float32)
    if self.kind == "similarity":
      # Rows 2i and 2i+1 are the two orders of example i; the summed states are
      # symmetric in the two texts, and the token-mean LM loss over both orders
      # equals the mean of the two orders' losses when they have equal lengths.
      feats = feats.reshape(tokens.shape[0], 2, -1).sum(axis=1)
    if features_only:
      return feats
    if train and "keep" in inputs:
      feats = feats * inputs["keep"]
    out = self.head_outputs(head_params, feats)
    return (out[:, 0] if self.regression else out), lm

  def features(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
               inputs) -> jax.Array:
    """The states fed to the output layer ``(B, d)`` (no dropout), e.g. for t-SNE plots."""
    del backbone_stats
    return self._forward(backbone_params, head_params, {"tokens": inputs["tokens"]},
                         False, features_only=True)

  def task_loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """MSE (regression) or softmax cross-entropy."""
    if self.regression:
      return jnp.mean(jnp.square(outputs - labels.astype(jnp.float32)))
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()

  def loss(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
           inputs, labels, *, train: bool = True) -> Tuple[jax.Array, PyTree]:
    """``(L_task + ν·L_GPT, backbone statistics unchanged)``; dropout only when ``train``."""
    outputs, lm = self._forward(backbone_params, head_params, inputs, train)
    return self.task_loss(outputs, labels) + self.lm_weight * lm, backbone_stats

  def logits(self, backbone_params: PyTree, head_params: PyTree, backbone_stats: PyTree,
             inputs) -> jax.Array:
    """Evaluation outputs (no dropout): logits ``(B, C)`` or predictions ``(B,)``."""
    del backbone_stats
    return self._forward(backbone_params, head_params, inputs, False)[0]
