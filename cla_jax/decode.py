"""KV-cached generation: a one-call prefill and a jitted decode loop over the cache of `kv_cache.py`.

`Transformer(cfg).apply(..., cache=cache)` runs the training modules' own layer math, each CLA group writing
its new keys and values into its one slice of the cache. Prompts of different lengths are right-padded; row
r's prompt occupies cache slots 0..len_r-1 and its t-th new token goes to slot len_r + t (RoPE positions
continue from each row's own length). A query at position p attends to slots 0..p of its row: padding
that the prefill wrote past a row's length is overwritten before any query can see it.

    params, cfg = ..., ModelConfig(...)
    new_ids = decode.generate(params, cfg, [[5, 17, 3], [9]], max_new_tokens=32, eos_id=2)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cla_jax import kv_cache, kv_quant, sharding
from cla_jax import model as model_lib
from cla_jax.errors import UserError
from cla_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn: greedy when temperature is 0, else softmax(logits / T) cut by top-k/top-p.

  Checked once, when built: a Sampling that exists is valid.
  """

  temperature: float = 0.0
  top_k: int = 0  # 0: no top-k cut
  top_p: float = 1.0  # 1.0: no nucleus cut

  def __post_init__(self) -> None:
    """Raises UserError naming the bad setting."""
    if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
      raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}.")
    if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      raise UserError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}.")
    if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
      raise UserError(f"top_p must lie in (0, 1] (1 keeps every token), got {self.top_p!r}.")


# ---------------------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------------------


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits [..., v] with tokens outside the top-k, then outside the top-p nucleus, set to -inf.

  The nucleus is the smallest set of most probable tokens whose probability reaches `top_p` (the token
  that crosses it is kept), computed on the distribution left after the top-k cut.
  """
  logits = logits.astype(jnp.float32)
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens [b] int32 from logits [b, v]; row r draws with fold_in(rng, r) (padding rows change nothing)."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / sampling.temperature, sampling.top_k, sampling.top_p)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(logits.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Prefill and the decode loop (traced functions; `Decoder` jits them).
# ---------------------------------------------------------------------------------------------------------


def _apply(params: Any, cfg: ModelConfig, tokens, positions, cache, logit_indices=None):
  return sharding.apply(model_lib.Transformer(cfg), params, tokens, positions, cache=cache, logit_indices=logit_indices)


def prefill(
    params: Any,
    tokens: jax.Array,
    lengths: jax.Array,
    cache: kv_cache.Cache,
    rng: jax.Array,
    *,
    cfg: ModelConfig,
    sampling: Sampling,
) -> tuple[jax.Array, jax.Array, kv_cache.Cache]:
  """Runs right-padded prompts [b, t] through the model in one call, filling cache slots 0..t-1.

  Returns (first new token [b], its logits [b, v], cache); the logits are each row's last prompt token's.
  """
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits, cache = _apply(params, cfg, tokens, positions, cache, logit_indices=(lengths - 1)[:, None])
  logits = logits[:, 0]
  return sample(logits, jax.random.fold_in(rng, 0), sampling), logits, cache


def decode_step(
    params: Any, token: jax.Array, positions: jax.Array, cache: kv_cache.Cache, *, cfg: ModelConfig
) -> tuple[jax.Array, kv_cache.Cache]:
  """Feeds one token per row [b] at its row's position [b]; returns (logits [b, v], updated cache)."""
  logits, cache = _apply(params, cfg, token[:, None], positions[:, None], cache)
  return logits[:, 0], cache


def decode_loop(
    params: Any,
    first_token: jax.Array,
    lengths: jax.Array,
    cache: kv_cache.Cache,
    rng: jax.Array,
    eos_id: jax.Array,
    *,
    cfg: ModelConfig,
    sampling: Sampling,
    max_new_tokens: int,
) -> tuple[jax.Array, kv_cache.Cache]:
  """New tokens [b, max_new_tokens] starting with `first_token` (rows that ended are padded with eos_id).

  One `lax.while_loop`: a fixed-shape step, so nothing recompiles per token; it ends when every row
  has emitted eos_id or after max_new_tokens tokens (eos_id -1: never stops early).
  """
  batch = first_token.shape[0]
  out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_token)
  done = first_token == eos_id

  def cond(state):
    step, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, token, out, done, cache = state
    logits, cache = decode_step(params, token, lengths + step - 1, cache, cfg=cfg)
    token = sample(logits, jax.random.fold_in(rng, step), sampling)
    token = jnp.where(done, eos_id, token)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    done = done | (token == eos_id)
    return step + 1, token, out, done, cache

  state = (jnp.asarray(1, jnp.int32), first_token, out, done, cache)
  _, _, out, _, cache = jax.lax.while_loop(cond, body, state)
  return out, cache


