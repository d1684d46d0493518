"""Errors that stop a run with a message for its user (never a traceback by default).

Each carries a message that names what went wrong, where, and how to fix it; the
entry points print the message alone and exit non-zero.
"""


class NonFiniteError(FloatingPointError):
  """A loss, gradient, parameter or implicit-gradient solution became NaN or infinite."""
