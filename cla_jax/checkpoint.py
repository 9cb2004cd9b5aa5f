"""Orbax checkpoints of a workdir: save, restore onto any mesh, fall back past unreadable ones.

Workdir layout (shared by train.py, eval.py and the HF converter):
  DIR/config.json              the resolved config (config_lib.to_json)
  DIR/checkpoints/<step>/      one orbax CheckpointManager step with items
                                 params     unboxed fp32 param tree
                                 opt_state  optax state (absent in params-only checkpoints)
                                 meta       JSON: {"step": int, "params_only": bool, ...}
  DIR/checkpoints_corrupt/     unreadable checkpoints moved aside by a resuming run (never deleted)

Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it (or writes a commit marker
on object stores) only when complete, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from cla_jax import config_lib, model as model_lib, paths, sharding
from cla_jax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointError(UserError):
  """A workdir or checkpoint that cannot be used; the message says which and what to do."""


@dataclasses.dataclass
class Restored:
  """What `restore` found: the step, its params, the optimizer state (None if params-only) and meta."""

  step: int
  params: Any
  opt_state: Any | None
  meta: dict


def _path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an absolute path (orbax refuses relative ones); bucket URLs (gs://...) as given."""
  path = os.fspath(workdir)
  return epath.Path(path if paths.is_remote(path) else os.path.abspath(os.path.expanduser(path)))


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes DIR/config.json (process 0 only), creating the workdir."""
  if jax.process_index() != 0:
    return
  path = _path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  tmp = path / (CONFIG_FILE + ".tmp")
  tmp.write_text(config_lib.to_json(config))
  tmp.replace(path / CONFIG_FILE)  # atomic replace: a reader never sees half a config


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a workdir was trained with, or CheckpointError."""
  path = _path(workdir)
  if not path.exists():
    raise CheckpointError(f"workdir {os.fspath(workdir)!r} does not exist; pass the --workdir of a training run.")
  if not (path / CONFIG_FILE).exists():
    raise CheckpointError(f"{os.fspath(workdir)!r} has no {CONFIG_FILE}; it is not a cla_jax workdir "
                          f"(train.py or the HF converter writes one).")
  return config_lib.from_json((path / CONFIG_FILE).read_text())


def make_manager(workdir: str | os.PathLike, keep: int | None = None, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager on DIR/checkpoints keeping the newest `keep` steps (None: all)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=1, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
  handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(_path(workdir) / CHECKPOINT_DIR, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any | None, meta: dict) -> None:
  """Starts an (async, if so configured) save of `step`; `opt_state=None` writes a params-only checkpoint."""
  items = {"params": ocp.args.StandardSave(params),
           "meta": ocp.args.JsonSave({**meta, "step": int(step), "params_only": opt_state is None})}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  manager.save(int(step), args=ocp.args.Composite(**items), force=True)


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> None:
  """Raises CheckpointError when the stored param tree does not match the config's (not a corruption)."""
  stored = manager.item_metadata(step)["params"]
  if stored is None:
    raise OSError(f"checkpoint {step} has no readable params metadata")
  stored_shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)}
  wanted = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
  if stored_shapes != wanted:
    diff = sorted(set(stored_shapes.items()) ^ set(wanted.items()))[:3]
    raise CheckpointError(
        f"checkpoint step {step} in {manager.directory} does not match the model config (first differences "
        f"(param, shape): {diff}); use the config the checkpoint was trained with or a new workdir.")


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
                  abstract_opt_state: Any | None) -> Restored:
  _check_shapes(manager, step, abstract_params)
  items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
  has_opt = (epath.Path(manager.directory) / str(step) / "opt_state").exists()
  if abstract_opt_state is not None and has_opt:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  out = manager.restore(step, args=ocp.args.Composite(**items))
  meta = dict(out["meta"] or {})
  return Restored(step=step, params=out["params"], opt_state=out.get("opt_state") if has_opt else None, meta=meta)


