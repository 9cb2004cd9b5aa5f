"""An independent numpy implementation of the CLA transformer, layer by layer, for tests.

It reads the scanned param tree structurally (no cla_jax code), loops over layers one at a time,
and repeats K/V heads explicitly, so it shares no code path with the Flax model.
"""

from __future__ import annotations

import re

import numpy as np


def split_layers(params) -> list[tuple[dict, list[dict]]]:
  """[(kv_params, [layer_params, ...]) per group], first group first, from a scanned param tree."""
  names = sorted((k for k in params if k.startswith("segment_")), key=lambda k: int(re.findall(r"\d+", k)[0]))
  groups = []
  for name in names:
    segment = params[name]
    num_groups = np.asarray(segment["kv"]["key"]).shape[0]
    layer_names = sorted((k for k in segment if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    for g in range(num_groups):
      groups.append((_take(segment["kv"], g), [_take(segment[n], g) for n in layer_names]))
  return groups


def _take(tree, g):
  """Group `g` of a stacked (scanned) subtree, as float64."""
  return {k: _take(v, g) if isinstance(v, dict) else np.asarray(v, np.float64)[g] for k, v in tree.items()}


def norm(x, p, kind="rmsnorm", eps=1e-5):
  if kind == "layernorm":
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p["scale"]


def rope(x, positions, theta):
  """Rotation of (x_i, x_{i+h/2}) pairs written as complex multiplication: x [b, t, heads, h]."""
  half = x.shape[-1] // 2
  freqs = 1.0 / theta ** (np.arange(half) * 2.0 / x.shape[-1])
  rot = np.exp(1j * positions[:, :, None, None] * freqs)  # [b, t, 1, h/2]
  z = (x[..., :half] + 1j * x[..., half:]) * rot
  return np.concatenate([z.real, z.imag], axis=-1)


def attend(q, k, v, segment_ids=None):
  """Causal softmax attention with K/V heads repeated to the query heads."""
  repeat = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, repeat, axis=2), np.repeat(v, repeat, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  t = q.shape[1]
  allowed = np.tril(np.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  scores = np.where(allowed, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def forward(
    params,
    tokens,
    *,
    norm_kind="rmsnorm",
    eps=1e-5,
    theta=10000.0,
    tie_embeddings=False,
    positions=None,
    segment_ids=None,
) -> np.ndarray:
  """Logits [b, t, vocab] (float64) of the CLA transformer for scanned `params`."""
  tokens = np.asarray(tokens)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  embed = np.asarray(params["embed"], np.float64)
  x = embed[tokens]
  silu = lambda a: a / (1 + np.exp(-a))
  for kv, layers in split_layers(params):
    h = norm(x, kv["norm"], norm_kind, eps)
    k = rope(np.einsum("btd,dkh->btkh", h, kv["key"]), positions, theta)
    v = np.einsum("btd,dkh->btkh", h, kv["value"])
    for layer in layers:
      h = norm(x, layer["attn_norm"], norm_kind, eps)
      q = rope(np.einsum("btd,dnh->btnh", h, layer["query"]), positions, theta)
      x = x + np.einsum("btnh,nhd->btd", attend(q, k, v, segment_ids), layer["out"])
      h = norm(x, layer["mlp_norm"], norm_kind, eps)
      x = x + (silu(h @ layer["gate"]) * (h @ layer["up"])) @ layer["down"]
  x = norm(x, {k: np.asarray(v, np.float64) for k, v in params["final_norm"].items()}, norm_kind, eps)
  head = embed.T if tie_embeddings else np.asarray(params["lm_head"], np.float64)
  return x @ head
