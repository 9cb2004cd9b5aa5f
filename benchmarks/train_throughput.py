"""Train-step throughput and MFU on random tokens (no data pipeline), on whatever devices are present.

  python benchmarks/train_throughput.py                                    # default config, CPU
  python benchmarks/train_throughput.py --config=configs/paper_1b.py:H128-MQA-CLA2 \\
      --config.train.batch_size=8 --config.model.remat=save_dots           # 1B row, reduced batch, GPU/TPU

Prints tokens/s, achieved TFLOP/s, MFU against the device's peak (bf16 table on TPU/GPU, a measured fp32
matmul on CPU) and, on CPU, the ratio of achieved to measured peak matmul FLOP/s.
"""

import time

import jax
import jax.numpy as jnp
import step_setup  # benchmarks/step_setup.py, beside this script
from absl import flags
from ml_collections import config_flags

from cla_jax import cli, config_lib, metrics, sharding

_CONFIG = config_flags.DEFINE_config_file("config", config_lib.DEFAULT_CONFIG, "Config file[:row].", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")


def main(argv):
  del argv
  config = _CONFIG.value
  setup = step_setup.setup_step(config)
  cfg, mesh = setup.model_config, setup.mesh
  b, t = config.train.batch_size, config.train.seq_len
  start = time.perf_counter()
  jax.block_until_ready(setup.run(1))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(setup.run(_STEPS.value))
  step_s = (time.perf_counter() - start) / _STEPS.value
  flops = metrics.flops_per_token(cfg, t) * b * t / step_s
  devices = list(mesh.devices.flat)
  peak, source = metrics.total_peak_flops(devices, float(config.train.peak_flops_per_device))
  print(
      f"config {config.name}: {cfg.num_layers} layers, d={cfg.d_model}, pattern={cfg.pattern}, "
      f"dtype={jnp.dtype(cfg.compute_dtype).name}, batch {b} x {t}, accum {config.train.grad_accum_steps}"
  )
  print(f"devices: {len(devices)} x {devices[0].device_kind}; mesh {sharding.describe(mesh)}")
  print(f"first step (compile) {compile_s:.1f} s; step {step_s * 1e3:.1f} ms; {b * t / step_s:,.0f} tokens/s")
  print(
      f"model FLOPs/token {metrics.flops_per_token(cfg, t) / 1e6:.1f} M; achieved {flops / 1e12:.3f} TFLOP/s; "
      f"peak {peak / 1e12:.3f} TFLOP/s ({source}); MFU {100 * flops / peak:.1f}%"
  )
  if devices[0].platform == "cpu":
    print(f"CPU: achieved / measured peak matmul FLOP/s = {flops / metrics.measured_cpu_peak():.2f}")


if __name__ == "__main__":
  cli.start(main)
