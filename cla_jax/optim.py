"""The optimizer of paper section 3: AdamW, warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax

# Parameters whose last path key is one of these are not weight-decayed (norm gains and biases).
NO_DECAY_NAMES = ("scale", "bias")


def learning_rate_schedule(train_config: Any) -> optax.Schedule:
  """Linear warmup over `warmup_frac` of the steps, then cosine decay to `min_lr_ratio` * peak."""
  steps = int(train_config.steps)
  warmup = int(round(float(train_config.warmup_frac) * steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=float(train_config.lr),
      warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1),
      end_value=float(train_config.lr) * float(train_config.min_lr_ratio),
  )


def decay_mask(params: Any) -> Any:
  """True for params that get weight decay; works on boxed (nn.Partitioned) and plain trees alike."""

  def decays(path, _) -> bool:
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", str(last)))
    return name not in NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(train_config: Any) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(b1, b2, weight_decay masked off norms) with the schedule above."""
  return optax.chain(
      optax.clip_by_global_norm(float(train_config.clip_norm)),
      optax.adamw(
          learning_rate_schedule(train_config),
          b1=float(train_config.b1),
          b2=float(train_config.b2),
          weight_decay=float(train_config.weight_decay),
          mask=decay_mask,
      ),
  )
