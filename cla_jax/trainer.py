"""The training loop: `run(config, workdir)` trains, checkpoints, resumes and survives preemption.

One program for one CPU, one GPU or a multi-host pod: every host runs this same loop on its slice
of the global batch; jit + the mesh do the rest. Only process 0 writes logs and metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from cla_jax import checkpoint, config_lib, distill, health, optim, paths, sharding, workdir_lock
from cla_jax import metrics as metrics_lib
from cla_jax import model as model_lib
from cla_jax import train_step as train_step_lib
from cla_jax import workdir as workdir_lib
from cla_jax.data import batches as batches_lib
from cla_jax.data import prepare
from cla_jax.data import tokenizer as tokenizer_lib
from cla_jax.errors import UserError
from cla_jax.model import Transformer


class TrainConfigError(UserError):
  """Train / batch / accumulation settings that cannot work."""


NonFiniteLossError = health.DivergenceError  # the name tests and callers used before spikes were detected


def check_train_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises TrainConfigError, naming the field and a fix, for steps/batch/accumulation that cannot work."""
  config_lib.check_values(config)
  t = config.train
  if t.batch_size % t.grad_accum_steps:
    raise TrainConfigError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps="
        f"{t.grad_accum_steps}; pick an accumulation count that divides the batch."
    )
  micro, ways = t.batch_size // t.grad_accum_steps, sharding.batch_parallelism(mesh)
  if micro % ways:
    raise TrainConfigError(
        f"micro-batch train.batch_size/train.grad_accum_steps = {micro} sequences cannot be split over "
        f"mesh data*fsdp = {ways} devices; make it a multiple of {ways}."
    )
  if t.batch_size % jax.process_count():
    raise TrainConfigError(
        f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} "
        f"processes; each host feeds an equal slice."
    )
  if t.eval_every > 0 and config.eval.batch_size % ways:
    raise TrainConfigError(
        f"eval.batch_size={config.eval.batch_size} cannot be split over mesh data*fsdp = "
        f"{ways} devices; make it a multiple of {ways} or set train.eval_every=0."
    )


