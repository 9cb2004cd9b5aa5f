"""The one error type users see: bad input (config, data, checkpoint) named with its fix.

Kept free of absl and jax so that any module (model, patterns, sharding) can raise it without
pulling in command-line machinery; `cli.start` turns it into one `error: ...` line and exit 2.
"""


class UserError(ValueError):
  """Bad input (config, data, checkpoint) whose message names the problem and the fix."""
