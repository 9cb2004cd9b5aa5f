"""Compile time of a forward+backward step vs depth, scanned over layer groups vs unrolled.

    python benchmarks/compile_time.py [--config=configs/default.py] [--depths=4,8,16,32]

Scanning compiles one group body per segment, so compile time should stay flat as depth grows
(target: scanned 32-layer / 4-layer <= 1.3x), while unrolled layers grow roughly linearly.
Nothing is allocated: the step is lowered from abstract shapes.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from cla_jax import cli, config_lib, train_step
from cla_jax import model as model_lib

_CONFIG = config_flags.DEFINE_config_file("config", config_lib.DEFAULT_CONFIG, "Config file[:row].", lock_config=True)
_DEPTHS = flags.DEFINE_list("depths", ["4", "8", "16", "32"], "Numbers of layers to compile.")


def compile_seconds(config, num_layers: int, scan_layers: bool) -> float:
  """Seconds to lower and compile value_and_grad of the training loss (`train_step.loss_fn`)."""
  config = config_lib.from_json(config_lib.to_json(config))
  with config.unlocked():
    config.model.update(num_layers=num_layers, scan_layers=scan_layers)
  cfg = config_lib.model_config(config)
  model = model_lib.Transformer(cfg)
  params = nn.meta.unbox(model_lib.abstract_params(cfg))
  rows = (config.train.batch_size, config.train.seq_len)
  batch = {
      "inputs": jax.ShapeDtypeStruct(rows, jnp.int32),
      "targets": jax.ShapeDtypeStruct(rows, jnp.int32),
      "weights": jax.ShapeDtypeStruct(rows, jnp.float32),
  }
  grad_fn = jax.value_and_grad(lambda p, b: train_step.loss_fn(p, b, model), has_aux=True)
  start = time.perf_counter()
  jax.jit(grad_fn).lower(params, batch).compile()
  return time.perf_counter() - start


def main(argv) -> None:
  del argv
  config, depths = _CONFIG.value, [int(d) for d in _DEPTHS.value]
  compile_seconds(config, depths[0], True)  # warm up JAX/XLA so the first row is not charged for it
  rows = [(d, compile_seconds(config, d, True), compile_seconds(config, d, False)) for d in depths]
  print(
      f"pattern={config.model.pattern} d_model={config.model.d_model} "
      f"batch={config.train.batch_size}x{config.train.seq_len} backend={jax.default_backend()}"
  )
  print(f"{'layers':>6} {'scanned s':>10} {'unrolled s':>11} {'unrolled/scanned':>17}")
  for d, scanned, unrolled in rows:
    print(f"{d:>6} {scanned:>10.2f} {unrolled:>11.2f} {unrolled / scanned:>17.2f}")
  first, last = rows[0], rows[-1]
  print(f"growth {last[0]}/{first[0]} layers: scanned {last[1] / first[1]:.2f}x, unrolled {last[2] / first[2]:.2f}x")


if __name__ == "__main__":
  cli.start(main)
