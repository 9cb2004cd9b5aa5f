"""The decode KV cache: its layout, where it lives on the mesh, and how a step writes and reads it.

Per segment of the model, one KVCache: (key, value), each [num_groups, b, k, rows, lanes] in the compute dtype,
one K and one V per CLA group (never per layer); an int8 cache (kv_quant) holds them quantised and adds
(key_scale, value_scale), each [num_groups, k, b, slots]. A row holds `tokens_per_row(h)` consecutive tokens
side by side (lanes = tokens_per_row * h): 1 for heads of 128 or more, 2 for 64-wide heads. A decode step
`write`s its new positions into its group's slice and every layer of the group `attend`s to that slice where
it lies; a query at position p sees slots 0..p of its row of the batch (the causal mask and the per-row
length mask in one).

Why this layout: a TPU tiles the two minor dims of a buffer by (8..32 sublanes, 128 lanes). A 64-wide int8
head as the minor dim, or a KV-head dim of 1 among the two minor dims, is padded, and when the decode loop
wants another layout than the cache arrives in, XLA copies the whole cache (padded) into temporaries: with
[g, b, s, k, h] and [g, b, s, k] an H64-MQA int8 cache cost three times its own size per sequence. Here both
minor dims are dense for every head size that divides 128 (tests/test_kv_cache_tpu.py compiles it for a v5e).

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
# mesh: rows of the batch over the batch axes, K/V heads over tensor.
KV_AXES = ("layers", "activation_batch", "cache_kv_heads", "activation_length", "head_dim")  # [g, b, k, rows, lanes]
SCALE_AXES = ("layers", "cache_kv_heads", "activation_batch", "activation_length")  # int8 scales [g, k, b, slots]
DECODE_BLOCK = 64  # cache slots per step of `attend`: its temporaries are [b, t, n, block] scores and K/V
LANES = 128  # a TPU vector register's lanes: the width a cache row is packed to


def tokens_per_row(head_dim: int) -> int:
  """Consecutive tokens one cache row holds: as many heads as fill the 128 lanes (1 when h >= 128)."""
  return LANES // head_dim if head_dim < LANES and LANES % head_dim == 0 else 1


class Layout(Protocol):
  """What the cache's shapes depend on (a model.ModelConfig has all of it)."""

  segments: tuple[tuple[int, int], ...]  # (group size, number of groups) per segment
  num_kv_heads: int
  head_dim: int
  compute_dtype: Any


def shapes(cfg: Layout, batch: int, max_length: int, kv_cache_dtype: str = "auto") -> Cache:
  """ShapeDtypeStructs of the cache: per segment (key, value), each [num_groups, b, k, rows, lanes], in the
  compute dtype (`auto`) or int8 followed by (key_scale, value_scale), each [num_groups, k, b, slots]; rows
  cover max_length rounded up to whole rows (the extra slots are never visible)."""
  kv_cache_dtype = kv_quant.check_kv_cache_dtype(kv_cache_dtype)
  per_row = tokens_per_row(cfg.head_dim)
  rows = -(-max_length // per_row)
  out = []
  for _, num_groups in cfg.segments:
    shape = (num_groups, batch, cfg.num_kv_heads, rows, per_row * cfg.head_dim)
    if kv_cache_dtype == "int8":
      scales = jax.ShapeDtypeStruct((num_groups, cfg.num_kv_heads, batch, rows * per_row), kv_quant.SCALE_DTYPE)
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
  per_row = tokens_per_row(cfg.head_dim)  # one whole row: a token's share of it is exact
  leaves = jax.tree.leaves(shapes(cfg, 1, per_row, kv_cache_dtype))
  return sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in leaves) // per_row


