"""Next-token prediction, GPT's pretext task L_P (thesis §2.3.4, §5.4).

The pretext head is empty: the logits come from the backbone's own tied token
embedding, so ``params['pretext_head']`` is ``{}`` and the lower level of BiSSL is
``L_P(θ_P) + (λ/2)‖θ_P − θ_D‖²``. The loss only sees the first V embedding rows:
the special-token rows belong to the downstream head and never enter L_P.

Follows :class:`bissl_jax.core.protocols.PretextTask`; there is no augmentation and no
target network.
"""
import dataclasses
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp

from bissl_jax.models.gpt import GPT
from bissl_jax.types import PyTree


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting ``tokens[:, t+1]`` from position t.

  Args:
    logits: ``(B, T, V')`` next-token logits.
    tokens: ``(B, T)`` ids, ``PAD`` (-1) for padding.

  Returns:
    The mean over every (sequence, position) whose *target* is a real token;
    padding contributes nothing (0 when a batch has no target at all).
  """
  targets = tokens[:, 1:]
  weights = (targets >= 0).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(picked * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _tokens_of(batch) -> jax.Array:
  if isinstance(batch, dict):
    if "tokens" not in batch:
      raise ValueError(f"A text batch needs a 'tokens' entry; got keys {sorted(batch)}.")
    batch = batch["tokens"]
  return jnp.asarray(batch)


@dataclasses.dataclass(frozen=True)
class NextToken:
  """GPT's autoregressive language-modelling loss.

  Attributes:
    model: the :class:`bissl_jax.models.gpt.GPT` bundle.
  """
  model: GPT
  has_target: ClassVar[bool] = False
  input_key: ClassVar[str] = "tokens"   # the batch entry prepare reads (protocols.input_key)

  def prepare(self, rng, batch) -> jax.Array:
    """The token array ``(B, T)`` of a batch (an array or ``{'tokens': ...}``); no randomness."""
    del rng
    tokens = _tokens_of(batch)
    if tokens.ndim != 2:
      raise ValueError(f"next_token expects tokens (B, T); got shape {tokens.shape}.")
    return tokens

  def loss(self, params: PyTree, batch_stats: PyTree, inputs, target: Optional[PyTree] = None
           ) -> Tuple[jax.Array, dict]:
    """``(L_P, {'batch_stats', 'metrics': {'loss'}})`` on token inputs.

    Args:
      params: ``{'backbone', 'pretext_head': {}}``; other keys are ignored (the
        special-token rows in ``downstream_head`` are not used).
      batch_stats: passed through (a GPT has no running statistics).
      inputs: tokens ``(B, T)`` from :meth:`prepare`.
      target: unused.
    """
    del target
    backbone = params["backbone"]
    hidden, _ = self.model.hidden(backbone, inputs)
    loss = next_token_loss(self.model.lm_logits(backbone, hidden), inputs)
    stats = {"backbone": batch_stats.get("backbone", {}),
             "pretext_head": batch_stats.get("pretext_head", {})}
    return loss, {"batch_stats": stats, "metrics": {"loss": loss}}
