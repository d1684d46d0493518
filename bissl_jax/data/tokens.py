"""Token datasets: the text counterpart of :class:`bissl_jax.data.arrays.ArrayDataset`.

A :class:`TokenDataset` holds ``PAD``-padded int32 token arrays (formatted model
inputs, see :func:`bissl_jax.tasks.downstream.text.format_examples`, or fixed-length chunks of
a corpus) and labels; ``batch(indices)`` returns ``{'tokens', 'label'}`` exactly as
``ArrayDataset.batch`` returns ``{'image', 'label'}``, so ``BatchStack`` and the
loops that draw batches by index work unchanged.
"""
import dataclasses
from typing import Sequence

import numpy as np

PAD = -1


@dataclasses.dataclass
class TokenDataset:
  """Token sequences and labels in host memory.

  Attributes:
    tokens: int32 ``(N, T)`` or, for similarity pairs, ``(N, 2, T)``; ``PAD`` (-1)
      after the last token of each sequence.
    labels: int32 ``(N,)`` classes (-1 = unlabelled) or float32 ``(N,)`` scores
      (regression).
    num_classes: classes C, or 1 for regression.
    name: a short name for logs.
  """
  tokens: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str = ''

  def __post_init__(self):
    tokens = np.asarray(self.tokens)
    if tokens.dtype.kind not in 'iu' or tokens.ndim not in (2, 3):
      raise ValueError(f'TokenDataset {self.name!r}: tokens must be integer (N, T) or '
                       f'(N, 2, T); got {tokens.dtype} {tokens.shape}.')
    labels = np.asarray(self.labels)
    if labels.shape != tokens.shape[:1]:
      raise ValueError(f'TokenDataset {self.name!r}: {len(tokens)} sequences but labels '
                       f'of shape {labels.shape}.')
    if self.num_classes == 1:
      labels = labels.astype(np.float32)
    else:
      labels = labels.astype(np.int32)
      if labels.size and labels.max() >= self.num_classes:
        raise ValueError(f'TokenDataset {self.name!r}: label {labels.max()} is out of '
                         f'range for {self.num_classes} classes.')
    self.tokens, self.labels = tokens.astype(np.int32), labels

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def length(self) -> int:
    """Padded sequence length T."""
    return int(self.tokens.shape[-1])

  def batch(self, indices) -> dict:
    """``{'tokens': int32 S+(T,) or S+(2, T), 'label': S}`` for indices of any shape S."""
    indices = np.asarray(indices)
    return {'tokens': np.take(self.tokens, indices, axis=0),
            'label': np.take(self.labels, indices, axis=0)}

  def subset(self, indices) -> 'TokenDataset':
    """A new dataset holding copies of the examples at ``indices`` (1-D)."""
    indices = np.asarray(indices, dtype=np.int64)
    return dataclasses.replace(self, tokens=self.tokens[indices],
                               labels=self.labels[indices])


def chunk_stream(ids: Sequence[int], length: int, *, name: str = '') -> TokenDataset:
  """Cuts one token stream into non-overlapping chunks of exactly ``length`` tokens.

  The tail shorter than ``length`` is dropped (GPT pretraining uses full context
  windows, thesis §7.1.1). Labels are -1 (unlabelled).
  """
  ids = np.asarray(ids, np.int32)
  count = len(ids) // length
  if count == 0:
    raise ValueError(f'A stream of {len(ids)} tokens holds no chunk of {length}; use a '
                     'longer corpus or a shorter context.')
  tokens = ids[:count * length].reshape(count, length)
  return TokenDataset(tokens=tokens, labels=np.full(count, -1, np.int32),
                      num_classes=2, name=name)


def head_split(count: int, fraction: float = 0.8) -> tuple:
  """The thesis's rule: the first ``floor(fraction·N)`` examples train, the rest validate."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}.')
  cut = int(np.floor(fraction * count))
  return np.arange(cut), np.arange(cut, count)
