"""The decode KV cache: its layout, where it lives on the mesh, and how a step writes and reads it.

Per segment of the model, one KVCache: (key, value), each [num_groups, b, max_length, k, h] in the compute
dtype, one K and one V per CLA group (never per layer); an int8 cache (kv_quant) holds them quantised and adds
(key_scale, value_scale), each [num_groups, b, max_length, k]. A decode step `write`s its new positions into
its group's slice and every layer of the group `attend`s to that slice where it lies; row r's token at
position p goes to slot p of row r, and a query at position p sees slots 0..p of its row (the causal mask and
the per-row length mask in one).

Shapes: b = batch, t = new positions, n = query heads, k = KV heads, g = n / k, h = head_dim.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cla_jax import kv_quant

Array = jax.Array
KVCache = tuple[Array, ...]  # one segment's: (key, value) or, int8, (key, value, key_scale, value_scale)
Cache = list[KVCache]  # one per segment of the model

# Logical axes of the arrays `shapes` lays out, which the rule table (sharding.LOGICAL_AXIS_RULES) maps to the
# mesh: rows over the batch axes, K/V heads over tensor.
KV_AXES = ("layers", "activation_batch", "activation_length", "cache_kv_heads", "head_dim")  # [g, b, s, k, h]
SCALE_AXES = KV_AXES[:-1]  # int8 scales [g, b, s, k]
DECODE_BLOCK = 64  # cache slots per step of `attend`: its temporaries are [b, t, n, block] scores and K/V


class Layout(Protocol):
  """What the cache's shapes depend on (a model.ModelConfig has all of it)."""

  segments: tuple[tuple[int, int], ...]  # (group size, number of groups) per segment
  num_kv_heads: int
  head_dim: int
  compute_dtype: Any


