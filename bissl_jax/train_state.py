"""BiSSL training core: Algorithm 1 of the paper as pure, jit-compiled functions.

One *alternation* runs N_L lower steps, then one upper stage of N_U steps:

* lower step: pretext loss + ``lam/2·‖θ_P − sg(θ_D)‖²`` over (θ_P, φ_P), global-norm
  clip 10, LARS, BYOL EMA, running statistics of the lower model;
* upper stage: the Hessian operator of the pretext loss at (θ_P, φ_P) on one
  augmented HVP batch is built once with ``jax.linearize`` and reused by every CG
  iteration of every upper step (θ_P, φ_P and that batch are fixed for the stage).
  Each step solves ``v_IG ≈ (I + H/(λ+δ))⁻¹ ∇_θ L_D(θ_P, φ_D)``, forms
  ``g_θD = v_IG + ∇_θ L_D(θ_D, φ_D)`` and ``g_φD = ∇_φ L_D(θ_P, φ_D) + ∇_φ L_D(θ_D, φ_D)``,
  clips to norm 10 and applies SGD with momentum and coupled weight decay.

Every function takes a static :class:`BisslSetup` first; bind it with
``functools.partial`` to get the ``(state, batch, rng)`` signatures. The step
functions are written for the global batch; :func:`make_alternation_fn` places the
batch over a 1-D device mesh so the same code runs data-parallel on every device.

XLA:CPU runs convolution gradients ~40× slower inside loop bodies (SPEC §3), so on
CPU the N_U upper steps and the CG iterations are unrolled Python loops under one
jit, and the N_L lower steps are a Python loop of one jitted step. Elsewhere they
are ``lax.scan`` loops, which compile once regardless of N.
"""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bissl_jax import augment
from bissl_jax import implicit
from bissl_jax import lam_variants
from bissl_jax import optim
from bissl_jax import parallel
from bissl_jax import tree_math

PyTree = Any


class NonFiniteError(FloatingPointError):
  """A loss, gradient or CG solution of BiSSL became NaN or infinite."""


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


# ----------------------------------------------------------------------------- lower level

def lower_objective(setup: BisslSetup, lower_params, lower_stats, target, theta_d, views, lam):
  """Pretext loss + ``lam/2·‖θ_P − sg(θ_D)‖²`` over every trainable backbone leaf.

  Returns:
    ``(total, (pretext_loss, prox, aux))``.
  """
  loss, aux = setup.task.loss(lower_params, lower_stats, views, target)
  gap = tree_math.tree_sub(lower_params["backbone"], jax.lax.stop_gradient(theta_d))
  prox = 0.5 * lam * tree_math.tree_vdot(gap, gap)
  return loss + prox, (loss, prox, aux)


def lower_step(setup: BisslSetup, state: BilevelState, pretext_images, rng
               ) -> Tuple[BilevelState, dict]:
  """One lower-level step (Algorithm 1, lower loop body).

  Args:
    setup: the static setup.
    state: the current state.
    pretext_images: ``(B, H, W, C)`` uint8 pretext batch.
    rng: PRNG key for the augmentation.

  Returns:
    ``(new_state, metrics)`` with the pretext loss, the proximal term, the gradient
    norm and a non-finite flag.
  """
  views = augment.pretext_views(rng, pretext_images, size=setup.image_size)
  lam = current_lam(setup, state)
  grad_fn = jax.value_and_grad(functools.partial(lower_objective, setup), has_aux=True)
  (_, (loss, prox, aux)), grads = grad_fn(state.lower_params, state.lower_stats, state.target,
                                          state.upper_params["backbone"], views, lam)
  tx = setup.lower_optimizer()
  updates, opt_state = tx.update(grads, state.lower_opt_state, state.lower_params)
  params = optax.apply_updates(state.lower_params, updates)
  stats = aux["batch_stats"]
  target = state.target
  if setup.task.has_target:
    target = setup.task.update_target(target, params, stats)
  grad_norm = optax.global_norm(grads)
  metrics = {"lower_loss": loss, "lower_prox": prox, "lower_grad_norm": grad_norm,
             "lower_nonfinite": ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))}
  new_state = state.replace(lower_params=params, lower_stats=stats, target=target,
                            lower_opt_state=opt_state, lower_step=state.lower_step + 1)
  return new_state, metrics


