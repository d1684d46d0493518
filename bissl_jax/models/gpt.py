"""The original GPT (Radford et al. 2018) in Flax, and its BiSSL model bundle.

Architecture (thesis §2.3, Appendix B, Table B.1): learned token and position
embeddings, L post-norm decoder blocks ``a = LN(x + MHA(x)); h = LN(a + FFN(a))``
with causal multi-head self-attention and a GELU (tanh form, as the original and
Hugging Face's ``openai-gpt``) feed-forward network, and the output layer tied to
the token embedding: ``logits = H_L W_eᵀ``.

Parameter names follow Hugging Face ``OpenAIGPTLMHeadModel`` one to one
(``tokens_embed``, ``positions_embed``, ``h_{i}`` ↔ ``h.{i}`` with ``attn.c_attn``,
``attn.c_proj``, ``ln_1``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_2``); its ``Conv1D``
weights are stored ``(in, out)`` like Flax ``Dense`` kernels, so
:mod:`bissl_jax.convert.gpt` copies them without transposing.

The bundle :class:`GPT` follows :class:`bissl_jax.core.protocols.Model` with the BiSSL
partition of thesis §5.4:

- ``backbone``: the whole transformer including the first V token-embedding rows;
- ``pretext_head``: ``{}`` (next-token prediction reuses the tied embedding);
- ``downstream_head``: owned by the downstream task
  (:meth:`bissl_jax.tasks.downstream.text.TextTask.init_head`): ``{'special_embeddings':
  (S, d) rows of the added start / delimiter / end tokens, 'output': the task's
  output layer}``.

The forward concatenates the backbone rows and the special rows into one table, so
the upper level can put θ_P's backbone (V rows) beside φ_D's special rows (thesis
§5.4.1, §7.1.3) without touching either.

Token arrays use ``PAD = -1`` for padding: ids ``>= 0`` are real tokens
(``V + j`` is special token j), and the attention and loss masks are
``tokens >= 0``. Padding must come after the tokens of a sequence.
"""
import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bissl_jax.types import PyTree

