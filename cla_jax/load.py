"""A public loader for any workdir (trained or converted): `cla_jax.load_model(workdir)(tokens) -> logits`."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cla_jax import config_lib, kv_quant, sharding
from cla_jax import model as model_lib
from cla_jax import workdir as workdir_lib
from cla_jax.errors import UserError


class LoadedModel:
  """A CLA model restored from a workdir: call it on int tokens [batch, length] for f32 logits.

  Attributes: `config` (the workdir's resolved ml_collections config), `params` (the unboxed fp32
  param tree, replicated on the local devices, or sharded on `mesh` when one was given), `step`
  (checkpoint step), `model_config` (`ModelConfig`), `module` (the Flax `Transformer`, for
  `module.apply({"params": params}, ...)`) and `kv_cache_dtype` (`generate`'s default cache dtype).
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      params: Any,
      step: int,
      workdir: str | os.PathLike | None = None,
      mesh: jax.sharding.Mesh | None = None,
      kv_cache_dtype: str = "auto",
  ):
    self.kv_cache_dtype = kv_quant.check_kv_cache_dtype(kv_cache_dtype)
    self.config = config
    self.params = params
    self.step = step
    self.workdir = workdir
    self.model_config = config_lib.model_config(config)
    self.module = model_lib.Transformer(self.model_config)
    self._apply = jax.jit(lambda p, t, pos, seg: self.module.apply({"params": p}, t, pos, seg))
    self._tokenizer = None
    self._decoders: dict[Any, Any] = {}  # compiled prefill/decode programs, per sampling setting
    self._decode_mesh = mesh
    # Params restored onto the decode mesh are already placed as the decoder wants them.
    self._sharded_params = params if mesh is not None else None

  def _mesh(self) -> jax.sharding.Mesh:
    if self._decode_mesh is None:
      self._decode_mesh = sharding.fitting_mesh(self.config.mesh, self.model_config)
    return self._decode_mesh

  @property
  def tokenizer(self) -> Any:
    """The workdir's tokenizer (the one the model was trained with), loaded on first use."""
    if self._tokenizer is None:
      if self.workdir is None:
        raise UserError("this model was built without a workdir, so it has no tokenizer; pass token ids.")
      self._tokenizer = workdir_lib.load_tokenizer(os.fspath(self.workdir), self.config)
    return self._tokenizer

  @property
  def max_length(self) -> int:
    """Longest prompt + new tokens `generate` accepts: the sequence length the model was trained at."""
    return int(self.config.train.seq_len)

  def generate(
      self,
      prompts: Any,
      max_new_tokens: int = 64,
      temperature: float = 0.0,
      top_k: int = 0,
      top_p: float = 1.0,
      seed: int = 0,
      max_length: int | None = None,
      kv_cache_dtype: str | None = None,
  ) -> list[str] | list[list[int]]:
    """Continues each prompt with the KV cache: strings in, strings out; token ids in, new token ids out.

    `prompts` is a list of strings (tokenized with the workdir's tokenizer after an EOS, the separator
    the model saw before every training document) or a list of token-id lists / an int array [b, t].
    Generation stops at the tokenizer's EOS (kept at the end of an id list, dropped from text) or after
    `max_new_tokens`. `temperature=0` is greedy; otherwise softmax(logits / temperature) restricted to
    the `top_k` most likely tokens (0: all) and the `top_p` nucleus, drawn reproducibly from `seed`.
    `max_length` caps prompt + new tokens (default: train.seq_len); `kv_cache_dtype` is `auto` (the
    compute dtype) or `int8` (default: the one given to load_model).
    """
    from cla_jax import decode  # pylint: disable=g-import-not-at-top

    kv_cache_dtype = self.kv_cache_dtype if kv_cache_dtype is None else kv_quant.check_kv_cache_dtype(kv_cache_dtype)

    is_text = isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts)
    )
    if isinstance(prompts, str):
      raise UserError("prompts must be a list of strings (or of token-id lists); wrap one prompt as [prompt].")
    eos_id = None
    if is_text:
      for i, p in enumerate(prompts):
        if not p:
          raise UserError(f"prompt {i} is empty; give some text to continue.")
      tokenizer = self.tokenizer
      eos_id = tokenizer.eos_id
      ids = [[eos_id] + t for t in tokenizer.encode_batch(list(prompts))]
    else:
      ids = prompts
      if self.workdir is not None:
        eos_id = self.tokenizer.eos_id
    sampling = decode.Sampling(temperature, top_k, top_p)
    key = (sampling, kv_cache_dtype)
    if key not in self._decoders:
      self._decoders[key] = decode.Decoder(self.model_config, self._mesh(), sampling, kv_cache_dtype)
    decoder = self._decoders[key]
    if self._sharded_params is None:
      self._sharded_params = decoder.shard_params(self.params)  # as trained: the rule table on the mesh
    new = decode.generate(
        self._sharded_params,
        self.model_config,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_id=eos_id,
        max_length=self.max_length if max_length is None else max_length,
        decoder=decoder,
        kv_cache_dtype=kv_cache_dtype,
    )
    if not is_text:
      return new
    # The embedding is padded past the tokenizer's vocabulary (to a multiple of 128): those ids have no text.
    known = self.tokenizer.vocab_size
    return [self.tokenizer.decode([t for t in row if t != eos_id and t < known]) for row in new]

  def __call__(self, tokens: Any, positions: Any = None, segment_ids: Any = None) -> jax.Array:
    """Logits [batch, length, vocab] float32 for int tokens [batch, length] (optional positions/segment ids).

    Ids outside [0, vocab) and negative positions / segment ids are a UserError for numpy, list and concrete
    jax inputs; under the caller's own jit they are tracers and pass unchecked (see `_value_range`).
    """
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
      raise UserError(
          f"{name} must be 2-D [batch, length], got shape {tuple(shape)}; wrap a single sequence as tokens[None]."
      )
    if not jnp.issubdtype(dtype, jnp.integer):
      raise UserError(f"{name} must be integers (e.g. int32 token ids), got dtype {dtype}.")
    if like is not None and tuple(shape) != tuple(like.shape):
      raise UserError(f"{name} has shape {tuple(shape)} but tokens have {tuple(like.shape)}.")
    bounds = _value_range(x)
    # Out-of-range ids would be clamped silently by the embedding gather, and a negative RoPE position or
    # segment id computes silently wrong logits: refused here, where the values are concrete.
    if vocab_check and bounds and (bounds[0] < 0 or bounds[1] >= self.model_config.vocab_size):
      raise UserError(
          f"{name} ids must lie in [0, {self.model_config.vocab_size}), got range [{bounds[0]}, {bounds[1]}]."
      )
    if not vocab_check and bounds and bounds[0] < 0:
      raise UserError(f"{name} must be >= 0, got a minimum of {bounds[0]}; positions count from 0.")
    return jnp.asarray(x, jnp.int32)

  def __repr__(self) -> str:
    cfg = self.model_config
    return (
        f"LoadedModel(step={self.step}, layers={cfg.num_layers}, d_model={cfg.d_model}, "
        f"pattern={cfg.pattern!r}, vocab={cfg.vocab_size})"
    )