def lower_stage(setup: BisslSetup, state: BilevelState, pretext_images, rng
                ) -> Tuple[BilevelState, dict]:
  """N_L lower steps as one ``lax.scan`` (the non-CPU path; one compile for any N_L).

  Returns:
    ``(state, metrics)`` with per-step metric arrays of length N_L.
  """
  rngs = jax.random.split(rng, pretext_images.shape[0])

  def body(carry, xs):
    images, key = xs
    return lower_step(setup, carry, images, key)

  return jax.lax.scan(body, state, (pretext_images, rngs))


# ----------------------------------------------------------------------------- upper level

def downstream_loss(setup: BisslSetup, backbone_params, head_params, backbone_stats,
                    images, labels):
  """Training-mode downstream loss L_D: softmax cross-entropy, or sigmoid BCE for multi-label.

  Returns:
    ``(loss, new_backbone_stats)``.
  """
  feats, new_stats = setup.model.features(backbone_params, backbone_stats, images, train=True)
  logits = setup.model.classify(head_params, feats)
  if setup.multilabel:
    loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, new_stats


def build_hessian_operator(setup: BisslSetup, state: BilevelState, hvp_images, rng):
  """The damped operator ``v ↦ v + H v/(λ+δ)`` of the pretext loss at (θ_P, φ_P).

  Built once per upper stage (``jax.linearize`` in 'linearize' mode). BatchNorm runs
  in training mode on batch statistics; running statistics are not touched.
  With ``head_in_implicit`` the operator acts on ``{'backbone', 'pretext_head'}`` as
  ``blockdiag(I, 0) + H_[θ;φ_P]/(λ+δ)``.

  Returns:
    ``(matvec, lam)``.
  """
  views = augment.pretext_views(rng, hvp_images, size=setup.image_size)
  lam = current_lam(setup, state)
  lp, stats, target = state.lower_params, state.lower_stats, state.target
  if setup.head_in_implicit:
    def loss_fn(theta_phi):
      return setup.task.loss(theta_phi, stats, views, target)[0]
    hess = implicit.hessian_operator(loss_fn, lp, mode=setup.hessian_mode)
    scale = 1.0 / (lam + setup.damping)

    def matvec(v):
      hv = hess(v)
      return {"backbone": tree_math.tree_axpy(scale, hv["backbone"], v["backbone"]),
              "pretext_head": tree_math.tree_scale(hv["pretext_head"], scale)}
    return matvec, lam

  phi_p = lp["pretext_head"]

  def loss_fn(theta):
    return setup.task.loss({"backbone": theta, "pretext_head": phi_p}, stats, views, target)[0]
  hess = implicit.hessian_operator(loss_fn, lp["backbone"], mode=setup.hessian_mode)
  return implicit.damped_operator(hess, lam=lam, damping=setup.damping), lam


