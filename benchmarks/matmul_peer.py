"""The train step's matmul shapes alone, jax (XLA CPU) vs torch, to tell XLA's CPU backend apart from our code.

  python benchmarks/matmul_peer.py

For the default config's MLP (tokens 2048 = batch 16 x 128, d_model 256, mlp 688) it times, alternating
jax and torch in one process, the three matmuls of one linear layer in training: the forward
x[t,d] @ w[d,f], the input gradient g[t,f] @ w[d,f]^T and the weight gradient x[t,d]^T @ g[t,f]
(contracting over tokens). Prints ms per call and torch/jax time ratios (> 1: jax is faster).
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

TOKENS, D_MODEL, MLP = 2048, 256, 688


def _time(fn, rounds: int = 7, calls: int = 20) -> list[float]:
  fn()
  out = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      fn()
    out.append((time.perf_counter() - start) / calls)
  return out


def main() -> None:
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((TOKENS, D_MODEL), (D_MODEL, MLP), (TOKENS, MLP)))
  jx, jw, jg = map(jnp.asarray, (x, w, g))
  tx, tw, tg = map(torch.from_numpy, (x, w, g))
  cases = {
      "forward   x @ w": (jax.jit(lambda a, b: a @ b), (jx, jw), lambda: tx @ tw),
      "input grad g @ w^T": (jax.jit(lambda a, b: a @ b.T), (jg, jw), lambda: tg @ tw.t()),
      "weight grad x^T @ g": (jax.jit(lambda a, b: a.T @ b), (jx, jg), lambda: tx.t() @ tg),
  }
  print(
      f"tokens {TOKENS}, d_model {D_MODEL}, mlp {MLP}; fp32; jax {jax.devices()[0].device_kind}, "
      f"torch threads {torch.get_num_threads()}"
  )
  for name, (jfn, args, tfn) in cases.items():
    j = _time(lambda jfn=jfn, args=args: jfn(*args).block_until_ready())
    t = _time(tfn)
    print(
        f"{name:22s} jax {1e3 * statistics.median(j):6.2f} ms   torch {1e3 * statistics.median(t):6.2f} ms   "
        f"torch/jax {statistics.median(t) / statistics.median(j):.2f}"
    )


if __name__ == "__main__":
  main()
