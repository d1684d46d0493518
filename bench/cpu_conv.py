"""The CPU convolution path: the pretext gradient under each XLA:CPU option, against PyTorch.

The unit of every BiSSL cost is one pretext gradient ``∇_θ L_P`` (SimCLR, two views,
training-mode batch norm). On this CPU XLA's convolution gradients were slower than
PyTorch's; this bench times that gradient (ResNet-18, CIFAR stem, width 64, 2×16
images of 32 px at ``--small``) under every option below, each in its own worker
process (an XLA flag set needs its own backend), with PyTorch's gradient of the same
network and batch timed in the same interleaved rounds:

* XLA:CPU flags of the installed jaxlib (read from ``libjax_common.so``): oneDNN
  (``xla_cpu_use_onednn``, its fusion types, its custom calls), XNNPACK
  (``xla_cpu_use_xnnpack``, fusion types, graph-fusion modes), YNNPACK fusion types,
  fast math, single-threaded Eigen, the concurrency-optimised scheduler, the legacy
  (non-fusion) emitters, 512-bit vectors, strict dot/conv math;
* ``jax_disable_most_optimizations`` (the test suite's setting);
* one core (``taskset -c 0``) for XLA and ``torch.set_num_threads(1)`` for PyTorch;
* buffer donation: an SGD step ``θ ← θ − η∇θ`` jitted with and without donating θ;
* layouts and convolutions as matrix products, on one 3×3 convolution layer of the
  first stage (64→64 channels): NHWC (flax's), NCHW, and im2col + one matmul.

Numerics: each option's gradient is compared with the default's; "bit-identical"
means every element is equal, otherwise the largest difference relative to the
largest entry is reported (fp32 tolerance: 1e-4).

Run: ``python -m bench.cpu_conv --small`` (``--options a,b`` runs only those).
"""
import dataclasses
import json
import os
import sys
import tempfile
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from bench import common
from bench import conv_layers
from bench import worker_protocol
from bissl_jax.runtime import cpu_kernels

FP32_TOLERANCE = 1e-4


class Option(NamedTuple):
  """One contender: XLA flags, JAX config and how the worker runs."""
  name: str
  xla_flags: str = ""
  jax_config: Optional[Dict[str, object]] = None
  one_core: bool = False
  donate: bool = False
  torch: bool = False
  torch_threads: int = 0
  float64: bool = False


