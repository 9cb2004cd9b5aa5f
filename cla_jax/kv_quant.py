"""int8 KV cache entries: symmetric quantisation with one scale per token and KV head.

A key or value vector x [h] (one token, one KV head) is stored as q = round(x / scale) in int8 with
scale = max|x| / 127, so |x - q * scale| <= scale / 2 for every element. The scale is written with the
vector, so a decode step quantises only its own new token: per-channel scales (one per head_dim entry over
all tokens) would have to be fixed before the tokens that set them were seen.

    q, scale = quantize(key)              # int8 [..., h], scale [...]
    key_again = dequantize(q, scale)      # within scale / 2 of key per element
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cla_jax.errors import UserError

KV_CACHE_DTYPES = ("auto", "int8")  # auto: the compute dtype (as before); int8: quantised with scales
SCALE_DTYPE = jnp.bfloat16  # 2 bytes per token and head: 1.6% of an int8 head of 128 (fp32 would be 3.1%)
QMAX = 127  # symmetric: -128 is never used, so negation is exact


def check_kv_cache_dtype(kv_cache_dtype: Any) -> str:
  """The validated name, or UserError naming the choices."""
  if kv_cache_dtype is None:
    return "auto"
  if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
    raise UserError(
        f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (auto: the compute dtype), got {kv_cache_dtype!r}."
    )
  return kv_cache_dtype


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., h] -> (int8 [..., h], scale [...] in SCALE_DTYPE) with x ~= q * scale."""
  x32 = x.astype(jnp.float32)
  # The scale is rounded to its storage dtype first and then used to quantise, so that dequantising with
  # the stored scale gives back the same grid the rounding was done on (error <= scale / 2, not more).
  scale = (jnp.max(jnp.abs(x32), axis=-1) / QMAX).astype(SCALE_DTYPE)
  safe = jnp.where(scale > 0, scale.astype(jnp.float32), 1.0)  # all-zero vectors: q = 0 with any scale
  q = jnp.clip(jnp.round(x32 / safe[..., None]), -QMAX, QMAX).astype(jnp.int8)
  return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """int8 [..., h] and scale [...] -> [..., h] in `dtype`."""
  return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)
