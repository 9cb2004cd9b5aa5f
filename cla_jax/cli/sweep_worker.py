"""One sweep run in its own process (started by `cla-sweep`): train, evaluate, write result.json.

python -m cla_jax.cli.sweep_worker --run_file=DIR/<run>/sweep_run.json
"""

from absl import flags

from cla_jax import cli, sweep_worker


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module adds no global flags."""
  flags.DEFINE_string("run_file", None, f"The {sweep_worker.RUN_FILE} the sweep runner wrote.", required=True)


def main(argv: list[str]) -> None:
  """Trains and evaluates the run of `--run_file`."""
  del argv
  sweep_worker.train_and_evaluate(flags.FLAGS.run_file)


def entry() -> None:
  """Entry point of the worker process."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
