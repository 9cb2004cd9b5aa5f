"""What CLA buys at inference: KV-cache bytes, the largest batch that fits a memory budget, decode speed.

  python benchmarks/decode.py --scale=tiny                     # CPU, minutes; + transformers side by side
  python benchmarks/decode.py --scale=paper --context=4096 --memory_bytes=60e9 --memory_only   # 1B rows, CPU
  python benchmarks/decode.py --topology=v5e-8 --scale=paper   # 1B rows compiled for a TPU slice (libtpu)

For each paper row (default H128-MQA, H128-MQA-CLA2, H64-MQA, H128-GQA4 and the MQA rows with an int8
cache: a row name ending in `-int8` sets kv_cache_dtype=int8), on one device: KV bytes per token
(`describe`, 16-bit; for int8 rows the allocated bytes, scales included) and the cache bytes at `--batch`
x `--context`; the largest batch whose decode program fits `--memory_bytes`, found from the compiled
program's memory analysis (params + cache + temporaries); the prefill time of `--batch` prompts of
`--prompt_len` tokens; decode tokens/s at `--batch` and at the row's own largest batch (the
`lax.while_loop` of `--decode_steps` tokens, cache donated, attending over a `--context`-slot cache).

`--memory_only` keeps the largest batch only (params abstract: nothing allocated, nothing timed) and adds
the prefill program's bytes at `--batch`. `--topology=v5e-8` compiles the prefill and the decode loop for
that TPU slice instead (compile-only devices, `cla_jax.topology`): bf16 params sharded over every chip, the
batch split over the chips, the budget each chip's HBM; the figures are per chip.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cla_jax import cli, config_lib, decode, describe, export_hf, kv_cache, sharding
from cla_jax import model as model_lib

_ROWS = flags.DEFINE_list(
    "rows",
    ["H128-MQA", "H128-MQA-CLA2", "H64-MQA", "H128-GQA4", "H128-MQA-int8", "H128-MQA-CLA2-int8"],
    "Paper rows (Table 1); a `-int8` suffix stores the row's KV cache in int8 (kv_cache_dtype=int8).",
)
_SCALE = flags.DEFINE_enum("scale", "tiny", ["tiny", "paper"], "tiny: shrunk rows for a CPU; paper: the 1B rows.")
_CONTEXT = flags.DEFINE_integer("context", None, "Cache length in tokens (default: tiny 1024, paper 4096).")
_MEMORY = flags.DEFINE_float(
    "memory_bytes", None, "Memory budget for the decode program " "(default: tiny 64 MiB, paper 40e9)."
)
_BATCH = flags.DEFINE_integer("batch", 8, "The common batch for cache bytes, prefill and decode speed.")
_PROMPT = flags.DEFINE_integer("prompt_len", None, "Prompt tokens per row (default: context / 2).")
_STEPS = flags.DEFINE_integer("decode_steps", 16, "Tokens per timed decode loop.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats (the fastest counts: the machine is shared).")
_MEMORY_ONLY = flags.DEFINE_bool(
    "memory_only", False, "Only the largest batches (compiled, params abstract): no timing, no weights allocated."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "Compile for this TPU slice (e.g. v5e-8; needs libtpu) instead of the local device: bf16 params sharded "
    "over the slice, batch split over its chips, budget = HBM per chip; implies --memory_only.",
)
_HF = flags.DEFINE_bool(
    "hf", None, "Also time transformers' generate (static cache) on the H128-MQA size " "(default: on at tiny scale)."
)

TINY_WIDTH_DIVISOR, TINY_LAYERS, TINY_VOCAB = 8, 4, 2048


INT8_SUFFIX = "-int8"


def split_row(name: str) -> tuple[str, str]:
  """(paper row, kv_cache_dtype) of a benchmark row name: `H128-MQA-CLA2-int8` -> (H128-MQA-CLA2, int8)."""
  if name.endswith(INT8_SUFFIX):
    return name[: -len(INT8_SUFFIX)], "int8"
  return name, "auto"


def row_config(name: str, scale: str, dtype: str | None = None) -> model_lib.ModelConfig:
  """The paper row's ModelConfig, or its tiny version (same heads, KV heads, head-size ratio, pattern)."""
  cfg = config_lib.model_config(config_lib.load(f"configs/paper_1b.py:{split_row(name)[0]}"))
  if dtype is not None:
    cfg = dataclasses.replace(cfg, dtype=dtype)
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


