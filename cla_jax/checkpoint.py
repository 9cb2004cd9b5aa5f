"""Orbax checkpoints: save, restore onto any mesh, fall back past unreadable ones, set steps aside.

Beneath cla_jax.workdir, which names the directory (DIR/checkpoints) and everything else in a workdir.
Each step of a CheckpointManager holds three items:
  params     unboxed fp32 param tree
  opt_state  optax state (absent in params-only checkpoints)
  meta       JSON: {"step": int, "params_only": bool, "fingerprints": ...}

Every array's fingerprint (a position-weighted uint32 sum of its bits, computed by a jitted reduction
where the array lives) is stored in meta and checked on restore: a flipped byte makes the checkpoint
unreadable (fallback + quarantine) instead of silently changing weights.

Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it (or writes a commit marker
on object stores) only when complete, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from cla_jax.errors import UserError


class CheckpointError(UserError):
  """A workdir or checkpoint that cannot be used; the message says which and what to do."""


class DiskFullError(CheckpointError):
  """Not enough free space for the next checkpoint; the earlier ones are intact."""


def _tree_bytes(*trees: Any) -> int:
  return sum(int(x.size) * x.dtype.itemsize for t in trees if t is not None for x in jax.tree.leaves(t))


def _free_bytes(directory: epath.Path) -> int | None:
  """Free bytes on the file system of a local directory (None for object stores)."""
  if "://" in os.fspath(directory):
    return None
  return shutil.disk_usage(os.fspath(directory)).free


def _disk_full(manager: ocp.CheckpointManager, step: int | None, needed: int | None) -> DiskFullError:
  """The one-line error; `step=None`: an earlier (async) save ran out of space while it was being written."""
  free = f"{(_free_bytes(epath.Path(manager.directory)) or 0) / 2**20:.1f} MiB free"
  intact = sorted(s for s in manager.all_steps() if step is None or s < step)[-3:] or "none"
  if step is None:
    what = f"a checkpoint save to {manager.directory} ran out of space ({free} now)"
  else:
    what = f"{manager.directory} has {free} but checkpoint step {step} needs about {needed / 2**20:.1f} MiB"
  return DiskFullError(
      f"disk full: {what}; checkpoints {intact} are intact. Free space (or lower checkpoint.keep) and rerun the "
      f"same command to resume."
  )


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight; DiskFullError (one line, naming the intact steps) if it ran out of space."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    if is_disk_full(e):
      raise _disk_full(manager, None, None) from None
    raise


def is_disk_full(error: BaseException) -> bool:
  """True for ENOSPC, however orbax / tensorstore wrapped it."""
  return getattr(error, "errno", None) == 28 or "No space left on device" in str(error)


@dataclasses.dataclass
class Restored:
  """What `restore` found: the step, its params, the optimizer state (None if params-only) and meta."""

  step: int
  params: Any
  opt_state: Any | None
  meta: dict


@dataclasses.dataclass
class KeepNewestAndVerified:
  """orbax preservation policy: the newest `keep` steps (None: all), plus `verified` whatever `keep` says.

  `verified` (set by the trainer as checkpoints pass the health check) is the one known-good state; a run
  whose loss diverges after it must still find it, however many bad checkpoints were saved since.
  """

  keep: int | None = None
  verified: int | None = None

  def should_preserve(self, checkpoints, *, context) -> list[bool]:  # pylint: disable=unused-argument
    newest = sorted((c.step for c in checkpoints), reverse=True)[: self.keep] if self.keep else None
    return [newest is None or c.step in newest or c.step == self.verified for c in checkpoints]


class _OrbaxErrorFilter(logging.Filter):
  """Drops orbax's ERROR log records (each with a library traceback) about a failed save or restore.

  Every such failure also reaches our code as an exception, which becomes one `error:` line (disk full)
  or one `warning:` line (an unreadable checkpoint falling back to an older one); the log copy would
  bury that line under tracebacks. orbax's other warnings and info records pass.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    orbax = f"{os.sep}orbax{os.sep}"
    if orbax in record.pathname and str(record.msg).startswith("Given directory is read only"):
      return False  # what every read-only restore (eval, generate, export) asked for: not worth a line
    if record.levelno < logging.ERROR:
      return True
    # absl records come from orbax's own files; asyncio's 'Task exception was never retrieved' names the task,
    # and its '_GatheringFuture exception was never retrieved' (orbax's gathered writes) carries their traceback.
    if orbax in record.pathname or orbax in str(record.msg):
      return False
    error = record.exc_info[1] if record.exc_info else None
    if error is None:
      return True
    # A bare 'Future exception was never retrieved' holds only tensorstore's error, which names the file it
    # was writing inside orbax's temporary directory.
    in_orbax_tmp = record.name == "asyncio" and ".orbax-checkpoint-tmp" in str(error)
    return not in_orbax_tmp and not any(orbax in f.filename for f in traceback.extract_tb(error.__traceback__))


