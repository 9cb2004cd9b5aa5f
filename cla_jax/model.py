"""The CLA transformer: a Llama-style decoder whose layer stack scans over KV-sharing groups.

Shapes: b = batch, t = query length, s = key length, d = d_model, n = query heads,
k = KV heads, h = head_dim, f = mlp_dim, v = vocab.

Param tree (scanned): `embed`, `segment_<i>/{kv, layer_0, ..., layer_<g-1>}` with a
leading `layers` axis of length num_groups in segment i, `final_norm`, `lm_head`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from cla_jax import kv_cache, patterns
from cla_jax.attention import causal_attention, dense
from cla_jax.errors import UserError

Array = jax.Array

# Residuals the "save_qkv_ffn" policy keeps (named with checkpoint_name in the layers below; each layer's input
# is its checkpoint's, always kept); the rest of a layer's forward (norms, RoPE of the query, attention and its
# output projection, the SwiGLU product) is recomputed in the backward pass. Recomputing the output projection
# costs 3% of a 1B step and frees one [b, t, d_model] activation a layer: what lets every 1B row fit a v5e-256
# at the paper's batch (docs/training.md, "Will it fit?").
SAVED_QKV_FFN = ("query", "key", "value", "gate", "up")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_ffn": jax.checkpoint_policies.save_only_these_names(*SAVED_QKV_FFN),
}
REMATS = ("auto", *REMAT_POLICIES)
NORMS = ("rmsnorm", "layernorm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "folded")


class ConfigError(UserError):
  """A model configuration that cannot be built; the message names the field and a fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of the CLA transformer (hashable, so it can sit on a Flax module)."""

  # The one home of the model defaults (configs/default.py takes its `model` section from here).
  num_layers: int = 4  # decoder layers
  d_model: int = 256  # residual width
  num_heads: int = 4  # query heads
  num_kv_heads: int = 1  # KV heads per KV block (1 = MQA, num_heads = MHA)
  head_dim: int = 64  # per-head width; num_heads * head_dim need not equal d_model
  mlp_dim: int = 688  # SwiGLU hidden width
  vocab_size: int = 2048  # must match the tokenizer (see data.tokenizer)
  pattern: str = "cla2"  # KV sharing: none | cla<N> | keep_ends | dense_front | dense_back | "1,2,1"
  dtype: str = "auto"  # compute dtype: auto (bf16 on accelerators, fp32 on CPU) | float32 | bfloat16 | float16
  norm: str = "rmsnorm"  # rmsnorm | layernorm
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  init_std: float = 0.01275  # N(0, std) for every linear layer and the embedding (paper)
  remat: str = (
      "auto"  # auto (save_qkv_ffn on TPU and scanned on CPU, else none) | none | full | save_dots | save_qkv_ffn
  )
  scan_layers: bool = True  # nn.scan over layer groups (False: unrolled, for debugging)
  attention_impl: str = (
      "auto"  # auto (cudnn on GPU when it applies, splash on TPU, folded on CPU) | xla | cudnn | splash | folded
  )

  @classmethod
  def from_config(cls, model_config: Any) -> ModelConfig:
    """Builds and validates a ModelConfig from a mapping (e.g. `config.model`)."""
    values = dict(model_config.items()) if hasattr(model_config, "items") else dict(model_config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown model field(s) {unknown}; valid fields: {sorted(known)}.")
    cfg = cls(**values)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    """Raises ConfigError, naming the field and a valid alternative, for impossible configs."""
    for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      divisors = [k for k in range(1, self.num_heads + 1) if self.num_heads % k == 0]
      raise ConfigError(
          f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.num_kv_heads}; "
          f"choose num_kv_heads from {divisors}."
      )
    if self.head_dim % 2:
      raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE; try {self.head_dim + 1}.")
    for name, allowed in (
        ("norm", NORMS),
        ("dtype", DTYPES),
        ("remat", REMATS),
        ("attention_impl", ATTENTION_IMPLS),
    ):
      if getattr(self, name) not in allowed:
        raise ConfigError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}.")
    for name in ("init_std", "norm_eps", "rope_theta"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"model.{name} must be a finite number > 0, got {value!r}.")
    try:
      patterns.group_sizes(self.pattern, self.num_layers)
    except patterns.PatternError as e:
      raise ConfigError(str(e)) from None

  @functools.cached_property
  def group_sizes(self) -> tuple[int, ...]:
    return patterns.group_sizes(self.pattern, self.num_layers)

  @property
  def segments(self) -> tuple[tuple[int, int], ...]:
    return patterns.segments(self.group_sizes)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return self.dtype_for(jax.default_backend())

  @property
  def resolved_attention_impl(self) -> str:
    """What `auto` means on this backend (see `attention_for`)."""
    return self.attention_for(jax.default_backend())

  @property
  def resolved_remat(self) -> str:
    """What `auto` means on this backend (see `remat_for`)."""
    return self.remat_for(jax.default_backend())

  def dtype_for(self, platform: str) -> jnp.dtype:
    """The compute dtype on `platform` (cpu | gpu | cuda | rocm | tpu): `auto` is bf16 except on CPU."""
    if self.dtype == "auto":
      # bf16 on accelerators; fp32 on CPU, where bf16 matmuls are emulated and slow.
      return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return jnp.dtype(self.dtype)

  def attention_for(self, platform: str) -> str:
    """What `auto` means on `platform`: cudnn (GPU, when it applies), splash (TPU), folded (CPU), else xla."""
    if self.attention_impl != "auto":
      return self.attention_impl
    gpu = platform in ("gpu", "cuda", "rocm")
    cudnn_ok = (
        gpu
        and self.dtype_for(platform) in (jnp.bfloat16, jnp.float16)
        and self.head_dim % 8 == 0
        and self.head_dim <= 128
    )
    if cudnn_ok:
      return "cudnn"
    if platform == "tpu":
      return "splash"
    return "folded" if platform == "cpu" else "xla"

  def remat_for(self, platform: str) -> str:
    """What `auto` means on `platform`: save_qkv_ffn for a scanned stack on CPU and on TPU, else none."""
    if self.remat != "auto":
      return self.remat
    # XLA:CPU stacks each scanned group's residuals into [groups, ...] buffers (zero-filled, written and read
    # back through dynamic slices: about a fifth of the step with remat=none). Keeping only the costly matmul
    # outputs and recomputing the rest is faster there. On TPU the same policy is what lets the paper's batch
    # fit (docs/training.md, "Will it fit?"): the splash kernel saves no probabilities, and recomputing the
    # norms and the SwiGLU product costs a few percent. GPUs keep every residual, as before.
    if platform == "tpu" or (self.scan_layers and platform == "cpu"):
      return "save_qkv_ffn"
    return "none"

  def for_platform(self, platform: str) -> ModelConfig:
    """This config with every `auto` resolved for `platform` (compile for a target other than this host)."""
    dtype = jnp.dtype(self.dtype_for(platform)).name
    return dataclasses.replace(
        self, dtype=dtype, attention_impl=self.attention_for(platform), remat=self.remat_for(platform)
    )


def _param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], init) -> Array:
  """Declares an fp32 param whose dimensions carry logical axis names for sharding."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