def restore(manager: ocp.CheckpointManager, abstract_params: Any, abstract_opt_state: Any | None = None,
            step: int | None = None, quarantine: bool = False) -> Restored | None:
  """Restores `step` (default: the newest readable one) onto the shardings carried by the abstract trees.

  With `step=None`, an unreadable checkpoint is reported and the next older one is tried; with
  `quarantine=True` (a resuming trainer, process 0 acts) the unreadable one is moved to
  DIR/checkpoints_corrupt/ so that new saves can reuse its step number. Nothing is ever deleted.
  Returns None when the workdir has no checkpoint at all.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {manager.directory}; available steps: "
                            f"{sorted(steps) or 'none'}.")
    try:
      return _restore_step(manager, step, abstract_params, abstract_opt_state)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"checkpoint step {step} in {manager.directory} is unreadable "
                            f"({type(e).__name__}: {_first_line(e)}); pick another step.") from e
  failures = []
  for candidate in steps:
    try:
      restored = _restore_step(manager, candidate, abstract_params, abstract_opt_state)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      message = (f"checkpoint step {candidate} in {manager.directory} is unreadable "
                 f"({type(e).__name__}: {_first_line(e)}); trying the previous one.")
      logging.warning(message)
      print(f"warning: {message}", flush=True)
      failures.append(candidate)
      continue
    if failures and quarantine:
      _quarantine(manager, failures)
    return restored
  if failures:
    raise CheckpointError(f"no readable checkpoint in {manager.directory} (tried steps {failures}); "
                          f"start a new workdir or restore the files.")
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:200] if text else ""


def _quarantine(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves unreadable step directories aside (kept for inspection) so their step numbers can be reused."""
  if jax.process_index() == 0:
    root = epath.Path(manager.directory)
    corrupt = root.parent / CORRUPT_DIR
    corrupt.mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = corrupt / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      shutil.move(os.fspath(root / str(step)), os.fspath(target))
      print(f"warning: moved unreadable checkpoint {step} to {target}", flush=True)
  sync = getattr(ocp.multihost, "sync_global_processes", None)
  if sync is not None and jax.process_count() > 1:
    sync("cla_jax_quarantine")
  manager.reload()


def _replicated_mesh():
  return jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def restore_params(workdir: str | os.PathLike, step: int | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> tuple[Any, ml_collections.ConfigDict, int]:
  """Loads (params, config, step) from a workdir: the newest readable step unless `step` is given.

  Params land sharded by the rule table on `mesh`, or replicated on all devices when mesh is None,
  whatever mesh they were trained on.
  """
  config = read_config(workdir)
  cfg = config_lib.model_config(config)
  boxed = model_lib.abstract_params(cfg)
  if mesh is None:
    everywhere = NamedSharding(_replicated_mesh(), P())
    shardings = jax.tree.map(lambda _: everywhere, nn.meta.unbox(boxed))
  else:
    sharding.check_model_fits(cfg, mesh)
    shardings = sharding.logical_shardings(boxed, mesh)
  abstract = sharding.shardings_like(nn.meta.unbox(boxed), shardings)
  if not (_path(workdir) / CHECKPOINT_DIR).exists():
    raise CheckpointError(f"{os.fspath(workdir)!r} has no checkpoints/ directory; train first or convert a model.")
  manager = make_manager(workdir, read_only=True)
  try:
    restored = restore(manager, abstract, None, step=step)
  finally:
    manager.close()
  if restored is None:
    raise CheckpointError(f"no checkpoint in {os.fspath(workdir)}/{CHECKPOINT_DIR}; train first or convert a model.")
  return restored.params, config, restored.step


def save_params_only(workdir: str | os.PathLike, params: Any, config: ml_collections.ConfigDict,
                     step: int = 0) -> None:
  """Writes DIR/config.json and a params-only checkpoint (e.g. a converted HF model); waits until done."""
  config_lib.model_config(config)  # validate before writing anything
  write_config(workdir, config)
  manager = make_manager(workdir, async_save=False)
  try:
    if step in manager.all_steps():
      raise CheckpointError(f"{os.fspath(workdir)} already has a checkpoint at step {step}; use a new workdir.")
    save(manager, step, params, None, {"source": "params_only"})
    manager.wait_until_finished()
  finally:
    manager.close()


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step of a workdir (not checked for readability), or None."""
  if not (_path(workdir) / CHECKPOINT_DIR).exists():
    return None
  manager = make_manager(workdir, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()
