"""Optimizers and learning-rate schedules used by BiSSL's two levels (BiSSL paper §4.2, Appendix B).

Both levels clip the global gradient norm to 10 before their optimizer. The lower
level uses LARS as in Bardes et al. (2022); the upper level and fine-tuning use SGD
with momentum and *coupled* weight decay (PyTorch semantics: the decay is added to
the gradient before momentum). Language configs (thesis ch. 7) use Adam with
decoupled weight decay on every level instead; :func:`by_name` builds any of them
from a config's optimizer name.
"""
from typing import Callable, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, Callable[[jnp.ndarray], jnp.ndarray]]

GRAD_CLIP_NORM = 10.0


def _is_matrix(params):
  # Bardes et al.'s LARS excludes biases and BatchNorm parameters (all 1-D) from
  # both weight decay and trust-ratio scaling.
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def lars(learning_rate: ScalarOrSchedule, *, weight_decay: float = 1e-6,
         momentum: float = 0.9, trust_coefficient: float = 1e-3
         ) -> optax.GradientTransformation:
  """LARS with 1-D parameters excluded from decay and trust-ratio scaling.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    weight_decay: decoupled-from-the-loss L2 coefficient added to the gradient.
    momentum: heavy-ball momentum.
    trust_coefficient: LARS trust coefficient η.

  Returns:
    An optax ``GradientTransformation``.
  """
  return optax.lars(learning_rate, weight_decay=weight_decay,
                    weight_decay_mask=_is_matrix,
                    trust_coefficient=trust_coefficient,
                    trust_ratio_mask=_is_matrix, momentum=momentum)


def adamw(learning_rate: ScalarOrSchedule, *, weight_decay: float = 0.0,
          b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
  """AdamW with decoupled weight decay on matrices only (no decay on 1-D leaves).

  The 1-D leaves are the biases and normalisation scales/offsets, which GPT
  (thesis §7.1.2) and BiSSLight exclude from weight decay; kernels and embedding
  tables (2-D) are decayed. The default β = (0.9, 0.95) is BiSSLight's.
  """
  return optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay,
                     mask=_is_matrix)


# The optimizer names a config may give (``pretext.optimizer``, ``head_warmup.optimizer``,
# ``bissl.lower_optimizer_name``, ``bissl.upper_optimizer_name``, ``finetune.optimizer``).
OPTIMIZERS = ("lars", "sgd", "adamw", "adam")


def by_name(name: str, learning_rate: ScalarOrSchedule, *, weight_decay: float,
            momentum: float = 0.9, trust_coefficient: float = 1e-3
            ) -> optax.GradientTransformation:
  """The optimizer of :data:`OPTIMIZERS` called ``name``.

  * ``'lars'``: :func:`lars` (the paper's pretext and lower level);
  * ``'sgd'``: :func:`sgd`, coupled weight decay (the paper's upper level and
    fine-tuning);
  * ``'adamw'``: :func:`adamw` with β = (0.9, 0.95) (BiSSLight's lower level);
  * ``'adam'``: :func:`adamw` with Adam's β = (0.9, 0.999), as the original GPT is
    pretrained and fine-tuned (thesis §7.1.2): decoupled weight decay on kernels
    and embeddings, none on biases and LayerNorm parameters.

  ``momentum`` is used by LARS and SGD, ``trust_coefficient`` by LARS only.
  """
  if name == "lars":
    return lars(learning_rate, weight_decay=weight_decay, momentum=momentum,
                trust_coefficient=trust_coefficient)
  if name == "sgd":
    return sgd(learning_rate, momentum=momentum, weight_decay=weight_decay)
  if name == "adamw":
    return adamw(learning_rate, weight_decay=weight_decay)
  if name == "adam":
    return adamw(learning_rate, weight_decay=weight_decay, b1=0.9, b2=0.999)
  raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def sgd(learning_rate: ScalarOrSchedule, *, momentum: float = 0.9,
        weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (``g + wd·p`` before momentum).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    momentum: heavy-ball momentum (PyTorch convention, no dampening).
    weight_decay: L2 coefficient added to every gradient leaf.

  Returns:
    An optax ``GradientTransformation``.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))


def with_clipping(tx: optax.GradientTransformation,
                  max_norm: float = GRAD_CLIP_NORM) -> optax.GradientTransformation:
  """Clips the global norm of the whole gradient tree before ``tx``."""
  return optax.chain(optax.clip_by_global_norm(max_norm), tx)


def lower_lr_schedule(base_lr: float, *, lower_steps: int, alternations: int,
                      warmup_factor: int = 10, final_ratio: float = 1e-3
                      ) -> optax.Schedule:
  """BiSSL lower-level LR: linear warm-up over ``10·N_L`` steps, then cosine.

  The cosine ends at ``final_ratio·base_lr`` after ``T·N_L`` steps in total. Step 0
  takes the schedule's own step-0 value (0 at the start of the warm-up); the
  reference implementation ran its first step at the full LR, which was a bug.

  Args:
    base_lr: peak learning rate.
    lower_steps: N_L, lower steps per alternation.
    alternations: T, the number of alternations.
    warmup_factor: the warm-up lasts ``warmup_factor·N_L`` steps.
    final_ratio: final LR as a fraction of ``base_lr``.

  Returns:
    A schedule of the lower-level step count.
  """
  total = max(lower_steps * alternations, 1)
  warmup = min(warmup_factor * lower_steps, total)
  return warmup_cosine_schedule(base_lr, warmup_steps=warmup, total_steps=total,
                                final_ratio=final_ratio)


def upper_lr_schedule(base_lr: float, *, upper_steps: int, alternations: int,
                      final_ratio: float = 1e-3) -> optax.Schedule:
  """BiSSL upper-level LR: cosine from ``base_lr`` to ``final_ratio·base_lr`` over T·N_U steps, no warm-up."""
  return cosine_schedule(base_lr, total_steps=max(upper_steps * alternations, 1),
                         final_ratio=final_ratio)


def warmup_cosine_schedule(base_lr: float, *, warmup_steps: int, total_steps: int,
                           final_ratio: float = 1e-3) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then cosine to ``final_ratio·base_lr`` at ``total_steps``."""
  if warmup_steps <= 0:
    return cosine_schedule(base_lr, total_steps=total_steps, final_ratio=final_ratio)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=final_ratio * base_lr)


def cosine_schedule(base_lr: float, *, total_steps: int, final_ratio: float = 1e-3
                    ) -> optax.Schedule:
  """Cosine decay from ``base_lr`` to ``final_ratio·base_lr`` over ``total_steps``."""
  return optax.cosine_decay_schedule(base_lr, decay_steps=max(total_steps, 1),
                                     alpha=final_ratio)