Rope = tuple[Array, Array]  # (cos, sin), each [b, t, 1, head_dim / 2] float32


def rope_tables(positions: Array, head_dim: int, theta: float) -> Rope:
  """cos and sin of the rotary angles at positions [b, t], computed once per forward and shared by every layer.

  (Inside a layer, XLA may fuse the sin/cos into the rotation and evaluate them for every head and element,
  in the forward and again in the backward.)
  """
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)  # [h/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, h/2]
  return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: Array, rope: Rope) -> Array:
  """Rotary embedding in the rotate-half layout (Hugging Face Llama's): x [b, t, heads, h]."""
  cos, sin = rope
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Norm(nn.Module):
  """Affine pre-norm: RMSNorm (scale) or LayerNorm (scale and bias), computed in fp32."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    scale = _param(self, "scale", (x.shape[-1],), ("embed",), nn.initializers.ones)
    if self.cfg.norm == "layernorm":
      bias = _param(self, "bias", (x.shape[-1],), ("embed",), nn.initializers.zeros)
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
      return (y * scale + bias).astype(x.dtype)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (y * scale).astype(x.dtype)


class KVBlock(nn.Module):
  """The group's one K/V projection: its own norm, K and V, RoPE applied to keys once."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, rope: Rope) -> tuple[Array, Array]:
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    init = nn.initializers.normal(cfg.init_std)
    shape, axes = (cfg.d_model, cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim")
    w_key = _param(self, "key", shape, axes, init)
    w_value = _param(self, "value", shape, axes, init)
    h = Norm(cfg, name="norm")(x)
    key = dense(h, w_key.astype(dtype))  # [b, s, k, h]
    value = dense(h, w_value.astype(dtype))  # [b, s, k, h]
    key = apply_rope(key, rope)
    key, value = checkpoint_name(key, "key"), checkpoint_name(value, "value")
    kv_axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
    return nn.with_logical_constraint(key, kv_axes), nn.with_logical_constraint(value, kv_axes)


class DecoderLayer(nn.Module):
  """One layer: its own norms, Q and output projections, attention over the group's K/V, SwiGLU."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
      self,
      x: Array,
      key: Array,
      value: Array,
      rope: Rope,
      segment_ids: Array | None,
      cached: tuple[kv_cache.KVCache, Array | int, Array] | None = None,
  ) -> Array:
    """`cached` = (segment cache, group index, positions [b, t]): attend to that group's cache slots instead."""
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    init = nn.initializers.normal(cfg.init_std)
    w_query = _param(self, "query", (cfg.d_model, cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), init)
    w_out = _param(self, "out", (cfg.num_heads, cfg.head_dim, cfg.d_model), ("heads", "head_dim", "embed"), init)
    w_gate = _param(self, "gate", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), init)
    w_up = _param(self, "up", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), init)
    w_down = _param(self, "down", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), init)

    h = Norm(cfg, name="attn_norm")(x)
    query = dense(h, w_query.astype(dtype))  # [b, t, n, h]
    query = checkpoint_name(apply_rope(query, rope), "query")
    if cached is None:
      attended = causal_attention(query, key, value, segment_ids, cfg.resolved_attention_impl)  # [b, t, n, h]
    else:
      attended = kv_cache.attend(query, *cached)  # [b, t, n, h]
    x = x + dense(attended, w_out.astype(dtype), contract=2)  # [b, t, d]

    h = Norm(cfg, name="mlp_norm")(x)
    gate = checkpoint_name(dense(h, w_gate.astype(dtype)), "gate")  # [b, t, f]
    up = checkpoint_name(dense(h, w_up.astype(dtype)), "up")
    hidden = nn.with_logical_constraint(
        jax.nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp")
    )
    x = x + dense(hidden, w_down.astype(dtype))
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