def teacher_forced_logits(
    params: Any, tokens: jax.Array, *, cfg: ModelConfig, prefill_len: int, kv_cache_dtype: str = "auto"
) -> jax.Array:
  """Logits [b, t, v] of whole sequences [b, t] through the cache, as generation computes them.

  The first `prefill_len` tokens go in as one prefill, each later one as a decode step fed the true token
  (teacher forcing): every position's keys and values are written to the cache (quantised for int8) and
  read back from it, so the scores measure what the cache dtype does to the model.
  """
  b, t = tokens.shape
  cache = kv_cache.init(cfg, b, t, kv_cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(prefill_len, dtype=jnp.int32), (b, prefill_len))
  first, cache = _apply(params, cfg, tokens[:, :prefill_len], positions, cache)

  def step(cache, i):
    logits, cache = decode_step(params, tokens[:, i], jnp.full((b,), i, jnp.int32), cache, cfg=cfg)
    return cache, logits

  _, rest = jax.lax.scan(step, cache, jnp.arange(prefill_len, t))  # [t - prefill_len, b, v]
  return jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)


def cache_shardings(cfg: ModelConfig, mesh: Mesh, kv_cache_dtype: str = "auto") -> list[tuple[NamedSharding, ...]]:
  """Where each array of the cache lives on `mesh`: its logical axes through the rule table."""
  shapes = kv_cache.shapes(cfg, sharding.batch_parallelism(mesh), 1, kv_cache_dtype)
  return jax.tree.map(lambda s: sharding.logical_sharding(s.shape, kv_cache.logical_axes(s), mesh), shapes)


class Decoder:
  """The jitted prefill and decode loop of one model on one mesh; the cache is donated between them.

  `kv_cache_dtype`: `auto` keeps K/V in the compute dtype; `int8` stores them quantised (kv_quant).
  """

  def __init__(self, cfg: ModelConfig, mesh: Mesh, sampling: Sampling = Sampling(), kv_cache_dtype: str = "auto"):
    self.kv_cache_dtype = kv_quant.check_kv_cache_dtype(kv_cache_dtype)
    self.cfg, self.mesh, self.sampling = cfg, mesh, sampling
    self.param_shardings = sharding.logical_shardings(model_lib.abstract_params(cfg), mesh)
    self.cache_sharding = cache_shardings(cfg, mesh, self.kv_cache_dtype)
    rows = sharding.batch_sharding(mesh, 1)
    constrain = lambda cache: jax.tree.map(jax.lax.with_sharding_constraint, cache, self.cache_sharding)  # noqa: E731

    def prefill_fn(params, tokens, lengths, rng, max_length):
      cache = constrain(kv_cache.init(cfg, tokens.shape[0], max_length, self.kv_cache_dtype))
      token, logits, cache = prefill(params, tokens, lengths, cache, rng, cfg=cfg, sampling=sampling)
      return token, logits, constrain(cache)

    def loop_fn(params, first_token, lengths, cache, rng, eos_id, max_new_tokens):
      out, cache = decode_loop(
          params, first_token, lengths, cache, rng, eos_id, cfg=cfg, sampling=sampling, max_new_tokens=max_new_tokens
      )
      return out, constrain(cache)

    self.prefill = jax.jit(
        prefill_fn,
        static_argnames="max_length",
        out_shardings=(rows, sharding.batch_sharding(mesh, 2), self.cache_sharding),
    )
    self.loop = jax.jit(
        loop_fn,
        static_argnames="max_new_tokens",
        donate_argnames="cache",
        out_shardings=(sharding.batch_sharding(mesh, 2), self.cache_sharding),
    )
    self.step = jax.jit(
        functools.partial(decode_step, cfg=cfg),
        donate_argnames="cache",
        out_shardings=(sharding.batch_sharding(mesh, 2), self.cache_sharding),
    )

  def shard_params(self, params: Any) -> Any:
    """Params placed by the training rule table on this mesh (as trained)."""
    return jax.device_put(params, self.param_shardings)

  def batch_multiple(self) -> int:
    """Rows per call must be a multiple of this (the data * fsdp ways the batch is split)."""
    return sharding.batch_parallelism(self.mesh)

  def put_rows(self, x: np.ndarray) -> jax.Array:
    """A host array [b, ...] split over the batch axes."""
    return jax.device_put(x, sharding.batch_sharding(self.mesh, np.ndim(x)))

  def __call__(
      self,
      params: Any,
      tokens: np.ndarray,
      lengths: np.ndarray,
      *,
      max_new_tokens: int,
      max_length: int,
      seed: int = 0,
      eos_id: int = -1,
  ) -> np.ndarray:
    """New tokens [b, max_new_tokens] for right-padded prompts [b, t] (b a multiple of batch_multiple())."""
    rng = jax.random.key(seed)
    with jax.set_mesh(self.mesh):
      tokens, lengths = self.put_rows(np.asarray(tokens, np.int32)), self.put_rows(np.asarray(lengths, np.int32))
      first, _, cache = self.prefill(params, tokens, lengths, rng, max_length=max_length)
      if max_new_tokens == 1:
        return np.asarray(first)[:, None]
      out, _ = self.loop(
          params, first, lengths, cache, rng, jnp.asarray(eos_id, jnp.int32), max_new_tokens=max_new_tokens
      )
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------------------
# The library entry point: token ids in, new token ids out.
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def cached_decoder(cfg: ModelConfig, mesh: Mesh, sampling: Sampling, kv_cache_dtype: str = "auto") -> Decoder:
  """One Decoder (and so one set of compiled programs) per model, mesh, sampling setting and cache dtype."""
  return Decoder(cfg, mesh, sampling, kv_cache_dtype)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
  """Prompts as lists of ints, or UserError for an empty batch, an empty prompt or an id out of range."""
  if isinstance(prompts, (np.ndarray, jax.Array)):
    if np.ndim(prompts) != 2 or not np.issubdtype(np.asarray(prompts).dtype, np.integer):
      raise UserError(
          f"token prompts must be a 2-D int array [batch, length] or a list of int lists, got "
          f"shape {np.shape(prompts)} dtype {np.asarray(prompts).dtype}."
      )
    prompts = np.asarray(prompts).tolist()
  prompts = [list(p) for p in prompts]
  if not prompts:
    raise UserError("no prompts given; pass at least one prompt.")
  for i, p in enumerate(prompts):
    if not p:
      raise UserError(f"prompt {i} is empty; every prompt needs at least one token.")
    if not all(isinstance(t, (int, np.integer)) for t in p):
      raise UserError(f"prompt {i} holds non-integer token ids; pass lists of ints (or strings with a tokenizer).")
    if min(p) < 0 or max(p) >= vocab_size:
      raise UserError(f"prompt {i} has token ids outside [0, {vocab_size}): range [{min(p)}, {max(p)}].")
  return [[int(t) for t in p] for p in prompts]