def _is_closed_loop_callback(error: BaseException | None) -> bool:
  """True for tensorstore's late completion callback of a write that orbax abandoned (its loop is closed)."""
  frames = traceback.extract_tb(error.__traceback__)
  return (
      isinstance(error, RuntimeError)
      and str(error) == "Event loop is closed"
      and bool(frames)
      and frames[0].name == "call_soon_threadsafe"
  )


def _is_abandoned_orbax_work(error: BaseException | None, obj: Any = None) -> bool:
  """True for the noise of orbax work abandoned after a failed save or restore (reported by us instead)."""
  code = getattr(obj, "cr_code", None)
  return _is_closed_loop_callback(error) or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)


def _quiet_hooks() -> None:
  """sys.excepthook / sys.unraisablehook that drop `_is_abandoned_orbax_work` and pass everything else on."""
  if getattr(sys.unraisablehook, "cla_jax_quiet", False):
    return
  previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(kind, error, tb):
    if not _is_abandoned_orbax_work(error):
      previous_except(kind, error, tb)

  def unraisablehook(unraisable):
    if not _is_abandoned_orbax_work(unraisable.exc_value, unraisable.object):
      previous_unraisable(unraisable)

  unraisablehook.cla_jax_quiet = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _quiet_orbax_errors() -> None:
  for name in ("absl", "asyncio"):  # orbax logs through absl; its abandoned write tasks through asyncio
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxErrorFilter) for f in logger.filters):
      logger.addFilter(_OrbaxErrorFilter())
  # When a save or restore fails half way, orbax closes its event loop while tensorstore still completes
  # the other reads/writes: each completion, and each abandoned coroutine, prints a traceback through these
  # hooks (dozens, hundreds of lines). Only those are dropped.
  _quiet_hooks()


def make_manager(
    directory: str | os.PathLike,
    keep: int | None = None,
    async_save: bool = True,
    read_only: bool = False,
    policy: KeepNewestAndVerified | None = None,
) -> ocp.CheckpointManager:
  """An orbax CheckpointManager on `directory` (absolute or a bucket URL) keeping the newest `keep` steps
  (None: all) or per `policy`; cla_jax.workdir.checkpoint_manager opens the one of a workdir."""
  _quiet_orbax_errors()
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy or KeepNewestAndVerified(keep),
      save_interval_steps=0 if read_only else 1,  # orbax warns when a read-only manager is asked to save
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
  )
  handlers = {
      "params": ocp.StandardCheckpointHandler(),
      "opt_state": ocp.StandardCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=handlers)


def _array_fingerprint(x: jax.Array) -> jax.Array:
  """uint32 sum of the array's bits times odd position weights (wrapping): any single changed element shows."""
  x = jnp.asarray(x)
  width = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}.get(x.dtype.itemsize)
  if width is None:
    raise TypeError(f"no fingerprint for dtype {x.dtype}")
  bits = (x.astype(jnp.uint8) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, width)).astype(jnp.uint32)
  position = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
  for axis in range(1, x.ndim):  # row-major flat index, without materialising a reshape of a sharded array
    position = position * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
  weights = (position * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(2654435761)  # odd: a bijection mod 2^32
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_tree_fingerprints = jax.jit(lambda tree: jax.tree.map(_array_fingerprint, tree))


def fingerprints(tree: Any) -> dict[str, int]:
  """{param path: fingerprint} of a tree of arrays, reduced on the devices that hold them (one small fetch)."""
  values = jax.device_get(_tree_fingerprints(tree))
  return {jax.tree_util.keystr(k): int(v) for k, v in jax.tree_util.tree_leaves_with_path(values)}


class FingerprintMismatch(OSError):
  """Restored bytes differ from those saved: treated like any unreadable checkpoint."""


def _verify(name: str, tree: Any, stored: dict[str, int] | None) -> None:
  if not stored:
    return  # saved before fingerprints existed
  got = fingerprints(tree)
  bad = sorted(k for k in stored if got.get(k) != stored[k])
  if bad or set(got) != set(stored):
    raise FingerprintMismatch(
        f"{name} fingerprint mismatch in {len(bad)} array(s), first {bad[:1]} (bit rot or " f"an overwritten file)"
    )


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any | None, meta: dict) -> None:
  """Starts an (async, if so configured) save of `step`; `opt_state=None` writes a params-only checkpoint.

  Refuses with DiskFullError (before writing anything) when the file system cannot hold the checkpoint:
  a save that runs out of space half way leaves only a temporary directory, but buries the cause.
  """
  needed = int(_tree_bytes(params, opt_state) * 1.05) + 2**16
  # orbax's save waits for the one in flight first; waiting here names that save if it is the one that failed.
  wait(manager)
  free = _free_bytes(epath.Path(manager.directory))
  if free is not None and free < needed:
    raise _disk_full(manager, step, needed)
  prints = {"params": fingerprints(params)}
  if opt_state is not None:
    prints["opt_state"] = fingerprints(opt_state)
  items = {
      "params": ocp.args.StandardSave(params),
      "meta": ocp.args.JsonSave({**meta, "step": int(step), "params_only": opt_state is None, "fingerprints": prints}),
  }
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  try:
    manager.save(int(step), args=ocp.args.Composite(**items), force=True)
  except Exception as e:  # pylint: disable=broad-except
    if is_disk_full(e):  # another writer filled the disk after the check above
      raise _disk_full(manager, step, needed) from None
    raise