class LayerGroup(nn.Module):
  """A CLA group: one KV block computed from the group's input, then `group_size` consumer layers.

  In training and evaluation (no `cache`) the KV block and each layer is its own checkpoint under the remat
  policy, and each layer's backward pass runs in order (`_backward_after_cotangent`): it starts once the
  gradient of its output exists and ends with its weight gradients. A checkpoint around the whole group let
  XLA recompute both layers' activations at the start of the group's backward and hold them together (CLA2
  needed 2 GB a chip more than MQA in a 4-layer 1B compile for a v5e-16), and weight gradients left to XLA's
  schedule were computed late, each holding its layer's activations (docs/training.md, "Will it fit?").

  With `cache` (decoding: a segment's cache and the index `group` of this group's slice in it), the KV
  block writes the new positions into the group's one cache and every layer of the group attends to that
  slice where it lies; the updated cache is returned beside x.
  """

  cfg: ModelConfig
  group_size: int

  @nn.compact
  def __call__(
      self,
      x: Array,
      positions: Array,
      rope: Rope,
      segment_ids: Array | None,
      cache: kv_cache.KVCache | None = None,
      group: Array | int = 0,
  ) -> Array | tuple[Array, kv_cache.KVCache]:
    cfg = self.cfg
    # Decoding has no backward pass to save memory for: remat would only add work.
    policy = REMAT_POLICIES[cfg.resolved_remat] if cache is None else None
    # Inside a scan XLA cannot CSE the recomputation away; jax's guard against that is needed unrolled only.
    prevent_cse = not cfg.scan_layers
    kv_block = KVBlock if policy is None else nn.remat(KVBlock, policy=policy, prevent_cse=prevent_cse)
    key, value = kv_block(cfg, name="kv")(x, rope)
    if cache is not None or self.is_initializing():
      cached = None
      if cache is not None:
        cache = kv_cache.write(cache, key, value, positions, group)
        cached = (cache, group, positions)
      for i in range(self.group_size):
        x = DecoderLayer(cfg, name=f"layer_{i}")(x, key, value, rope, segment_ids, cached)
      return x if cache is None else (x, cache)

    def layer(x: Array, params: Any, key: Array, value: Array, rope: Rope) -> Array:
      return DecoderLayer(cfg).apply({"params": params}, x, key, value, rope, segment_ids)

    if policy is not None:
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=prevent_cse)
    layer = _backward_after_cotangent(layer)
    for i in range(self.group_size):
      x = layer(x, nn.meta.unbox(self.variables["params"][f"layer_{i}"]), key, value, rope)
    return x


