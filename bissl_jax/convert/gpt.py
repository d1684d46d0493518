"""Hugging Face ``openai-gpt`` weights → the bissl_jax GPT (:mod:`bissl_jax.models.gpt`).

Reads an ``OpenAIGPTLMHeadModel`` (or ``OpenAIGPTModel``) state dict from a local
``.bin``/``.pt``/``.pth`` file (``torch.load(weights_only=True)``: plain tensors
only, never arbitrary pickles) or a ``.safetensors`` file, or from a mapping.

Validation is strict and happens before anything is built: every expected key
must be present with its exact shape, no unknown key may remain, and every value
must be finite. Tolerated extras: the ``transformer.`` prefix of the LM-head
model, ``lm_head.weight`` when it equals the token embedding (it is tied), and
the causal-mask buffers ``h.{i}.attn.bias`` (lower-triangular ones) and
``attn.masked_bias`` that older ``transformers`` versions saved.

Layout: ``Conv1D`` weights are ``(in, out)`` like Flax ``Dense`` kernels (no
transpose); LayerNorm ``weight`` → ``scale``. A token embedding with V + S rows
(a checkpoint already fine-tuned with S special tokens) gives its last S rows to
the downstream head's ``special_embeddings``.
"""
import os
from typing import Any, Mapping, Optional, Tuple, Union

import jax
import numpy as np

from bissl_jax.models.gpt import GPT, GPTConfig
from bissl_jax.types import PyTree

_PREFIX = "transformer."
_BLOCK_LEAVES = (
    ("attn.c_attn.weight", ("attn", "c_attn", "kernel"), lambda c: (c.width, 3 * c.width)),
    ("attn.c_attn.bias", ("attn", "c_attn", "bias"), lambda c: (3 * c.width,)),
    ("attn.c_proj.weight", ("attn", "c_proj", "kernel"), lambda c: (c.width, c.width)),
    ("attn.c_proj.bias", ("attn", "c_proj", "bias"), lambda c: (c.width,)),
    ("ln_1.weight", ("ln_1", "scale"), lambda c: (c.width,)),
    ("ln_1.bias", ("ln_1", "bias"), lambda c: (c.width,)),
    ("mlp.c_fc.weight", ("mlp", "c_fc", "kernel"), lambda c: (c.width, c.mlp_width)),
    ("mlp.c_fc.bias", ("mlp", "c_fc", "bias"), lambda c: (c.mlp_width,)),
    ("mlp.c_proj.weight", ("mlp", "c_proj", "kernel"), lambda c: (c.mlp_width, c.width)),
    ("mlp.c_proj.bias", ("mlp", "c_proj", "bias"), lambda c: (c.width,)),
    ("ln_2.weight", ("ln_2", "scale"), lambda c: (c.width,)),
    ("ln_2.bias", ("ln_2", "bias"), lambda c: (c.width,)),
)


def hf_layout(config: GPTConfig) -> list:
  """``[(hf_key, flax backbone path, shape)]`` of everything but the token embedding."""
  layout = [("positions_embed.weight", ("positions_embed",), (config.context, config.width))]
  for i in range(config.depth):
    for key, path, shape in _BLOCK_LEAVES:
      layout.append((f"h.{i}.{key}", (f"h_{i}",) + path, shape(config)))
  return layout