def upper_step(setup: BisslSetup, state: BilevelState, matvec, lam, images, labels, rng
               ) -> Tuple[BilevelState, dict]:
  """One upper-level step against a prebuilt Hessian operator (Algorithm 1, upper loop body).

  Args:
    setup: the static setup.
    state: the current state.
    matvec: the damped operator from :func:`build_hessian_operator`.
    lam: λ in force for this stage.
    images: ``(b, H, W, C)`` uint8 downstream batch.
    labels: its labels.
    rng: PRNG key for the downstream augmentation.

  Returns:
    ``(new_state, metrics)``.
  """
  x = augment.downstream_train_view(rng, images, size=setup.image_size)
  theta_p, theta_d = state.lower_params["backbone"], state.upper_params["backbone"]
  phi_d = state.upper_params["downstream_head"]
  loss_and_grad = jax.value_and_grad(functools.partial(downstream_loss, setup),
                                     argnums=(0, 1), has_aux=True)
  # Both terms use the same batch. θ_P's running statistics are left alone: only
  # real pretext steps may change them.
  (loss_p, _), (v, gphi_p) = loss_and_grad(theta_p, phi_d, state.lower_stats["backbone"], x, labels)
  (loss_d, stats_d), (gtheta_d, gphi_d) = loss_and_grad(theta_d, phi_d,
                                                         state.upper_stats["backbone"], x, labels)

  if setup.head_in_implicit:
    rhs = {"backbone": v, "pretext_head": jax.tree_util.tree_map(
        jnp.zeros_like, state.lower_params["pretext_head"])}
    init = {"backbone": state.cg_solution, "pretext_head": rhs["pretext_head"]}
    sol, info = implicit.solve(matvec, rhs, **_solver_kwargs(setup, init))
    v_ig = sol["backbone"]
  else:
    v_ig, info = implicit.solve(matvec, v, **_solver_kwargs(setup, state.cg_solution))

  grads = {"backbone": tree_math.tree_add(v_ig, gtheta_d),
           "downstream_head": tree_math.tree_add(gphi_p, gphi_d)}
  if setup.learnable_lam:
    grads["lam_rho"] = lam_variants.rho_gradient(
        state.upper_params["lam_rho"], theta_d, theta_p, v_ig, lam_damping=setup.lam_damping)
  tx = setup.upper_optimizer()
  updates, opt_state = tx.update(grads, state.upper_opt_state, state.upper_params)
  params = optax.apply_updates(state.upper_params, updates)
  grad_norm = optax.global_norm(grads)
  metrics = {
      "upper_loss": loss_p + loss_d, "upper_loss_theta_p": loss_p, "upper_loss_theta_d": loss_d,
      "upper_grad_norm": grad_norm, "v_norm": tree_math.tree_norm(v),
      "v_ig_norm": tree_math.tree_norm(v_ig), "lam": lam,
      "cg_residual": info.residual, "cg_min_curvature": info.min_curvature,
      "cg_iterations": info.iterations,
      "upper_nonfinite": info.nonfinite | ~(jnp.isfinite(loss_p + loss_d) & jnp.isfinite(grad_norm)),
  }
  new_state = state.replace(upper_params=params, upper_stats={"backbone": stats_d},
                            upper_opt_state=opt_state, upper_step=state.upper_step + 1,
                            cg_solution=v_ig)
  return new_state, metrics


def _solver_kwargs(setup, init):
  kwargs = dict(solver=setup.solver, maxiter=setup.cg_iters, tol=setup.cg_tol,
                unroll=setup.use_unrolled)
  if setup.warm_start and setup.solver == "cg":
    kwargs["init"] = init
  return kwargs


def upper_stage(setup: BisslSetup, state: BilevelState, hvp_images, downstream_images,
                downstream_labels, rng) -> Tuple[BilevelState, dict]:
  """N_U upper steps sharing one Hessian operator (built once here).

  Args:
    setup: the static setup.
    state: the current state.
    hvp_images: ``(B, H, W, C)`` uint8 pretext batch for the Hessian, augmented once.
    downstream_images: ``(N_U, b, H, W, C)`` uint8.
    downstream_labels: ``(N_U, b)`` or ``(N_U, b, K)``.
    rng: PRNG key.

  Returns:
    ``(state, metrics)`` with per-step metric arrays of length N_U.
  """
  hvp_rng, step_rng = jax.random.split(rng)
  matvec, lam = build_hessian_operator(setup, state, hvp_images, hvp_rng)
  n = downstream_images.shape[0]
  rngs = jax.random.split(step_rng, n)
  if setup.use_unrolled:
    per_step = []
    for i in range(n):
      state, m = upper_step(setup, state, matvec, lam, downstream_images[i],
                            downstream_labels[i], rngs[i])
      per_step.append(m)
    metrics = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)
  else:
    def body(carry, xs):
      images, labels, key = xs
      return upper_step(setup, carry, matvec, lam, images, labels, key)
    state, metrics = jax.lax.scan(body, state, (downstream_images, downstream_labels, rngs))
  return state, metrics


# ----------------------------------------------------------------------------- alternation

def summarize_metrics(lower: dict, upper: dict, state: BilevelState) -> dict:
  """Reduces per-step metrics of one alternation to scalars (still on device)."""
  out = {k: jnp.mean(v) for k, v in lower.items() if k != "lower_nonfinite"}
  out.update({k: jnp.mean(v) for k, v in upper.items()
              if k not in ("upper_nonfinite", "cg_min_curvature", "lam")})
  out["cg_residual_last"] = upper["cg_residual"][-1]
  out["cg_min_curvature"] = jnp.min(upper["cg_min_curvature"])
  out["lam"] = upper["lam"][-1]
  out["lower_nonfinite"] = jnp.any(lower["lower_nonfinite"])
  out["upper_nonfinite"] = jnp.any(upper["upper_nonfinite"])
  gap = tree_math.tree_sub(state.lower_params["backbone"], state.upper_params["backbone"])
  out["theta_distance"] = tree_math.tree_norm(gap)
  return out