@jax.tree_util.register_pytree_node_class
class _SplitResiduals:
  """A pullback's residuals as the ones to hold behind a barrier and the rest; the layout is static."""

  def __init__(self, held: list, rest: list, layout: tuple):
    self.held, self.rest, self.layout = held, rest, layout

  def tree_flatten(self):
    return (self.held, self.rest), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(*children, layout)

  def pullback(self, held: list):
    """The pullback rebuilt with `held` in place of the held residuals."""
    treedef, mask = self.layout
    held_it, rest_it = iter(held), iter(self.rest)
    return jax.tree.unflatten(treedef, [next(held_it) if m else next(rest_it) for m in mask])


def _backward_after_cotangent(f):
  """f, whose backward pass starts only once its output's gradient exists and ends with all its gradients.

  XLA schedules a loop body's operations in any order their data allows, and two orders cost memory:
  - Recomputing early. In a CLA group's backward, the recomputation of layer 0 needs only layer 0's saved
    residuals, so XLA may run it before layer 1's backward and hold both layers' activations at once. Here
    the residuals that are f's own inputs (the layer input, its params, the group's K/V) pass through an
    optimization barrier together with the incoming gradient, so layer i's recomputation waits for layer
    i+1's backward. The saved activations (gate, up, ...) stay out of the barrier: XLA would copy each out
    of the scan's stacked residuals to pass it through.
  - Weight gradients late. Nothing downstream waits for them, so XLA may compute them after the next
    layer's (or the KV block's) backward, holding this layer's activations meanwhile: with CLA2 at 48
    sequences a chip on a v5p-64, 6 GB a chip in a 4-layer compile. The gradients leave f's backward
    through one barrier, so the input's gradient exists only once the weights' do.
  Being a custom VJP, f supports reverse-mode differentiation only (all that training and eval use).
  """

  @jax.custom_vjp
  def ordered(*args):
    return f(*args)

  def forward(*args):
    out, pullback = jax.vjp(f, *args)
    leaves, treedef = jax.tree.flatten(pullback)
    inputs = {id(a) for a in jax.tree.leaves(args)}
    mask = tuple(id(leaf) in inputs for leaf in leaves)
    held = [leaf for leaf, m in zip(leaves, mask) if m]
    rest = [leaf for leaf, m in zip(leaves, mask) if not m]
    return out, _SplitResiduals(held, rest, (treedef, mask))

  def backward(residuals: _SplitResiduals, cotangent: Array):
    cotangent, held = jax.lax.optimization_barrier((cotangent, residuals.held))
    *grads, rope = residuals.pullback(held)(cotangent)  # rope's gradient is dead code, left for XLA to drop
    return (*jax.lax.optimization_barrier(tuple(grads)), rope)

  ordered.defvjp(forward, backward)
  return ordered


