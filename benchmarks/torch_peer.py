"""cla_jax's train step against its PyTorch peer (Hugging Face `LlamaForCausalLM` + `torch.optim.AdamW`).

  python benchmarks/torch_peer.py                                  # default config (MQA+CLA2), CPU
  python benchmarks/torch_peer.py --config.model.pattern=none      # plain MQA: the same model on both sides

Both sides train the same dims (layers, width, heads, KV heads, head size, FFN, vocab, batch x length),
fp32, AdamW with the config's betas and weight decay, global-norm clipping. The peer has no CLA, so for
a CLA pattern it is the same-sized model without sharing (it computes more K/V, not less). Each side runs
in its own worker process (a jax step that follows torch's in one process runs slower: the two runtimes'
thread pools and allocators get in each other's way), and the rounds alternate (jax, torch, jax, torch,
...) so that a noisy machine hits both; the figure to quote is the median of the per-round ratios.

On Linux, `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (transparent huge pages for malloc) speeds up both sides;
see the README's benchmark notes. The last line of stdout is one JSON object.
"""

import json
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import step_setup  # benchmarks/step_setup.py, beside this script
from absl import flags
from ml_collections import config_flags

from cla_jax import cli, config_lib, export_hf

_CONFIG = config_flags.DEFINE_config_file("config", config_lib.DEFAULT_CONFIG, "Config file[:row].", lock_config=True)
_ROUNDS = flags.DEFINE_integer("rounds", 16, "Alternating rounds (each times both sides).")
_STEPS = flags.DEFINE_integer("steps", 3, "Train steps per side per round.")
_SIDE = flags.DEFINE_enum("side", None, ["jax", "torch"], "Internal: run as the worker process of one side.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: one per core, like XLA's CPU pool).")


def jax_step(config):
  """(run n steps -> seconds per step) for cla_jax's jitted train step on random tokens."""
  setup = step_setup.setup_step(config)

  def run(n: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(setup.run(n))
    return (time.perf_counter() - start) / n

  return run


def torch_step(config, threads: int):
  """(run n steps -> seconds per step) for transformers' Llama of the same dims, or None without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  m, t = config.model, config.train
  if threads > 0:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  # The same config.json the Hugging Face export writes for this model (plain Llama: no sharing on the peer side).
  hf_config = transformers.LlamaConfig.from_dict(
      export_hf.hf_config(
          config_lib.model_config(config), llama=True, dtype="float32", max_positions=t.seq_len, special={}
      )
  )
  model = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
  model.train()
  decay = [p for n, p in model.named_parameters() if "norm" not in n]
  no_decay = [p for n, p in model.named_parameters() if "norm" in n]
  opt = torch.optim.AdamW(
      [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
      lr=1e-4,
      betas=(t.b1, t.b2),
  )
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, m.vocab_size, size=(t.batch_size, t.seq_len + 1)))
  inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

  def one():
    logits = model(input_ids=inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)

  def run(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      one()
    return (time.perf_counter() - start) / n

  return run


def serve(run) -> None:
  """Worker loop: for each line `n` on stdin, runs n steps and prints the seconds per step."""
  run(1)  # compile / warm up
  print("ready", flush=True)
  for line in sys.stdin:
    print(run(int(line)), flush=True)


def main(argv):
  del argv
  config = _CONFIG.value
  if _SIDE.value == "jax":
    return serve(jax_step(config))
  if _SIDE.value == "torch":
    peer = torch_step(config, _THREADS.value)
    if peer is None:
      print("missing", flush=True)
      return None
    return serve(peer)
  cfg = config_lib.model_config(config)
  flags_passed = [a for a in sys.argv[1:] if not a.startswith("--side")]
  workers = {
      side: subprocess.Popen(
          [sys.executable, __file__, f"--side={side}", *flags_passed],
          stdin=subprocess.PIPE,
          stdout=subprocess.PIPE,
          text=True,
      )
      for side in ("jax", "torch")
  }
  try:
    for side, worker in workers.items():  # one at a time: compiling is not what is timed
      status = worker.stdout.readline().strip()
      if status == "missing":
        raise cli.UserError("torch/transformers are not installed; `pip install -e '.[test]'` brings them in.")
      if status != "ready":
        raise SystemExit(f"the {side} worker failed (see its error above).")

    def timed(side: str) -> float:
      workers[side].stdin.write(f"{_STEPS.value}\n")
      workers[side].stdin.flush()
      return float(workers[side].stdout.readline())

    ours_s, peer_s, ratios = [], [], []
    for _ in range(_ROUNDS.value):
      a, b = timed("jax"), timed("torch")
      ours_s.append(a)
      peer_s.append(b)
      ratios.append(b / a)  # > 1: cla_jax is faster
  finally:
    for worker in workers.values():
      worker.stdin.close()
      worker.wait()
  b, t = config.train.batch_size, config.train.seq_len
  print(
      f"{cfg.num_layers} layers, d={cfg.d_model}, heads {cfg.num_heads}/{cfg.num_kv_heads} kv, head_dim "
      f"{cfg.head_dim}, ffn {cfg.mlp_dim}, vocab {cfg.vocab_size}, pattern={cfg.pattern}, batch {b} x {t}, fp32, "
      "each side in its own process"
  )
  print(f"cla_jax step  median {1e3 * statistics.median(ours_s):7.1f} ms  (min {1e3 * min(ours_s):.1f})")
  print(f"torch   step  median {1e3 * statistics.median(peer_s):7.1f} ms  (min {1e3 * min(peer_s):.1f})")
  print(
      f"speed ratio cla_jax/torch (peer time / our time, median of {len(ratios)} rounds): "
      f"{statistics.median(ratios):.2f}x  (range {min(ratios):.2f}-{max(ratios):.2f})"
  )
  print(
      json.dumps(
          {
              "pattern": cfg.pattern,
              "cla_jax_step_ms": 1e3 * statistics.median(ours_s),
              "torch_step_ms": 1e3 * statistics.median(peer_s),
              "ratio": statistics.median(ratios),
              "ratio_min": min(ratios),
              "ratio_max": max(ratios),
          }
      )
  )
  sys.stdout.flush()


if __name__ == "__main__":
  cli.start(main)
