"""Configuration of a Cross-Layer Attention (CLA) decoder exported by cla_jax (`cla-export-hf`).

A Llama-style decoder in which adjacent layers form KV groups: `kv_group_sizes` lists the groups' sizes from
the first layer to the last (they sum to `num_hidden_layers`). Each group's first layer computes the group's
keys and values (with its own `kv_layernorm`); the group's other layers attend to them and have no K/V
projections. This file ships inside the cla_jax package and is copied into every export.
"""

from transformers import PretrainedConfig


class CLAConfig(PretrainedConfig):
  """Sizes, norm, RoPE and KV grouping of a CLA decoder (`model_type="cla"`)."""

  model_type = "cla"
  keys_to_ignore_at_inference = ["past_key_values"]

  def __init__(
      self,
      vocab_size=32000,
      hidden_size=4096,
      intermediate_size=11008,
      num_hidden_layers=32,
      num_attention_heads=32,
      num_key_value_heads=None,
      head_dim=None,
      kv_group_sizes=None,
      hidden_act="silu",
      rms_norm_eps=1e-5,
      rope_parameters=None,
      rope_theta=None,
      max_position_embeddings=2048,
      initializer_range=0.02,
      use_cache=True,
      tie_word_embeddings=False,
      bos_token_id=None,
      eos_token_id=None,
      pad_token_id=None,
      **kwargs,
  ):
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.intermediate_size = intermediate_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.num_key_value_heads = num_key_value_heads or num_attention_heads
    self.head_dim = head_dim or hidden_size // num_attention_heads
    # Default: no sharing (every layer its own group), i.e. a plain Llama with separate KV norms.
    self.kv_group_sizes = list(kv_group_sizes) if kv_group_sizes else [1] * num_hidden_layers
    self.hidden_act = hidden_act
    self.rms_norm_eps = rms_norm_eps
    # Exports write both `rope_parameters` (transformers 5) and the older top-level `rope_theta` (4.x).
    self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": rope_theta or 10000.0})
    self.max_position_embeddings = max_position_embeddings
    self.initializer_range = initializer_range
    self.use_cache = use_cache
    if sum(self.kv_group_sizes) != num_hidden_layers or min(self.kv_group_sizes) <= 0:
      raise ValueError(
          f"kv_group_sizes={self.kv_group_sizes} must be positive and sum to " f"num_hidden_layers={num_hidden_layers}."
      )
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={num_attention_heads} is not divisible by "
          f"num_key_value_heads={self.num_key_value_heads}."
      )
    if self.rope_parameters.get("rope_type", "default") != "default" or hidden_act != "silu":
      raise ValueError("CLA models use the default RoPE and a SwiGLU (silu) MLP.")
    super().__init__(
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **kwargs,
    )

  @property
  def num_kv_groups(self) -> int:
    """Number of KV groups, i.e. of layers that compute keys and values (and of KV-cache entries)."""
    return len(self.kv_group_sizes)
