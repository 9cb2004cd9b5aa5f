"""Helpers for the model tests: small model configs, random params of a model's shapes, random tokens."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cla_jax import model as model_lib
from cla_jax.model import ModelConfig


def small_config(**overrides) -> ModelConfig:
  """A 7-layer model small enough to compile in seconds; `overrides` replace any field."""
  base = dict(
      num_layers=7, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, vocab_size=61, dtype="float32"
  )
  return ModelConfig(**{**base, **overrides})


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.2):
  """Random fp32 params of the model's shapes (numpy RNG: no compile); norm scales 1 + noise, the rest noise."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(model_lib.abstract_params(cfg))

  def draw(path, leaf):
    noise = std * rng.standard_normal(leaf.shape)
    return jnp.asarray(1 + noise if "scale" in jax.tree_util.keystr(path) else noise, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def tokens_for(cfg: ModelConfig, batch: int = 2, length: int = 12, seed: int = 7) -> jax.Array:
  """Random token ids [batch, length] in the model's vocabulary."""
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)


def decode_loop_bytes(decoder, batch: int, length: int, param_dtype=None) -> int:
  """Bytes a device needs for `decoder`'s compiled decode loop at `batch` x `length` (arguments + outputs -
  aliases + temporaries), from abstract params and cache placed as the decoder places them: nothing is
  allocated, so this works on compile-only TPU devices too. `param_dtype`: the params' dtype (default: as
  initialised)."""
  from cla_jax import kv_cache, sharding  # pylint: disable=g-import-not-at-top

  mesh = decoder.mesh
  everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = lambda s, where, dtype=None: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=where)  # noqa: E731
  params = jax.tree.map(
      lambda s, where: abstract(s, where, param_dtype),
      nn.meta.unbox(model_lib.abstract_params(decoder.cfg)),
      decoder.param_shardings,
  )
  shapes = kv_cache.shapes(decoder.cfg, batch, length, decoder.kv_cache_dtype)
  cache = jax.tree.map(abstract, shapes, decoder.cache_sharding)
  tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=everywhere)
  eos = jax.ShapeDtypeStruct((), jnp.int32, sharding=everywhere)
  with jax.set_mesh(mesh):
    compiled = decoder.loop.lower(params, tokens, tokens, cache, rng, eos, max_new_tokens=4).compile()
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
