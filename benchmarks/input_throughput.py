"""Input pipeline throughput (tokens/s) against what the config's train step consumes, on this machine.

  python benchmarks/input_throughput.py [--config=configs/default.py] [--batches=200] [--train_steps=5]

Prints one JSON line: pipeline tokens/s (one thread, `batch(step)` only; and through the prefetching
iterator), train-step tokens/s (the trainer's own `train_step.jit_train_step` on the config's model, batch
and sequence length), and their ratio (the headroom; the issue asks for >= 10x).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cla_jax import cli, config_lib, optim, sharding, train_step  # noqa: E402
from cla_jax import model as model_lib
from cla_jax.data import batches as batches_lib  # noqa: E402
from cla_jax.data import prepare  # noqa: E402
from cla_jax.data import tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", config_lib.DEFAULT_CONFIG, "Experiment config.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Batches timed through the pipeline.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 5, "Train steps timed (after 2 for compilation).")


def pipeline_tokens_per_s(batches: batches_lib.TrainBatches, n: int) -> tuple[float, float]:
  """(tokens/s of direct batch(step) calls, tokens/s through the prefetching iterator)."""
  tokens = batches.local_batch * batches.seq_len * n
  batches.batch(0)  # first touch of the shards and the epoch permutation
  start = time.perf_counter()
  for step in range(n):
    batches.batch(step)
  direct = tokens / (time.perf_counter() - start)
  it = batches.iterator(n)
  next(it)
  start = time.perf_counter()
  for _ in range(n):
    next(it)
  return direct, tokens / (time.perf_counter() - start)


def train_tokens_per_s(config, batch: dict, steps: int) -> float:
  """Tokens/s of the trainer's own jitted step (`train_step.jit_train_step`) on the config's mesh."""
  cfg = config_lib.model_config(config)
  mesh = sharding.make_mesh(config.mesh)
  model, tx = model_lib.Transformer(cfg), optim.make_optimizer(config.train)
  param_sh, opt_sh = train_step.state_shardings(model_lib.abstract_params(cfg), tx, mesh)
  params, opt_state = train_step.init_state(model, tx, mesh, param_sh, opt_sh, jax.random.key(0))
  step = train_step.jit_train_step(model, tx, config.train.grad_accum_steps, mesh, param_sh, opt_sh)
  batch = sharding.global_batch(batch, mesh)
  for _ in range(2):
    params, opt_state, metrics = step(params, opt_state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, metrics = step(params, opt_state, batch)
  jax.block_until_ready(metrics)
  return batch["inputs"].size * steps / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  tok = tokenizer_lib.get_tokenizer(config)
  config.model.vocab_size = tokenizer_lib.fitted_vocab_size(tok, config.model.vocab_size, config.data.pad_vocab)
  data = prepare.open_split(config, tok, "train", config.train.seq_len)
  batches = batches_lib.TrainBatches(data, config.train.batch_size, config.data, tok.eos_id, 0, 1)  # one host
  direct, prefetched = pipeline_tokens_per_s(batches, _BATCHES.value)
  train = train_tokens_per_s(config, batches.batch(0), _TRAIN_STEPS.value)
  print(
      json.dumps(
          {
              "device": jax.devices()[0].device_kind,
              "batch_size": batches.global_batch,
              "seq_len": batches.seq_len,
              "packing": batches.packing,
              "pipeline_tokens_per_s": round(direct),
              "pipeline_prefetched_tokens_per_s": round(prefetched),
              "train_step_tokens_per_s": round(train),
              "headroom": round(direct / train, 1),
          }
      )
  )


if __name__ == "__main__":
  cli.start(main)
