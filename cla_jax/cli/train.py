"""`cla-train` (or `python train.py`): trains a CLA transformer.

    cla-train --config=configs/default.py --workdir=DIR [--config.x=y ...]

Rerunning the same command on the same workdir resumes from its newest checkpoint. See docs/training.md.
"""

from absl import flags
from ml_collections import config_flags

from cla_jax import cli


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module adds no global flags."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/default.py or " "configs/paper_1b.py:H128-MQA-CLA2.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  """Trains `--config` in `--workdir` (resuming from its newest checkpoint)."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> for overrides.")
  from cla_jax import trainer  # pylint: disable=g-import-not-at-top  (after flag parsing: faster --help)
  # On an existing workdir the model comes from its config.json, except model fields given on the command line.
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  trainer.run(
      flags.FLAGS.config, flags.FLAGS.workdir, [k.split(".", 1)[1] for k in overrides if k.startswith("model.")]
  )


def entry() -> None:
  """Console-script entry point."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
