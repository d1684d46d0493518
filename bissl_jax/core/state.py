"""Static setup and explicit state of a BiSSL run (BiSSL paper §3.2, Algorithm 1).

:class:`BisslSetup` holds everything static: model, pretext and downstream tasks and
hyperparameters, frozen and hashable so jitted functions close over it. It has no
defaults of its own: the configs (``configs/common.py``) are the one source of
defaults, and :meth:`BisslSetup.from_config` requires every field.

:class:`BilevelState` holds everything that changes: one :class:`LevelState` per
level, BYOL's target, the alternation counter and the solver's state.
"""
import dataclasses
from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from bissl_jax.core import hessian
from bissl_jax.core import lam_schedules
from bissl_jax.implicit import solvers
from bissl_jax.core import optim
from bissl_jax.core import partition
from bissl_jax.core import protocols
from bissl_jax.core.residual import ResidualPolicy
from bissl_jax.types import PyTree


STAGE_DRIVERS = ("auto", "fused", "per_step")
LOWER_OPTIMIZERS = optim.OPTIMIZERS
UPPER_OPTIMIZERS = optim.OPTIMIZERS
# How the upper stage forms H (bissl_jax.core.hessian, the one builder).
HESSIAN_MODES = hessian.HESSIAN_MODES
NO_PRECONDITIONER = "none"
# How the upper level forms its hypergradient: the implicit-gradient solve, or the
# first-order penalty method (bissl_jax.core.penalty, docs/solvers.md).
UPPER_METHODS = ("implicit", "penalty")


def preconditioner_names() -> tuple:
  """``config.bissl.preconditioner`` values: ``'none'``, a gradient-window solver or a
  curvature-model solver.

  Either applies the inverse of its curvature model, ``(I + F/(λ+δ))⁻¹`` (M-FAC's
  ``window_solve``, K-FAC's ``curvature_solve``): symmetric positive definite and
  ≈ ``A⁻¹``, so it preconditions a solver that declares ``preconditionable``.
  """
  return (NO_PRECONDITIONER,) + tuple(
      name for name in solvers.names()
      if solvers.get(name).keeps_gradient_window or solvers.get(name).is_curvature_model)


