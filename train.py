"""Trains a CLA transformer: `python train.py --config=configs/default.py --workdir=DIR [--config.x=y ...]`.

Rerunning the same command on the same workdir resumes from its newest checkpoint. See docs/training.md.
"""

from absl import flags
from ml_collections import config_flags

from cla_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py or "
                                          "configs/paper_1b.py:H128-MQA-CLA2.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> for overrides.")
  from cla_jax import trainer  # pylint: disable=g-import-not-at-top  (after flag parsing: faster --help)
  # On an existing workdir the model comes from its config.json, except model fields given on the command line.
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  trainer.run(_CONFIG.value, _WORKDIR.value, [k.split(".", 1)[1] for k in overrides if k.startswith("model.")])


if __name__ == "__main__":
  cli.run(main)