def data_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of everything that decides which tokens batch(step) holds (to warn when a resume changes it)."""
  relevant = {"data": config.data.to_dict(), "batch_size": config.train.batch_size, "seq_len": config.train.seq_len}
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


# Model fields a resume may change: how the same weights are computed, never their shapes or values.
RESUME_FREE_FIELDS = ("remat", "dtype", "attention_impl")


def _model_from_workdir(workdir: str, config: ml_collections.ConfigDict, explicit: Collection[str] | None) -> list[str]:
  """Continuing a workdir: its config.json decides the model, except `explicit` (command-line) fields.

  `explicit=None` treats every model field of `config` as asked for. A field that would change the
  weights is refused; remat/dtype/attention_impl may change. Updates `config.model` in place and returns
  the fields taken from the workdir that differ from `config`.
  """
  if not workdir_lib.has_config(workdir):
    return []
  saved = workdir_lib.read_config(workdir).model.to_dict()
  asked = config.model.to_dict()
  explicit = set(asked) if explicit is None else set(explicit)
  merged = {k: asked[k] if k in explicit else saved[k] for k in asked}  # read_config gave saved every field
  changed = sorted(k for k in merged if k not in RESUME_FREE_FIELDS and merged[k] != saved[k])
  if changed:
    raise TrainConfigError(
        f"workdir {workdir} holds a run with a different model config (fields {changed}); "
        f"use a new --workdir, or drop those --config.model overrides to continue it."
    )
  config.model.update(merged)
  return sorted(k for k in asked if merged[k] != asked[k])


def _prepare_workdir(workdir: str) -> None:
  """Creates the workdir (process 0), or one line saying why it cannot be used."""
  if jax.process_index() != 0 or "://" in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise TrainConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory path.")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise TrainConfigError(f"cannot write to --workdir={workdir} ({e.strerror}); pass a writable directory.") from None


def _first_process_then_others(make: Any) -> Any:
  """`make()` on process 0, then on the others: a tokenizer it trains and caches is then theirs to load."""
  if jax.process_count() == 1:
    return make()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  result = make() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("cla_jax_tokenizer")
  return make() if result is None else result


class Trainer:
  """State and loop of one training run (see `run`)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, explicit_model_fields=None):
    """Validates everything first, then takes the workdir lock, then writes; see `run` for the arguments."""
    self.workdir = workdir if paths.is_remote(workdir) else os.path.abspath(os.path.expanduser(workdir))
    self.config = config = ml_collections.ConfigDict(config.to_dict())
    config_lib.check_values(config)
    distill.check_config(config)
    from_workdir = _model_from_workdir(self.workdir, config, explicit_model_fields)
    self.mesh = sharding.make_mesh(config.mesh)
    check_train_config(config, self.mesh)
    self.tokenizer = _first_process_then_others(lambda: tokenizer_lib.get_tokenizer(config))
    config.model.vocab_size = tokenizer_lib.fitted_vocab_size(
        self.tokenizer, config.model.vocab_size, config.data.pad_vocab
    )
    self.model_config = config_lib.model_config(config)
    sharding.check_model_fits(self.model_config, self.mesh)
    # Loaded (and checked against the student) before the workdir is touched; None without train.teacher.
    self.teacher = distill.load_teacher(config, self.mesh, self.model_config, self.tokenizer)
    # The data is opened (and checked against train.seq_len) before the workdir is touched, so a config
    # the data cannot serve leaves no workdir behind.
    self.train_batches = batches_lib.TrainBatches(
        prepare.open_split(config, self.tokenizer, "train", config.train.seq_len),
        config.train.batch_size,
        config.data,
        self.tokenizer.eos_id,
    )
    _prepare_workdir(self.workdir)
    self.lock = workdir_lock.WorkdirLock(self.workdir).acquire()  # before anything in the workdir changes
    try:
      self._set_up(from_workdir)
    except BaseException:
      self.lock.release()
      raise

  def _set_up(self, from_workdir: list[str]) -> None:
    """Writes the workdir's config and tokenizer; builds model, optimizer, writer and checkpoint manager."""
    config = self.config
    workdir_lib.write_config(self.workdir, config)
    if jax.process_index() == 0:
      # A copy in the workdir keeps eval.py independent of the tokenizer cache (workdir.load_tokenizer).
      self.tokenizer.save(self.workdir)
    self._scorer = None  # built at the first validation

    self.model = Transformer(self.model_config)
    self.tx = optim.make_optimizer(config.train)
    # Jitted once: evaluating the optax schedule eagerly would compile a few small ops per new shape.
    self.schedule = jax.jit(optim.learning_rate_schedule(config.train))
    boxed_params = model_lib.abstract_params(self.model_config)
    self.param_shardings, self.opt_shardings = train_step_lib.state_shardings(boxed_params, self.tx, self.mesh)
    unboxed = nn.meta.unbox(boxed_params)
    self.abstract_params = sharding.shardings_like(unboxed, self.param_shardings)
    self.abstract_opt_state = sharding.shardings_like(jax.eval_shape(self.tx.init, unboxed), self.opt_shardings)

    self.writer = metrics_lib.MetricWriter(self.workdir, config.train.steps)
    self.health = health.HealthCheck(config.train, self.model_config.vocab_size)
    self.policy = checkpoint.KeepNewestAndVerified(keep=config.checkpoint.keep)
    self._verified_on_disk = workdir_lib.read_verified_step(self.workdir)
    self.manager = workdir_lib.checkpoint_manager(
        self.workdir, async_save=config.checkpoint.async_save, policy=self.policy
    )
    if from_workdir:
      self.writer.message(f"continuing {self.workdir}: model fields {from_workdir} come from its config.json")
    self.flops_per_step = metrics_lib.flops_per_token(self.model_config, config.train.seq_len) * (
        config.train.batch_size * config.train.seq_len
    )
    self.peak_flops, self.peak_source = metrics_lib.total_peak_flops(
        list(self.mesh.devices.flat), float(config.train.peak_flops_per_device)
    )

  # -- state -------------------------------------------------------------------------------------

  def _fresh_opt_state(self, params: Any) -> Any:
    with jax.set_mesh(self.mesh):
      return jax.jit(self.tx.init, in_shardings=(self.param_shardings,), out_shardings=self.opt_shardings)(params)

  def restore_or_init(self) -> tuple[int, Any, Any]:
    """(start step, params, opt_state) from the newest readable checkpoint, or freshly initialised."""
    restored = checkpoint.restore(
        self.manager, self.abstract_params, self.abstract_opt_state, quarantine=workdir_lib.CORRUPT_DIR
    )
    verified = workdir_lib.read_verified_step(self.workdir)
    if (
        restored is not None
        and verified is not None
        and verified <= restored.step
        and verified in self.manager.all_steps()
    ):
      self.policy.verified = verified
    if restored is None:
      params, opt_state = train_step_lib.init_state(
          self.model,
          self.tx,
          self.mesh,
          self.param_shardings,
          self.opt_shardings,
          jax.random.key(self.config.train.seed),
      )
      self.writer.message(
          f"initialised {self.model_config.num_layers}-layer model from seed " f"{self.config.train.seed}"
      )
      return 0, params, opt_state
    if restored.opt_state is None:
      # Params-only checkpoint (e.g. converted from Hugging Face): continued training from those weights
      # with a fresh optimizer and schedule, starting at step 0 of this run.
      self.writer.message(f"loaded params-only checkpoint step {restored.step}; fresh optimizer from step 0")
      return 0, restored.params, self._fresh_opt_state(restored.params)
    if restored.meta.get("data_fingerprint") not in (None, data_fingerprint(self.config)):
      self.writer.message(
          "warning: the data / batch config differs from the checkpoint's; resumed batches "
          "will not continue the original data order."
      )
    self.writer.message(f"resumed from checkpoint step {restored.step} in {self.manager.directory}")
    return restored.step, restored.params, restored.opt_state

  def save(self, step: int, params: Any, opt_state: Any) -> None:
    """Starts an async save of `step` (the caller has checked its loss is finite)."""
    if step in self.manager.all_steps():
      return  # e.g. a params-only checkpoint at this step: never overwrite an existing one
    meta = {
        "data_seed": int(self.config.data.seed),
        "data_fingerprint": data_fingerprint(self.config),
        "config_name": str(self.config.name),
        "time": time.time(),
    }
    checkpoint.save(self.manager, step, params, opt_state, meta)

  # -- loop --------------------------------------------------------------------------------------

  def evaluate(self, params: Any) -> dict[str, float]:
    """Validation loss over `train.eval_batches` batches of the eval split (evaluate.Scorer, as eval.py does)."""
    from cla_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

    config = self.config
    if self._scorer is None:
      self._scorer = evaluate_lib.Scorer(params, config, self.mesh)
    batches = batches_lib.eval_batches(
        prepare.open_split(config, self.tokenizer, "validation", config.train.seq_len, check_seq_len=False),
        config.eval.batch_size,
        config.train.seq_len,
        config.train.eval_batches * config.eval.batch_size * config.train.seq_len,
        eos_id=self.tokenizer.eos_id,
        packing=config.data.packing,
    )
    loss_sum, tokens = self._scorer.score(batches, params)
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": metrics_lib.perplexity(loss), "eval_tokens": tokens}

  def run(self) -> None:
    """Trains from the latest checkpoint (or scratch) to train.steps; see module docstring."""
    config = self.config
    steps = config.train.steps
    start, params, opt_state = self.restore_or_init()
    if start >= steps:
      self.writer.message(f"nothing to do: checkpoint step {start} >= train.steps={steps}")
      self._close()
      return
    self.writer.message(
        f"mesh {sharding.describe(self.mesh)}; {self.flops_per_step / 1e9:.2f} GFLOP/step; "
        f"peak {metrics_lib.format_peak(self.peak_flops)} ({self.peak_source})"
    )
    train_fn = train_step_lib.jit_train_step(
        self.model,
        self.tx,
        config.train.grad_accum_steps,
        self.mesh,
        self.param_shardings,
        self.opt_shardings,
        teacher=self.teacher,
    )
    batches: Iterator[dict] = self.train_batches.iterator(start)
    tokens_per_step = config.train.batch_size * config.train.seq_len
    pending = None  # (step, device metrics) of the last dispatched step, fetched one step late
    saved_steps = {start} & set(self.manager.all_steps())  # checkpoints the next step's health check vouches for
    last_time = time.perf_counter()

    def finish(entry) -> None:
      """Fetches a step's metrics (blocks until it ran), stops on a non-finite loss, logs."""
      nonlocal last_time
      self._record_verified()  # a verification that waited for its checkpoint's save to commit
      done, device_metrics = entry
      m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      now = time.perf_counter()
      step_time, last_time = now - last_time, now
      problem = self.health.problem(m["loss"], m["grad_norm"])
      if problem:
        self._stop_diverged(problem, done, start)
      if done - 1 in saved_steps:  # step done's loss came from checkpoint done-1's params: it is good
        self._mark_verified(done - 1)
      eval_due = config.train.eval_every > 0 and done % config.train.eval_every == 0
      if eval_due:
        m.update(self.evaluate(params))
        last_time = time.perf_counter()  # keep eval time out of the next step's time
      if done % config.train.log_every == 0 or done == steps or eval_due:
        flops = self.flops_per_step / step_time
        self.writer.write(
            done,
            {
                "loss": m["loss"],
                "perplexity": metrics_lib.perplexity(m["loss"]),
                "lr": float(self.schedule(done - 1)),
                "grad_norm": m["grad_norm"],
                "param_norm": m["param_norm"],
                "step_time": step_time,
                "tokens_per_s": tokens_per_step / step_time,
                "mfu": flops / self.peak_flops,
                **{k: v for k, v in m.items() if k.startswith(("eval_", "distill_"))},
            },
        )

    with _Preemption() as preemption:
      for step in range(start, steps):
        local = next(batches)
        params, opt_state, step_metrics = train_fn(params, opt_state, sharding.global_batch(local, self.mesh))
        if pending is not None:
          finish(pending)
        pending = (step + 1, step_metrics)
        done = step + 1
        preempted = preemption.requested or (jax.process_count() > 1 and self.manager.reached_preemption(done))
        eval_due = config.train.eval_every > 0 and done % config.train.eval_every == 0
        if done % config.checkpoint.every_steps == 0 or done == steps or preempted or eval_due:
          finish(pending)  # a checkpoint is only written after its loss was seen to be finite
          pending = None
          if done % config.checkpoint.every_steps == 0 or done == steps or preempted:
            self.save(done, params, opt_state)
            saved_steps.add(done)
        if preempted:
          checkpoint.wait(self.manager)
          self.writer.message(
              f"preempted (SIGTERM): saved checkpoint step {done}; rerun the same command " f"to resume."
          )
          break
    self._close()

  def _mark_verified(self, step: int) -> None:
    """Protects checkpoint `step` from rotation (its next step passed the health check) and records it."""
    self.policy.verified = step
    self._record_verified()

  def _record_verified(self) -> None:
    """Writes verified_step.json for the verified step once no save is in flight.

    An async save lives in an orbax temporary directory until it commits: naming its step before then
    would leave, after a kill -9, a file pointing at a checkpoint that never existed.
    """
    step = self.policy.verified
    if step is None or step == self._verified_on_disk or self.manager.is_saving_in_progress():
      return
    if step in self.manager.all_steps():
      workdir_lib.write_verified_step(self.workdir, step)
      self._verified_on_disk = step

  def _stop_diverged(self, problem: str, step: int, start: int) -> None:
    """Moves the checkpoints saved since the last verified one aside and raises DivergenceError."""
    checkpoint.wait(self.manager)
    good = self.policy.verified
    suspect = [s for s in self.manager.all_steps() if s > max(start, -1 if good is None else good)]
    moved = checkpoint.set_aside(self.manager, suspect, workdir_lib.DIVERGED_DIR, "unverified") if suspect else ""
    aside = f"; checkpoints {sorted(suspect)} saved since were moved to {moved}" if suspect else ""
    if good is not None:
      where = f"The newest checkpoint that passed the health check is step {good} in {self.manager.directory}{aside}"
    elif step == start + 1 and start > 0:
      where = f"The checkpoint this run resumed from (step {start}) already gives this{aside}"
    else:
      where = f"No checkpoint has passed the health check yet{aside}; check model.init_std and train.lr"
    raise health.DivergenceError(
        f"{problem} at step {step}; stopped without saving. {where}. Lower train.lr or "
        f"raise train.warmup_frac and rerun to resume from there."
    )

  def _close(self) -> None:
    checkpoint.wait(self.manager)
    self._record_verified()
    self.manager.close()


def run(config: ml_collections.ConfigDict, workdir: str, explicit_model_fields: Collection[str] | None = None) -> None:
  """Trains `config` in `workdir`, resuming from its newest readable checkpoint (see docs/training.md).

  On a workdir that already has a config.json, its model section is used except for the model fields
  named in `explicit_model_fields` (train.py passes the --config.model.* overrides; None: all of them).
  """
  sharding.maybe_initialize_distributed()
  trainer = Trainer(config, workdir, explicit_model_fields)
  try:
    trainer.run()
  finally:
    trainer.writer.close()  # here, not in _close: on an error too, its buffered events must not follow the error line
    trainer.lock.release()