@dataclasses.dataclass(frozen=True)
class BisslSetup:
  """Everything static about a BiSSL run (see ``configs/common.py`` for each field).

  Build it from ``config.bissl`` with :meth:`from_config`.
  """
  model: Any
  task: Any            # protocols.PretextTask
  downstream: Any      # protocols.DownstreamTask
  lam: float
  damping: float
  solver: str
  cg_iters: int
  cg_tol: float
  lower_steps: int
  upper_steps: int
  alternations: int
  lower_optimizer_name: str
  lower_lr: float
  lower_weight_decay: float
  lower_momentum: float
  trust_coefficient: float
  upper_optimizer_name: str
  upper_lr: float
  upper_weight_decay: float
  upper_momentum: float
  grad_clip: float
  hessian_mode: str
  warm_start: bool
  unroll: Optional[bool]
  stage_driver: str
  lam_schedule: str
  lam_min: float
  lam_exp_alpha: float
  learnable_lam: bool
  lam_damping: float
  head_in_implicit: bool
  residual_guard: bool
  residual_every: int
  mfac_history: Optional[int]
  mfac_blocks: str
  mfac_dtype: str
  preconditioner: str
  upper_method: str
  penalty_sigma: float
  penalty_inner_steps: int
  penalty_lr: float
  penalty_momentum: float

  def __post_init__(self):
    solvers.get(self.solver)  # a ValueError naming the registered solvers
    if self.upper_method not in UPPER_METHODS:
      raise ValueError(f"config.bissl.upper_method={self.upper_method!r}: use one of "
                       f"{UPPER_METHODS}.")
    if self.solver_spec.needs_operator and self.upper_method == "implicit":
      hessian.check_hessian_mode(self.task, self.hessian_mode)
    problems = combination_problems({name: getattr(self, name) for name in self.field_names()})
    if problems:
      raise ValueError(" ".join(problems))

  @property
  def solver_spec(self) -> "solvers.SolverSpec":
    """What the solver declares it can do and needs (:mod:`bissl_jax.implicit.solvers`)."""
    return solvers.get(self.solver)

  @property
  def window_spec(self) -> Optional["solvers.SolverSpec"]:
    """The solver whose gradient window the lower steps fill: the solver itself
    (M-FAC), the preconditioner's (``preconditioner='mfac'``), or None."""
    if self.solver_spec.keeps_gradient_window:
      return self.solver_spec
    if self.preconditioner_spec is not None and self.preconditioner_spec.keeps_gradient_window:
      return self.preconditioner_spec
    return None

  @property
  def preconditioner_spec(self) -> Optional["solvers.SolverSpec"]:
    """The solver whose curvature model preconditions the upper solve, or None."""
    if self.preconditioner == NO_PRECONDITIONER:
      return None
    return solvers.get(self.preconditioner)

  @property
  def residual_policy(self) -> ResidualPolicy:
    """When the upper step computes its solve's residual (one more product); never
    with ``upper_method='penalty'``, which solves no system."""
    if self.upper_method == "penalty":
      return ResidualPolicy(every=0, guard=False, free=False)
    return ResidualPolicy(every=self.residual_every, guard=self.residual_guard,
                          free=self.solver_spec.residual_is_free)

  @property
  def mfac_window_length(self) -> int:
    """m, the stored pretext gradients (default N_L, BiSSLight's choice)."""
    return int(self.mfac_history or self.lower_steps)

  @classmethod
  def field_names(cls):
    """The names :meth:`from_config` reads from ``config.bissl``."""
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.name not in ("model", "task", "downstream"))

  @classmethod
  def from_config(cls, model, task, cfg, *, downstream) -> "BisslSetup":
    """Builds a setup from a resolved ``config.bissl`` (ConfigDict or dict).

    Raises:
      ValueError: naming every field the config lacks.
    """
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    missing = [name for name in cls.field_names() if name not in values]
    if missing:
      raise ValueError(f"config.bissl lacks {missing}; start from configs/common.py:"
                       f"base_config(), which holds every default.")
    unset = [f.name for f in dataclasses.fields(cls) if f.name in values
             and values[f.name] is None and f.type not in (Optional[bool], Optional[int])]
    if unset:
      raise ValueError(f"config.bissl fields {unset} are unset (None); resolve them first "
                       f"(bissl_jax.config_validation.validate_config does).")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in ("model", "task", "downstream"):
        continue
      value = values[f.name]
      # Command-line overrides arrive as whatever type the parser produced.
      kwargs[f.name] = value if value is None or f.type is Any else _coerce(f.type, value)
    return cls(model=model, task=task, downstream=downstream, **kwargs)

  @property
  def use_unrolled(self) -> bool:
    """Loops inside one jit are unrolled (the XLA:CPU loop cliff) unless set otherwise."""
    if self.unroll is not None:
      return bool(self.unroll)
    return jax.default_backend() == "cpu"

  @property
  def per_step(self) -> bool:
    """One jit per lower/upper step driven from the host, rather than one per stage.

    On CPU the unrolled stage in one jit compiles super-linearly in N_U
    (docs/benchmarks.md), so ``'auto'`` drives steps from the host there.
    """
    if self.stage_driver == "auto":
      return jax.default_backend() == "cpu"
    return self.stage_driver == "per_step"

  def lower_trainable(self, params: PyTree) -> PyTree:
    """The lower level's trainable mask over ``{'backbone', 'pretext_head'}``."""
    return protocols.trainable_mask(self.model, params)

  def upper_trainable(self, params: PyTree) -> PyTree:
    """The upper level's mask; ``lam_rho`` always trains."""
    groups = {k: v for k, v in params.items() if k != "lam_rho"}
    mask = dict(protocols.trainable_mask(self.model, groups))
    if "lam_rho" in params:
      mask["lam_rho"] = True
    return mask

  def lower_optimizer(self, params: PyTree) -> optax.GradientTransformation:
    """Clip over the trainable (θ_P, φ_P) jointly, then LARS (or AdamW) on the lower schedule.

    AdamW (``lower_optimizer_name='adamw'``, BiSSLight's choice for LoRA) matters for
    zero-initialised adapters: LARS scales each step by ‖B‖, so it hardly moves a
    LoRA B that starts at 0.
    """
    schedule = optim.lower_lr_schedule(self.lower_lr, lower_steps=self.lower_steps,
                                       alternations=self.alternations)
    tx_lower = optim.by_name(self.lower_optimizer_name, schedule,
                             weight_decay=self.lower_weight_decay,
                             momentum=self.lower_momentum,
                             trust_coefficient=self.trust_coefficient)
    tx = partition.level_optimizer({g: tx_lower for g in params}, params,
                                   self.lower_trainable(params))
    return optim.with_clipping(tx, self.grad_clip)

  def upper_optimizer(self, params: PyTree) -> optax.GradientTransformation:
    """Clip over the trainable (θ_D, φ_D[, ρ]) jointly, then SGD with coupled weight decay.

    (``upper_optimizer_name='adam'``: Adam, as the language configs' upper level.)
    """
    schedule = optim.upper_lr_schedule(self.upper_lr, upper_steps=self.upper_steps,
                                       alternations=self.alternations)
    tx_upper = optim.by_name(self.upper_optimizer_name, schedule,
                             weight_decay=self.upper_weight_decay,
                             momentum=self.upper_momentum)
    tx = partition.level_optimizer({g: tx_upper for g in params}, params,
                                   self.upper_trainable(params))
    return optim.with_clipping(tx, self.grad_clip)

  def penalty_optimizer(self) -> optax.GradientTransformation:
    """The penalty method's z steps: clip to ``grad_clip``, then SGD (with momentum)."""
    momentum = self.penalty_momentum or None
    return optim.with_clipping(optax.sgd(self.penalty_lr, momentum=momentum), self.grad_clip)


