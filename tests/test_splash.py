"""The TPU splash attention path (Pallas interpret mode on CPU) equals jax.nn.dot_product_attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax import splash


def _inputs(kv_heads: int, packed: bool):
  b, t, n, h = 2, 256, 4, 32  # two 128-blocks of positions: the kernel skips the block above the diagonal
  keys = jax.random.split(jax.random.key(kv_heads), 3)
  query = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
  key = jax.random.normal(keys[1], (b, t, kv_heads, h), jnp.float32)
  value = jax.random.normal(keys[2], (b, t, kv_heads, h), jnp.float32)
  # Documents of 100, 60 and 96 tokens in row 0 (one crosses the block boundary), one in row 1.
  segment_ids = jnp.asarray([[1] * 100 + [2] * 60 + [3] * 96, [1] * t], jnp.int32) if packed else None
  return query, key, value, segment_ids


def _reference(query, key, value, segment_ids):
  mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=True, implementation="xla")


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads, packed", [(1, False), (1, True), (2, True)])
def test_splash_matches_the_library(kv_heads, packed):
  query, key, value, segment_ids = _inputs(kv_heads, packed)
  ours = functools.partial(splash.splash_attention, segment_ids=segment_ids, interpret=True)
  ref = functools.partial(_reference, segment_ids=segment_ids)
  np.testing.assert_allclose(ours(query, key, value), ref(query, key, value), atol=2e-5, rtol=1e-5)
  cotangent = jax.random.normal(jax.random.key(9), query.shape)

  def grads(fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2))(query, key, value)

  for got, want in zip(grads(ours), grads(ref)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_short_sequences_are_not_tiled():
  assert splash.supported(2048, 2048) and not splash.supported(1, 1) and not splash.supported(100, 100)
  assert splash.block_size(2048) == 512 and splash.block_size(384) == 128