def _value_range(x: Any) -> tuple[int, int] | None:
  """(min, max) of a concrete non-empty numpy or jax array; None for a tracer (values unknown) or no elements.

  Inside someone's own `jax.jit` the values are abstract and cannot be checked: there, out-of-range ids
  are clamped by the gather and negative positions rotate backwards, as in any JAX model.
  """
  if isinstance(x, jax.core.Tracer) or not np.size(x):
    return None
  if isinstance(x, jax.Array):
    low, high = jax.device_get(_min_max(x))  # one small reduction where the array lives, not a host copy
  else:
    low, high = np.min(x), np.max(x)
  return int(low), int(high)


@jax.jit
def _min_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.min(x), jnp.max(x)


def load_model(
    workdir: str | os.PathLike,
    step: int | None = None,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    kv_cache_dtype: str = "auto",
) -> LoadedModel:
  """Restores a workdir's newest (or `step`'s) params; `dtype` overrides `config.model.dtype` (e.g. 'float32').

  With `mesh` (a (data, fsdp, tensor) mesh, e.g. `sharding.make_mesh`), each param is read straight into
  its shards on that mesh by the training rule table, and generation decodes on it: no device ever holds
  a whole copy. Without, params are replicated on every local device. `kv_cache_dtype` (`auto` or `int8`)
  is `generate`'s default cache dtype.
  """
  kv_cache_dtype = kv_quant.check_kv_cache_dtype(kv_cache_dtype)
  opened = workdir_lib.open(workdir, step=step, overrides=None if dtype is None else {"model.dtype": dtype}, mesh=mesh)
  return LoadedModel(
      opened.config, opened.params, opened.step, workdir=workdir, mesh=mesh, kv_cache_dtype=kv_cache_dtype
  )