def _solvers_that(capability: str) -> tuple:
  """The registered solvers that declare ``capability`` (for messages)."""
  return tuple(name for name in solvers.names() if getattr(solvers.get(name), capability))


def combination_problems(bissl: dict) -> list:
  """Messages for ``config.bissl`` values that are valid alone but not together.

  Each would otherwise fail deep inside a traced step, or be silently ignored.
  Config validation reports them before any compute; :class:`BisslSetup` refuses them.
  """
  problems = []
  solver = bissl.get("solver")
  spec = solvers.REGISTRY.get(solver)
  if spec is None:
    return problems  # an unknown name is reported by the field's own check
  if not spec.solves_head and bissl.get("head_in_implicit"):
    problems.append(f"config.bissl.solver={solver!r} solves over θ only; it cannot "
                    "solve over [θ; φ_P]: set config.bissl.head_in_implicit=False.")
  if bissl.get("warm_start") and not spec.warm_start:
    problems.append(f"config.bissl.warm_start=True has no effect with solver={solver!r}; "
                    f"use one of {_solvers_that('warm_start')} or set it False.")
  if bissl.get("cg_tol") and not spec.tolerance:
    problems.append(f"config.bissl.cg_tol={bissl.get('cg_tol')} needs a solver with a "
                    f"tolerance mode {_solvers_that('tolerance')}; {solver!r} runs exactly "
                    f"cg_iters iterations: set config.bissl.cg_tol=0.")
  problems.extend(_preconditioner_problems(bissl, solver, spec))
  problems.extend(_penalty_problems(bissl, spec))
  lam, damping = bissl.get("lam"), bissl.get("damping")
  if (isinstance(lam, (int, float)) and isinstance(damping, (int, float))
      and not bissl.get("learnable_lam") and lam + damping <= 0):
    problems.append("config.bissl.lam + config.bissl.damping must be > 0: the operator "
                    "I + H/(λ+δ) is undefined at λ = δ = 0. Set a positive λ or δ.")
  return problems