OPTIONS = [
    Option("default"),
    Option("oneDNN (xla_cpu_use_onednn)", "--xla_cpu_use_onednn=true"),
    Option("oneDNN fusions dot,eltwise,reduce",
           "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce"),
    Option("oneDNN custom calls", "--xla_cpu_use_onednn=true "
           "--xla_cpu_experimental_onednn_custom_call=true"),
    Option("XNNPACK (xla_cpu_use_xnnpack)", "--xla_cpu_use_xnnpack=true"),
    Option("XNN fusions dot,eltwise,reduce",
           "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    Option("XNN graph fusion GREEDY",
           "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    Option("XNN graph fusion GREEDY_SLINKY",
           "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY"),
    Option("YNN fusions dot,eltwise,reduce",
           "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"),
    # By default jaxlib 0.10.2 already runs convolutions and dots as YNNPACK fusions;
    # naming the types overwrites that list (convolutions go back to XLA's own
    # kernels), a '+' prefix adds to it.
    Option("YNN fusions dot only", "--xla_cpu_experimental_ynn_fusion_type=dot"),
    Option("YNN fusions +eltwise,+reduce",
           "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce"),
    Option("YNN fusions eltwise,reduce (dots to XLA too)",
           "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce"),
    Option("YNN fusions none", "--xla_cpu_experimental_ynn_fusion_type="),
    # With the convolutions out of YNNPACK (the library's 'fast' kernels), can oneDNN
    # or XNNPACK take them? jaxlib 0.10.2 knows the type 'individual_convolution'.
    Option("fast kernels + oneDNN convolutions", cpu_kernels.FAST_CPU_FLAG
           + " --xla_cpu_experimental_onednn_fusion_type=individual_convolution"),
    Option("fast kernels + XNNPACK convolutions", cpu_kernels.FAST_CPU_FLAG
           + " --xla_cpu_experimental_xnn_fusion_type=individual_convolution"),
    Option("fast math", "--xla_cpu_enable_fast_math=true"),
    Option("single-threaded Eigen", "--xla_cpu_multi_thread_eigen=false"),
    Option("concurrency-optimized scheduler",
           "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
    Option("legacy emitters (no fusion emitters)", "--xla_cpu_use_fusion_emitters=false"),
    Option("512-bit vectors", "--xla_cpu_prefer_vector_width=512"),
    Option("strict dot/conv math", "--xla_cpu_strict_dot_conv_math=true"),
    Option("jax_disable_most_optimizations", jax_config={"jax_disable_most_optimizations": True}),
    Option("one core (taskset -c 0)", one_core=True),
    Option("donated θ (SGD step)", donate=True),
    # Not a speed option: the same gradient in float64, to tell a less accurate
    # float32 gradient from a differently rounded one.
    Option("float64 (accuracy reference)", jax_config={"jax_enable_x64": True}, float64=True),
    Option("PyTorch", torch=True),
    Option("PyTorch, 1 thread", torch=True, torch_threads=1),
]


def add_arguments(parser) -> None:
  parser.add_argument("--options", default="",
                      help="comma-separated option names (or unique prefixes) to run; "
                           "default and PyTorch always run.")
  parser.add_argument("--worker", default=None, help=argparse_hidden())
  parser.add_argument("--spec", default=None, help=argparse_hidden())


def argparse_hidden():
  import argparse  # pylint: disable=import-outside-toplevel
  return argparse.SUPPRESS


def selected_options(text: str) -> List[Option]:
  """The options named in ``text`` (prefixes allowed), plus the default and PyTorch."""
  if not text:
    return list(OPTIONS)
  wanted = [w.strip() for w in text.split(",") if w.strip()]
  out = [OPTIONS[0]]
  for w in wanted:
    hits = [o for o in OPTIONS if o.name.lower().startswith(w.lower())]
    if not hits:
      raise SystemExit(f"cpu_conv: no option named {w!r}; options: "
                       + "; ".join(o.name for o in OPTIONS))
    out.extend(h for h in hits if h not in out)
  out.extend(o for o in OPTIONS if o.name == "PyTorch" and o not in out)
  return out


def compare_size(args) -> common.Size:
  size = args.size
  if args.base_size == "small" and "--width" not in " ".join(args.argv):
    size = dataclasses.replace(size, width=1.0)
  return size


# ----------------------------------------------------------------------------- workers

def _jax_worker(spec: dict) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  for key, value in (spec.get("jax_config") or {}).items():
    jax.config.update(key, value)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bench import compare_reference  # pylint: disable=import-outside-toplevel
  size = common.Size(**spec["size"])
  problem = compare_reference.build_problem(size, spec["cifar_stem"], spec["seed"])
  if spec.get("float64"):  # the backbone computes in its own dtype (float32 by default)
    from bissl_jax.tasks import pretext as pretext_lib  # pylint: disable=import-outside-toplevel
    model = dataclasses.replace(problem.model,
                                backbone=problem.model.backbone.clone(dtype=jnp.float64))
    task = pretext_lib.make_pretext_task("simclr", model, image_size=size.image_size)
    problem = problem._replace(model=model, task=task)
  data = np.load(spec["batch"])
  views = (jnp.asarray(data["v1"]), jnp.asarray(data["v2"]))
  loss = common.pretext_loss_of_backbone(problem.task)
  theta, head, stats = (problem.params["backbone"], problem.params["pretext_head"],
                        problem.batch_stats)
  if spec.get("float64"):
    theta, head, stats, views = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64), (theta, head, stats, views))
  grad = jax.jit(jax.grad(loss))

  def sgd(theta, head, stats, views):
    g = jax.grad(loss)(theta, head, stats, views)
    return jax.tree_util.tree_map(lambda p, d: p - 1e-3 * d, theta, g)
  step = jax.jit(sgd, donate_argnums=(0,) if spec["donate"] else ())
  carry = {"theta": jax.tree_util.tree_map(jnp.copy, theta)}

  def run_step():
    carry["theta"] = step(carry["theta"], head, stats, views)
    return carry["theta"]

  # Only the default (resident) worker and the donation option time the SGD step and the
  # lone layer: every other option is about the gradient, and compiling costs minutes.
  contenders = {"gradient": lambda: grad(theta, head, stats, views)}
  if spec["donate"] or spec["resident"]:
    contenders["sgd step"] = run_step
  if spec["resident"]:
    contenders.update(_conv_layer_contenders(jax, jnp, size, spec["seed"]))
  if spec.get("layers"):
    contenders.update(conv_layers.jax_contenders(jax, jnp, size, spec["seed"]))
  for thunk in contenders.values():
    jax.block_until_ready(thunk())

  def dump(request):
    g = grad(theta, head, stats, views)
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(g)])
    np.save(request["path"], flat)
    return {"saved": request["path"]}

  worker_protocol.serve(contenders, wait=jax.block_until_ready, extra={"dump": dump},
                        info={"backend": jax.default_backend(), "contenders": list(contenders)})