PAD = -1
SPECIAL_TOKENS = ("start", "delimiter", "end")
_MASKED = -1e9  # finite: keeps every derivative finite (exp underflows to 0)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Sizes of a GPT.

  Attributes:
    vocab_size: V, the pretraining vocabulary (special tokens come on top).
    context: k, the longest sequence (number of learned positions).
    width: d, the embedding width.
    depth: L, the number of blocks.
    heads: h, attention heads (``width % heads == 0``).
    mlp_width: d_ff of the feed-forward network.
    layer_norm_eps: LayerNorm ε (1e-5 as Hugging Face's ``openai-gpt``).
    init_std: standard deviation of the normal initialiser (0.02).
  """
  vocab_size: int = 40478
  context: int = 512
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_width: int = 3072
  layer_norm_eps: float = 1e-5
  init_std: float = 0.02

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"GPTConfig: width {self.width} must be divisible by heads "
                       f"{self.heads}.")
    for name in ("vocab_size", "context", "width", "depth", "heads", "mlp_width"):
      if getattr(self, name) < 1:
        raise ValueError(f"GPTConfig: {name} must be >= 1, got {getattr(self, name)}.")


# The original GPT (thesis Table B.1) and small CPU sizes; vocab and context of
# the small ones are usually replaced by the tokenizer's (see gpt_config).
CONFIGS = {
    "gpt": GPTConfig(),
    "gpt_small": GPTConfig(vocab_size=2048, context=128, width=128, depth=4, heads=4,
                           mlp_width=512),
    "gpt_tiny": GPTConfig(vocab_size=512, context=64, width=64, depth=2, heads=4,
                          mlp_width=256),
    "gpt_micro": GPTConfig(vocab_size=32, context=16, width=16, depth=1, heads=2,
                           mlp_width=32),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
  """A named configuration of :data:`CONFIGS`, with fields replaced by ``overrides``."""
  if name not in CONFIGS:
    raise ValueError(f"Unknown GPT configuration {name!r}; choose one of {sorted(CONFIGS)}.")
  return dataclasses.replace(CONFIGS[name], **overrides)


def _dense(features: int, name: str, config: GPTConfig, dtype) -> nn.Dense:
  return nn.Dense(features, name=name, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(config.init_std))


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention where position i sees keys j <= i that are not padding."""
  config: GPTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    cfg = self.config
    batch, length, width = x.shape
    head_dim = width // cfg.heads
    qkv = _dense(3 * width, "c_attn", cfg, self.dtype)(x)
    q, k, v = (t.reshape(batch, length, cfg.heads, head_dim)
               for t in jnp.split(qkv, 3, axis=-1))
    # Scores and softmax in float32 whatever the compute dtype.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))
    allowed = causal[None, None] & key_mask[:, None, None, :]
    weights = jax.nn.softmax(jnp.where(allowed, scores, _MASKED), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
    return _dense(width, "c_proj", cfg, self.dtype)(out.reshape(batch, length, width))


class MLP(nn.Module):
  """``c_proj(GELU(c_fc(x)))`` with the tanh GELU of the original GPT."""
  config: GPTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = jax.nn.gelu(_dense(cfg.mlp_width, "c_fc", cfg, self.dtype)(x), approximate=True)
    return _dense(cfg.width, "c_proj", cfg, self.dtype)(h)


class Block(nn.Module):
  """One post-norm decoder block: ``n = ln_1(x + attn(x)); ln_2(n + mlp(n))``."""
  config: GPTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    ln = lambda name: nn.LayerNorm(epsilon=self.config.layer_norm_eps, name=name,
                                   dtype=self.dtype, param_dtype=jnp.float32)
    n = ln("ln_1")(x + CausalSelfAttention(self.config, self.dtype, name="attn")(x, key_mask))
    return ln("ln_2")(n + MLP(self.config, self.dtype, name="mlp")(n))


class GPTTransformer(nn.Module):
  """Embeddings and blocks: token ids → last hidden states ``H_L``.

  Attributes:
    config: the sizes.
    dtype: compute dtype (parameters stay float32).
    remat: recompute each block in the backward pass (``nn.remat``), trading
      compute for activation memory.
  """
  config: GPTConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array,
               extra_embeddings: Optional[jax.Array] = None) -> jax.Array:
    """Hidden states ``(B, T, d)`` of ids ``(B, T)`` (in ``[0, V + S)``) and mask ``(B, T)``.

    ``extra_embeddings`` ``(S, d)`` are appended to the token embedding as rows
    ``V .. V+S-1``.
    """
    cfg = self.config
    if ids.shape[-1] > cfg.context:
      raise ValueError(f"Sequences of {ids.shape[-1]} tokens exceed the context of "
                       f"{cfg.context}; drop or truncate them first.")
    init = nn.initializers.normal(cfg.init_std)
    table = self.param("tokens_embed", init, (cfg.vocab_size, cfg.width), jnp.float32)
    positions = self.param("positions_embed", init, (cfg.context, cfg.width), jnp.float32)
    table = embedding_table(table, extra_embeddings)
    x = jnp.take(table, ids, axis=0) + positions[:ids.shape[-1]]
    x = x.astype(self.dtype)
    block = nn.remat(Block) if self.remat else Block
    for i in range(cfg.depth):
      x = block(cfg, self.dtype, name=f"h_{i}")(x, mask)
    return x


def embedding_table(backbone_rows: jax.Array, special_rows: Optional[jax.Array]) -> jax.Array:
  """The ``(V + S, d)`` token embedding from the backbone rows and the special rows."""
  if special_rows is None or special_rows.shape[0] == 0:
    return backbone_rows
  return jnp.concatenate([backbone_rows, special_rows.astype(backbone_rows.dtype)], axis=0)


def token_mask(tokens: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """``(ids, mask)`` from a ``PAD``-padded token array: ids with padding set to 0."""
  mask = tokens >= 0
  return jnp.where(mask, tokens, 0), mask


def last_token_index(mask: jax.Array) -> jax.Array:
  """Index of the last real token of each row (the end token of a formatted input)."""
  return jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=-1) - 1, 0)


