"""`cla-prepare`: tokenizes a config's corpus once, in parallel, into prepared splits (cla_jax.data.prepare).

    cla-prepare --config=configs/paper_1b.py:H128-MQA-CLA2 --output=DIR_OR_BUCKET [--num_workers=N]
        [--shard=i --num_shards=k]

Prints a JSON summary of what was prepared. See docs/data.md.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from cla_jax import cli, config_lib
from cla_jax.data import prepare


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module adds no global flags."""
  config_flags.DEFINE_config_file("config", config_lib.DEFAULT_CONFIG, "Experiment config whose data to prepare.")
  flags.DEFINE_string(
      "output",
      "",
      "Directory or bucket for the prepared splits (train with "
      "--config.data.prepared_dir=OUTPUT); empty: the cache training uses by default.",
  )
  flags.DEFINE_integer(
      "num_workers", os.cpu_count() or 1, "Local processes tokenizing and writing shards (this one included)."
  )
  flags.DEFINE_integer("shard", 0, "This host's share of the tasks, in [0, num_shards).")
  flags.DEFINE_integer("num_shards", 1, "Hosts preparing this corpus together.")


def main(argv: list[str]) -> None:
  """Prepares `--config`'s data into `--output`; prints the summary."""
  del argv
  f = flags.FLAGS
  print(json.dumps(prepare.prepare(f.config, f.output, f.num_workers, f.shard, f.num_shards), indent=1))


def entry() -> None:
  """Console-script entry point (`cla-prepare`)."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
