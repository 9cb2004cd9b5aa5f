"""`cla-generate` (or `python generate.py`): text from a workdir's model with the KV cache.

    cla-generate --workdir=runs/default --prompt="The dictionary" --max_new_tokens=40
    cla-generate --workdir=runs/default --prompt_file=prompts.txt --temperature=0.8 --top_p=0.95 \
        --num_samples=3 --seed=1 --jsonl

Prints each prompt followed by its continuation (or one JSON line per continuation with --jsonl).
See the README's "Generate" section.
"""

import json
import pathlib

from absl import flags, logging

from cla_jax import cli


def define_flags() -> None:
  """The command's flags; defined on demand, so importing this module adds no global flags."""
  flags.DEFINE_string(
      "workdir", None, "Workdir written by train.py or convert_hf (config.json + checkpoints/).", required=True
  )
  flags.DEFINE_string("prompt", None, "Text to continue.")
  flags.DEFINE_string("prompt_file", None, "A file of prompts, one a line (blank lines are skipped).")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (fewer if EOS comes first).")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise sample from softmax(logits / temperature).")
  flags.DEFINE_integer("top_k", 0, "Sample only among the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Sample only within the smallest set of tokens whose probability reaches p.")
  flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same text.")
  flags.DEFINE_integer("num_samples", 1, "Continuations per prompt.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable one).")
  flags.DEFINE_string(
      "kv_cache_dtype", "auto", "KV cache storage: auto (the compute dtype) or int8 (quantised per token and head)."
  )
  flags.DEFINE_bool("jsonl", False, "Print one JSON line per continuation: prompt, sample, continuation.")


FLAGS = flags.FLAGS


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
  """--prompt, then each non-blank line of --prompt_file; UserError when there is none or one is unreadable."""
  prompts = []
  if prompt is not None:
    if not prompt.strip():
      raise cli.UserError("--prompt is empty; give some text to continue.")
    prompts.append(prompt)
  if prompt_file is not None:
    path = pathlib.Path(prompt_file).expanduser()
    if not path.is_file():
      raise cli.UserError(f"--prompt_file={prompt_file}: no such file.")
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise cli.UserError(
          f"--prompt_file={prompt_file} is not UTF-8 text (byte {e.start}); save it as UTF-8, one prompt a line."
      ) from None
    except OSError as e:
      raise cli.UserError(f"cannot read --prompt_file={prompt_file} ({e.strerror}).") from None
    prompts += [line for line in text.splitlines() if line.strip()]
  if not prompts:
    raise cli.UserError("no prompt: give --prompt=TEXT or --prompt_file=FILE (one prompt a line).")
  return prompts


def main(argv: list[str]) -> None:
  """Generates from `--workdir`'s model; prints each prompt with its continuation."""
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}; flags are written --name=value (quote the prompt).")
  if FLAGS.num_samples < 1:
    raise cli.UserError(f"--num_samples must be at least 1, got {FLAGS.num_samples}.")
  prompts = read_prompts(FLAGS.prompt, FLAGS.prompt_file)
  import cla_jax  # pylint: disable=g-import-not-at-top  (after flags: fast --help and flag errors)
  from cla_jax import decode, kv_quant  # pylint: disable=g-import-not-at-top

  decode.Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)  # checks the settings before the slow restore
  kv_quant.check_kv_cache_dtype(FLAGS.kv_cache_dtype)
  logging.set_verbosity(logging.ERROR)  # orbax logs warnings on every read-only restore
  model = cla_jax.load_model(FLAGS.workdir, step=FLAGS.step, kv_cache_dtype=FLAGS.kv_cache_dtype)
  batch = [p for p in prompts for _ in range(FLAGS.num_samples)]
  texts = model.generate(
      batch,
      max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      top_p=FLAGS.top_p,
      seed=FLAGS.seed,
  )
  for i, (prompt, text) in enumerate(zip(batch, texts)):
    sample = i % FLAGS.num_samples
    if FLAGS.jsonl:
      print(json.dumps({"prompt": prompt, "sample": sample, "continuation": text}), flush=True)
    else:
      header = f"[prompt {i // FLAGS.num_samples + 1}" + (f", sample {sample + 1}]" if FLAGS.num_samples > 1 else "]")
      print(f"{header}\n{prompt}{text}\n", flush=True)


def entry() -> None:
  """Console-script entry point."""
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  entry()
