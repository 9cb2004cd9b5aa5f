"""The decode loop compiled for a TPU v5e (libtpu's compile-only devices on this CPU host): one more sequence
costs its own cache and little more, whatever the head size and cache dtype."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax import config_lib, decode, kv_cache, topology
from tests.model_helpers import decode_loop_bytes

CHIPS = 4  # v5e:2x2


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
  grown = decode_loop_bytes(decoder, large, context, jnp.bfloat16) - decode_loop_bytes(
      decoder, small, context, jnp.bfloat16
  )
  cache = (large - small) * context * kv_cache.bytes_per_token(cfg, kv_cache_dtype) // CHIPS
  # The cache itself (allocated bytes, scales included), within 5%: logits, sampling state and blocks of
  # scores grow with the batch too, and XLA's choice of what else to keep varies a little with the batch.
  assert 0.95 * cache <= grown <= 1.05 * cache, grown / cache