def _preconditioner_problems(bissl: dict, solver: str, spec) -> list:
  preconditioner = bissl.get("preconditioner", NO_PRECONDITIONER)
  if preconditioner == NO_PRECONDITIONER or preconditioner not in preconditioner_names():
    return []  # an unknown name is reported by the field's own check
  if not spec.preconditionable:
    return [f"config.bissl.preconditioner={preconditioner!r} needs a solver that takes a "
            f"preconditioner {_solvers_that('preconditionable')}; solver={solver!r} does "
            f"not: set config.bissl.solver to one of them or config.bissl.preconditioner="
            f"{NO_PRECONDITIONER!r}."]
  if bissl.get("head_in_implicit"):
    return [f"config.bissl.preconditioner={preconditioner!r} preconditions θ only; it "
            "cannot precondition a solve over [θ; φ_P]: set config.bissl.head_in_implicit="
            f"False or config.bissl.preconditioner={NO_PRECONDITIONER!r}."]
  return []


def _penalty_problems(bissl: dict, spec) -> list:
  """The penalty method's z runs over θ alone and forms no solve: settings that would
  cost lower-level work for nothing, or ask for what it does not do, are refused."""
  if bissl.get("upper_method") != "penalty":
    return []
  fix = "or set config.bissl.upper_method='implicit'."
  problems = []
  if bissl.get("head_in_implicit"):
    problems.append("config.bissl.upper_method='penalty' runs its second sequence z over θ "
                    f"only: set config.bissl.head_in_implicit=False {fix}")
  if spec.keeps_gradient_window or bissl.get("preconditioner", NO_PRECONDITIONER) != \
      NO_PRECONDITIONER:
    problems.append("config.bissl.upper_method='penalty' solves no system, so the gradient "
                    "window that config.bissl.solver/preconditioner makes the lower steps "
                    "fill is unused: set a solver without one (e.g. 'cg') and "
                    f"config.bissl.preconditioner={NO_PRECONDITIONER!r}, {fix}")
  if bissl.get("residual_guard"):
    problems.append("config.bissl.residual_guard=True guards a solve's residual; "
                    "upper_method='penalty' has none: set config.bissl.residual_guard=False, "
                    f"{fix}")
  return problems


def _coerce(kind, value):
  if kind in ("bool", bool):
    return bool(value)
  if kind in ("int", int):
    return int(value)
  if kind in ("float", float):
    return float(value)
  if kind in ("str", str):
    return str(value)
  return value  # Optional[...]: already the parsed value


class LevelState(flax.struct.PyTreeNode):
  """One level's (or one training stage's) trainable state.

  Attributes:
    params: the parameter groups of the level.
    batch_stats: BatchNorm running statistics (may be empty dicts).
    opt_state: the level optimizer's state.
    step: optimizer steps taken (drives the LR schedule).
  """
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  step: jnp.ndarray


class SolverState(flax.struct.PyTreeNode):
  """What the implicit-gradient solver carries across steps and alternations.

  Attributes:
    warm_start: the last v_IG (the next solve's start with ``warm_start``), shaped
      like θ's trainable part.
    gradient_window: a gradient-window solver's store (M-FAC: the last m gradients of
      L_P over θ's trainable part, a :class:`bissl_jax.implicit.solvers.mfac.GradientWindow`, rolling across
      alternations, filled by the lower steps), kept for the solver or for the
      preconditioner (``BisslSetup.window_spec``); None otherwise.
  """
  warm_start: PyTree
  gradient_window: PyTree = None


class BilevelState(flax.struct.PyTreeNode):
  """The whole BiSSL state; everything needed to resume exactly.

  Attributes:
    lower: ``params = {'backbone': θ_P, 'pretext_head': φ_P}`` with their statistics.
    upper: ``params = {'backbone': θ_D, 'downstream_head': φ_D}`` plus ``'lam_rho'``
      when λ is learnable; ``batch_stats = {'backbone'}``.
    target: BYOL's EMA target network, or None.
    alternation: completed alternations (drives λ schedules).
    solver_state: a :class:`SolverState`.
  """
  lower: LevelState
  upper: LevelState
  target: PyTree
  alternation: jnp.ndarray
  solver_state: SolverState