def shapes(cfg: Layout, batch: int, max_length: int, kv_cache_dtype: str = "auto") -> Cache:
  """ShapeDtypeStructs of the cache: per segment (key, value), each [num_groups, b, max_length, k, h], in the
  compute dtype (`auto`) or int8 followed by (key_scale, value_scale), each [num_groups, b, max_length, k]."""
  kv_cache_dtype = kv_quant.check_kv_cache_dtype(kv_cache_dtype)
  out = []
  for _, num_groups in cfg.segments:
    shape = (num_groups, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    if kv_cache_dtype == "int8":
      scales = jax.ShapeDtypeStruct(shape[:-1], kv_quant.SCALE_DTYPE)
      out.append((jax.ShapeDtypeStruct(shape, jnp.int8),) * 2 + (scales,) * 2)
    else:
      out.append((jax.ShapeDtypeStruct(shape, cfg.compute_dtype),) * 2)
  return out


def logical_axes(array: Any) -> tuple[str, ...]:
  """The logical axes of one array of the cache (or of its shapes): keys and values, or int8 scales."""
  return KV_AXES if array.ndim == len(KV_AXES) else SCALE_AXES


def init(cfg: Layout, batch: int, max_length: int, kv_cache_dtype: str = "auto") -> Cache:
  """A zero cache (see `shapes`)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes(cfg, batch, max_length, kv_cache_dtype))


def bytes_per_token(cfg: Layout, kv_cache_dtype: str = "auto") -> int:
  """Bytes one token of one sequence occupies in the cache as allocated (scales included)."""
  leaves = jax.tree.leaves(shapes(cfg, 1, 1, kv_cache_dtype))
  return sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in leaves)


def write(cache: KVCache, key: Array, value: Array, positions: Array, group: Array | int) -> KVCache:
  """Writes new keys/values [b, t, k, h] at each row's own positions [b, t] into slice `group` of a segment's
  cache (quantised first when the cache is int8); a carried cache is updated in place."""
  rows = jnp.arange(key.shape[0])[:, None]
  index = (group, rows, positions)
  new = (key, value)
  if len(cache) == 4:
    (key_q, key_scale), (value_q, value_scale) = kv_quant.quantize(key), kv_quant.quantize(value)
    new = (key_q, value_q, key_scale, value_scale)
  # Slots past the cache's end are dropped; decode.py refuses requests that would need them.
  return tuple(c.at[index].set(n.astype(c.dtype), mode="drop") for c, n in zip(cache, new))


def attend(query: Array, cache: KVCache, group: Array | int, positions: Array) -> Array:
  """Attention of query [b, t, n, h] at positions [b, t] over slots 0..position of group `group`'s cache.

  Reads the cache where it lies, DECODE_BLOCK slots at a time with a running softmax (as flash attention
  does), and only up to the furthest position in the batch: a step's temporaries are a block's scores and
  K/V, never a copy of the group's [b, max_length, k, h] (which would cost as much per sequence as an MQA
  layer's cache). int8 blocks are scaled inside the products: scores by the key scales, probabilities by
  the value scales.
  """
  b, t, n, h = query.shape
  length, k = cache[0].shape[2], cache[0].shape[3]
  g = n // k
  block = min(DECODE_BLOCK, length)
  scaled = len(cache) == 4
  dtype = query.dtype
  q = (query.astype(jnp.float32) * h**-0.5).astype(dtype).reshape(b, t, k, g, h)
  num_blocks = -(-(jnp.max(positions) + 1) // block)  # blocks holding any visible slot

  def read(c, start):
    # [b, block, k(, h)] of group `group`: a dynamic slice of the carried cache, no bigger than a block.
    sizes = (1, b, block, *c.shape[3:])
    return jax.lax.dynamic_slice(c, (group, 0, start) + (0,) * (c.ndim - 3), sizes)[0]

  def body(i, state):
    best, total, acc = state  # [b, t, k, g], [b, t, k, g], [b, t, k, g, h] (fp32)
    # The last block is moved back to end at the cache's end (a length need not divide by the block);
    # slots it shares with the previous block are masked out, so each slot counts once.
    start = jnp.minimum(i * block, length - block)
    slots = start + jnp.arange(block)
    visible = (slots[None, None, :] >= i * block) & (slots[None, None, :] <= positions[:, :, None])  # [b, t, s]
    keys, values = read(cache[0], start), read(cache[1], start)
    scores = jnp.einsum("btkgh,bskh->btkgs", q, keys.astype(dtype), preferred_element_type=jnp.float32)
    if scaled:
      scores = scores * read(cache[2], start).astype(jnp.float32).transpose(0, 2, 1)[:, None, :, None, :]
    scores = jnp.where(visible[:, :, None, None, :], scores, -jnp.inf)
    new_best = jnp.maximum(best, scores.max(axis=-1))
    # Rows whose slots are all masked so far keep best = -inf; subtracting 0 keeps exp() at 0, not NaN.
    shift = jnp.where(jnp.isfinite(new_best), new_best, 0.0)
    probs = jnp.exp(scores - shift[..., None])
    correction = jnp.exp(jnp.where(jnp.isfinite(best), best - shift, -jnp.inf))
    total = total * correction + probs.sum(axis=-1)
    if scaled:
      probs = probs * read(cache[3], start).astype(jnp.float32).transpose(0, 2, 1)[:, None, :, None, :]
    update = jnp.einsum(
        "btkgs,bskh->btkgh", probs.astype(dtype), values.astype(dtype), preferred_element_type=jnp.float32
    )
    return new_best, total, acc * correction[..., None] + update

  state = (
      jnp.full((b, t, k, g), -jnp.inf, jnp.float32),
      jnp.zeros((b, t, k, g), jnp.float32),
      jnp.zeros((b, t, k, g, h), jnp.float32),
  )
  _, total, acc = jax.lax.fori_loop(0, num_blocks, body, state)
  return (acc / total[..., None]).reshape(b, t, n, h).astype(query.dtype)