def make_alternation_fn(setup: BisslSetup, mesh=None, *, donate: bool = False) -> Callable:
  """Returns ``alternation(state, batches, rng) -> (state, metrics)``, data-parallel.

  The returned function compiles on its first call only: later alternations reuse
  the executables (inputs keep their shapes and shardings). The batch is split
  over the ``'data'`` axis of ``mesh`` (default: every device); the state is
  replicated.

  Args:
    setup: the static setup.
    mesh: a 1-D mesh from :func:`bissl_jax.parallel.make_mesh`.
    donate: donate the input state's buffers (halves peak memory on accelerators;
      the caller must then not reuse the state it passed in).

  Returns:
    The alternation function. It also carries ``.lower_step``, ``.lower_stage``
    and ``.upper_stage``, the jitted pieces, for benchmarks.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  rep = parallel.replicated(mesh)
  batch0 = parallel.batch_sharding(mesh, 0)
  batch1 = parallel.batch_sharding(mesh, 1)
  donate_args = (0,) if donate else ()
  jit_lower_step = jax.jit(functools.partial(lower_step, setup),
                           in_shardings=(rep, batch0, rep), out_shardings=(rep, rep),
                           donate_argnums=donate_args)
  jit_lower_stage = jax.jit(functools.partial(lower_stage, setup),
                            in_shardings=(rep, batch1, rep), out_shardings=(rep, rep),
                            donate_argnums=donate_args)
  jit_upper_stage = jax.jit(functools.partial(upper_stage, setup),
                            in_shardings=(rep, batch0, batch1, batch1, rep),
                            out_shardings=(rep, rep), donate_argnums=donate_args)
  jit_summary = jax.jit(summarize_metrics, out_shardings=rep)

  def alternation(state: BilevelState, batches: AlternationBatches, rng):
    state = jax.device_put(state, rep)
    pretext = jax.device_put(batches.pretext, batch1)
    lower_rng, upper_rng = jax.random.split(rng)
    if setup.use_unrolled:
      per_step = []
      for i, key in enumerate(jax.random.split(lower_rng, pretext.shape[0])):
        state, m = jit_lower_step(state, pretext[i], key)
        per_step.append(m)
      lower_metrics = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)
    else:
      state, lower_metrics = jit_lower_stage(state, pretext, lower_rng)
    state, upper_metrics = jit_upper_stage(
        state, jax.device_put(batches.hvp, batch0),
        jax.device_put(batches.downstream_images, batch1),
        jax.device_put(batches.downstream_labels, batch1), upper_rng)
    state = state.replace(alternation=state.alternation + 1)
    return state, jit_summary(lower_metrics, upper_metrics, state)

  alternation.lower_step = jit_lower_step
  alternation.lower_stage = jit_lower_stage
  alternation.upper_stage = jit_upper_stage
  alternation.mesh = mesh
  return alternation


def raise_if_nonfinite(metrics: dict, alternation: int) -> None:
  """Raises :class:`NonFiniteError` naming the alternation and level if a flag is set.

  Call before checkpointing so a corrupted state is never saved.
  """
  for level in ("lower", "upper"):
    if bool(np.asarray(metrics[f"{level}_nonfinite"])):
      raise NonFiniteError(
          f"Non-finite loss, gradient or CG solution in the {level} level at BiSSL "
          f"alternation {alternation}. Nothing was checkpointed for this alternation. "
          f"Check the input data for NaN/Inf; otherwise lower config.bissl."
          f"{'lower_lr' if level == 'lower' else 'upper_lr'} or raise config.bissl.damping, "
          f"then rerun: training resumes from the last good checkpoint.")


def lower_result(state: BilevelState) -> Tuple[PyTree, PyTree]:
  """BiSSL's output θ_P: ``({'backbone', 'pretext_head'}, batch_stats)``."""
  return state.lower_params, state.lower_stats