def check_length(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_length: int | None) -> int:
  """The cache length a request needs, or UserError when it exceeds `max_length` (None: no limit)."""
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
  longest = max(len(p) for p in prompts)
  needed = longest + max_new_tokens
  if max_length is not None and needed > max_length:
    raise UserError(
        f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} needs {needed} "
        f"cache positions but the limit is {max_length}; shorten the prompt or lower max_new_tokens "
        f"to at most {max(max_length - longest, 0)}."
    )
  return needed


def pad_prompts(
    prompts: Sequence[Sequence[int]], rows_multiple: int, length_multiple: int = 8
) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded tokens [b', t] and lengths [b'], b' rounded up to `rows_multiple` with copies of row 0.

  t is rounded up to `length_multiple` so that nearby prompt lengths share one compiled prefill.
  """
  rows = -(-len(prompts) // rows_multiple) * rows_multiple
  length = -(-max(len(p) for p in prompts) // length_multiple) * length_multiple
  padded = list(prompts) + [prompts[0]] * (rows - len(prompts))
  tokens = np.zeros((rows, length), np.int32)
  for r, p in enumerate(padded):
    tokens[r, : len(p)] = p
  return tokens, np.asarray([len(p) for p in padded], np.int32)


def trim(new_tokens: np.ndarray, count: int, eos_id: int | None) -> list[list[int]]:
  """Each of the first `count` rows up to and including its first eos_id."""
  out = []
  for row in np.asarray(new_tokens)[:count].tolist():
    if eos_id is not None and eos_id in row:
      row = row[: row.index(eos_id) + 1]
    out.append(row)
  return out


def generate(
    params: Any,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    max_length: int | None = None,
    mesh: Mesh | None = None,
    decoder: Decoder | None = None,
    kv_cache_dtype: str = "auto",
) -> list[list[int]]:
  """New token ids for each prompt (a list of int lists), ending at eos_id (kept) or after max_new_tokens.

  `params` is the model's param tree (scanned layout, any placement); `mesh` the (data, fsdp, tensor)
  mesh to decode on (default: one device), `max_length` a cap on prompt + new tokens (default: none).
  `kv_cache_dtype` is `auto` (the compute dtype) or `int8` (quantised per token and KV head). Pass a
  `decoder` to reuse its compiled programs across calls.
  """
  kv_cache_dtype = kv_quant.check_kv_cache_dtype(kv_cache_dtype)
  prompts = check_prompts(prompts, cfg.vocab_size)
  needed = check_length(prompts, max_new_tokens, max_length)
  sampling = Sampling(temperature, top_k, top_p)
  if decoder is None or decoder.sampling != sampling or decoder.kv_cache_dtype != kv_cache_dtype:
    decoder = cached_decoder(cfg, mesh or sharding.single_device_mesh(), sampling, kv_cache_dtype)
  tokens, lengths = pad_prompts(prompts, decoder.batch_multiple())
  cache_length = max(needed, tokens.shape[1])
  new = decoder(
      decoder.shard_params(params),
      tokens,
      lengths,
      max_new_tokens=max_new_tokens,
      max_length=cache_length,
      seed=seed,
      eos_id=-1 if eos_id is None else int(eos_id),
  )
  return trim(new, len(prompts), eos_id)
