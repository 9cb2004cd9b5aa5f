"""The jitted train step on random tokens, set up once for the step benchmarks (no flags of its own)."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cla_jax import config_lib, optim, sharding, train_step
from cla_jax import model as model_lib


@dataclasses.dataclass
class StepSetup:
  """A config's sharded params and optimizer state, its jitted train step, and one random global batch."""

  model_config: model_lib.ModelConfig
  mesh: Mesh
  step: Callable[..., Any]
  params: Any
  opt_state: Any
  batch: dict[str, jax.Array]

  def run(self, n: int) -> Any:
    """Runs `n` steps on the batch (state carried along); returns the last step's metrics, unfetched."""
    metrics = None
    for _ in range(n):
      self.params, self.opt_state, metrics = self.step(self.params, self.opt_state, self.batch)
    return metrics


def setup_step(config: ml_collections.ConfigDict) -> StepSetup:
  """Builds what `trainer.py` builds for a step (state init, shardings, jit), fed random tokens."""
  cfg = config_lib.model_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_model_fits(cfg, mesh)
  model, tx = model_lib.Transformer(cfg), optim.make_optimizer(config.train)
  param_sh, opt_sh = train_step.state_shardings(model_lib.abstract_params(cfg), tx, mesh)
  params, opt_state = train_step.init_state(model, tx, mesh, param_sh, opt_sh, jax.random.key(0))
  step = train_step.jit_train_step(model, tx, config.train.grad_accum_steps, mesh, param_sh, opt_sh)
  b, t = config.train.batch_size, config.train.seq_len
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(b, t + 1), dtype=np.int32)
  batch = sharding.global_batch(
      {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32)}, mesh
  )
  return StepSetup(cfg, mesh, step, params, opt_state, batch)