def kv_bytes_per_token(cfg: model_lib.ModelConfig, kv_cache_dtype: str) -> int:
  """16-bit K/V bytes per token as the paper counts them; for int8, the allocated bytes with the scales."""
  if kv_cache_dtype == "int8":
    return kv_cache.bytes_per_token(cfg, "int8")
  return describe.describe(cfg)["kv_bytes_per_token"]


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
  """One row's decoder on a mesh, with random params (or abstract ones) and a zero cache.

  The cache's contents do not change timing. With `abstract_params` only compiled memory is measured:
  the params are ShapeDtypeStructs in `param_dtype` with the decoder's shardings, nothing is allocated.
  """

  def __init__(
      self,
      cfg: model_lib.ModelConfig,
      steps: int,
      kv_cache_dtype: str = "auto",
      mesh: jax.sharding.Mesh | None = None,
      abstract_params: bool = False,
      param_dtype: object = jnp.float32,
  ):
    self.cfg, self.steps, self.kv_cache_dtype = cfg, steps, kv_cache_dtype
    self.decoder = decode.Decoder(cfg, mesh or sharding.single_device_mesh(), decode.Sampling(), kv_cache_dtype)
    if abstract_params:
      shapes = nn.meta.unbox(model_lib.abstract_params(cfg))
      self.params = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, param_dtype, sharding=s), shapes, self.decoder.param_shardings
      )
    else:
      with jax.set_mesh(self.decoder.mesh):
        self.params = jax.jit(
            lambda: model_lib.init_params(cfg, jax.random.key(0)), out_shardings=self.decoder.param_shardings
        )()
    self.rng = jax.random.key(0)
    self.batch_multiple = self.decoder.batch_multiple()

  def _loop_args(self, batch: int, context: int, abstract: bool):
    """(first token, lengths, cache) for a loop whose rows start `steps` slots before the cache's end."""
    rows = sharding.batch_sharding(self.decoder.mesh, 1)

    def make(shape, dtype, placement, fill=0):
      # Placed as the loop returns them, so the first call compiles the same program as every later one.
      if abstract:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=placement)
      return jax.device_put(jnp.full(shape, fill, dtype), placement)

    shapes = kv_cache.shapes(self.cfg, batch, context, self.kv_cache_dtype)
    cache = jax.tree.map(lambda s, p: make(s.shape, s.dtype, p), shapes, self.decoder.cache_sharding)
    return make((batch,), jnp.int32, rows), make((batch,), jnp.int32, rows, context - self.steps), cache

  def _loop(self, first, lengths, cache):
    return self.decoder.loop(self.params, first, lengths, cache, self.rng, jnp.int32(-1), max_new_tokens=self.steps)

  @staticmethod
  def _bytes(lowered) -> int:
    """Bytes a lowered program needs per device once compiled: arguments + outputs - aliases + temporaries.

    A TPU compile refuses a program that cannot fit its HBM: that counts as too big (2**62 bytes).
    """
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" in str(e):
        return 2**62
      raise
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)

  def _scalars(self):
    """Abstract (rng, eos_id), replicated on the mesh: compile-only devices cannot hold concrete ones."""
    everywhere = jax.sharding.NamedSharding(self.decoder.mesh, jax.sharding.PartitionSpec())
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=everywhere)
    return rng, jax.ShapeDtypeStruct((), jnp.int32, sharding=everywhere)

  def decode_memory(self, batch: int, context: int) -> int:
    """Bytes per device of the compiled decode loop at `batch`."""
    rng, eos_id = self._scalars()
    with jax.set_mesh(self.decoder.mesh):
      first, lengths, cache = self._loop_args(batch, context, abstract=True)
      lowered = self.decoder.loop.lower(self.params, first, lengths, cache, rng, eos_id, max_new_tokens=self.steps)
    return self._bytes(lowered)

  def prefill_memory(self, batch: int, context: int, prompt_len: int) -> int:
    """Bytes per device of the compiled prefill of `batch` prompts of `prompt_len` tokens."""
    rows = sharding.batch_sharding(self.decoder.mesh, 1)
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=sharding.batch_sharding(self.decoder.mesh))
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    rng = self._scalars()[0]
    with jax.set_mesh(self.decoder.mesh):
      lowered = self.decoder.prefill.lower(self.params, tokens, lengths, rng, max_length=context)
    return self._bytes(lowered)

  def max_batch(self, budget: float, context: int) -> int:
    """The largest batch (a multiple of the mesh's batch ways) whose compiled decode loop fits `budget` bytes."""
    unit = self.batch_multiple
    memory = lambda b: self.decode_memory(b, context)  # noqa: E731
    memo = {}

    def fits(k):  # k units of `unit` rows
      if k not in memo:
        memo[k] = memory(k * unit)
      return memo[k] <= budget

    if not fits(1):
      return 0
    # Memory is affine in the batch: two compiled sizes point at the answer, compiles around it confirm it.
    fits(2)
    # A sequence costs at least its own cache: a floor on the slope when the two sizes measure alike (XLA
    # CPU can report equal memory for batch 1 and 2 with a bf16 cache), which would make the guess explode.
    per_unit = max(memo[2] - memo[1], self.cache_bytes(unit, context) // self.decoder.mesh.size, 1)
    guess = max(1, int((budget - memo[1]) // per_unit) + 1)
    # Gallop from the guess (it is nearly exact, and each compile of a 1B program takes a while), then bisect.
    step = 1
    if fits(guess):
      low = guess
      while fits(low + step):
        low, step = low + step, step * 2
      high = low + step
    else:
      high = guess
      while high - step >= 1 and not fits(high - step):
        high, step = high - step, step * 2
      low = max(high - step, 1)
    while high - low > 1:
      mid = (low + high) // 2
      low, high = (mid, high) if fits(mid) else (low, mid)
    return low * unit

  def cache_bytes(self, batch: int, context: int) -> int:
    """Bytes of a cache of `batch` x `context` (all devices together)."""
    return batch * context * kv_cache.bytes_per_token(self.cfg, self.kv_cache_dtype)

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


def target() -> tuple[jax.sharding.Mesh | None, float | None, str, str | None]:
  """(mesh, budget per device, device name, dtype override): the local device, or --topology's slice.

  On a TPU slice the params are sharded over every chip (fsdp) and so is the batch; the compute dtype is
  bf16 there (`auto` would resolve for this host's CPU backend, not for the target).
  """
  if _TOPOLOGY.value is None:
    return None, None, jax.devices()[0].device_kind, None
  from cla_jax import topology  # pylint: disable=g-import-not-at-top  (loads libtpu)

  slice_ = topology.parse(_TOPOLOGY.value)
  devices = np.asarray(topology.compile_only_devices(slice_)).reshape(1, slice_.chips, 1)
  mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  name = f"{slice_.name} ({devices.flat[0].device_kind}, compile-only)"
  return mesh, float(slice_.hbm_per_chip_bytes), name, "bfloat16"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}.")
  scale = _SCALE.value
  context = _CONTEXT.value or (1024 if scale == "tiny" else 4096)
  prompt_len = _PROMPT.value or context // 2
  batch, steps = _BATCH.value, _STEPS.value
  for name, value, low in (("context", context, 2), ("batch", batch, 1), ("decode_steps", steps, 2)):
    if value < low:
      raise cli.UserError(f"--{name} must be at least {low}, got {value}.")
  if not 0 < prompt_len <= context - steps:
    raise cli.UserError(f"--prompt_len={prompt_len} must lie in [1, context - decode_steps = {context - steps}].")
  for name in _ROWS.value:
    config_lib.load(f"configs/paper_1b.py:{split_row(name)[0]}")  # an unknown row fails before any compile
  mesh, hbm, device, dtype = target()
  budget = _MEMORY.value or hbm or (64 * 2**20 if scale == "tiny" else 40e9)
  if budget <= 0:
    raise cli.UserError(f"--memory_bytes must be positive, got {budget}.")
  memory_only = _MEMORY_ONLY.value or mesh is not None

  rows = []
  for name in _ROWS.value:
    kv_cache_dtype = split_row(name)[1]
    cfg = row_config(name, scale, dtype)
    bench = RowBench(cfg, steps, kv_cache_dtype, mesh, abstract_params=memory_only, param_dtype=cfg.compute_dtype)
    row = {
        "name": name,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, kv_cache_dtype),
        "cache_bytes": bench.cache_bytes(batch, context),
        "max_batch": bench.max_batch(budget, context),
    }
    if memory_only:
      # One compile: a 1B prefill is a long compile, and serving prefills a few prompts at a time anyway.
      row["prefill_bytes_at_batch"] = bench.prefill_memory(batch, context, prompt_len)
    else:
      row["prefill_ms"] = 1e3 * bench.prefill_seconds(batch, prompt_len, context)
      row["decode_tokens_per_s"] = bench.decode_tokens_per_s(batch, context)
      row["decode_tokens_per_s_at_max_batch"] = (
          bench.decode_tokens_per_s(row["max_batch"], context) if row["max_batch"] else 0.0
      )
    rows.append(row)
    print(f"  {name}: max batch {row['max_batch']}", flush=True)

  cfg0 = row_config(_ROWS.value[0], scale, dtype)
  print(
      f"\nscale={scale} ({cfg0.num_layers} layers, d_model {cfg0.d_model}, vocab {cfg0.vocab_size}), "
      f"context {context}, prompt {prompt_len}, budget {budget / 2**20:.0f} MiB per device, batch {batch}, "
      f"{steps} decode steps, {device} ({jnp.dtype(cfg0.compute_dtype).name} compute and params)"
  )
  base = rows[0]
  if memory_only:
    print(f"{'row':<20}{'KV B/token':>11}{'max batch':>10}{'x':>6}{f'prefill @{batch} GiB':>17}")
    for r in rows:
      print(
          f"{r['name']:<20}{r['kv_bytes_per_token']:>11,}{r['max_batch']:>10}"
          f"{r['max_batch'] / max(base['max_batch'], 1):>6.2f}{r['prefill_bytes_at_batch'] / 2**30:>17.2f}"
      )
  else:
    header = (
        f"{'row':<20}{'KV B/token':>11}{'cache MiB':>10}{'max batch':>10}{'x':>6}{'prefill ms':>11}"
        f"{'step ms':>9}{'tok/s @' + str(batch):>11}{'tok/s @max':>11}{'x':>6}"
    )
    print(header)
    for r in rows:
      step_ms = 1e3 * batch / max(r["decode_tokens_per_s"], 1e-9)
      print(
          f"{r['name']:<20}{r['kv_bytes_per_token']:>11,}{r['cache_bytes'] / 2**20:>10.2f}{r['max_batch']:>10}"
          f"{r['max_batch'] / max(base['max_batch'], 1):>6.2f}{r['prefill_ms']:>11.1f}{step_ms:>9.2f}"
          f"{r['decode_tokens_per_s']:>11,.0f}{r['decode_tokens_per_s_at_max_batch']:>11,.0f}"
          f"{r['decode_tokens_per_s_at_max_batch'] / max(base['decode_tokens_per_s_at_max_batch'], 1e-9):>6.2f}"
      )
  print(f"(x: relative to {base['name']}; max batch: compiled memory analysis, per device)")

  result = {"context": context, "memory_bytes": int(budget), "device": device, "rows": rows}
  if not memory_only and (_HF.value if _HF.value is not None else scale == "tiny"):
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
  cli.start(main)
