"""`cla-harness`: EleutherAI's LM-Eval-Harness on a cla_jax workdir, with the `cla_jax` model registered.

    cla-harness --model_args workdir=DIR[,step=N] --tasks hellaswag,piqa [--num_fewshot K ...]
    cla-harness ls tasks

The harness's own command line (argparse, not absl): every flag goes to `lm-eval run`, with `--model cla_jax`
added, and `--batch_size auto` (the workdir's eval.batch_size) unless one is given. Needs the '.[eval]' extra.
"""

import sys
from collections.abc import Sequence

# Importing cla_jax.harness registers the `cla_jax` model with lm_eval.
from cla_jax import cli, harness, sharding  # noqa: F401

_SUBCOMMANDS = ("run", "ls", "validate")


def harness_argv(argv: Sequence[str]) -> list[str]:
  """The harness CLI's arguments for ours: `--model cla_jax` added, and `--batch_size auto` (the workdir's
  eval.batch_size) unless a batch size is given; `ls` / `validate` pass through untouched."""
  argv = list(argv)
  if argv and argv[0] in ("ls", "validate", "-h", "--help"):
    return argv
  if argv and argv[0] == "run":
    argv = argv[1:]
  for i, arg in enumerate(argv):
    name, _, value = arg.partition("=")
    if name in ("--model", "-M"):
      value = value or (argv[i + 1] if i + 1 < len(argv) else "")
      if value != "cla_jax":
        raise cli.UserError(
            f"--model {value}: this command evaluates cla_jax workdirs; use lm-eval itself for other "
            "models, or drop --model."
        )
  added = [] if any(a.split("=")[0] in ("--model", "-M") for a in argv) else ["--model", "cla_jax"]
  if not any(a.split("=")[0] in ("--batch_size", "-b") for a in argv):
    added += ["--batch_size", "auto"]
  return ["run", *added, *argv]


def main(argv: Sequence[str] | None = None) -> None:
  """`cla-harness ARGS`: `lm-eval run --model cla_jax ARGS` with this model registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top

  argv = sys.argv[1:] if argv is None else argv
  try:
    sharding.maybe_initialize_distributed()
    sys.argv = ["python -m cla_jax.cli.harness", *harness_argv(argv)]
    cli_evaluate()
  except cli.UserError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  except ValueError as e:
    if not str(e).startswith("Tasks not found"):  # the harness's one bad-input ValueError; others are bugs
      raise
    sys.stderr.write(
        f"error: {str(e).splitlines()[0].replace('Tasks not found', 'unknown task(s)')}; list the tasks with "
        "`python -m cla_jax.cli.harness ls tasks`.\n"
    )
    sys.exit(2)


def entry() -> None:
  """Console-script entry point (`cla-harness`)."""
  main()


if __name__ == "__main__":
  entry()