class PenaltyState(NamedTuple):
  """The penalty method's second lower-level sequence (:mod:`bissl_jax.core.penalty`).

  Attributes:
    z: the iterate of the penalised lower problem, shaped like θ's trainable part.
    opt_state: its optimizer's state (:meth:`BisslSetup.penalty_optimizer`).
  """
  z: PyTree
  opt_state: PyTree


class PenaltyBilevelState(BilevelState):
  """A :class:`BilevelState` with the penalty method's :class:`PenaltyState`.

  A subclass rather than a field of :class:`BilevelState`, so that the
  implicit-gradient state (and every checkpoint of it) keeps its structure.
  """
  penalty: PenaltyState = None


class AlternationBatches(NamedTuple):
  """Raw batches for one alternation (augmented on device).

  Attributes:
    pretext: ``(N_L, B, ...)`` lower-level batches.
    hvp: ``(B, ...)`` the pretext batch of the upper stage's Hessian.
    downstream_images: ``(N_U, b, ...)``.
    downstream_labels: ``(N_U, b)`` int labels, ``(N_U, b, K)`` multi-hot, or a tree
      of ``(N_U, b, ...)`` arrays (detection: boxes, classes, valid).
  """
  pretext: Any
  hvp: Any
  downstream_images: Any
  downstream_labels: Any


def _copy(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(jnp.array, tree)


def init_level(params: PyTree, batch_stats: PyTree, tx: optax.GradientTransformation
               ) -> LevelState:
  """A :class:`LevelState` with fresh buffers and a new optimizer state."""
  params = _copy(params)
  return LevelState(params=params, batch_stats=_copy(batch_stats), opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32))


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
  lower_params = {"backbone": params["backbone"], "pretext_head": params["pretext_head"]}
  upper_params = {"backbone": params["backbone"], "downstream_head": params["downstream_head"]}
  if setup.learnable_lam:
    upper_params["lam_rho"] = jnp.asarray(lam_schedules.inverse_softplus(setup.lam), jnp.float32)
  lower = init_level(lower_params, batch_stats, setup.lower_optimizer(lower_params))
  upper = init_level(upper_params, {"backbone": batch_stats["backbone"]},
                     setup.upper_optimizer(upper_params))
  target = (setup.task.init_target(lower.params, lower.batch_stats)
            if setup.task.has_target else None)
  theta_train, _ = partition.split(lower.params["backbone"],
                                   setup.lower_trainable(lower.params)["backbone"])
  warm = jax.tree_util.tree_map(jnp.zeros_like, theta_train)
  window = None
  if setup.window_spec is not None:
    window = setup.window_spec.window_init(theta_train, setup)
  state = BilevelState(lower=lower, upper=upper, target=target,
                       alternation=jnp.zeros((), jnp.int32),
                       solver_state=SolverState(warm_start=warm, gradient_window=window))
  if setup.upper_method != "penalty":
    return state
  z = _copy(theta_train)  # z starts at θ_P: the two sequences start together
  return PenaltyBilevelState(**{f.name: getattr(state, f.name)
                                for f in dataclasses.fields(BilevelState)},
                             penalty=PenaltyState(z, setup.penalty_optimizer().init(z)))


def current_lam(setup: BisslSetup, state: BilevelState) -> jnp.ndarray:
  """λ in force: learnable softplus(ρ), a schedule of the alternation, or the constant."""
  if setup.learnable_lam:
    return jax.nn.softplus(state.upper.params["lam_rho"])
  if setup.lam_schedule != "none":
    return lam_schedules.scheduled_lam(setup.lam_schedule, state.alternation,
                                      lam_max=setup.lam, lam_min=setup.lam_min,
                                      alternations=setup.alternations,
                                      alpha=setup.lam_exp_alpha)
  return jnp.asarray(setup.lam, jnp.float32)
