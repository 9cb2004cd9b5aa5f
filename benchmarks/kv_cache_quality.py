"""What an int8 KV cache costs in quality: perplexity through the cache and greedy agreement, vs the unquantised cache.

  python benchmarks/kv_cache_quality.py --workdir=runs/default

On a trained workdir's validation split: consecutive windows of `train.seq_len + 1` tokens scored with
`decode.teacher_forced_logits` (the first half as a prefill, the rest as decode steps fed the true tokens,
so every key and value is written to the cache and read back), with the cache in the compute dtype and in
int8, and by the plain forward pass for reference; then greedy continuations of `--new_tokens` tokens from
the first `--prompt_len` tokens of `--prompts` windows, with each cache dtype: the share of positions where
the two continuations agree. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from cla_jax import cli, config_lib, decode
from cla_jax.data import prepare

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (train.py / run.sh).", required=True)
_WINDOWS = flags.DEFINE_integer("windows", 64, "Validation windows scored (each seq_len targets).")
_BATCH = flags.DEFINE_integer("batch", 16, "Windows per call.")
_PROMPTS = flags.DEFINE_integer("prompts", 64, "Prompts for the greedy agreement (one per window).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Greedy tokens compared per prompt.")


def validation_windows(model, count: int) -> np.ndarray:
  """The first `count` consecutive windows [count, seq_len + 1] of the validation split's token stream."""
  length = int(model.config.train.seq_len) + 1
  data = prepare.open_split(model.config, model.tokenizer, "validation", length - 1, check_seq_len=False)
  count = min(count, (data.num_tokens - 1) // (length - 1))
  if count < 1:
    raise cli.UserError("the validation split holds less than one window; prepare more data.")
  stream = np.asarray(data.tokens(0, count * (length - 1) + 1), np.int32)
  return np.stack([stream[i * (length - 1) : i * (length - 1) + length] for i in range(count)])


def mean_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Summed next-token negative log-likelihood of targets [b, t] under logits [b, t, v]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1).sum()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}.")
  for name, value in (
      ("windows", _WINDOWS.value),
      ("batch", _BATCH.value),
      ("prompts", _PROMPTS.value),
      ("prompt_len", _PROMPT_LEN.value),
      ("new_tokens", _NEW.value),
  ):
    if value < 1:
      raise cli.UserError(f"--{name} must be a positive integer, got {value}.")
  import cla_jax  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.ERROR)
  model = cla_jax.load_model(_WORKDIR.value)
  cfg = config_lib.model_config(model.config)
  windows = validation_windows(model, _WINDOWS.value)
  inputs, targets = windows[:, :-1], windows[:, 1:]
  prefill_len = inputs.shape[1] // 2

  scorers = {
      "forward": jax.jit(lambda p, x, y: mean_nll(model.module.apply({"params": p}, x), y)),
      **{
          f"cached {dtype}": jax.jit(
              lambda p, x, y, dtype=dtype: mean_nll(
                  decode.teacher_forced_logits(p, x, cfg=cfg, prefill_len=prefill_len, kv_cache_dtype=dtype), y
              )
          )
          for dtype in ("auto", "int8")
      },
  }
  perplexity = {}
  for name, score in scorers.items():
    total = math.fsum(
        float(score(model.params, inputs[i : i + _BATCH.value], targets[i : i + _BATCH.value]))
        for i in range(0, len(inputs), _BATCH.value)
    )
    perplexity[name] = math.exp(total / targets.size)

  prompts = validation_windows(model, _PROMPTS.value)[:, : _PROMPT_LEN.value].tolist()
  kwargs = dict(max_new_tokens=_NEW.value, max_length=_PROMPT_LEN.value + _NEW.value)
  greedy = {dtype: model.generate(prompts, kv_cache_dtype=dtype, **kwargs) for dtype in ("auto", "int8")}
  # Rows that stop at EOS are compared over the longer one's length (a missing token disagrees).
  same = total = 0
  for a, b in zip(greedy["auto"], greedy["int8"]):
    n = max(len(a), len(b))
    same += sum(1 for i in range(min(len(a), len(b))) if a[i] == b[i])
    total += n
  agreement = same / total
  identical = sum(a == b for a, b in zip(greedy["auto"], greedy["int8"])) / len(prompts)

  relative = perplexity["cached int8"] / perplexity["cached auto"] - 1
  print(f"{_WORKDIR.value}: {targets.size:,} validation targets ({len(inputs)} windows, prefill {prefill_len})")
  for name, value in perplexity.items():
    print(f"  perplexity, {name:<13} {value:10.4f}")
  print(f"  int8 vs unquantised cache: perplexity {100 * relative:+.3f}%")
  print(
      f"  greedy, {len(prompts)} prompts of {_PROMPT_LEN.value} tokens, {_NEW.value} new: tokens agreeing "
      f"{100 * agreement:.2f}%, continuations identical {100 * identical:.1f}%"
  )
  print(
      json.dumps(
          {
              "targets": int(targets.size),
              "perplexity": perplexity,
              "int8_relative_perplexity": relative,
              "greedy_token_agreement": agreement,
              "greedy_identical": identical,
          }
      ),
      flush=True,
  )


if __name__ == "__main__":
  cli.start(main)