@dataclasses.dataclass(frozen=True)
class GPT:
  """GPT model bundle for BiSSL (see the module docstring for the partition).

  Attributes:
    config: the transformer sizes.
    num_special: S, rows added for downstream special tokens (3: start, delimiter,
      end; 2 for single-sentence classification; 0 for pure language modelling).
    dtype: compute dtype name ('float32', 'bfloat16', 'float16').
    remat: per-block rematerialisation.
  """
  config: GPTConfig = GPTConfig()
  num_special: int = 3
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if not 0 <= self.num_special <= len(SPECIAL_TOKENS):
      raise ValueError(f"num_special must be in [0, {len(SPECIAL_TOKENS)}], got "
                       f"{self.num_special}.")

  @property
  def module(self) -> GPTTransformer:
    return GPTTransformer(self.config, jnp.dtype(self.dtype), self.remat)

  @property
  def special_ids(self) -> Dict[str, int]:
    """Token id of each special token: start = V, then delimiter (if S = 3), end = V + S − 1."""
    names = SPECIAL_TOKENS if self.num_special == 3 else (
        ("start", "end") if self.num_special == 2 else SPECIAL_TOKENS[:self.num_special])
    return {name: self.config.vocab_size + j for j, name in enumerate(names)}

  def init(self, rng: jax.Array, image_size: Optional[int] = None) -> Tuple[PyTree, PyTree]:
    """``(params, batch_stats)`` without the downstream head (the task's, from
    :meth:`head_rng`); ``image_size`` is unused (the protocol's argument)."""
    del image_size
    k_backbone, _ = jax.random.split(rng)
    ids = jnp.zeros((1, min(self.config.context, 2)), jnp.int32)
    backbone = self.module.init(k_backbone, ids, ids >= 0)["params"]
    params = {"backbone": backbone, "pretext_head": {}, "downstream_head": {}}
    return params, {"backbone": {}, "pretext_head": {}}

  @staticmethod
  def head_rng(rng: jax.Array) -> jax.Array:
    """The key :meth:`init`'s schedule reserves for the downstream head."""
    return jax.random.split(rng)[1]

  def hidden(self, backbone_params: PyTree, tokens: jax.Array,
             special_embeddings: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """``(H_L (B, T, d), mask (B, T))`` of ``PAD``-padded tokens ``(B, T)``."""
    ids, mask = token_mask(tokens)
    h = self.module.apply({"params": backbone_params}, ids, mask, special_embeddings)
    return h, mask

  def lm_logits(self, backbone_params: PyTree, hidden: jax.Array,
                special_embeddings: Optional[jax.Array] = None) -> jax.Array:
    """Next-token logits ``H_L W_eᵀ`` (float32) over the V (+ S) rows of the tied table."""
    table = embedding_table(backbone_params["tokens_embed"], special_embeddings)
    return jnp.einsum("btd,vd->btv", hidden, table.astype(hidden.dtype)).astype(jnp.float32)

  def features(self, backbone_params: PyTree, backbone_stats: PyTree, x: jax.Array, *,
               train: bool, special_embeddings: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, PyTree]:
    """Hidden state at the last real token ``(B, d)``; statistics unchanged (there are none).

    Inputs with special tokens need ``special_embeddings`` (the downstream head's
    rows); without them the lookup of ids ``>= V`` gives NaN (JAX's fill mode), so
    the omission shows instead of silently reusing other rows.
    """
    del train
    h, mask = self.hidden(backbone_params, x, special_embeddings)
    return end_state(h, mask), backbone_stats

  def trainable(self, params: PyTree) -> PyTree:
    """Every leaf is trained."""
    return jax.tree_util.tree_map(lambda _: True, params)


def end_state(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """``hidden[b, last real token of b]`` ``(B, d)``."""
  index = last_token_index(mask)
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def count_params(tree: PyTree) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
