"""A Cross-Layer Attention (CLA) decoder for transformers, exported by cla_jax (`cla-export-hf`).

Brandon et al. 2024, "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention": adjacent
layers form KV groups (`config.kv_group_sizes`). A group's first layer (the producer) normalises its
input with `kv_layernorm`, projects keys and values (RoPE on keys) and writes them to the KV cache; every
layer of the group, producer included, attends to those keys and values with its own queries. The other
layers (consumers) have no K/V projections, read the producer's keys and values, and write nothing, so
the cache holds one entry per group: it is `num_hidden_layers / num_kv_groups` times smaller than a
Llama cache of the same sizes.

Weight names follow Llama's (`model.layers.i.self_attn.q_proj`, ...); producers add
`model.layers.i.kv_layernorm.weight` and `self_attn.k_proj`/`v_proj`. This file ships inside the cla_jax
package and is copied into every export.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_cla import CLAConfig

_TRANSFORMERS_5 = int(__import__("transformers").__version__.split(".")[0]) >= 5
# transformers 5.2x renamed the cache argument and output field `past_key_values` to `cache`: `generate` then
# passes the cache as `cache=`, and a forward that reads only `past_key_values` would start every step from an
# empty cache. Forwards here accept both names and return the cache under the field this version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
  """The cache passed under either name (`cache` in newer transformers, `past_key_values` in older)."""
  if cache is not None and past_key_values is not None:
    raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
  return cache if cache is not None else past_key_values


class CLARMSNorm(nn.Module):
  """RMSNorm computed in float32, scaled by a learned weight."""

  def __init__(self, size: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(size))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * self.weight.float()).to(x.dtype)


def rotary(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
  """(cos, sin) [b, 1, t, head_dim / 2] of the rotate-half RoPE at `position_ids` [b, t], in float32."""
  inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
  angles = position_ids.float()[..., None] * inv_freq  # [b, t, h/2]
  return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """Rotates pairs (x_i, x_{i + h/2}) of x [b, heads, t, h] (Hugging Face Llama's layout)."""
  x1, x2 = x.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class CLAMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: CLAConfig):
    super().__init__()
    self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
    self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CLAAttention(nn.Module):
  """Queries of one layer; keys and values only in a group's first layer (`is_producer`)."""

  def __init__(self, config: CLAConfig, is_producer: bool):
    super().__init__()
    d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
    self.q_proj = nn.Linear(d, n * h, bias=False)
    self.o_proj = nn.Linear(n * h, d, bias=False)
    if is_producer:
      self.k_proj = nn.Linear(d, k * h, bias=False)
      self.v_proj = nn.Linear(d, k * h, bias=False)

  def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's keys (rotated) and values [b, kv_heads, t, h] of the KV-normed group input x [b, t, d]."""
    b, t, _ = x.shape
    key = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
    value = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
    return apply_rotary(key, cos, sin), value

  def forward(
      self,
      x: torch.Tensor,
      key: torch.Tensor,
      value: torch.Tensor,
      cos: torch.Tensor,
      sin: torch.Tensor,
      bias: torch.Tensor,
  ) -> torch.Tensor:
    b, t, _ = x.shape
    query = apply_rotary(self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
    # Grouped-query attention: each KV head serves num_heads / num_kv_heads query heads.
    repeat = self.num_heads // self.num_kv_heads
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype))
    return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class CLADecoderLayer(nn.Module):
  """Pre-norm attention over the group's K/V, then a pre-norm SwiGLU; a producer also computes that K/V."""

  def __init__(self, config: CLAConfig, group_index: int, is_producer: bool):
    super().__init__()
    self.group_index, self.is_producer = group_index, is_producer
    self.input_layernorm = CLARMSNorm(config.hidden_size, config.rms_norm_eps)
    if is_producer:
      self.kv_layernorm = CLARMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = CLAAttention(config, is_producer)
    self.post_attention_layernorm = CLARMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = CLAMLP(config)

  def forward(self, x, shared_kv, cos, sin, bias, cache):
    if self.is_producer:
      key, value = self.self_attn.key_value(self.kv_layernorm(x), cos, sin)
      if cache is not None:  # the group's one cache entry: past and new keys/values
        key, value = cache.update(key, value, self.group_index)
      shared_kv = (key, value)
    x = x + self.self_attn(self.input_layernorm(x), *shared_kv, cos, sin, bias)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, shared_kv


