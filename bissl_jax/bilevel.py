"""Static setup and explicit state of a BiSSL run (SPEC §1, §2).

:class:`BisslSetup` holds everything static: model, pretext task and hyperparameters,
frozen and hashable so jitted functions close over it. :class:`BilevelState` holds
everything that changes: both levels' parameters, statistics and optimizer states,
the step counters and the CG warm start.
"""
import dataclasses
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from bissl_jax import lam_variants
from bissl_jax import optim

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BisslSetup:
  """Everything static about a BiSSL run: model, pretext task and hyperparameters.

  Frozen and hashable, so jitted functions close over it. Build it from a config
  with :meth:`from_config`. Defaults are the paper's (SPEC §2).
  """
  model: Any
  task: Any
  image_size: int
  multilabel: bool = False
  lam: float = 1e-3
  damping: float = 10.0
  solver: str = "layerwise_cg"
  cg_iters: int = 5
  cg_tol: float = 0.0
  lower_steps: int = 20
  upper_steps: int = 8
  alternations: int = 500
  lower_lr: float = 1.0
  lower_weight_decay: float = 1e-6
  lower_momentum: float = 0.9
  trust_coefficient: float = 1e-3
  upper_lr: float = 0.03
  upper_weight_decay: float = 1e-3
  upper_momentum: float = 0.9
  grad_clip: float = optim.GRAD_CLIP_NORM
  hessian_mode: str = "linearize"
  warm_start: bool = False
  unroll: Optional[bool] = None
  # Thesis variants (SPEC §7), all off by default.
  lam_schedule: str = "none"
  lam_min: float = lam_variants.LAM_MIN
  lam_exp_alpha: float = 10.0
  learnable_lam: bool = False
  lam_damping: float = 0.0
  head_in_implicit: bool = False

  @classmethod
  def from_config(cls, model, task, cfg, *, image_size: int, multilabel: bool = False
                  ) -> "BisslSetup":
    """Builds a setup from ``config.bissl`` (an ml_collections ConfigDict or dict)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in ("model", "task", "image_size", "multilabel"):
        continue
      value = get(f.name, None)
      if value is None:
        continue
      # Config overrides arrive as whatever type the command line produced.
      kwargs[f.name] = type(f.default)(value) if f.default is not None else bool(value)
    return cls(model=model, task=task, image_size=int(image_size),
               multilabel=bool(multilabel), **kwargs)

  @property
  def use_unrolled(self) -> bool:
    if self.unroll is not None:
      return bool(self.unroll)
    return jax.default_backend() == "cpu"

  def lower_optimizer(self) -> optax.GradientTransformation:
    """Clip over (θ_P, φ_P) jointly, then LARS on the lower schedule."""
    schedule = optim.lower_lr_schedule(self.lower_lr, lower_steps=self.lower_steps,
                                       alternations=self.alternations)
    return optim.with_clipping(
        optim.lars(schedule, weight_decay=self.lower_weight_decay,
                   momentum=self.lower_momentum,
                   trust_coefficient=self.trust_coefficient), self.grad_clip)

  def upper_optimizer(self) -> optax.GradientTransformation:
    """Clip over (θ_D, φ_D) jointly, then SGD with coupled weight decay on a cosine."""
    schedule = optim.upper_lr_schedule(self.upper_lr, upper_steps=self.upper_steps,
                                       alternations=self.alternations)
    return optim.with_clipping(
        optim.sgd(schedule, momentum=self.upper_momentum,
                  weight_decay=self.upper_weight_decay), self.grad_clip)


class BilevelState(flax.struct.PyTreeNode):
  """The whole BiSSL state; everything needed to resume exactly.

  Attributes:
    lower_params: ``{'backbone': θ_P, 'pretext_head': φ_P}``.
    lower_stats: BatchNorm running statistics of the lower model.
    upper_params: ``{'backbone': θ_D, 'downstream_head': φ_D}`` plus ``'lam_rho'``
      (λ = softplus(ρ)) when λ is learnable.
    upper_stats: ``{'backbone': ...}`` running statistics of θ_D.
    target: BYOL's EMA target network, or None.
    lower_opt_state: optimizer state of the lower level.
    upper_opt_state: optimizer state of the upper level.
    lower_step: number of lower steps taken (drives the lower LR schedule).
    upper_step: number of upper steps taken.
    alternation: number of completed alternations (drives λ schedules).
    cg_solution: the last v_IG, the warm start of the next solve.
  """
  lower_params: PyTree
  lower_stats: PyTree
  upper_params: PyTree
  upper_stats: PyTree
  target: PyTree
  lower_opt_state: PyTree
  upper_opt_state: PyTree
  lower_step: jnp.ndarray
  upper_step: jnp.ndarray
  alternation: jnp.ndarray
  cg_solution: PyTree


class AlternationBatches(NamedTuple):
  """uint8 batches for one alternation (augmented on device).

  Attributes:
    pretext: ``(N_L, B, H, W, C)`` lower-level batches.
    hvp: ``(B, H, W, C)`` the pretext batch of the upper stage's Hessian.
    downstream_images: ``(N_U, b, H, W, C)``.
    downstream_labels: ``(N_U, b)`` int labels, or ``(N_U, b, K)`` multi-hot.
  """
  pretext: Any
  hvp: Any
  downstream_images: Any
  downstream_labels: Any


def init_bilevel_state(setup: BisslSetup, params: PyTree, batch_stats: PyTree
                       ) -> BilevelState:
  """θ_P = θ_D = the pretext backbone; φ_D the warmed-up head (Algorithm 1).

  Args:
    setup: the static setup.
    params: ``{'backbone', 'pretext_head', 'downstream_head'}`` after head warm-up.
    batch_stats: ``{'backbone', 'pretext_head'}``.

  Returns:
    A fresh :class:`BilevelState`; BYOL's target is re-copied from the online network.
  """
  backbone = params["backbone"]
  copy = lambda t: jax.tree_util.tree_map(jnp.array, t)
  lower_params = {"backbone": copy(backbone), "pretext_head": copy(params["pretext_head"])}
  lower_stats = copy(batch_stats)
  upper_params = {"backbone": copy(backbone), "downstream_head": copy(params["downstream_head"])}
  if setup.learnable_lam:
    upper_params["lam_rho"] = jnp.asarray(lam_variants.inverse_softplus(setup.lam), jnp.float32)
  upper_stats = {"backbone": copy(batch_stats["backbone"])}
  target = setup.task.init_target(lower_params, lower_stats) if setup.task.has_target else None
  return BilevelState(
      lower_params=lower_params, lower_stats=lower_stats,
      upper_params=upper_params, upper_stats=upper_stats, target=target,
      lower_opt_state=setup.lower_optimizer().init(lower_params),
      upper_opt_state=setup.upper_optimizer().init(upper_params),
      lower_step=jnp.zeros((), jnp.int32), upper_step=jnp.zeros((), jnp.int32),
      alternation=jnp.zeros((), jnp.int32),
      cg_solution=jax.tree_util.tree_map(jnp.zeros_like, backbone))


def current_lam(setup: BisslSetup, state: BilevelState) -> jnp.ndarray:
  """λ in force: learnable softplus(ρ), a schedule of the alternation, or the constant."""
  if setup.learnable_lam:
    return jax.nn.softplus(state.upper_params["lam_rho"])
  if setup.lam_schedule != "none":
    return lam_variants.scheduled_lam(setup.lam_schedule, state.alternation,
                                      lam_max=setup.lam, lam_min=setup.lam_min,
                                      alternations=setup.alternations,
                                      alpha=setup.lam_exp_alpha)
  return jnp.asarray(setup.lam, jnp.float32)
