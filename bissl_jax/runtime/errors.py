"""Errors that stop a run with a message for its user (never a traceback by default).

Each carries a message that names what went wrong, where, and how to fix it; the
entry points print the message alone and exit non-zero.
"""
from typing import Optional

# The exit status of every command stopped by a user-fixable error (a bad config value,
# a missing file): 2, as argparse exits on a bad command line.
USER_ERROR_STATUS = 2


class NonFiniteError(FloatingPointError):
  """A loss, gradient, parameter or implicit-gradient solution became NaN or infinite.

  Attributes:
    field: the dotted config field to change (e.g. ``'bissl.lower_lr'``), or None
      when no hyperparameter is to blame (a corrupt checkpoint, NaN data); the
      command line offers a branch of the run with that field changed.
    suggestion: the value the evidence suggests for ``field`` (None: the command
      line proposes a tenth of the current one).
  """

  def __init__(self, message: str, *, field: Optional[str] = None,
               suggestion: Optional[float] = None):
    super().__init__(message)
    self.field = field
    self.suggestion = suggestion


class WorkdirInUseError(RuntimeError):
  """Another live run holds the workdir's lock (:mod:`bissl_jax.pipeline.workdir_lock`)."""


class LaunchError(ValueError):
  """A multi-process launch setting is wrong (:func:`bissl_jax.runtime.mesh.initialize_multihost`)."""