class CLAPreTrainedModel(PreTrainedModel):
  config_class = CLAConfig
  base_model_prefix = "model"
  _no_split_modules = ["CLADecoderLayer"]
  _skip_keys_device_placement = ["past_key_values", "cache"]
  _supports_sdpa = True

  def _init_weights(self, module):
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, CLARMSNorm):
      nn.init.ones_(module.weight)


class CLAModel(CLAPreTrainedModel):
  """The decoder stack: embeddings, layers grouped by `config.kv_group_sizes`, final norm."""

  def __init__(self, config: CLAConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
    layers = []
    for g, size in enumerate(config.kv_group_sizes):
      layers += [CLADecoderLayer(config, g, is_producer=(j == 0)) for j in range(size)]
    self.layers = nn.ModuleList(layers)
    self.norm = CLARMSNorm(config.hidden_size, config.rms_norm_eps)
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def _group_cache(self, cache: Cache | None, use_cache: bool) -> Cache | None:
    """The cache to fill: one entry per KV group."""
    if not use_cache:
      return None
    if cache is None:
      return DynamicCache()  # grows one layer entry per producer on first update
    num_groups = self.config.num_kv_groups
    if isinstance(cache, DynamicCache) and len(cache.layers) > num_groups and cache.get_seq_length() == 0:
      # `generate` builds an empty cache with one entry per layer; CLA needs one per group only.
      del cache.layers[num_groups:]
    return cache

  def forward(
      self,
      input_ids=None,
      attention_mask=None,
      position_ids=None,
      past_key_values=None,
      inputs_embeds=None,
      use_cache=None,
      cache=None,
      **kwargs,
  ) -> BaseModelOutputWithPast:
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    use_cache = self.config.use_cache if use_cache is None else use_cache
    cache = self._group_cache(_one_cache(cache, past_key_values), use_cache)
    b, t = x.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    cache_position = torch.arange(past, past + t, device=x.device)
    if position_ids is None:
      position_ids = cache_position[None].expand(b, t)
    # Additive mask [b, 1, t, past + t]: causal by absolute cache position, and padding from attention_mask.
    key_position = torch.arange(past + t, device=x.device)
    allowed = (key_position[None, :] <= cache_position[:, None])[None, None]
    if attention_mask is not None and attention_mask.dim() == 2:
      allowed = allowed & attention_mask[:, None, None, -(past + t) :].bool()
    # A finite minimum (not -inf) keeps fully masked rows (left padding) finite instead of NaN.
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=x.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )
    cos, sin = rotary(position_ids, self.config.head_dim, float(self.config.rope_parameters["rope_theta"]))
    shared_kv = None
    for layer in self.layers:
      x, shared_kv = layer(x, shared_kv, cos, sin, bias, cache)
    return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{_CACHE_FIELD: cache})


class CLAForCausalLM(CLAPreTrainedModel, GenerationMixin):
  """CLA decoder with a language-model head; `generate` keeps one KV-cache entry per group."""

  _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

  def __init__(self, config: CLAConfig):
    super().__init__(config)
    self.model = CLAModel(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def set_input_embeddings(self, value):
    self.model.embed_tokens = value

  def get_output_embeddings(self):
    return self.lm_head

  def set_output_embeddings(self, value):
    self.lm_head = value

  def forward(
      self,
      input_ids=None,
      attention_mask=None,
      position_ids=None,
      past_key_values=None,
      inputs_embeds=None,
      labels=None,
      use_cache=None,
      logits_to_keep=0,
      cache=None,
      **kwargs,
  ) -> CausalLMOutputWithPast:
    out = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=_one_cache(cache, past_key_values),
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
    )
    hidden = out.last_hidden_state
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
      hidden = hidden[:, -logits_to_keep:]
    elif not isinstance(logits_to_keep, int):
      hidden = hidden[:, logits_to_keep]
    logits = self.lm_head(hidden)
    loss = None
    if labels is not None:
      loss = F.cross_entropy(
          logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
      )
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
