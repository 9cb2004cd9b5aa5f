"""The commands: one module per command, each of the same shape, and what they share.

Every command module here holds `define_flags()` (absl flags, defined on demand so that importing it adds
no global flags), `main(argv)` (check the flags, then one call into the library) and `entry()` (the
console script `cla-*`; also what `python -m cla_jax.cli.<command>` runs); `harness` alone has no flags of
its own, as it hands its arguments to lm_eval's command line. Only this package imports absl:
the library modules under cla_jax/ take arguments and raise `UserError`, which `start` prints as one line.

  train, eval, generate            cla-train, cla-eval, cla-generate (and train.py, eval.py, generate.py)
  describe, aot                    cla-describe, cla-aot: shapes and KV bytes; will it fit on a TPU slice?
  convert_hf, export_hf, harness   cla-convert-hf, cla-export-hf, cla-harness
  prepare, python_docs             cla-prepare (tokenize a corpus into shards), cla-python-docs (its TFDS build)
  sweep, sweep_worker              cla-sweep (many runs, reports); one run of it in its own process
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

from cla_jax.errors import UserError  # re-exported: entry points raise cli.UserError


def _one_line(message: str) -> str:
  lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
  line = lines[-1] if lines else "invalid arguments"
  # Drop a 'package.module.SomeError: ' prefix left by wrapped tracebacks.
  return re.sub(r"^[\w.]*(Error|Exception): ", "", line)


def define_config_dict(name: str, default, help_string: str) -> None:
  """`config_flags.DEFINE_config_dict`, whose eager parse of --name.x=y overrides fails in one line."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  try:
    config_flags.DEFINE_config_dict(name, default, help_string)
  except (AttributeError, KeyError) as e:
    sys.stderr.write(f"error: {unknown_field_message(e)}\n")
    sys.exit(2)


def unknown_field_message(error: BaseException) -> str:
  """'--config.x.y: no such config field (did you mean "z"?); ...' from ml_collections' KeyError/AttributeError.

  str() of a KeyError is the repr of its message: quotes escaped and the suggestion after a literal '\\n'.
  """
  text = str(error.args[0]) if error.args else str(error)
  text = text.replace("\\n", "\n").replace("\\'", "'")  # config_flags re-wraps the repr of a KeyError
  first, *rest = [line.strip() for line in text.splitlines() if line.strip()] or [""]
  field = first.strip("'\"")
  given = [
      a.split("=")[0] for a in sys.argv[1:] if a.startswith("--") and field and a.split("=")[0].endswith(f".{field}")
  ]
  suggestion = re.search(r'Did you mean "([^"]+)"', " ".join(rest))
  hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""
  return f"{given[0] if given else field}: no such config field{hint}; see configs/default.py for the fields."


def _config_file_problem(error: BaseException) -> str:
  """'config file X not found' from ml_collections' multi-line load error."""
  found = re.search(r"No such file or directory: '([^']*)'", str(error))
  if found:
    return (
        f"--config file {found.group(1)!r} not found; pass a config file such as configs/default.py or "
        f"configs/paper_1b.py:H128-MQA-CLA2."
    )
  return f"--config could not be loaded: {_one_line(str(error))}"


def _with_shipped_config(arg: str) -> str:
  """`--config=configs/x.py[:row]` names the shipped config from any directory (see config_lib.resolve)."""
  if not arg.startswith("--config="):
    return arg
  from cla_jax import config_lib  # pylint: disable=g-import-not-at-top  (jax; only when a config is named)

  spec = config_lib.resolve(arg[len("--config=") :])
  if not os.path.isfile(spec.partition(":")[0]):
    # config_flags would defer this error to the first use of the config, as a traceback.
    raise UserError(
        f"config file {spec.partition(':')[0]!r} not found; e.g. --config=configs/default.py or "
        "--config=configs/paper_1b.py:H128-MQA."
    )
  return "--config=" + spec


def start(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` that turns flag/config and UserError failures into `error: <one line>`, exit 2."""

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      remaining = flags.FLAGS([_with_shipped_config(arg) for arg in argv])
    except (AttributeError, KeyError) as e:
      sys.stderr.write(f"error: {unknown_field_message(e)}\n")
      sys.exit(2)
    except (flags.Error, UserError) as e:
      # config_flags wraps errors raised inside get_config() with their traceback; keep the message.
      sys.stderr.write(f"error: {_one_line(str(e))}\n")
      sys.exit(2)
    except OSError as e:  # a config file that could not be read while applying --config.x overrides
      sys.stderr.write(f"error: {_config_file_problem(e)}\n")
      sys.exit(2)
    for name in list(flags.FLAGS):
      error = getattr(flags.FLAGS[name].value, "_error", None)  # ml_collections' placeholder for a failed load
      if isinstance(error, OSError):
        sys.stderr.write(f"error: {_config_file_problem(error)}\n")
        sys.exit(2)
    return remaining

  def guarded(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except UserError as e:
      sys.stderr.write(f"error: {_one_line(str(e))}\n")
      sys.exit(2)
    except OSError as e:
      if e.errno != errno.ENOSPC:
        raise
      sys.stderr.write(f"error: disk full writing {e.filename or 'a file'}; free space and rerun.\n")
      sys.exit(2)

  app.run(guarded, flags_parser=parse_flags)
