"""The train step lowers for CUDA on a CPU-only host (runs in CPU CI; test_gpu.py needs a GPU)."""

import dataclasses

import jax
import jax.numpy as jnp

from cla_jax import config_lib, optim, train_step
from cla_jax import model as model_lib


def test_train_step_lowers_for_cuda_from_a_cpu_host():
  """No GPU needed: the step lowers to CUDA StableHLO (deviceless GPU *compilation* is not in this jax).

  `auto` picks cuDNN attention on GPU, but lowering it needs cuDNN present, so this lowers the XLA path.
  """
  config = config_lib.load("configs/default.py")
  cfg = config_lib.model_config(config).for_platform("gpu")
  assert (cfg.attention_impl, cfg.remat, cfg.dtype) == ("cudnn", "none", "bfloat16")
  cfg = dataclasses.replace(cfg, attention_impl="xla")
  model, tx = model_lib.Transformer(cfg), optim.make_optimizer(config.train)
  params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  opt_state = jax.eval_shape(tx.init, params)
  batch = {k: jax.ShapeDtypeStruct((4, 128), jnp.int32) for k in ("inputs", "targets")}
  batch["weights"] = jax.ShapeDtypeStruct((4, 128), jnp.float32)
  step = jax.jit(lambda p, o, b: train_step.train_step(p, o, b, model=model, tx=tx, accum_steps=1))
  text = step.trace(params, opt_state, batch).lower(lowering_platforms=("cuda",)).as_text()
  assert "bf16" in text and "stablehlo.dot_general" in text