def _conv_layer_contenders(jax, jnp, size, seed):
  """One first-stage 3×3 convolution's gradient (w.r.t. input and kernel), three ways."""
  c = int(round(64 * size.width))
  b, s = 2 * size.pretext_batch, size.image_size
  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, (b, s, s, c))
  w = jax.random.normal(jax.random.fold_in(key, 1), (3, 3, c, c)) * 0.05

  def nhwc(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def nchw(x, w):  # x given NCHW, kernel OIHW
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))

  def im2col(x, w):
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([p[:, i:i + s, j:j + s, :] for i in range(3) for j in range(3)],
                           axis=-1)
    return (cols.reshape(-1, 9 * c) @ w.reshape(9 * c, c)).reshape(b, s, s, c)

  def grad_of(f):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
  x_nchw, w_oihw = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
  g_nhwc, g_nchw, g_col = grad_of(nhwc), grad_of(nchw), grad_of(im2col)
  return {"conv layer NHWC": lambda: g_nhwc(x, w), "conv layer NCHW": lambda: g_nchw(x_nchw, w_oihw),
          "conv layer im2col+matmul": lambda: g_col(x, w)}


def _torch_worker(spec: dict) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  if spec.get("torch_threads"):
    torch.set_num_threads(spec["torch_threads"])
  torch.manual_seed(spec["seed"])
  size = common.Size(**spec["size"])
  data = np.load(spec["batch"])
  to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  v1, v2 = to_t(data["v1"]), to_t(data["v2"])
  net = _torch_simclr(torch, int(round(64 * size.width)), spec["cifar_stem"])
  net.train()
  params = tuple(net.backbone.parameters())

  def gradient():
    return torch.autograd.grad(net.loss(v1, v2), params)

  contenders = {"gradient": gradient}

  c, b, s = int(round(64 * size.width)), 2 * size.pretext_batch, size.image_size
  x = torch.randn(b, c, s, s, requires_grad=True)
  w = (torch.randn(c, c, 3, 3) * 0.05).requires_grad_()

  def conv_layer():
    return torch.autograd.grad((torch.nn.functional.conv2d(x, w, padding=1) ** 2).sum(), (x, w))
  if spec["resident"]:
    contenders["conv layer NHWC"] = conv_layer
  if spec.get("layers"):
    contenders.update(conv_layers.torch_contenders(torch, size))
  for thunk in contenders.values():
    thunk()
  worker_protocol.serve(contenders, info={"torch": torch.__version__,
                                          "threads": torch.get_num_threads(),
                                          "contenders": list(contenders)})