class _ScannedGroup(LayerGroup):
  """LayerGroup with the (carry, out) signature nn.scan wants."""

  def __call__(self, x, positions, rope, segment_ids):  # pytype: disable=signature-mismatch
    return super().__call__(x, positions, rope, segment_ids), None


def _slice_after(stacked: Any, group: Array, x: Array) -> Any:
  """Slice `group` of stacked params, computed only once `x` exists.

  XLA schedules the slices of a loop body's stacked params all at its start, so a decode step would hold a
  whole group's weights as temporaries: twice an MQA group's for CLA2. Making the index depend on x (it
  is min(g, g + isnan(x)) = g) delays each layer's slice until that layer runs.
  """
  probe = x.reshape(-1)[0]
  late = jnp.minimum(group, group + (probe != probe).astype(group.dtype))
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, late, keepdims=False), stacked)


def decode_segment(
    cfg: ModelConfig, group_size: int, params: Any, x: Array, positions: Array, rope: Rope, cache: kv_cache.KVCache
) -> tuple[Array, kv_cache.KVCache]:
  """A scanned segment's groups in decoding: the same modules on their stacked params [num_groups, ...].

  A loop over the group index g: the segment's whole cache rides in the carry and group g writes and
  reads its slice g in place; each layer slices its own params just before it runs.
  """

  def body(g, carry):
    x, cache = carry
    key, value = KVBlock(cfg).apply({"params": _slice_after(params["kv"], g, x)}, x, rope)
    cache = kv_cache.write(cache, key, value, positions, g)
    for i in range(group_size):
      layer_params = _slice_after(params[f"layer_{i}"], g, x)
      x = DecoderLayer(cfg).apply({"params": layer_params}, x, None, None, rope, None, (cache, g, positions))
    return x, cache

  return jax.lax.fori_loop(0, cache[0].shape[0], body, (x, cache))


