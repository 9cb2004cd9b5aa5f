"""Loss, the jitted train step (gradient accumulation, fp32 grads) and the eval step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cla_jax import sharding
from cla_jax.attention import dense

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Objective = Callable[[Any, Batch], tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]


# Above this many logits per sequence (seq_len x vocab), the loss computes them in chunks of positions instead of
# all at once: the paper's 2048 x 50,304 fp32 logits and their gradient are 3.3 GB each per 8 sequences, a fifth
# of a v5e chip. Below it (every CPU-sized config) the loss is computed whole, as it always was.
CHUNKED_LOSS_MIN_LOGITS = 1 << 24
LOSS_CHUNK_LOGITS = 1 << 24  # logits per sequence per chunk (~64 MB fp32 per sequence)


def loss_chunk(seq_len: int, vocab_size: int) -> int:
  """Positions per loss chunk: seq_len (no chunking) for small heads, else the largest divisor within budget."""
  if seq_len * vocab_size <= CHUNKED_LOSS_MIN_LOGITS:
    return seq_len
  limit = max(1, LOSS_CHUNK_LOGITS // vocab_size)
  return max(c for c in range(1, min(limit, seq_len) + 1) if seq_len % c == 0)


def _token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  token_loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(token_loss * weights.astype(jnp.float32))


def loss_fn(params: Any, batch: Batch, model: nn.Module) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token cross-entropies, number of weighted target tokens), both fp32.

  Sums rather than means so that micro-batches, hosts and eval batches combine exactly:
  the mean loss is always sum_loss / num_tokens over everything that was summed.
  """
  cfg = model.cfg
  seq_len = batch["inputs"].shape[1]
  chunk = loss_chunk(seq_len, cfg.vocab_size)
  args = (batch["inputs"],)
  kwargs = {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}
  weights = batch["weights"].astype(jnp.float32)
  if chunk == seq_len:
    logits = sharding.apply(model, params, *args, **kwargs)
    return _token_losses(logits, batch["targets"], weights), jnp.sum(weights)
  features = sharding.apply(model, params, *args, **kwargs, features_only=True)  # [b, t, d]
  head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  head = head.astype(cfg.compute_dtype)

  # Each chunk's fp32 logits live only inside its (rematerialised) body: the backward pass recomputes them
  # from the saved bf16 features, one chunk at a time, for about a third of the head's matmul FLOPs.
  @jax.checkpoint
  def chunk_loss(feats, targets, w):
    logits = nn.with_logical_constraint(
        dense(feats, head, out_dtype=jnp.float32),
        ("activation_batch", "activation_length", "activation_vocab"),
        rules=sharding.LOGICAL_AXIS_RULES,
    )
    return _token_losses(logits, targets, w)

  def body(total, xs):
    return total + chunk_loss(*xs), None

  split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], seq_len // chunk, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(features), split(batch["targets"]), split(weights)))
  return total, jnp.sum(weights)


def _micro_batches(batch: Batch, accum_steps: int) -> Batch:
  """[B, ...] -> [accum, B / accum, ...] where micro-batch a takes rows a, a+accum, a+2*accum, ...

  Strided rather than contiguous so that every device's rows contribute to every micro-batch:
  the batch axis keeps its (data, fsdp) sharding and no data moves between devices.
  """

  def split(x):
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, P(None, sharding.BATCH_AXES, *([None] * (x.ndim - 2))))

  return {k: split(v) for k, v in batch.items()}


def grads_and_loss(
    params: Any, batch: Batch, model: nn.Module, accum_steps: int, objective: Objective | None = None
) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array]]:
  """(summed fp32 grads, summed loss, token count, summed extra terms) over `accum_steps` micro-batches, scanned.

  `objective(params, batch) -> (summed loss, (token count, {name: summed term}))` replaces the LM loss
  (distillation, cla_jax.distill); its extra terms are summed like the loss.
  """
  if objective is None:
    objective = lambda p, b: _no_extras(*loss_fn(p, b, model))  # noqa: E731
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if accum_steps == 1:
    (loss_sum, (tokens, extras)), grads = grad_fn(params, batch)
    return grads, loss_sum, tokens, extras

  def body(carry, micro):
    grads_acc, loss_acc, tokens_acc, extras_acc = carry
    (loss_sum, (tokens, extras)), grads = grad_fn(params, micro)
    grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
    extras_acc = jax.tree.map(jnp.add, extras_acc, extras)
    return (grads_acc, loss_acc + loss_sum, tokens_acc + tokens, extras_acc), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  micro_batches = _micro_batches(batch, accum_steps)
  extras_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches))[0][1][1]
  init = (
      zeros,
      jnp.zeros((), jnp.float32),
      jnp.zeros((), jnp.float32),
      jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), extras_shape),
  )
  (grads, loss_sum, tokens, extras), _ = jax.lax.scan(body, init, micro_batches)
  return grads, loss_sum, tokens, extras


