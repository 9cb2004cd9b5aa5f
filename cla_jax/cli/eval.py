"""`cla-eval` (or `python eval.py`): validation perplexity of a workdir, or LM-Eval-Harness-style text perplexity.

    cla-eval --workdir=runs/default                      # validation split of the saved config
    cla-eval --workdir=runs/default --step=200 --max_tokens=65536
    cla-eval --workdir=runs/default --text_file=wiki.test.raw   # word/byte perplexity, bits per byte
    cla-eval --workdir=runs/default --config.data.source=text --config.data.text_glob='val/*.txt'

Prints a table, then one JSON line (the last line of stdout); the JSON is also written to DIR/eval/.
See docs/eval.md.
"""

import json

from absl import flags, logging
from ml_collections import config_flags

from cla_jax import cli, config_lib


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module adds no global flags."""
  flags.DEFINE_string("workdir", None, "Workdir written by train.py (config.json + checkpoints/).", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest readable one).")
  flags.DEFINE_string("text_file", None, "Raw text file to score with rolling windows (e.g. wiki.test.raw).")
  flags.DEFINE_enum(
      "text_format",
      "wikitext",
      ["wikitext", "plain"],
      "wikitext: split into pages at ' = Title = ' lines and detokenize; plain: one document as is.",
  )
  flags.DEFINE_integer("max_length", None, "Rolling-window length for --text_file (default: train.seq_len).")
  flags.DEFINE_integer("max_tokens", None, "Validation tokens to score (default: eval.max_tokens).")
  flags.DEFINE_integer(
      "batch_size",
      None,
      "Sequences per batch (default: eval.batch_size; rounded up to the " "number of data-parallel devices).",
  )
  flags.DEFINE_string("split", None, "Split to score (default: data.eval_split).")
  flags.DEFINE_bool("progress", True, "Show a progress bar over evaluation batches.")
  # cli.define_config_dict: an unknown --config.x override is one line, not config_flags' eager traceback.
  cli.define_config_dict(
      "config",
      config_lib.load(config_lib.DEFAULT_CONFIG),
      "Only as --config.<field>=value overrides of the workdir's saved config: data.*, eval.*, mesh.*, "
      "train.seq_len, model.dtype, model.attention_impl, model.remat.",
  )


def main(argv: list[str]) -> None:
  """Evaluates `--workdir`; prints a table, then one JSON line."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
  from cla_jax import evaluate, sharding  # pylint: disable=g-import-not-at-top  (after flags: fast --help)

  sharding.maybe_initialize_distributed()

  # Orbax logs warnings on every read-only restore; problems that matter are raised or printed.
  logging.set_verbosity(logging.ERROR)

  args = flags.FLAGS
  result = evaluate.run(
      args.workdir,
      step=args.step,
      text_file=args.text_file,
      text_format=args.text_format,
      max_length=args.max_length,
      max_tokens=args.max_tokens,
      batch_size=args.batch_size,
      split=args.split,
      overrides=config_flags.get_override_values(args["config"]),
      progress=args.progress,
  )
  print(evaluate.format_table(result), flush=True)
  print(json.dumps(result), flush=True)


def entry() -> None:
  """Console-script entry point."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
