r"""Offline GeSSL comparison on scikit-learn's digits: SimCLR vs SimCLR + GeSSL.

Run (no download, no GPU)::

  python -m bissl_jax.pipeline.gessl_comparison --config configs/digits_gessl.py \
      --workdir runs/digits_gessl

Data: the 1,797 bundled 8×8 digits upscaled to 16×16 RGB, the library's fixed
stratified splits (1,150 train / 288 validation / 359 test). Digits 0–4 are the
training classes: pretraining sees only their train-split images (no labels).
Digits 5–9 are held out for few-shot evaluation.

Model: ResNet-18 with a CIFAR stem at width 1/8, projector 64-64-64, SimCLR τ = 0.5.
Pretraining, identical for both methods: 10 epochs, batch 64, SGD with momentum 0.9
and weight decay 1e-4 (GeSSL's Appendix C), cosine LR from 0.1. GeSSL: n = 4 tasks of
B = 16 images, A = 2 views, K = 1, λ = 10, α = 0.1, KL second level, second order,
loss = SimCLR + GeSSL (see docs/gessl.md). The inner steps adapt the pretext head
only (projector + task classifier; the outer gradient still reaches the backbone
through the features): adapting all parameters as in the paper's Eq. 6
(``gessl.inner_params = 'all'``) makes one outer step
cost 10–26 plain SimCLR steps on this CPU at K = 1 (``bench/gessl_cost.py``), which
does not fit the offline budget.

Evaluation on frozen features: a linear probe on the train split (all 10 classes;
SGD momentum 0.9, batch 128, LR 5e-2 → 5e-6 cosine, 100 epochs) scored on test;
5-way 1-shot and 5-shot episodes (15 queries per class, 600 episodes, nearest
prototype) drawn from the test split's held-out digits. 3 seeds, mean ± std.

Result (3 seeds, test accuracy %, on the shared 2-core CPU; docs/gessl.md)::

  | Method         | Linear probe | 5-way 1-shot | 5-way 5-shot | Wall (s) |
  | SimCLR         | 89.6 ± 2.3   | 47.0 ± 1.8   | 57.9 ± 2.7   | 183      |
  | SimCLR + GeSSL | 81.2 ± 0.9   | 45.1 ± 4.2   | 58.4 ± 5.3   | 232      |

About 7 minutes in all under a load average of ~12. GeSSL does not help at this
scale (nothing is tuned); the config exercises and times the protocol.

``get_config("runlocal")`` is the seconds-long smoke size the tests use.
"""
import ml_collections


def get_config(arg: str = ""):
  """The offline GeSSL comparison; ``arg='runlocal'`` gives the smoke-test size."""
  from bissl_jax import gessl  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict()
  c.seeds = (0, 1, 2)
  c.image_size = 16
  c.model = ml_collections.ConfigDict(dict(arch="resnet18", width_multiplier=0.125,
                                           cifar_stem=True, projector="64-64-64"))
  c.pretext = ml_collections.ConfigDict(dict(epochs=10, batch_size=64, lr=0.1, momentum=0.9,
                                             weight_decay=1e-4))
  c.gessl = gessl.default_config()
  c.gessl.update(dict(K=1, lam=10, n_tasks=4, classes_per_task=16, num_views=2,
                      inner_lr=0.1, second_level_loss="kl", first_order=False,
                      inner_params="pretext_head"))
  c.probe = ml_collections.ConfigDict(dict(epochs=100, batch_size=128, lr=5e-2, final_lr=5e-6))
  c.fewshot = ml_collections.ConfigDict(dict(held_out_classes=5, n_way=5, shots=(1, 5),
                                             n_query=15, episodes=600,
                                             classifier="prototype"))
  if arg == "runlocal":
    c.seeds = (0,)
    c.image_size = 8
    c.model.arch = "mini_resnet"
    c.model.projector = "8-8"
    c.pretext.epochs = 1
    c.pretext.batch_size = 8
    c.gessl.update(dict(n_tasks=2, classes_per_task=4, lam=2))
    c.probe.epochs = 2
    c.fewshot.episodes = 5
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use '' or 'runlocal'.")
  return c
