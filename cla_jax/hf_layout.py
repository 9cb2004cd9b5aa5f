"""The one table between cla_jax params and Hugging Face Llama/CLA tensors: names, shapes and layouts.

`export_hf` writes with `to_hf` and `convert_hf` reads with `from_hf`, both from this table, so the two are
inverses by construction. cla_jax keeps matmul operands [in, ...]; Hugging Face keeps [out, in] matrices:
  embed [v, d]                -> model.embed_tokens.weight [v, d]
  final_norm                  -> model.norm.weight;  lm_head [d, v] -> lm_head.weight [v, d] (untied only)
  layer.attn_norm, mlp_norm   -> model.layers.i.input_layernorm, post_attention_layernorm
  layer.query [d, n, h]       -> model.layers.i.self_attn.q_proj.weight [n*h, d]
  layer.out [n, h, d]         -> model.layers.i.self_attn.o_proj.weight [d, n*h]
  layer.gate/up [d, f], down [f, d] -> model.layers.i.mlp.gate_proj/up_proj [f, d], down_proj [d, f]
  kv.key/value [d, k, h]      -> model.layers.i.self_attn.k_proj/v_proj.weight [k*h, d]  (a group's first layer)
  kv.norm                     -> model.layers.i.kv_layernorm.weight  (CLA format only; Llama: input_layernorm)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One param: its Hugging Face name (after `model.layers.{i}.` for layer tensors) and where it lives here."""

  hf_name: str
  path: tuple[str, ...]  # keys into cla_jax's params (the whole tree, a layer's or a group's kv)
  shape: tuple[str, ...]  # cla_jax's shape in dims: d_model, num_heads, num_kv_heads, head_dim, mlp, vocab
  layout: str  # same | transpose | heads_in ([d, n, h] <-> [n*h, d]) | heads_out ([n, h, d] <-> [d, n*h])
  fields: str  # the config.json fields that fix Hugging Face's shape (for error messages)


EMBED = Tensor("model.embed_tokens.weight", ("embed",), ("v", "d"), "same", "vocab_size, hidden_size")
FINAL_NORM = Tensor("model.norm.weight", ("final_norm", "scale"), ("d",), "same", "hidden_size")
LM_HEAD = Tensor("lm_head.weight", ("lm_head",), ("d", "v"), "transpose", "vocab_size, hidden_size")
_HEADS = "num_attention_heads x head_dim, hidden_size"
_KV_HEADS = "num_key_value_heads x head_dim, hidden_size"
LAYER = (
    Tensor("input_layernorm.weight", ("attn_norm", "scale"), ("d",), "same", "hidden_size"),
    Tensor("self_attn.q_proj.weight", ("query",), ("d", "n", "h"), "heads_in", _HEADS),
    Tensor("self_attn.o_proj.weight", ("out",), ("n", "h", "d"), "heads_out", _HEADS),
    Tensor("post_attention_layernorm.weight", ("mlp_norm", "scale"), ("d",), "same", "hidden_size"),
    Tensor("mlp.gate_proj.weight", ("gate",), ("d", "f"), "transpose", "intermediate_size, hidden_size"),
    Tensor("mlp.up_proj.weight", ("up",), ("d", "f"), "transpose", "intermediate_size, hidden_size"),
    Tensor("mlp.down_proj.weight", ("down",), ("f", "d"), "transpose", "hidden_size, intermediate_size"),
)
KV = (
    Tensor("self_attn.k_proj.weight", ("key",), ("d", "k", "h"), "heads_in", _KV_HEADS),
    Tensor("self_attn.v_proj.weight", ("value",), ("d", "k", "h"), "heads_in", _KV_HEADS),
)
KV_NORM = Tensor("kv_layernorm.weight", ("norm", "scale"), ("d",), "same", "hidden_size")  # CLA format only


def layer_prefix(i: int) -> str:
  """The Hugging Face name prefix of layer i's tensors."""
  return f"model.layers.{i}."


def dims(cfg: Any) -> dict[str, int]:
  """The table's dimension letters for a model config (ModelConfig or convert_hf's LlamaArch)."""
  return {
      "d": cfg.d_model,
      "n": cfg.num_heads,
      "k": cfg.num_kv_heads,
      "h": cfg.head_dim,
      "f": cfg.mlp_dim,
      "v": cfg.vocab_size,
  }


def shape(tensor: Tensor, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """cla_jax's shape of `tensor`."""
  return tuple(sizes[letter] for letter in tensor.shape)


def hf_shape(tensor: Tensor, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """Hugging Face's shape of `tensor`."""
  ours = shape(tensor, sizes)
  if tensor.layout == "same":
    return ours
  if tensor.layout == "transpose":
    return ours[::-1]
  if tensor.layout == "heads_in":  # [d, n, h] -> [n*h, d]
    return (math.prod(ours[1:]), ours[0])
  return (ours[-1], math.prod(ours[:-1]))  # heads_out: [n, h, d] -> [d, n*h]


def to_hf(tensor: Tensor, x: np.ndarray) -> np.ndarray:
  """cla_jax's array of `tensor` in Hugging Face's layout."""
  if tensor.layout == "same":
    return x
  if tensor.layout == "transpose":
    return x.T
  if tensor.layout == "heads_in":
    return x.reshape(x.shape[0], -1).T  # [d, n, h] -> [d, n*h] -> [n*h, d]
  return x.reshape(-1, x.shape[-1]).T  # heads_out: [n, h, d] -> [n*h, d] -> [d, n*h]


def from_hf(tensor: Tensor, w: np.ndarray, sizes: Mapping[str, int]) -> np.ndarray:
  """Hugging Face's array of `tensor` in cla_jax's layout (the inverse of `to_hf`)."""
  if tensor.layout == "same":
    return w
  return w.T.reshape(shape(tensor, sizes))  # transpose, and split the heads axis where there is one


def get(tree: Mapping[str, Any], tensor: Tensor) -> Any:
  """The entry of `tree` at `tensor.path`."""
  for key in tensor.path:
    tree = tree[key]
  return tree


def put(tree: dict[str, Any], tensor: Tensor, value: Any) -> None:
  """Sets the entry of `tree` at `tensor.path`, creating the dicts on the way."""
  *parents, last = tensor.path
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value
