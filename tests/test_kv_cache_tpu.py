"""The decode loop compiled for a TPU v5e (libtpu's compile-only devices on this CPU host): one more sequence
costs its own cache and little more, whatever the head size and cache dtype."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax import config_lib, decode, kv_cache, sharding, topology
from cla_jax import model as model_lib

CHIPS = 4  # v5e:2x2


def _loop_bytes(decoder: decode.Decoder, batch: int, context: int) -> int:
  """Bytes a chip needs for the compiled decode loop at `batch`: arguments + outputs - aliases + temporaries."""
  cfg, mesh = decoder.cfg, decoder.mesh
  everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = lambda s, where, dtype=None: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=where)  # noqa: E731
  params = jax.tree.map(
      lambda s, where: abstract(s, where, jnp.bfloat16),
      nn.meta.unbox(model_lib.abstract_params(cfg)),
      decoder.param_shardings,
  )
  cache = jax.tree.map(abstract, kv_cache.shapes(cfg, batch, context, decoder.kv_cache_dtype), decoder.cache_sharding)
  tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=everywhere)
  eos = jax.ShapeDtypeStruct((), jnp.int32, sharding=everywhere)
  with jax.set_mesh(mesh):
    compiled = decoder.loop.lower(params, tokens, tokens, cache, rng, eos, max_new_tokens=4).compile()
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


@pytest.mark.slow  # 4 x 2 TPU compiles of a 2-layer 1B-width decoder: about a minute
@pytest.mark.parametrize(
    "row,kv_cache_dtype", [("H64-MQA", "int8"), ("H64-MQA", "auto"), ("H128-MQA-CLA2", "int8"), ("H128-GQA4", "auto")]
)
def test_one_more_sequence_costs_its_cache_on_a_tpu(row, kv_cache_dtype):
  # Before the [g, b, k, rows, lanes] layout (kv_cache.py's docstring says why), H64-MQA-int8 grew by 4x
  # its cache per sequence here: the loop held two padded copies of the whole cache.
  cfg = config_lib.model_config(config_lib.load(f"configs/paper_1b.py:{row}"))
  # Two layers (one CLA2 group) at the row's widths; a small vocabulary keeps the compile short.
  cfg = dataclasses.replace(cfg, num_layers=2, vocab_size=2048, dtype="bfloat16")
  devices = np.asarray(topology.compile_only_devices(topology.parse("v5e:2x2"))).reshape(1, CHIPS, 1)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
  decoder = decode.Decoder(cfg, mesh, decode.Sampling(), kv_cache_dtype)
  context, small, large = 4096, 16 * CHIPS, 256 * CHIPS
  grown = _loop_bytes(decoder, large, context) - _loop_bytes(decoder, small, context)
  cache = (large - small) * context * kv_cache.bytes_per_token(cfg, kv_cache_dtype) // CHIPS
  # The cache itself (allocated bytes, scales included), within 5%: logits, sampling state and blocks of
  # scores grow with the batch too, and XLA's choice of what else to keep varies a little with the batch.
  assert 0.95 * cache <= grown <= 1.05 * cache, grown / cache