def shape_differences(got: Any, expected: Any) -> list[str]:
  """'path: shape -> expected shape' for every param whose path or shape differs between two trees (sorted)."""

  def shapes(tree):
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

  a, b = shapes(got), shapes(expected)
  return [f"{path}: {a.get(path)} -> {b.get(path)}" for path in sorted(set(a) | set(b)) if a.get(path) != b.get(path)]


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> None:
  """Raises CheckpointError when the stored param tree does not match the config's (not a corruption)."""
  stored = manager.item_metadata(step)["params"]
  if stored is None:
    raise OSError(f"checkpoint {step} has no readable params metadata")
  diff = shape_differences(stored, abstract_params)
  if diff:
    raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} does not match the model config (first differences, "
        f"stored -> config: {'; '.join(diff[:3])}); use the config the checkpoint was trained with or a new workdir."
    )


def _restore_step(
    manager: ocp.CheckpointManager, step: int, abstract_params: Any, abstract_opt_state: Any | None
) -> Restored:
  _check_shapes(manager, step, abstract_params)
  items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
  has_opt = (epath.Path(manager.directory) / str(step) / "opt_state").exists()
  if abstract_opt_state is not None and has_opt:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  out = manager.restore(step, args=ocp.args.Composite(**items))
  meta = dict(out["meta"] or {})
  opt_state = out.get("opt_state") if "opt_state" in items else None
  stored = meta.get("fingerprints") or {}
  _verify("params", out["params"], stored.get("params"))
  if opt_state is not None:
    _verify("opt_state", opt_state, stored.get("opt_state"))
  return Restored(step=step, params=out["params"], opt_state=opt_state, meta=meta)


def restore(
    manager: ocp.CheckpointManager,
    abstract_params: Any,
    abstract_opt_state: Any | None = None,
    step: int | None = None,
    quarantine: str | None = None,
) -> Restored | None:
  """Restores `step` (default: the newest readable one) onto the shardings carried by the abstract trees.

  With `step=None`, an unreadable checkpoint is reported and the next older one is tried; with
  `quarantine` (a folder beside the manager's directory; a resuming trainer, process 0 acts) the unreadable
  one is moved there so that new saves can reuse its step number. Nothing is ever deleted.
  Returns None when the directory has no checkpoint at all.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {manager.directory}; available steps: " f"{sorted(steps) or 'none'}."
      )
    try:
      return _restore_step(manager, step, abstract_params, abstract_opt_state)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint step {step} in {manager.directory} is unreadable "
          f"({type(e).__name__}: {_first_line(e)}); pick another step."
      ) from e
  failures = []
  for candidate in steps:
    try:
      restored = _restore_step(manager, candidate, abstract_params, abstract_opt_state)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      message = (
          f"checkpoint step {candidate} in {manager.directory} is unreadable "
          f"({type(e).__name__}: {_first_line(e)}); trying the previous one"
          f"{f' (this one goes to {quarantine}/)' if quarantine else ''}."
      )
      print(f"warning: {message}", file=sys.stderr, flush=True)  # one line per unreadable step
      failures.append(candidate)
      continue
    if failures and quarantine:
      set_aside(manager, failures, quarantine, "")  # each was warned about above
    return restored
  if failures:
    raise CheckpointError(
        f"no readable checkpoint in {manager.directory} (tried steps {failures}); "
        f"start a new workdir or restore the files."
    )
  return None


def _first_line(e: BaseException) -> str:
  # tensorstore appends a bound-method repr and a multi-line spec after this phrase: not for a one-line warning.
  text = str(e).split(". See full TensorStore details")[0].strip().splitlines()
  return text[0][:200] if text else ""


def set_aside(manager: ocp.CheckpointManager, steps: list[int], folder: str, why: str) -> str:
  """Moves step directories to <folder>/<step>-<time> beside the manager's directory (process 0 acts; never
  deletes); returns the folder."""
  root = epath.Path(manager.directory)
  target_root = root.parent / folder
  if jax.process_index() == 0 and steps:
    target_root.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = target_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      shutil.move(os.fspath(root / str(step)), os.fspath(target))
      if why:
        print(f"warning: moved {why} checkpoint {step} to {target}", file=sys.stderr, flush=True)
  sync = getattr(ocp.multihost, "sync_global_processes", None)
  if sync is not None and jax.process_count() > 1:
    sync(f"cla_jax_set_aside_{folder}")
  manager.reload()
  return os.fspath(target_root)
