"""A public loader for any workdir (trained or converted): `cla_jax.load_model(workdir)(tokens) -> logits`."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cla_jax import checkpoint
from cla_jax import config_lib
from cla_jax import model as model_lib
from cla_jax.errors import UserError


class LoadedModel:
  """A CLA model restored from a workdir: call it on int tokens [batch, length] for f32 logits.

  Attributes: `config` (the workdir's resolved ml_collections config), `params` (the unboxed fp32
  param tree, replicated on the local devices), `step` (checkpoint step), `model_config`
  (`ModelConfig`) and `module` (the Flax `Transformer`, for `module.apply({"params": params}, ...)`).
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, step: int):
    self.config = config
    self.params = params
    self.step = step
    self.model_config = config_lib.model_config(config)
    self.module = model_lib.Transformer(self.model_config)
    self._apply = jax.jit(lambda p, t, pos, seg: self.module.apply({"params": p}, t, pos, seg))

  def __call__(self, tokens: Any, positions: Any = None, segment_ids: Any = None) -> jax.Array:
    """Logits [batch, length, vocab] float32 for int tokens [batch, length] (optional positions/segment ids)."""
    tokens = self._check_tokens(tokens, "tokens")
    if positions is not None:
      positions = self._check_tokens(positions, "positions", vocab_check=False, like=tokens)
    if segment_ids is not None:
      segment_ids = self._check_tokens(segment_ids, "segment_ids", vocab_check=False, like=tokens)
    return self._apply(self.params, tokens, positions, segment_ids).astype(jnp.float32)

  def _check_tokens(self, x: Any, name: str, vocab_check: bool = True, like: Any = None) -> jax.Array:
    shape, dtype = np.shape(x), getattr(x, "dtype", None)
    if dtype is None:  # a (nested) list: numpy decides whether it is all ints
      x = np.asarray(x)
      dtype = x.dtype
    if len(shape) != 2:
      raise UserError(f"{name} must be 2-D [batch, length], got shape {tuple(shape)}; "
                      "wrap a single sequence as tokens[None].")
    if not jnp.issubdtype(dtype, jnp.integer):
      raise UserError(f"{name} must be integers (e.g. int32 token ids), got dtype {dtype}.")
    if like is not None and tuple(shape) != tuple(like.shape):
      raise UserError(f"{name} has shape {tuple(shape)} but tokens have {tuple(like.shape)}.")
    if vocab_check and isinstance(x, np.ndarray) and x.size:
      # Out-of-range ids would be clamped silently by the embedding gather; only checked on host arrays.
      low, high = int(x.min()), int(x.max())
      if low < 0 or high >= self.model_config.vocab_size:
        raise UserError(f"{name} ids must lie in [0, {self.model_config.vocab_size}), got range [{low}, {high}].")
    return jnp.asarray(x, jnp.int32)

  def __repr__(self) -> str:
    cfg = self.model_config
    return (f"LoadedModel(step={self.step}, layers={cfg.num_layers}, d_model={cfg.d_model}, "
            f"pattern={cfg.pattern!r}, vocab={cfg.vocab_size})")


def load_model(workdir: str | os.PathLike, step: int | None = None, dtype: str | None = None) -> LoadedModel:
  """Restores a workdir's newest (or `step`'s) params; `dtype` overrides `config.model.dtype` (e.g. 'float32')."""
  params, config, restored_step = checkpoint.restore_params(workdir, step=step)
  if dtype is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = dtype
    config.lock()
  return LoadedModel(config, params, restored_step)
