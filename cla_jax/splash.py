"""Causal attention with the document mask through the TPU splash kernel (`jax.experimental.pallas.ops.tpu`).

The kernel never materialises the [t, s] scores or probabilities: it streams key blocks through an online
softmax and recomputes what the backward pass needs from (q, k, v, output, logsumexp). Blocks entirely above
the diagonal are skipped. The kernel runs per example; under a mesh it is wrapped in `shard_map` over the
batch (and query-head) axes, since a Pallas call cannot be partitioned by GSPMD.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # sharding.BATCH_AXES; not imported, so the model does not depend on sharding


def block_size(length: int) -> int:
  """The largest of 512, 256, 128 dividing `length`: the kernel tiles by it, in multiples of the 128 lanes."""
  return next(b for b in (512, 256, 128) if length % b == 0)


def supported(query_length: int, key_length: int) -> bool:
  """Whether the kernel tiles these lengths (multiples of 128); shorter ones (model.init's 1 token) take xla."""
  return query_length % 128 == 0 and key_length % 128 == 0


def _local(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array | None, interpret: bool):
  """Splash attention on one device's shard: query [b,t,n,h], key/value [b,s,k,h] -> [b,t,n,h]."""
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  g = n // k
  bq, bkv = block_size(t), block_size(s)
  # The fused backward computes dq inside the dkv kernel: one recomputation of the scores and dP instead of
  # one per kernel (5 matmuls per visited block pair instead of 3 + 4), for a [s / bkv]-fold partial dq.
  sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv, use_fused_bwd_kernel=True)
  causal = mask_lib.MultiHeadMask([mask_lib.CausalMask((t, s)) for _ in range(g)])
  # One MQA kernel per KV head: its g query heads all read that head's keys and values (no K/V repeat).
  kernel = kernel_lib.make_splash_mqa_single_device(mask=causal, block_sizes=sizes, interpret=interpret)
  q = (query * jnp.asarray(h**-0.5, query.dtype)).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)  # [b,k,g,t,h]
  keys, values = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [b, k, s, h]

  def one(q, k_, v, seg):
    ids = None if seg is None else kernel_lib.SegmentIds(q=seg, kv=seg)
    return kernel(q, k_, v, segment_ids=ids)

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
  out = jax.vmap(per_head, in_axes=(0, 0, 0, 0 if segment_ids is not None else None))(q, keys, values, segment_ids)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(query.dtype)


def splash_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array | None, interpret: bool = False
) -> jax.Array:
  """Causal (and, given segment_ids [b, t], per-document) attention of query [b,t,n,h] over key/value [b,s,k,h]."""
  local = functools.partial(_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(query, key, value, segment_ids)
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  tensor = mesh.shape.get("tensor", 1)
  k = key.shape[2]
  # Query heads split over `tensor` where they divide; K/V heads follow them (k % tensor == 0) or, with one
  # KV head (MQA), are read whole by every shard.
  heads = "tensor" if tensor > 1 and query.shape[2] % tensor == 0 and (k == 1 or k % tensor == 0) else None
  q_spec = P(batch, None, heads, None)
  kv_spec = P(batch, None, heads if k > 1 else None, None)
  specs = (q_spec, kv_spec, kv_spec) + ((P(batch, None),) if segment_ids is not None else ())
  if segment_ids is None:
    fn = lambda q, k_, v: local(q, k_, v, None)  # noqa: E731
    args = (query, key, value)
  else:
    fn, args = local, (query, key, value, segment_ids)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
