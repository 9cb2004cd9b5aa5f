"""What CLA buys at inference: KV-cache bytes, the largest batch that fits a memory budget, decode speed.

  python benchmarks/decode.py --scale=tiny                     # CPU, minutes; + transformers side by side
  python benchmarks/decode.py --scale=paper --context=4096 --memory_bytes=60e9 --batch=16   # 1B rows, GPU/TPU

For each paper row (default H128-MQA, H128-MQA-CLA2, H64-MQA, H128-GQA4), on one device: KV bytes per
token (`describe`, 16-bit) and the cache bytes actually allocated at `--batch` x `--context` (the arrays'
nbytes, compute dtype); the largest batch whose decode program fits `--memory_bytes`, found from the
compiled program's memory analysis (params + cache + temporaries); the prefill time of `--batch` prompts
of `--prompt_len` tokens; decode tokens/s at `--batch` and at the row's own largest batch (the
`lax.while_loop` of `--decode_steps` tokens, cache donated, attending over a `--context`-slot cache).

`--scale=tiny` keeps each row's heads, KV heads, head-size ratio and sharing pattern and divides width by 8
(d_model 256, H128 -> head_dim 16) and depth to 4 layers, with a 2048-token vocabulary. With `--hf` (the
default at tiny scale) the H128-MQA size also runs through Hugging Face transformers' `generate` with a
static cache on the same CPU, greedy, same batch, prompt and cache length.

Prints a table, then one JSON line (the last line of stdout).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cla_jax import cli, config_lib, decode, describe, export_hf, sharding
from cla_jax import model as model_lib

_ROWS = flags.DEFINE_list("rows", ["H128-MQA", "H128-MQA-CLA2", "H64-MQA", "H128-GQA4"], "Paper rows (Table 1).")
_SCALE = flags.DEFINE_enum("scale", "tiny", ["tiny", "paper"], "tiny: shrunk rows for a CPU; paper: the 1B rows.")
_CONTEXT = flags.DEFINE_integer("context", None, "Cache length in tokens (default: tiny 1024, paper 4096).")
_MEMORY = flags.DEFINE_float(
    "memory_bytes", None, "Memory budget for the decode program " "(default: tiny 64 MiB, paper 40e9)."
)
_BATCH = flags.DEFINE_integer("batch", 8, "The common batch for cache bytes, prefill and decode speed.")
_PROMPT = flags.DEFINE_integer("prompt_len", None, "Prompt tokens per row (default: context / 2).")
_STEPS = flags.DEFINE_integer("decode_steps", 16, "Tokens per timed decode loop.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats (the fastest counts: the machine is shared).")
_HF = flags.DEFINE_bool(
    "hf", None, "Also time transformers' generate (static cache) on the H128-MQA size " "(default: on at tiny scale)."
)

TINY_WIDTH_DIVISOR, TINY_LAYERS, TINY_VOCAB = 8, 4, 2048


def row_config(name: str, scale: str) -> model_lib.ModelConfig:
  """The paper row's ModelConfig, or its tiny version (same heads, KV heads, head-size ratio, pattern)."""
  cfg = config_lib.model_config(config_lib.load(f"configs/paper_1b.py:{name}"))
  if scale == "tiny":
    div = TINY_WIDTH_DIVISOR
    cfg = dataclasses.replace(
        cfg,
        d_model=cfg.d_model // div,
        head_dim=cfg.head_dim // div,
        mlp_dim=cfg.mlp_dim // div,
        num_layers=TINY_LAYERS,
        vocab_size=TINY_VOCAB,
    )
    cfg.validate()
  return cfg