def _no_extras(loss_sum: jax.Array, tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, dict]]:
  return loss_sum, (tokens, {})


def train_step(
    params: Any,
    opt_state: Any,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    accum_steps: int,
    objective: Objective | None = None,
) -> tuple[Any, Any, Metrics]:
  """One optimizer step on a global batch: mean-token-loss gradients, clipped AdamW update."""
  grads, loss_sum, tokens, extras = grads_and_loss(params, batch, model, accum_steps, objective)
  denom = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {
      "loss": loss_sum / denom,
      "num_tokens": tokens,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      **{name: value / denom for name, value in extras.items()},
  }
  return params, opt_state, metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> Metrics:
  """Summed validation loss and token count of one batch (combine across batches by summing)."""
  loss_sum, tokens = loss_fn(params, batch, model)
  return {"loss_sum": loss_sum, "num_tokens": tokens}


def state_shardings(boxed_params: Any, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[Any, Any]:
  """(param, optimizer-state) NamedShardings from the logically annotated abstract params."""
  opt_shardings = sharding.logical_shardings(jax.eval_shape(tx.init, boxed_params), mesh)
  return sharding.logical_shardings(boxed_params, mesh), opt_shardings


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    param_shardings: Any,
    opt_shardings: Any,
    rng: jax.Array,
) -> tuple[Any, Any]:
  """Params and optimizer state created directly sharded by one jitted init (never whole on a host)."""

  def init(rng):
    params = nn.meta.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
    return params, tx.init(params)

  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=(param_shardings, opt_shardings))(rng)


def jit_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    accum_steps: int,
    mesh: Mesh,
    param_shardings: Any,
    opt_shardings: Any,
    teacher: Any = None,
) -> Callable[..., tuple[Any, Any, Metrics]]:
  """`train_step` as one jax.jit with explicit shardings; params and optimizer state are donated.

  With a `distill.Teacher`, its forward runs in the same program (its params an input, never donated).
  """

  def step(params, opt_state, batch, teacher_params=None):
    objective = None
    if teacher is not None:
      from cla_jax import distill  # pylint: disable=g-import-not-at-top

      objective = functools.partial(distill.objective, model=model, teacher=teacher, teacher_params=teacher_params)
    return train_step(params, opt_state, batch, model=model, tx=tx, accum_steps=accum_steps, objective=objective)

  in_shardings = (param_shardings, opt_shardings, sharding.batch_sharding(mesh))
  if teacher is not None:
    in_shardings += (teacher.param_shardings,)
  jitted = jax.jit(
      step,
      in_shardings=in_shardings,
      out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, P())),
      donate_argnums=(0, 1),
  )
  if teacher is None:
    return _with_mesh(jitted, mesh)
  call = _with_mesh(lambda params, opt_state, batch: jitted(params, opt_state, batch, teacher.params), mesh)
  call.jitted = jitted  # lower(params, opt_state, batch, teacher.params)
  return call


def jit_eval_step(model: nn.Module, mesh: Mesh, param_shardings: Any) -> Callable[[Any, Batch], Metrics]:
  """`eval_step` as one jax.jit with explicit shardings."""

  def step(params, batch):
    return eval_step(params, batch, model=model)

  jitted = jax.jit(
      step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)), out_shardings=NamedSharding(mesh, P())
  )
  return _with_mesh(jitted, mesh)


def _with_mesh(jitted: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """Calls (and so traces) `jitted` under `mesh`: linen's logical constraints are no-ops without one."""

  def call(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  call.jitted = jitted  # for .lower() / cost analysis in benchmarks
  return call