def _scatter(c: Array, new: Array, index: tuple[Array | int, ...]) -> Array:
  """c with new written at index: one entry per dim of c, each broadcast against [b, t, k]; keys and values
  (new [b, t, k, h]) are written as h lanes from the last index on. Only the lanes are a window: XLA:TPU lays
  a scatter's window dims out minor-most, so a KV-head window would transpose the whole cache.
  Slots past the cache's end are dropped; decode.py refuses requests that would need them."""
  points, lanes = new.shape[:3], new.ndim == 4
  dnums = jax.lax.ScatterDimensionNumbers(
      update_window_dims=(3,) if lanes else (),
      inserted_window_dims=tuple(range(c.ndim - 1 if lanes else c.ndim)),
      scatter_dims_to_operand_dims=tuple(range(c.ndim)),
  )
  where = jnp.stack([jnp.broadcast_to(jnp.asarray(i, jnp.int32), points) for i in index], axis=-1)
  return jax.lax.scatter(c, where, new.astype(c.dtype), dnums, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def write(cache: KVCache, key: Array, value: Array, positions: Array, group: Array | int) -> KVCache:
  """Writes new keys/values [b, t, k, h] at each row's own positions [b, t] into slice `group` of a segment's
  cache (quantised first when the cache is int8); a carried cache is updated in place."""
  b, _, k, h = key.shape
  per_row = tokens_per_row(h)
  rows, heads, positions = jnp.arange(b)[:, None, None], jnp.arange(k)[None, None, :], positions[:, :, None]
  at = (group, rows, heads, positions // per_row, (positions % per_row) * h)  # [g, b, k, rows, lanes]
  if len(cache) == 2:
    return tuple(_scatter(c, n, at) for c, n in zip(cache, (key, value)))
  (key_q, key_scale), (value_q, value_scale) = kv_quant.quantize(key), kv_quant.quantize(value)
  scale_at = (group, heads, rows, positions)  # [g, k, b, slots]
  return (
      _scatter(cache[0], key_q, at),
      _scatter(cache[1], value_q, at),
      _scatter(cache[2], key_scale, scale_at),
      _scatter(cache[3], value_scale, scale_at),
  )


def attend(query: Array, cache: KVCache, group: Array | int, positions: Array) -> Array:
  """Attention of query [b, t, n, h] at positions [b, t] over slots 0..position of group `group`'s cache.

  Reads the cache where it lies, DECODE_BLOCK slots at a time with a running softmax (as flash attention
  does), and only up to the furthest position in the batch: a step's temporaries are a block's scores and
  K/V, never a copy of the group's cache (which would cost as much per sequence as an MQA
  layer's cache). int8 blocks are scaled inside the products: scores by the key scales, probabilities by
  the value scales.
  """
  b, t, n, h = query.shape
  per_row = tokens_per_row(h)
  k, length = cache[0].shape[2], cache[0].shape[3] * per_row
  g = n // k
  block = min(max(DECODE_BLOCK // per_row, 1) * per_row, length)  # whole rows
  scaled = len(cache) == 4
  dtype = query.dtype
  q = (query.astype(jnp.float32) * h**-0.5).astype(dtype).reshape(b, t, k, g, h)
  num_blocks = -(-(jnp.max(positions) + 1) // block)  # blocks holding any visible slot

  def read(c, start):
    # [b, k, block, h], or scales [b, k, block], of group `group`: a dynamic slice of the carried cache, no
    # bigger than a block (start is a multiple of per_row).
    if c.ndim == 4:
      return jax.lax.dynamic_slice(c, (group, 0, 0, start), (1, k, b, block))[0].transpose(1, 0, 2)
    rows = jax.lax.dynamic_slice(c, (group, 0, 0, start // per_row, 0), (1, b, k, block // per_row, per_row * h))
    return rows[0].reshape(b, k, block, h)

  def body(i, state):
    best, total, acc = state  # [b, t, k, g], [b, t, k, g], [b, t, k, g, h] (fp32)
    # The last block is moved back to end at the cache's end (a length need not divide by the block);
    # slots it shares with the previous block are masked out, so each slot counts once.
    start = jnp.minimum(i * block, length - block)
    slots = start + jnp.arange(block)
    visible = (slots[None, None, :] >= i * block) & (slots[None, None, :] <= positions[:, :, None])  # [b, t, s]
    keys, values = read(cache[0], start), read(cache[1], start)
    scores = jnp.einsum("btkgh,bksh->btkgs", q, keys.astype(dtype), preferred_element_type=jnp.float32)
    if scaled:
      scores = scores * read(cache[2], start).astype(jnp.float32)[:, None, :, None, :]
    scores = jnp.where(visible[:, :, None, None, :], scores, -jnp.inf)
    new_best = jnp.maximum(best, scores.max(axis=-1))
    # Rows whose slots are all masked so far keep best = -inf; subtracting 0 keeps exp() at 0, not NaN.
    shift = jnp.where(jnp.isfinite(new_best), new_best, 0.0)
    probs = jnp.exp(scores - shift[..., None])
    correction = jnp.exp(jnp.where(jnp.isfinite(best), best - shift, -jnp.inf))
    total = total * correction + probs.sum(axis=-1)
    if scaled:
      probs = probs * read(cache[3], start).astype(jnp.float32)[:, None, :, None, :]
    update = jnp.einsum(
        "btkgs,bksh->btkgh", probs.astype(dtype), values.astype(dtype), preferred_element_type=jnp.float32
    )
    return new_best, total, acc * correction[..., None] + update

  state = (
      jnp.full((b, t, k, g), -jnp.inf, jnp.float32),
      jnp.zeros((b, t, k, g), jnp.float32),
      jnp.zeros((b, t, k, g, h), jnp.float32),
  )
  _, total, acc = jax.lax.fori_loop(0, num_blocks, body, state)
  return (acc / total[..., None]).reshape(b, t, n, h).astype(query.dtype)
