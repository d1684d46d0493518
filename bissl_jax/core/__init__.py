"""The BiSSL training core: pure functions over an explicit state.

``protocols`` (what models and tasks provide), ``partition`` (parameter groups),
``optim`` (the level optimizers), ``state`` (static setup and state), ``lower`` and
``upper`` (one step of each level), ``penalty`` (the first-order penalty upper step),
``alternation`` (Algorithm 1 and its two drivers), ``lam_schedules`` (λ schedules and
learnable λ). Imports ``implicit``, ``runtime`` and ``types``; never the pipeline.
"""
