"""The training loop: `run(config, workdir)` trains, checkpoints, resumes and survives preemption.

One program for one CPU, one GPU or a multi-host pod: every host runs this same loop on its slice
of the global batch; jit + the mesh do the rest. Only process 0 writes logs and metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections

from cla_jax import checkpoint, config_lib, metrics as metrics_lib, optim, sharding
from cla_jax import train_step as train_step_lib
from cla_jax.data import batches as batches_lib, tokenizer as tokenizer_lib
from cla_jax.errors import UserError
from cla_jax import model as model_lib
from cla_jax.model import Transformer


class TrainConfigError(UserError):
  """Train / batch / accumulation settings that cannot work."""


class NonFiniteLossError(UserError):
  """The loss became NaN or inf; the run stops without saving the bad state."""


def check_train_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises TrainConfigError, naming the field and a fix, for steps/batch/accumulation that cannot work."""
  t = config.train
  for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every"):
    if not isinstance(t[name], int) or t[name] < 1:
      raise TrainConfigError(f"train.{name} must be a positive integer, got {t[name]!r}.")
  if t.batch_size % t.grad_accum_steps:
    raise TrainConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps="
                           f"{t.grad_accum_steps}; pick an accumulation count that divides the batch.")
  micro, ways = t.batch_size // t.grad_accum_steps, sharding.batch_parallelism(mesh)
  if micro % ways:
    raise TrainConfigError(
        f"micro-batch train.batch_size/train.grad_accum_steps = {micro} sequences cannot be split over "
        f"mesh data*fsdp = {ways} devices; make it a multiple of {ways}.")
  if t.batch_size % jax.process_count():
    raise TrainConfigError(f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} "
                           f"processes; each host feeds an equal slice.")
  if t.eval_every > 0 and config.eval.batch_size % ways:
    raise TrainConfigError(f"eval.batch_size={config.eval.batch_size} cannot be split over mesh data*fsdp = "
                           f"{ways} devices; make it a multiple of {ways} or set train.eval_every=0.")
  if config.checkpoint.every_steps < 1 or config.checkpoint.keep < 1:
    raise TrainConfigError("checkpoint.every_steps and checkpoint.keep must be positive integers.")
  if not 0 <= t.warmup_frac < 1 or not 0 <= t.min_lr_ratio <= 1 or t.lr <= 0:
    raise TrainConfigError("need 0 <= train.warmup_frac < 1, 0 <= train.min_lr_ratio <= 1 and train.lr > 0.")


