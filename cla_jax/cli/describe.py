"""`cla-describe`: a config's KV groups, KV layers, KV-cache bytes per token and parameter count, as one JSON line.

cla-describe --config=configs/paper_1b.py:H128-MQA-CLA2 [--config.model.x=y ...]
"""

import json

from absl import flags
from ml_collections import config_flags

from cla_jax import cli, config_lib, describe


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module as a library adds no global flags."""
  config_flags.DEFINE_config_file(
      "config", config_lib.DEFAULT_CONFIG, "Experiment config (path[:row]).", lock_config=True
  )


def main(argv: list[str]) -> None:
  """Prints `describe` of `--config` as one JSON line."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; use --config=PATH[:ROW] and --config.<field>=<value>.")
  print(json.dumps(describe.describe(config_lib.model_config(flags.FLAGS.config))))


def entry() -> None:
  """Console-script entry point (`cla-describe`)."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