class Transformer(nn.Module):
  """CLA decoder: tokens [b, t] int32 -> logits [b, t, vocab] float32 (or, `features_only`, the final-norm
  output [b, t, d] that the head would multiply).

  Decoding passes `cache`, one kv_cache.KVCache per segment (`kv_cache.init`), and gets `(logits, updated
  cache)` back; `logit_indices` [b, m] keeps only the logits at those indices along t (a prefill needs each
  row's last prompt token only).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
      self,
      tokens: Array,
      positions: Array | None = None,
      segment_ids: Array | None = None,
      cache: Sequence[kv_cache.KVCache] | None = None,
      logit_indices: Array | None = None,
      features_only: bool = False,
  ) -> Array | tuple[Array, list[kv_cache.KVCache]]:
    cfg, dtype = self.cfg, self.cfg.compute_dtype
    init = nn.initializers.normal(cfg.init_std)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    embedding = _param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), init)
    # The lookup gathers the table's d_model dim over fsdp first (as FSDP does for every weight before use):
    # a gather's output inherits the table's d_model sharding, and moving the fsdp axis from there to the
    # batch dim (where the activation constraint wants it) is a full rematerialization for XLA.
    table = nn.with_logical_constraint(embedding, ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(dtype)  # [b, t, d]
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    new_cache = []
    for s, (group_size, num_groups) in enumerate(cfg.segments):
      segment_cache = None if cache is None else tuple(cache[s])
      x, segment_cache = self._segment(s, group_size, num_groups, x, positions, rope, segment_ids, segment_cache)
      new_cache.append(segment_cache)

    if logit_indices is not None:
      x = jnp.take_along_axis(x, logit_indices[:, :, None], axis=1)  # [b, m, d]
    x = Norm(cfg, name="final_norm")(x)
    if features_only:  # the loss applies the head itself, in chunks (train_step.loss_fn)
      return x
    if cfg.tie_embeddings:
      head = embedding.T  # [d, v]
    else:
      head = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), init)
    logits = dense(x, head.astype(dtype), out_dtype=jnp.float32)  # [b, t, v]
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits if cache is None else (logits, new_cache)

  def _segment(
      self,
      index: int,
      group_size: int,
      num_groups: int,
      x: Array,
      positions: Array,
      rope: Rope,
      segment_ids: Array | None,
      cache: kv_cache.KVCache | None,
  ) -> tuple[Array, kv_cache.KVCache | None]:
    """x through segment `index`'s groups (scanned or unrolled, as configured), and the segment's updated cache
    when decoding (else None)."""
    cfg = self.cfg
    if cfg.scan_layers and cache is not None:
      # The params the training scan stacked, [num_groups, ...]; decode_segment loops over the groups.
      stacked = self.variables["params"][f"segment_{index}"]
      return decode_segment(cfg, group_size, stacked, x, positions, rope, cache)
    if cfg.scan_layers:
      scanned = nn.scan(
          _ScannedGroup,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
          length=num_groups,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = scanned(cfg, group_size, name=f"segment_{index}")(x, positions, rope, segment_ids)
      return x, None
    for g in range(num_groups):
      group = LayerGroup(cfg, group_size, name=group_name(index, g))
      if cache is None:
        x = group(x, positions, rope, segment_ids)
      else:
        x, cache = group(x, positions, rope, segment_ids, cache, g)
    return x, cache


def group_name(segment: int, group: int) -> str:
  """Module name of group `group` of segment `segment` in the unscanned (`scan_layers=False`) layout."""
  return f"segment_{segment}_group_{group}"


def abstract_params(cfg: ModelConfig) -> Any:
  """Boxed param shapes (with logical axis metadata) without allocating anything."""
  model = Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(tokens.shape, tokens.dtype)))["params"]


def init_params(cfg: ModelConfig, rng: Array) -> Any:
  """Unboxed fp32 params (single device; training builds them sharded instead)."""
  variables = Transformer(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))
  return nn.meta.unbox(variables["params"])


def unstack_params(params: Any, cfg: ModelConfig) -> dict:
  """Converts scanned params (stacked per segment) into the unscanned (`scan_layers=False`) layout."""
  out = {k: v for k, v in params.items() if not k.startswith("segment_")}
  for s, (_, num_groups) in enumerate(cfg.segments):
    for g in range(num_groups):
      out[group_name(s, g)] = jax.tree.map(lambda a, g=g: a[g], params[f"segment_{s}"])
  return out


def stack_params(params: Any, cfg: ModelConfig) -> dict:
  """Inverse of `unstack_params`: per-group params stacked into each segment's `layers` axis.

  Stacks with numpy, on the host: converters build whole checkpoints this way, and no accelerator
  should have to hold one unsharded.
  """
  out = {k: v for k, v in params.items() if not k.startswith("segment_")}
  for s, (_, num_groups) in enumerate(cfg.segments):
    groups = [params[group_name(s, g)] for g in range(num_groups)]
    out[f"segment_{s}"] = jax.tree.map(lambda *a: np.stack(a), *groups)
  return out
