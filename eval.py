"""Evaluates a training workdir: validation perplexity, or LM-Eval-Harness-style perplexity of a text file.

    python eval.py --workdir=runs/default                      # validation split of the saved config
    python eval.py --workdir=runs/default --step=200 --max_tokens=65536
    python eval.py --workdir=runs/default --text_file=wiki.test.raw   # word/byte perplexity, bits per byte
    python eval.py --workdir=runs/default --config.data.source=text --config.data.text_glob='val/*.txt'

Prints a table, then one JSON line (the last line of stdout); the JSON is also written to DIR/eval/.
See docs/eval.md.
"""

import json

from absl import flags, logging
from ml_collections import config_flags

from cla_jax import cli
from configs import default

flags.DEFINE_string("workdir", None, "Workdir written by train.py (config.json + checkpoints/).", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest readable one).")
flags.DEFINE_string("text_file", None, "Raw text file to score with rolling windows (e.g. wiki.test.raw).")
flags.DEFINE_enum("text_format", "wikitext", ["wikitext", "plain"],
                  "wikitext: split into pages at ' = Title = ' lines and detokenize; plain: one document as is.")
flags.DEFINE_integer("max_length", None, "Rolling-window length for --text_file (default: train.seq_len).")
flags.DEFINE_integer("max_tokens", None, "Validation tokens to score (default: eval.max_tokens).")
flags.DEFINE_integer("batch_size", None, "Sequences per batch (default: eval.batch_size; rounded up to the "
                     "number of data-parallel devices).")
flags.DEFINE_string("split", None, "Split to score (default: data.eval_split).")
flags.DEFINE_bool("progress", True, "Show a progress bar over evaluation batches.")
cli.define_config_dict(
    "config", default.get_config(),
    "Only as --config.<field>=value overrides of the workdir's saved config: data.*, eval.*, mesh.*, "
    "train.seq_len, model.dtype, model.attention_impl, model.remat.")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
  from cla_jax import evaluate, sharding  # pylint: disable=g-import-not-at-top  (after flags: fast --help)
  sharding.maybe_initialize_distributed()

  # Orbax logs warnings on every read-only restore; problems that matter are raised or printed.
  logging.set_verbosity(logging.ERROR)

  result = evaluate.run(
      FLAGS.workdir, step=FLAGS.step, text_file=FLAGS.text_file, text_format=FLAGS.text_format,
      max_length=FLAGS.max_length, max_tokens=FLAGS.max_tokens, batch_size=FLAGS.batch_size, split=FLAGS.split,
      overrides=config_flags.get_override_values(FLAGS["config"]), progress=FLAGS.progress)
  print(evaluate.format_table(result), flush=True)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  cli.run(main)
