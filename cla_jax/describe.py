"""What a config builds: its KV groups, KV layers, KV-cache bytes per token and parameter count.

    cla-describe --config=configs/paper_1b.py:H128-MQA-CLA2      # the command: cla_jax/cli/describe.py

Everything is read off the built model's parameter shapes (`jax.eval_shape`, nothing allocated).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax

from cla_jax import model as model_lib
from cla_jax.model import ModelConfig

KV_BYTES_PER_ELEMENT = 2  # the paper reports 16-bit caches


def describe(cfg: ModelConfig) -> dict[str, Any]:
  """Groups (layer indices), number of KV blocks, 16-bit KV bytes per token, and parameter count."""
  params = jax.tree.map(lambda box: box.value, model_lib.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names"))
  if cfg.scan_layers:
    stacks = [params[k] for k in sorted(params, key=_segment_index) if k.startswith("segment_")]
    # Leading axis of a scanned segment = its number of groups.
    groups_per_stack = [s["kv"]["key"].shape[0] for s in stacks]
    per_group = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), s) for s in stacks]
  else:
    names = sorted((k for k in params if k.startswith("segment_")), key=_segment_index)
    per_group, groups_per_stack = [params[k] for k in names], [1] * len(names)

  groups, kv_layers, kv_bytes, layer = [], 0, 0, 0
  for group, count in zip(per_group, groups_per_stack):
    size = sum(1 for name in group if name.startswith("layer_"))
    per_token = sum(math.prod(group["kv"][w].shape) // cfg.d_model for w in ("key", "value"))
    for _ in range(count):
      groups.append(list(range(layer, layer + size)))
      layer += size
      kv_layers += 1
      kv_bytes += per_token * KV_BYTES_PER_ELEMENT
  num_params = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
  return {"groups": groups, "kv_layers": kv_layers, "kv_bytes_per_token": kv_bytes, "params": num_params}


def _segment_index(name: str) -> tuple[int, ...]:
  return tuple(int(n) for n in re.findall(r"\d+", name))
