"""The optimizer of the paper's section 3 against hand-written formulas: schedule, AdamW, clipping, decay mask."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cla_jax import model as model_lib
from cla_jax import optim
from tests.model_helpers import random_params, small_config, tokens_for
from tests.train_helpers import tiny_config


def test_linear_warmup_over_5_percent_then_cosine_to_10_percent():
  peak, steps = 1e-3, 200
  schedule = optim.learning_rate_schedule(
      tiny_config(train=dict(lr=peak, steps=steps, warmup_frac=0.05, min_lr_ratio=0.1)).train
  )
  warmup = 10  # 5% of 200 steps

  def expected(step):  # the paper's schedule, written out
    if step < warmup:
      return peak * step / warmup
    progress = min(step - warmup, steps - warmup) / (steps - warmup)
    return 0.1 * peak + (peak - 0.1 * peak) * 0.5 * (1 + math.cos(math.pi * progress))

  for step in (0, 1, 5, 9, 10, 11, 55, 105, 150, 199, 200, 250):
    assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-12), step
  assert float(schedule(0)) == 0.0 and float(schedule(warmup)) == pytest.approx(peak)
  assert float(schedule(steps)) == pytest.approx(0.1 * peak)  # the floor: 10% of the peak, not zero
  assert min(float(schedule(s)) for s in range(warmup, 400)) == pytest.approx(0.1 * peak)


def test_weight_decay_skips_norms_and_biases():
  """Zero gradients leave Adam's step at zero, so each param moves by its weight decay alone."""
  cfg = small_config(norm="layernorm", num_layers=2, pattern="cla2")  # layernorm: norms have scale and bias
  params = random_params(cfg)
  lr, decay = 1e-2, 0.1
  tx = optim.make_optimizer(tiny_config(train=dict(lr=lr, weight_decay=decay, warmup_frac=0.0, steps=10)).train)
  updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, params), jax.jit(tx.init)(params), params)
  names = []
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    name, param = path[-1].key, _at(params, path)
    names.append(name)
    expected = np.zeros_like(param) if name in ("scale", "bias") else -lr * decay * np.asarray(param)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-12, err_msg=jax.tree_util.keystr(path))
  assert {"scale", "bias", "query", "key", "embed", "lm_head"} <= set(names)


def _numpy_adamw(params, grads_per_step, *, peak, min_ratio, steps, b1, b2, weight_decay, clip_norm, eps=1e-8):
  """Global-norm clipping then AdamW (decay off norms and biases) in float64, cosine lr without warmup."""
  flat = {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  m = {k: np.zeros_like(v) for k, v in flat.items()}
  v2 = {k: np.zeros_like(v) for k, v in flat.items()}
  trajectory = []
  for t, grads in enumerate(grads_per_step):
    g = {jax.tree_util.keystr(k): np.asarray(x, np.float64) for k, x in jax.tree_util.tree_leaves_with_path(grads)}
    norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    scale = min(1.0, clip_norm / norm)
    lr = min_ratio * peak + (1 - min_ratio) * peak * 0.5 * (1 + math.cos(math.pi * t / steps))
    for k in flat:
      gk = g[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      v2[k] = b2 * v2[k] + (1 - b2) * gk**2
      step = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v2[k] / (1 - b2 ** (t + 1))) + eps)
      decays = not k.endswith(("['scale']", "['bias']"))
      flat[k] = flat[k] - lr * (step + (weight_decay * flat[k] if decays else 0.0))
    trajectory.append((dict(flat), scale))
  return trajectory


def test_adamw_with_real_gradients_and_clipping_matches_numpy():
  """Four steps on the model's own loss gradients, scaled so that some steps are clipped and some are not."""
  cfg = small_config(norm="layernorm", num_layers=2, pattern="cla2")
  params = random_params(cfg)
  train = tiny_config(
      train=dict(lr=1e-2, weight_decay=0.1, warmup_frac=0.0, steps=8, min_lr_ratio=0.1, b1=0.9, b2=0.95)
  ).train

  def loss(p, tokens):
    logits = model_lib.Transformer(cfg).apply({"params": p}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  grad_fn = jax.jit(jax.grad(loss))
  # Adam divides out a constant gradient scale, so the clip only shows when the scale changes between steps.
  scales = (10.0, 0.1, 1.0, 10.0)
  first = jax.tree.leaves(grad_fn(params, tokens_for(cfg, length=13, seed=0)))
  train.clip_norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in first)))
  tx = optim.make_optimizer(train)
  state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
  current, grads_seen, got = params, [], []
  for step, scale in enumerate(scales):
    grads = jax.tree.map(lambda g, s=scale: g * s, grad_fn(current, tokens_for(cfg, length=13, seed=step)))
    grads_seen.append(grads)
    updates, state = update(grads, state, current)
    current = optax.apply_updates(current, updates)
    got.append(current)

  expected = _numpy_adamw(
      params,
      grads_seen,
      peak=1e-2,
      min_ratio=0.1,
      steps=8,
      b1=0.9,
      b2=0.95,
      weight_decay=0.1,
      clip_norm=train.clip_norm,
  )
  clip_scales = [scale for _, scale in expected]
  assert min(clip_scales) < 0.5 and max(clip_scales) == 1.0, clip_scales  # both regimes are exercised
  for step, (want, _) in enumerate(expected):
    for path, leaf in jax.tree_util.tree_leaves_with_path(got[step]):
      key = jax.tree_util.keystr(path)
      np.testing.assert_allclose(leaf, want[key], rtol=2e-5, atol=2e-6, err_msg=f"step {step} {key}")


def test_decay_mask_is_the_same_on_boxed_params():
  """The trainer builds optimizer state from the boxed (logically partitioned) abstract params."""
  cfg = small_config(norm="layernorm", num_layers=2, pattern="cla2")
  boxed = optim.decay_mask(model_lib.abstract_params(cfg))
  plain = optim.decay_mask(nn.meta.unbox(model_lib.abstract_params(cfg)))
  assert jax.tree.leaves(boxed) == jax.tree.leaves(plain) and not all(jax.tree.leaves(plain))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree
