"""Trains a CLA transformer: `python train.py --config=configs/default.py --workdir=DIR [--config.x=y ...]`.

The same command as `cla-train` (cla_jax/cli/train.py, flags and all). Rerunning the same command on the same
workdir resumes from its newest checkpoint. See docs/training.md.
"""

from cla_jax.cli import train as train_command

if __name__ == "__main__":
  train_command.entry()