def read_state_dict(path: Union[str, os.PathLike]) -> dict:
  """A state dict of numpy arrays from a ``.safetensors`` or a torch pickle file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No GPT checkpoint at {path!r}.")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(path))
  from bissl_jax.convert.torch_files import load_state_dict  # pylint: disable=import-outside-toplevel
  try:
    return dict(load_state_dict(path))
  except ValueError:
    raise  # load_state_dict's own message (e.g. a pickle that is not plain tensors)
  except Exception as e:  # pylint: disable=broad-except
    # torch.load fails on foreign bytes with whatever its unpickler hits first
    # (UnpicklingError, RuntimeError, IndexError, EOFError, ...).
    raise ValueError(
        f"{path}: not a PyTorch state-dict file ({type(e).__name__}: {e}). Expected the "
        "pytorch_model.bin of Hugging Face 'openai-gpt' (torch.save(model.state_dict())) "
        "or its model.safetensors.") from e


def _is_causal_buffer(key: str, value: np.ndarray) -> bool:
  if key.endswith("attn.masked_bias"):
    return True
  if not key.endswith("attn.bias") or value.ndim != 4:
    return False
  n = value.shape[-1]
  return value.shape[:2] == (1, 1) and np.array_equal(
      value.reshape(value.shape[-2:]), np.tril(np.ones((n, n), value.dtype)))


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict:
  from bissl_jax.convert.torch_files import to_numpy  # pylint: disable=import-outside-toplevel
  out = {}
  for key, value in state_dict.items():
    key = str(key)
    short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    if short in out:
      raise ValueError(f"{key} appears twice (with and without the {_PREFIX!r} prefix).")
    out[short] = to_numpy(value, key)
  return out


def hf_to_flax(state_dict: Mapping[str, Any], model: GPT) -> Tuple[PyTree, Optional[np.ndarray]]:
  """``(backbone params, special rows or None)`` from a Hugging Face state dict.

  Raises:
    ValueError: naming the first missing, unexpected, misshapen or non-finite entry.
  """
  cfg = model.config
  sd = _normalise_keys(state_dict)
  if "tokens_embed.weight" not in sd:
    raise ValueError("missing key tokens_embed.weight (not an openai-gpt state dict?).")
  table = sd.pop("tokens_embed.weight")
  extra = table.shape[0] - cfg.vocab_size
  if table.ndim != 2 or table.shape[1] != cfg.width or extra not in (0, model.num_special):
    raise ValueError(
        f"tokens_embed.weight has shape {table.shape}; expected ({cfg.vocab_size}, "
        f"{cfg.width}) or, with the model's {model.num_special} special tokens, "
        f"({cfg.vocab_size + model.num_special}, {cfg.width}).")
  head = sd.pop("lm_head.weight", None)
  if head is not None and not np.array_equal(head, table):
    raise ValueError("lm_head.weight differs from tokens_embed.weight; the GPT output "
                     "layer must be tied to the token embedding.")
  backbone = {"tokens_embed": table[:cfg.vocab_size]}
  for key, path, shape in hf_layout(cfg):
    if key not in sd:
      raise ValueError(f"missing key {key} (is the checkpoint for depth={cfg.depth}, "
                       f"width={cfg.width}?).")
    value = sd.pop(key)
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(shape)}.")
    node = backbone
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  unknown = sorted(k for k, v in sd.items() if not _is_causal_buffer(k, v))
  if unknown:
    raise ValueError(f"unexpected key(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
                     f" (a checkpoint of a deeper model, or not openai-gpt?).")
  for path, value in jax.tree_util.tree_flatten_with_path(backbone)[0]:
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{jax.tree_util.keystr(path)} holds NaN or inf values.")
  if extra and not np.all(np.isfinite(table[cfg.vocab_size:])):
    raise ValueError("tokens_embed.weight: the special-token rows hold NaN or inf values.")
  backbone = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), backbone)
  return backbone, (np.asarray(table[cfg.vocab_size:], np.float32) if extra else None)


def load_hf_gpt(source: Union[str, os.PathLike, Mapping[str, Any]], model: GPT,
                downstream: Any = None, *, rng: Optional[jax.Array] = None
                ) -> Tuple[PyTree, PyTree]:
  """Full ``(params, batch_stats)`` for ``model`` with the pretrained backbone.

  The downstream head (special rows unless the checkpoint has them, output layer) is
  ``downstream.init_head``'s, from the key ``model.init`` reserves for it (``rng``,
  default ``PRNGKey(0)``); without a ``downstream`` task it holds only the
  checkpoint's special rows, if any.
  """
  state_dict = source if isinstance(source, Mapping) else read_state_dict(source)
  backbone, special = hf_to_flax(state_dict, model)
  params = {"backbone": backbone, "pretext_head": {}}
  head = {} if downstream is None else downstream.init_head(
      model.head_rng(jax.random.PRNGKey(0) if rng is None else rng), params,
      {"backbone": {}, "pretext_head": {}})
  if special is not None:
    head["special_embeddings"] = special
  params["downstream_head"] = head
  return params, {"backbone": {}, "pretext_head": {}}