def data_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of everything that decides which tokens batch(step) holds (to warn when a resume changes it)."""
  relevant = {"data": config.data.to_dict(), "batch_size": config.train.batch_size,
              "seq_len": config.train.seq_len}
  relevant["data"].pop("prefetch", None)
  return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class _Preemption:
  """SIGTERM sets a flag that the loop checks at the next step boundary (never mid-step)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir belongs to one model: refuse to resume it with a different model config."""
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.exists(path):
    return
  old = checkpoint.read_config(workdir)
  if old.model.to_dict() != config.model.to_dict():
    changed = sorted(k for k in set(old.model.keys()) | set(config.model.keys())
                     if old.model.get(k) != config.model.get(k))
    raise TrainConfigError(f"workdir {workdir} holds a run with a different model config (fields {changed}); "
                           f"use a new --workdir or the original model settings.")


class Trainer:
  """State and loop of one training run (see `run`)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.config = config = ml_collections.ConfigDict(config.to_dict())
    self.mesh = sharding.make_mesh(config.mesh)
    check_train_config(config, self.mesh)
    self.tokenizer = tokenizer_lib.get_tokenizer(config)
    tokenizer_lib.set_vocab_size(config, self.tokenizer)
    self.cfg = config_lib.model_config(config)
    sharding.check_model_fits(self.cfg, self.mesh)
    _check_workdir_config(self.workdir, config)
    checkpoint.write_config(self.workdir, config)
    if jax.process_index() == 0:
      # A copy in the workdir keeps eval.py independent of the tokenizer cache (evaluate.load_tokenizer).
      self.tokenizer.save(self.workdir)

    self.model = Transformer(self.cfg)
    self.tx = optim.make_optimizer(config.train)
    # Jitted once: evaluating the optax schedule eagerly would compile a few small ops per new shape.
    self.schedule = jax.jit(optim.learning_rate_schedule(config.train))
    boxed_params = model_lib.abstract_params(self.cfg)
    self.param_shardings, self.opt_shardings = train_step_lib.state_shardings(boxed_params, self.tx, self.mesh)
    unboxed = nn.meta.unbox(boxed_params)
    self.abstract_params = sharding.shardings_like(unboxed, self.param_shardings)
    self.abstract_opt_state = sharding.shardings_like(jax.eval_shape(self.tx.init, unboxed), self.opt_shardings)

    self.writer = metrics_lib.MetricWriter(self.workdir, config.train.steps)
    self.manager = checkpoint.make_manager(self.workdir, keep=config.checkpoint.keep,
                                           async_save=config.checkpoint.async_save)
    self.flops_per_step = metrics_lib.flops_per_token(self.cfg, config.train.seq_len) * (
        config.train.batch_size * config.train.seq_len)
    self.peak_flops, self.peak_source = metrics_lib.total_peak_flops(
        list(self.mesh.devices.flat), float(config.train.get("peak_flops_per_device", 0.0)))

  # -- state -------------------------------------------------------------------------------------

  def _fresh_opt_state(self, params: Any) -> Any:
    with jax.set_mesh(self.mesh):
      return jax.jit(self.tx.init, in_shardings=(self.param_shardings,), out_shardings=self.opt_shardings)(params)

  def restore_or_init(self) -> tuple[int, Any, Any]:
    """(start step, params, opt_state) from the newest readable checkpoint, or freshly initialised."""
    restored = checkpoint.restore(self.manager, self.abstract_params, self.abstract_opt_state, quarantine=True)
    if restored is None:
      params, opt_state = train_step_lib.init_state(self.model, self.tx, self.mesh, self.param_shardings,
                                                    self.opt_shardings, jax.random.key(self.config.train.seed))
      self.writer.message(f"initialised {self.cfg.num_layers}-layer model from seed {self.config.train.seed}")
      return 0, params, opt_state
    if restored.opt_state is None:
      # Params-only checkpoint (e.g. converted from Hugging Face): continued training from those weights
      # with a fresh optimizer and schedule, starting at step 0 of this run.
      self.writer.message(f"loaded params-only checkpoint step {restored.step}; fresh optimizer from step 0")
      return 0, restored.params, self._fresh_opt_state(restored.params)
    if restored.meta.get("data_fingerprint") not in (None, data_fingerprint(self.config)):
      self.writer.message("warning: the data / batch config differs from the checkpoint's; resumed batches "
                          "will not continue the original data order.")
    self.writer.message(f"resumed from checkpoint step {restored.step} in {self.manager.directory}")
    return restored.step, restored.params, restored.opt_state

  def save(self, step: int, params: Any, opt_state: Any) -> None:
    """Starts an async save of `step` (the caller has checked its loss is finite)."""
    if step in self.manager.all_steps():
      return  # e.g. a params-only checkpoint at this step: never overwrite an existing one
    meta = {"data_seed": int(self.config.data.seed), "data_fingerprint": data_fingerprint(self.config),
            "config_name": str(self.config.get("name", "")), "time": time.time()}
    checkpoint.save(self.manager, step, params, opt_state, meta)

  # -- loop --------------------------------------------------------------------------------------

  def evaluate(self, params: Any, eval_fn) -> dict[str, float]:
    """Validation loss over `train.eval_batches` batches of the eval split."""
    cfg = self.config
    batches = batches_lib.eval_batches(
        cfg, self.tokenizer, batch_size=cfg.eval.batch_size,
        max_tokens=cfg.train.eval_batches * cfg.eval.batch_size * cfg.train.seq_len)
    loss_sum, tokens = 0.0, 0.0
    for local in batches:
      out = jax.device_get(eval_fn(params, sharding.global_batch(local, self.mesh)))
      loss_sum += float(out["loss_sum"])
      tokens += float(out["num_tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}

  def run(self) -> None:
    """Trains from the latest checkpoint (or scratch) to train.steps; see module docstring."""
    cfg = self.config
    steps = cfg.train.steps
    start, params, opt_state = self.restore_or_init()
    if start >= steps:
      self.writer.message(f"nothing to do: checkpoint step {start} >= train.steps={steps}")
      self._close()
      return
    self.writer.message(f"mesh {sharding.describe(self.mesh)}; {self.flops_per_step / 1e9:.2f} GFLOP/step; "
                        f"peak {self.peak_flops / 1e12:.2f} TFLOP/s ({self.peak_source})")
    train_fn = train_step_lib.jit_train_step(self.model, self.tx, cfg.train.grad_accum_steps, self.mesh,
                                             self.param_shardings, self.opt_shardings)
    eval_fn = train_step_lib.jit_eval_step(self.model, self.mesh, self.param_shardings)
    batches: Iterator[dict] = batches_lib.TrainBatches(cfg, self.tokenizer, "train").iterator(start)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    pending = None  # (step, device metrics) of the last dispatched step, fetched one step late
    last_time = time.perf_counter()

    def finish(entry) -> None:
      """Fetches a step's metrics (blocks until it ran), stops on a non-finite loss, logs."""
      nonlocal last_time
      done, device_metrics = entry
      m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      now = time.perf_counter()
      step_time, last_time = now - last_time, now
      bad = [f"{name} is {m[key]}" for key, name in (("loss", "loss"), ("grad_norm", "gradient norm"))
             if not math.isfinite(m[key])]
      if bad:
        # A non-finite gradient norm poisons the update even when the loss itself was still finite.
        self.manager.wait_until_finished()
        raise NonFiniteLossError(
            f"{' and '.join(bad)} at step {done}; stopped without saving. The last good checkpoint is step "
            f"{self.manager.latest_step()} in {self.manager.directory}; lower train.lr or raise "
            f"train.warmup_frac and rerun.")
      eval_due = cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0
      if eval_due:
        m.update(self.evaluate(params, eval_fn))
        last_time = time.perf_counter()  # keep eval time out of the next step's time
      if done % cfg.train.log_every == 0 or done == steps or eval_due:
        flops = self.flops_per_step / step_time
        self.writer.write(done, {
            "loss": m["loss"], "perplexity": math.exp(min(m["loss"], 50.0)), "lr": float(self.schedule(done - 1)),
            "grad_norm": m["grad_norm"], "param_norm": m["param_norm"], "step_time": step_time,
            "tokens_per_s": tokens_per_step / step_time, "mfu": flops / self.peak_flops,
            **{k: v for k, v in m.items() if k.startswith("eval_")}})

    with _Preemption() as preemption:
      for step in range(start, steps):
        local = next(batches)
        params, opt_state, step_metrics = train_fn(params, opt_state, sharding.global_batch(local, self.mesh))
        if pending is not None:
          finish(pending)
        pending = (step + 1, step_metrics)
        done = step + 1
        preempted = preemption.requested or (jax.process_count() > 1 and self.manager.reached_preemption(done))
        eval_due = cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0
        if done % cfg.checkpoint.every_steps == 0 or done == steps or preempted or eval_due:
          finish(pending)  # a checkpoint is only written after its loss was seen to be finite
          pending = None
          if done % cfg.checkpoint.every_steps == 0 or done == steps or preempted:
            self.save(done, params, opt_state)
        if preempted:
          self.manager.wait_until_finished()
          self.writer.message(f"preempted (SIGTERM): saved checkpoint step {done}; rerun the same command "
                              f"to resume.")
          break
    self._close()

  def _close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    self.writer.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains `config` in `workdir`, resuming from its newest readable checkpoint (see docs/training.md)."""
  sharding.maybe_initialize_distributed()
  Trainer(config, workdir).run()