def _best_time(fn, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls (after one untimed warm-up call)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


class RowBench:
  """One row's decoder on one device, with random params and a zero cache (contents do not change timing)."""

  def __init__(self, cfg: model_lib.ModelConfig, steps: int):
    self.cfg, self.steps = cfg, steps
    self.decoder = decode.Decoder(cfg, decode.single_device_mesh(), decode.Sampling())
    with jax.set_mesh(self.decoder.mesh):
      self.params = jax.jit(
          lambda: model_lib.init_params(cfg, jax.random.key(0)), out_shardings=self.decoder.param_shardings
      )()
    self.rng = jax.random.key(0)

  def _loop_args(self, batch: int, context: int, abstract: bool):
    """(first token, lengths, cache) for a loop whose rows start `steps` slots before the cache's end."""
    rows = sharding.batch_sharding(self.decoder.mesh, 1)

    def make(shape, dtype, placement, fill=0):
      # Placed as the loop returns them, so the first call compiles the same program as every later one.
      if abstract:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=placement)
      return jax.device_put(jnp.full(shape, fill, dtype), placement)

    shapes = decode.cache_shapes(self.cfg, batch, context, self.decoder.kv_cache_dtype)
    cache = jax.tree.map(lambda s, p: make(s.shape, s.dtype, p), shapes, self.decoder.cache_sharding)
    return make((batch,), jnp.int32, rows), make((batch,), jnp.int32, rows, context - self.steps), cache

  def _loop(self, first, lengths, cache):
    return self.decoder.loop(self.params, first, lengths, cache, self.rng, jnp.int32(-1), max_new_tokens=self.steps)

  def decode_memory(self, batch: int, context: int) -> int:
    """Bytes the compiled decode loop needs at `batch`: arguments + outputs - donated aliases + temporaries."""
    with jax.set_mesh(self.decoder.mesh):
      first, lengths, cache = self._loop_args(batch, context, abstract=True)
      compiled = self.decoder.loop.lower(
          self.params, first, lengths, cache, self.rng, jnp.int32(-1), max_new_tokens=self.steps
      ).compile()
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)

  def max_batch(self, budget: float, context: int) -> int:
    """The largest batch whose compiled decode loop fits `budget` bytes (0 if not even batch 1)."""
    memo = {}

    def fits(b):
      if b not in memo:
        memo[b] = self.decode_memory(b, context)
      return memo[b] <= budget

    if not fits(1):
      return 0
    # Memory is affine in the batch: two compiled sizes point at the answer, compiles around it confirm it.
    fits(2)
    # A sequence costs at least its own cache: a floor on the slope when the two sizes measure alike (XLA
    # CPU can report equal memory for batch 1 and 2 with a bf16 cache), which would make the guess explode.
    per_sequence = max(memo[2] - memo[1], self.cache_bytes(1, context), 1)
    guess = max(1, int((budget - memo[1]) // per_sequence) + 1)
    low, high = (guess, None) if fits(guess) else (1, guess)
    if high is None:
      high = guess + 1
      while fits(high):
        low, high = high, high * 2
    while high - low > 1:
      mid = (low + high) // 2
      low, high = (mid, high) if fits(mid) else (low, mid)
    return low

  def cache_bytes(self, batch: int, context: int) -> int:
    """nbytes of an allocated cache of `batch` x `context`."""
    return sum(a.nbytes for a in jax.tree.leaves(decode.init_cache(self.cfg, batch, context)))

  def prefill_seconds(self, batch: int, prompt_len: int, context: int) -> float:
    """The prefill program: `batch` prompts of `prompt_len` tokens into a `context`-slot cache."""
    tokens = np.random.default_rng(0).integers(0, self.cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    lengths = np.full((batch,), prompt_len, np.int32)
    with jax.set_mesh(self.decoder.mesh):
      return _best_time(
          lambda: self.decoder.prefill(self.params, tokens, lengths, self.rng, max_length=context)[0], _REPEATS.value
      )

  def decode_tokens_per_s(self, batch: int, context: int) -> float:
    """Tokens/s of the decode loop: steps - 1 model calls per row (the first token comes from the prefill)."""
    first, lengths, cache = self._loop_args(batch, context, abstract=False)
    state = [cache]

    def run():
      out, state[0] = self._loop(first, lengths, state[0])  # the donated cache comes back for the next run
      return out

    with jax.set_mesh(self.decoder.mesh):
      seconds = _best_time(run, _REPEATS.value)
    return batch * (self.steps - 1) / seconds


def hf_generate(cfg: model_lib.ModelConfig, batch: int, prompt_len: int):
  """`run(new_tokens)`: greedy transformers LlamaForCausalLM `generate` with a static cache, same shapes as ours."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  hf_config = transformers.LlamaConfig.from_dict(
      export_hf.hf_config(cfg, llama=True, dtype="float32", max_positions=2048, special={})
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  tokens = torch.randint(0, cfg.vocab_size, (batch, prompt_len))

  def run(new):
    with torch.inference_mode():
      return model.generate(
          tokens,
          attention_mask=torch.ones_like(tokens),
          max_new_tokens=new,
          min_new_tokens=new,
          do_sample=False,
          cache_implementation="static",
          pad_token_id=0,
      )

  return run


def side_by_side(cfg: model_lib.ModelConfig, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
  """(cla_jax, transformers) greedy decode tokens/s, timed in alternation (the machine is shared).

  transformers' decode time is generate(steps) - generate(1): the steps - 1 decode calls without the prefill;
  ours is the decode loop's steps - 1 calls over a cache of prompt_len + steps slots, as HF's static cache.
  """
  ours = RowBench(cfg, steps)
  first, lengths, cache = ours._loop_args(batch, prompt_len + steps, abstract=False)
  state = [cache]

  def run_ours():
    out, state[0] = ours._loop(first, lengths, state[0])
    return jax.block_until_ready(out)

  run_hf = hf_generate(cfg, batch, prompt_len)
  timers = {"ours": run_ours, "hf_full": lambda: run_hf(steps), "hf_prefill": lambda: run_hf(1)}
  best = {name: float("inf") for name in timers}
  with jax.set_mesh(ours.decoder.mesh):
    for fn in timers.values():
      fn()  # warm-up / compile
    for _ in range(_REPEATS.value + 1):
      for name, fn in timers.items():
        start = time.perf_counter()
        fn()
        best[name] = min(best[name], time.perf_counter() - start)
  tokens = batch * (steps - 1)
  return tokens / best["ours"], tokens / (best["hf_full"] - best["hf_prefill"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}.")
  scale = _SCALE.value
  context = _CONTEXT.value or (1024 if scale == "tiny" else 4096)
  budget = _MEMORY.value or (64 * 2**20 if scale == "tiny" else 40e9)
  prompt_len = _PROMPT.value or context // 2
  batch, steps = _BATCH.value, _STEPS.value
  for name, value, low in (("context", context, 2), ("batch", batch, 1), ("decode_steps", steps, 2)):
    if value < low:
      raise cli.UserError(f"--{name} must be at least {low}, got {value}.")
  if not 0 < prompt_len <= context - steps:
    raise cli.UserError(f"--prompt_len={prompt_len} must lie in [1, context - decode_steps = {context - steps}].")
  if budget <= 0:
    raise cli.UserError(f"--memory_bytes must be positive, got {budget}.")

  rows = []
  for name in _ROWS.value:
    cfg = row_config(name, scale)
    bench = RowBench(cfg, steps)
    row = {
        "name": name,
        "kv_bytes_per_token": describe.describe(cfg)["kv_bytes_per_token"],
        "cache_bytes": bench.cache_bytes(batch, context),
        "max_batch": bench.max_batch(budget, context),
        "prefill_ms": 1e3 * bench.prefill_seconds(batch, prompt_len, context),
        "decode_tokens_per_s": bench.decode_tokens_per_s(batch, context),
    }
    row["decode_tokens_per_s_at_max_batch"] = (
        bench.decode_tokens_per_s(row["max_batch"], context) if row["max_batch"] else 0.0
    )
    rows.append(row)
    print(f"  {name}: done", flush=True)

  device = jax.devices()[0]
  cfg0 = row_config(_ROWS.value[0], scale)
  print(
      f"\nscale={scale} ({cfg0.num_layers} layers, d_model {cfg0.d_model}, vocab {cfg0.vocab_size}), "
      f"context {context}, prompt {prompt_len}, budget {budget / 2**20:.0f} MiB, batch {batch}, "
      f"{steps} decode steps, {device.device_kind} ({jnp.dtype(cfg0.compute_dtype).name} cache)"
  )
  base = rows[0]
  header = (
      f"{'row':<16}{'KV B/token':>11}{'cache MiB':>10}{'max batch':>10}{'x':>6}{'prefill ms':>11}"
      f"{'step ms':>9}{'tok/s @' + str(batch):>11}{'tok/s @max':>11}{'x':>6}"
  )
  print(header)
  for r in rows:
    step_ms = 1e3 * batch / max(r["decode_tokens_per_s"], 1e-9)
    print(
        f"{r['name']:<16}{r['kv_bytes_per_token']:>11,}{r['cache_bytes'] / 2**20:>10.2f}{r['max_batch']:>10}"
        f"{r['max_batch'] / max(base['max_batch'], 1):>6.2f}{r['prefill_ms']:>11.1f}{step_ms:>9.2f}"
        f"{r['decode_tokens_per_s']:>11,.0f}{r['decode_tokens_per_s_at_max_batch']:>11,.0f}"
        f"{r['decode_tokens_per_s_at_max_batch'] / max(base['decode_tokens_per_s_at_max_batch'], 1e-9):>6.2f}"
    )
  print(f"(x: relative to {base['name']})")

  result = {"context": context, "memory_bytes": int(budget), "rows": rows}
  if _HF.value if _HF.value is not None else scale == "tiny":
    # Side by side on the same MQA size: batch, prompt and cache length (prompt + steps) the same for both.
    mqa = row_config("H128-MQA", scale)
    hf_prompt = min(prompt_len, 128)
    ours, hf = side_by_side(mqa, batch, hf_prompt, steps)
    print(
        f"H128-MQA size, batch {batch}, prompt {hf_prompt}, cache {hf_prompt + steps}, greedy: "
        f"cla_jax {ours:,.0f} tokens/s, transformers generate (static cache) {hf:,.0f} tokens/s: "
        f"{ours / hf:.2f}x"
    )
    result["transformers_static_cache"] = {
        "name": "H128-MQA",
        "batch": batch,
        "prompt_len": hf_prompt,
        "cla_jax_tokens_per_s": ours,
        "transformers_tokens_per_s": hf,
    }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  cli.run(main)
