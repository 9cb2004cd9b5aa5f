"""The chunked loss (long sequences x large vocabularies) equals the whole-logits loss, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cla_jax import model as model_lib
from cla_jax import train_step
from tests.model_helpers import small_config


def test_loss_chunk_rule():
  assert train_step.loss_chunk(128, 2048) == 128  # CPU-sized: whole, as before
  assert train_step.loss_chunk(2048, 50304) == 256  # the paper: largest divisor of 2048 within 2^24 / 50304 = 333


@pytest.mark.slow
def test_chunked_loss_matches_whole_logits(monkeypatch):
  cfg = small_config(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, vocab_size=96)
  model = model_lib.Transformer(cfg)
  params = model_lib.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {
      "inputs": jnp.asarray(rng.integers(0, 96, (2, 16)), jnp.int32),
      "targets": jnp.asarray(rng.integers(0, 96, (2, 16)), jnp.int32),
      "weights": jnp.asarray(rng.random((2, 16)) > 0.2, jnp.float32),
  }

  def reference(p):  # independent: optax on the model's full logits
    logits = model.apply({"params": p}, batch["inputs"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(losses * batch["weights"])

  monkeypatch.setattr(train_step, "CHUNKED_LOSS_MIN_LOGITS", 0)
  monkeypatch.setattr(train_step, "LOSS_CHUNK_LOGITS", 4 * 96)  # 4 positions per chunk
  assert train_step.loss_chunk(16, 96) == 4
  chunked = lambda p: train_step.loss_fn(p, batch, model)[0]  # noqa: E731
  np.testing.assert_allclose(chunked(params), reference(params), rtol=1e-5)
  got, want = jax.grad(chunked)(params), jax.grad(reference)(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
