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