def _torch_simclr(torch, width: int, cifar_stem: bool):
  """ResNet-18 (basic blocks 2-2-2-2), projector 256-256-256, NT-Xent at τ = 0.5."""
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.down = None
      if stride != 1 or cin != cout:
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return F.relu(y + (x if self.down is None else self.down(x)))

  layers = ([nn.Conv2d(3, width, 3, 1, 1, bias=False)] if cifar_stem else
            [nn.Conv2d(3, width, 7, 2, 3, bias=False)])
  layers += [nn.BatchNorm2d(width), nn.ReLU()]
  if not cifar_stem:
    layers.append(nn.MaxPool2d(3, 2, 1))
  cin = width
  for i in range(4):
    for j in range(2):
      cout = width * 2 ** i
      layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]

  class SimCLR(nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = nn.Sequential(*layers)
      self.head = nn.Sequential(nn.Linear(cin, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                nn.Linear(256, 256, bias=False))

    def loss(self, a, b):
      z = F.normalize(torch.cat([self.head(self.backbone(a)), self.head(self.backbone(b))]),
                      dim=1)
      n = z.shape[0]
      logits = (z @ z.t()) / 0.5
      logits = logits.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
      target = torch.arange(n).roll(n // 2)
      return F.cross_entropy(logits, target)
  return SimCLR()


def worker_main(kind: str, spec: dict) -> None:
  worker_protocol.redirect_prints()
  (_torch_worker if kind == "torch" else _jax_worker)(spec)


# ----------------------------------------------------------------------------- parent

def start(option: Option, spec: dict, resident: bool = False) -> worker_protocol.Worker:
  kind = "torch" if option.torch else "jax"
  # Per-layer timings: the default and PyTorch (resident) and the library's fast kernels.
  layers = (resident and option.name in ("default", "PyTorch")) or (
      option.xla_flags == cpu_kernels.FAST_CPU_FLAG and not option.jax_config)
  spec = dict(spec, donate=option.donate, jax_config=option.jax_config,
              torch_threads=option.torch_threads, resident=resident, float64=option.float64,
              layers=layers)
  command = [sys.executable, "-m", "bench.cpu_conv", "--worker", kind, "--spec",
             json.dumps(spec)]
  if option.one_core:
    command = ["taskset", "-c", "0"] + command
  env = {"JAX_PLATFORMS": "cpu"}
  if not option.torch:
    env["XLA_FLAGS"] = option.xla_flags  # '' clears any the caller had set
  return worker_protocol.Worker(command, env=env)


def main(argv: Optional[Sequence[str]] = None) -> List[common.Table]:
  args = common.parse_args(argv, __doc__, add_arguments,
                           default_repeats={"tiny": 1, "small": 5, "full": 5})
  if args.worker:
    return worker_main(args.worker, json.loads(args.spec))
  size = compare_size(args)
  if size.arch == "mini_resnet":
    size = dataclasses.replace(size, arch="resnet18")
  cifar_stem = size.image_size <= 32
  options = selected_options(args.options)
  rng = np.random.default_rng(args.seed)
  images, _ = common.sample_batch(rng, common.image_pool(size), (size.pretext_batch,))
  views = common.make_views(images, image_size=size.image_size, seed=args.seed)
  blocks: Dict[str, Dict[tuple, List[float]]] = {}
  grads, failed, infos = {}, {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    batch = os.path.join(tmp, "views.npz")
    np.savez(batch, v1=np.asarray(views[0]), v2=np.asarray(views[1]))
    spec = {"size": dataclasses.asdict(size), "cifar_stem": cifar_stem, "seed": args.seed,
            "batch": batch}
    by_name = {o.name: o for o in options}
    # The default and PyTorch stay up; every other option gets its own worker in turn
    # and is timed in rounds with those two, so at most three processes hold memory.
    resident = {name: start(by_name[name], spec, resident=True)
                for name in ("default", "PyTorch")}
    try:
      for name, worker in resident.items():
        infos[name] = worker.info
      grads["default"] = _dump(resident["default"], tmp, "default")
      for option in options:
        if option.name in resident:
          continue
        print(f"cpu_conv: {option.name} ...", flush=True)
        try:
          worker = start(option, spec)
        except worker_protocol.WorkerError as e:
          failed[option.name] = str(e).splitlines()[0][:160]
          continue
        try:
          infos[option.name] = worker.info
          if not option.torch:
            grads[option.name] = _dump(worker, tmp, option.name)
          blocks[option.name] = _time_block({option.name: worker, **resident}, args.repeats)
        finally:
          worker.close()
      if not blocks:  # only the resident two were asked for
        blocks["default"] = _time_block(resident, args.repeats)
    finally:
      for worker in resident.values():
        worker.close()
  return common.finish("cpu_conv", tables(blocks, grads, failed, infos, options, size,
                                          cifar_stem, args), args)


def _dump(worker, tmp, name) -> np.ndarray:
  path = os.path.join(tmp, f"grad_{abs(hash(name))}.npy")
  worker.call("dump", path=path)
  return np.load(path)


def _time_block(workers, repeats) -> Dict[tuple, List[float]]:
  """Interleaved rounds over ``workers``: ``{(worker name, contender): seconds}``."""
  contenders = {}
  for name, worker in workers.items():
    for contender in worker.info["contenders"]:
      contenders[(name, contender)] = (lambda w=worker, c=contender: w.seconds(c))
  return worker_protocol.interleaved_seconds(contenders, repeats, warmup=1)


def numerics(g: np.ndarray, ref: np.ndarray):
  """(bit-identical, max |Δ| / max |ref|)."""
  if g.shape != ref.shape:
    return False, float("inf")
  return bool(np.array_equal(g, ref)), float(np.max(np.abs(g - ref)) / np.max(np.abs(ref)))


def tables(blocks, grads, failed, infos, options, size, cifar_stem, args) -> List[common.Table]:
  """The option table (ratios within each option's own rounds) and the layer table."""
  pooled: Dict[tuple, List[float]] = {}
  for block in blocks.values():
    for key, values in block.items():
      if key[0] in ("default", "PyTorch"):
        pooled.setdefault(key, []).extend(values)
  exact = next((grads[o.name] for o in options if o.float64 and o.name in grads), None)
  rows = []
  for option in options:
    name = option.name
    flags = option.xla_flags or ("taskset -c 0" if option.one_core else "–")
    if name in failed:
      rows.append([name, flags, "failed: " + failed[name], "–", "–", "–", "–"]
                  + (["–"] if exact is not None else []))
      continue
    block = blocks.get(name) or next(iter(blocks.values()))
    if name in ("default", "PyTorch"):
      own = pooled[(name, "gradient")]
      vs_default = common.paired_ratio(own, pooled[("default", "gradient")])
      vs_torch = common.paired_ratio(own, pooled[("PyTorch", "gradient")])
    else:
      own = block[(name, "gradient")]
      vs_default = common.paired_ratio(own, block[("default", "gradient")])
      vs_torch = common.paired_ratio(own, block[("PyTorch", "gradient")])
    if option.torch:
      same, rel = "–", "–"
    else:
      same, rel = numerics(grads[name], grads["default"])
    row = [name, flags, common.median(own), vs_default, vs_torch, same, rel]
    if exact is not None:
      row.append(numerics(grads[name], exact)[1] if not option.torch else "–")
    rows.append(row)
  torch_info = infos.get("PyTorch", {})
  notes = [
      f"{args.repeats} interleaved rounds (after one warm-up round) of each option with the "
      "default and PyTorch, every option in its own process; medians of seconds, and of "
      "per-round ratios within the option's own rounds. 'vs PyTorch' > 1 means slower than "
      f"PyTorch (torch {torch_info.get('torch')}, {torch_info.get('threads')} threads); the "
      "default and PyTorch rows pool all rounds.",
      f"Numerics: each gradient against the default's; 'max rel Δ' is max|Δ| / max|g| (fp32 "
      f"tolerance {FP32_TOLERANCE:g})."
      + (" 'error vs float64' is the same measure against the float64 gradient (same "
         "parameters and views, cast up): a float32 option no less accurate than the "
         "default has an error no larger than the default's." if exact is not None else ""),
  ]
  donated = blocks.get("donated θ (SGD step)")
  if donated:
    d, u = donated[("donated θ (SGD step)", "sgd step")], donated[("default", "sgd step")]
    notes.append(f"Donation: an SGD step with θ donated takes {common.median(d):.4g} s, "
                 f"without {common.median(u):.4g} s (ratio {common.paired_ratio(d, u):.3g}).")
  stem = "CIFAR stem" if cifar_stem else "ImageNet stem"
  out = [common.Table(
      title=f"Pretext gradient under each CPU option — {common.describe(size)}, {stem}",
      columns=["option", "flags", "gradient s", "vs default", "vs PyTorch", "bit-identical",
               "max rel Δ"] + (["error vs float64"] if exact is not None else []),
      rows=rows, notes=notes, signed_rows=tuple(o.name for o in options))]
  torch_layer = pooled.get(("PyTorch", "conv layer NHWC"))
  layer_rows = []
  for layer in ["conv layer NHWC", "conv layer NCHW", "conv layer im2col+matmul"]:
    x = pooled.get(("default", layer))
    if x is not None:
      layer_rows.append([f"XLA, {layer[len('conv layer '):]}", common.median(x),
                         common.paired_ratio(x, torch_layer) if torch_layer else "–"])
  if torch_layer:
    layer_rows.append(["PyTorch (NCHW)", common.median(torch_layer), 1.0])
  c = int(round(64 * size.width))
  if layer_rows:
    out.append(common.Table(
        title=f"One 3×3 convolution's gradient (input and kernel), {c}→{c} channels, "
              f"{size.image_size} px, batch {2 * size.pretext_batch}",
        columns=["layout", "seconds", "vs PyTorch"], rows=layer_rows,
        notes=["Default XLA flags, all rounds pooled."]))
  fast = next((o.name for o in options if o.xla_flags == cpu_kernels.FAST_CPU_FLAG
               and o.name in blocks), None)
  if fast is not None:
    out.append(conv_layers.table(blocks[fast], fast, size))
  return out


if __name__ == "__main__":
  main()
