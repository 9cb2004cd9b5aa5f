"""Attention of queries over a CLA group's shared keys/values, and `dense`, the 2-D matmul every projection uses.

Shapes: b = batch, t = query length, s = key length, n = query heads, k = KV heads (n % k == 0), g = n / k,
h = head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def dense(x: Array, w: Array, contract: int = 1, out_dtype: jnp.dtype | None = None) -> Array:
  """x [..., w.shape[:contract]] times w, summed over those dims: [..., w.shape[contract:]], as one 2-D matmul.

  Every projection goes through here rather than a many-dimensional einsum ('btd,df->btf'): XLA's CPU
  backend runs a dot with several free dims per operand, and the weight gradient that contracts two of them
  (b and t), about 1.6x slower than the same dot on 2-D operands (benchmarks/matmul_peer.py). GPU and TPU
  compilers flatten dots this way themselves, so there the HLO they compile is the same.
  """
  lead, inner = x.shape[: x.ndim - contract], int(np.prod(w.shape[:contract]))
  y = jnp.matmul(x.reshape(-1, inner), w.reshape(inner, -1), preferred_element_type=out_dtype)
  return y.reshape(*lead, *w.shape[contract:])


def causal_attention(query: Array, key: Array, value: Array, segment_ids: Array | None, impl: str) -> Array:
  """Causal attention of query [b,t,n,h] over shared key/value [b,s,k,h]; GQA without repeating K/V."""
  if impl == "folded":
    return folded_attention(query, key, value, segment_ids)
  if impl == "splash":
    from cla_jax import splash  # pylint: disable=g-import-not-at-top  (Pallas TPU ops: only when asked for)

    if splash.supported(query.shape[1], key.shape[1]):
      return splash.splash_attention(query, key, value, segment_ids)
    impl = "xla"
  mask = None
  if segment_ids is not None:
    # Packed examples: a token attends only within its own document.
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [b, 1, t, s]
    impl = "xla"
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=True, implementation=impl)


def folded_attention(query: Array, key: Array, value: Array, segment_ids: Array | None, blocks: int = 2) -> Array:
  """Causal attention as `jax.nn.dot_product_attention` computes it, with each KV head's query heads folded into
  the query length: [b * k, t * g, h] against [b * k, s, h] (g = n / k query heads per KV head).

  The CPU path (model.attention_impl=auto). The library's einsums keep (k, g) as separate dims, and XLA:CPU
  transposes the query, the probabilities and the output around its batched matmuls; folded, with one KV head
  (MQA) every reshape here is free and each matmul has a single batch dim. The queries are cut into `blocks`
  runs of positions, each multiplied only with the keys up to its end, which skips the products above the
  diagonal (a quarter of them with 2 blocks) that the causal mask would discard.
  """
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  g = n // k
  fold_kv = lambda x: x.transpose(0, 2, 1, 3).reshape(b * k, s, h)  # noqa: E731  [b, s, k, h] -> [b*k, s, h]
  q = query.reshape(b, t, k, g, h).transpose(0, 2, 1, 3, 4).reshape(b * k, t * g, h)  # row = position * g + head
  keys, values = fold_kv(key), fold_kv(value)
  blocks = blocks if t == s and t % blocks == 0 else 1
  span = t // blocks
  outs = []
  for i in range(blocks):
    start, end = i * span, (i + 1) * span  # positions of this block's queries; it sees keys [0, end)
    logits = jnp.einsum("zmh,zsh->zms", q[:, start * g : end * g], keys[:, :end], preferred_element_type=jnp.float32)
    row_position = start + jnp.arange(span * g) // g
    visible = row_position[:, None] >= jnp.arange(end)[None, :]  # [span*g, end]
    if segment_ids is not None:
      # Packed examples: a token attends only within its own document.
      row_doc = jnp.repeat(segment_ids[:, start:end], g, axis=1)  # [b, span*g]
      visible = jnp.repeat(visible & (row_doc[:, :, None] == segment_ids[:, None, :end]), k, axis=0)
    logits = jnp.where(visible, logits * h**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    outs.append(jnp.einsum("zms,zsh->zmh", probs, values[:, :end]))
  out = jnp.concatenate(outs, axis=1)  # [b*k, t*g, h]
  return out.reshape(b, k, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
