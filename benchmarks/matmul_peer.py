"""The train step's matmul shapes alone, jax (XLA CPU) vs torch, to tell XLA's CPU backend apart from our code.

  python benchmarks/matmul_peer.py

For the default config's MLP (tokens 2048 = batch 16 x 128, d_model 256, mlp 688) it times, alternating
jax and torch in one process, the three matmuls of one linear layer in training: the forward
x[t,d] @ w[d,f], the input gradient g[t,f] @ w[d,f]^T and the weight gradient x[t,d]^T @ g[t,f]
(contracting over tokens); then the whole SwiGLU MLP, forward and backward, written as the model wrote it
before (3-D einsums such as 'btd,df->btf') and as it does now (`attention.dense`: 2-D matmuls), against torch.
Prints ms per call and torch/jax time ratios (> 1: jax is faster).

Then the weight gradient (x^T @ g, contracting over the 2048 tokens) of every projection of the default
config, and their sum over one train step at `pattern=none` (the count of each shape per step): XLA:CPU
runs these transposed-operand matmuls with Eigen, not the YNNPACK kernels of the forward and input-gradient
matmuls, and this is where its matmuls fall behind torch's (MKL/oneDNN); then one layer's causal attention,
forward and backward: `attention.folded_attention` against torch's `scaled_dot_product_attention`.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cla_jax.attention import dense, folded_attention

TOKENS, D_MODEL, MLP = 2048, 256, 688
BATCH = 16  # TOKENS = BATCH x 128
HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 4, 1, 64, 2048, 4
# (in, out) of each projection's weight, and how many of them one train step has (pattern=none, 4 layers).
WEIGHT_GRADS = {
    "query, out": ((D_MODEL, HEADS * HEAD_DIM), 2 * LAYERS),
    "key, value": ((D_MODEL, KV_HEADS * HEAD_DIM), 2 * LAYERS),
    "gate, up": ((D_MODEL, MLP), 2 * LAYERS),
    "down": ((MLP, D_MODEL), LAYERS),
    "lm_head": ((D_MODEL, VOCAB), 1),
}


def mlp_einsum(x, w_gate, w_up, w_down):
  """SwiGLU as 3-D einsums over [b, t, d] (how model.py wrote it before `dense`)."""
  hidden = jax.nn.silu(jnp.einsum("btd,df->btf", x, w_gate)) * jnp.einsum("btd,df->btf", x, w_up)
  return jnp.einsum("btf,fd->btd", hidden, w_down)


def mlp_dense(x, w_gate, w_up, w_down):
  """SwiGLU through `attention.dense` (2-D matmuls), as the model computes it."""
  return dense(jax.nn.silu(dense(x, w_gate)) * dense(x, w_up), w_down)


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
  x3, dy = x.reshape(BATCH, -1, D_MODEL), rng.standard_normal((BATCH, TOKENS // BATCH, D_MODEL)).astype(np.float32)
  weights = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in ((D_MODEL, MLP), (D_MODEL, MLP), (MLP, D_MODEL))]
  mlp_args = tuple(map(jnp.asarray, (x3, *weights, dy)))
  tensors = [torch.from_numpy(a).requires_grad_() for a in (x3, *weights)]
  t_dy = torch.from_numpy(dy)

  def torch_mlp():
    tx3, t_gate, t_up, t_down = tensors
    out = (torch.nn.functional.silu(tx3 @ t_gate) * (tx3 @ t_up)) @ t_down
    torch.autograd.grad(out, tensors, t_dy)

  for name, fn in (("MLP fwd+bwd, 3-D einsum", mlp_einsum), ("MLP fwd+bwd, attention.dense", mlp_dense)):
    step = jax.jit(lambda x, wg, wu, wd, dy, fn=fn: jax.vjp(fn, x, wg, wu, wd)[1](dy))
    cases[name] = (step, mlp_args, torch_mlp)
  print(
      f"tokens {TOKENS}, d_model {D_MODEL}, mlp {MLP}; fp32; jax {jax.devices()[0].device_kind}, "
      f"torch threads {torch.get_num_threads()}"
  )
  for name, (jfn, args, tfn) in cases.items():
    _compare(name, jfn, args, tfn)

  print("\nweight gradient x^T @ g over the step's 2048 tokens, per projection (count per step, pattern=none)")
  totals = [0.0, 0.0]
  for name, ((d_in, d_out), count) in WEIGHT_GRADS.items():
    a, b = rng.standard_normal((TOKENS, d_in), np.float32), rng.standard_normal((TOKENS, d_out), np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    j, t = _compare(
        f"{name} [{d_in}x{d_out}] x{count}",
        jax.jit(lambda a, b: a.T @ b),
        (jnp.asarray(a), jnp.asarray(b)),
        lambda ta=ta, tb=tb: ta.t() @ tb,
        flops=2 * TOKENS * d_in * d_out,
    )
    totals[0] += count * j
    totals[1] += count * t
  print(
      f"{'all weight gradients of a step':26s} jax {1e3 * totals[0]:6.2f} ms   torch {1e3 * totals[1]:6.2f} ms   "
      f"torch/jax {totals[1] / totals[0]:.2f}"
  )

  q, k, v, dout = (
      rng.standard_normal((BATCH, TOKENS // BATCH, h, HEAD_DIM), np.float32) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS)
  )
  attend = jax.jit(lambda q, k, v, dout: jax.vjp(lambda *a: folded_attention(*a, None), q, k, v)[1](dout))
  tq, tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()).requires_grad_() for a in (q, k, v))
  tdout = torch.from_numpy(dout.transpose(0, 2, 1, 3).copy())

  def torch_attend():
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
    torch.autograd.grad(out, (tq, tk, tv), tdout)

  print()
  _compare("causal attention fwd+bwd", attend, tuple(map(jnp.asarray, (q, k, v, dout))), torch_attend)


def _compare(name, jfn, args, tfn, flops: int = 0) -> tuple[float, float]:
  """Times jax `jfn(*args)` and torch `tfn()`; prints both, the ratio (and GFLOP/s when `flops`)."""
  j = statistics.median(_time(lambda: jax.block_until_ready(jfn(*args))))
  t = statistics.median(_time(tfn))
  rate = f"   {flops / j / 1e9:4.0f} vs {flops / t / 1e9:4.0f} GFLOP/s" if flops else ""
  print(f"{name:26s} jax {1e3 * j:6.2f} ms   torch {1e3 * t:6.2f} ms   torch/jax {t / j:.2f}{rate}")
  return j, t


if __name__ == "__main__":
  main()
