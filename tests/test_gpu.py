"""GPU-only numerics: cuDNN attention and bf16 compute against the fp32 XLA path (skipped without a GPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cla_jax.model import Transformer
from tests import numpy_reference as ref
from tests.model_helpers import random_params, small_config, tokens_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]


def test_cudnn_attention_matches_xla_in_bf16():
  cfg = small_config(pattern="cla2", dtype="bfloat16", head_dim=64, num_heads=4, num_kv_heads=1, d_model=256)
  assert cfg.resolved_attention_impl == "cudnn"
  params, tokens = random_params(cfg), tokens_for(cfg, batch=4, length=256)
  cudnn = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
  xla = jax.jit(Transformer(dataclasses.replace(cfg, attention_impl="xla")).apply)({"params": params}, tokens)
  scale = float(jnp.abs(xla).max())
  assert float(jnp.abs(cudnn - xla).max()) < 0.05 * scale


def test_fp32_on_gpu_matches_numpy():
  cfg = small_config(pattern="keep_ends", dtype="float32")
  params, tokens = random_params(cfg), tokens_for(cfg)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
  np.testing.assert_allclose(got, ref.forward(jax.device_get(params), np.asarray(tokens)), atol=1e-4, rtol=1e-4)
