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

from cla_jax import cli, config_lib
from cla_jax import model as model_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file[:row].", lock_config=True)
_DEPTHS = flags.DEFINE_list("depths", ["4", "8", "16", "32"], "Numbers of layers to compile.")


def compile_seconds(config, num_layers: int, scan_layers: bool) -> float:
  """Seconds to lower and compile value_and_grad of the mean next-token loss."""
  config = config_lib.from_json(config_lib.to_json(config))
  with config.unlocked():
    config.model.update(num_layers=num_layers, scan_layers=scan_layers)
  cfg = config_lib.model_config(config)
  model = model_lib.Transformer(cfg)
  params = nn.meta.unbox(model_lib.abstract_params(cfg))
  tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len + 1), jnp.int32)

  def loss(p, t):
    logits = model.apply({"params": p}, t[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

  start = time.perf_counter()
  jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
  return time.perf_counter() - start


def main(argv) -> None:
  del argv
  config, depths = _CONFIG.value, [int(d) for d in _DEPTHS.value]
  compile_seconds(config, depths[0], True)  # warm up JAX/XLA so the first row is not charged for it
  rows = [(d, compile_seconds(config, d, True), compile_seconds(config, d, False)) for d in depths]
  print(f"pattern={config.model.pattern} d_model={config.model.d_model} "
        f"batch={config.train.batch_size}x{config.train.seq_len} backend={jax.default_backend()}")
  print(f"{'layers':>6} {'scanned s':>10} {'unrolled s':>11} {'unrolled/scanned':>17}")
  for d, scanned, unrolled in rows:
    print(f"{d:>6} {scanned:>10.2f} {unrolled:>11.2f} {unrolled / scanned:>17.2f}")
  first, last = rows[0], rows[-1]
  print(f"growth {last[0]}/{first[0]} layers: scanned {last[1] / first[1]:.2f}x, unrolled {last[2] / first[2]:.2f}x")


if __name__ == "__main__":
  cli.run(main)
