"""The optimizer of the paper's section 3 against hand-written formulas: warmup, cosine floor, decay mask."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from cla_jax import config_lib, optim
from cla_jax import model as model_lib
from tests.model_helpers import random_params, small_config


def _train_config(**fields):
  config = config_lib.load("configs/default.py")
  config.train.update(**fields)
  return config.train


def test_linear_warmup_over_5_percent_then_cosine_to_10_percent():
  peak, steps = 1e-3, 200
  schedule = optim.learning_rate_schedule(_train_config(lr=peak, steps=steps, warmup_frac=0.05, min_lr_ratio=0.1))
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
  tx = optim.make_optimizer(_train_config(lr=lr, weight_decay=decay, warmup_frac=0.0, steps=10))
  updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, params), jax.jit(tx.init)(params), params)
  names = []
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    name, param = path[-1].key, _at(params, path)
    names.append(name)
    expected = np.zeros_like(param) if name in ("scale", "bias") else -lr * decay * np.asarray(param)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-12, err_msg=jax.tree_util.keystr(path))
  assert {"scale", "bias", "query", "key", "embed", "lm_head"} <= set(names)


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
