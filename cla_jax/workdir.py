"""A workdir's files in one place, and `open`: what eval, generation, the harness and export restore from one.

Layout (written by train.py and the HF converter, read by everything else):
  DIR/config.json              the resolved config (config_lib.to_json)
  DIR/checkpoints/<step>/      one orbax CheckpointManager step (cla_jax.checkpoint: params, opt_state, meta)
  DIR/checkpoints_corrupt/     unreadable checkpoints moved aside by a resuming run (never deleted)
  DIR/checkpoints_diverged/    checkpoints saved before a divergence was detected, moved aside (never deleted)
  DIR/verified_step.json       {"step": K}: the newest checkpoint whose next step passed the health check
  DIR/tokenizer.model|.json    a copy of the tokenizer the model was trained with
  DIR/metrics.jsonl, tensorboard/   training metrics (cla_jax.metrics)
  DIR/eval/<name>_step<N>.json the results of eval.py
  DIR/convert_report.json      what the HF converter kept and dropped
  DIR/lock                     held by the one trainer of this workdir (cla_jax.workdir_lock)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from etils import epath

from cla_jax import config_lib, paths, sharding
from cla_jax import model as model_lib
from cla_jax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
DIVERGED_DIR = "checkpoints_diverged"
VERIFIED_FILE = "verified_step.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
CONVERT_REPORT_FILE = "convert_report.json"
LOCK_FILE = "lock"

# Fields of a workdir's config that evaluation and generation may change: what to read and how to run,
# never the weights.
OVERRIDABLE = ("data.", "eval.", "mesh.", "train.seq_len", "model.dtype", "model.attention_impl", "model.remat")


def path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an absolute path (orbax refuses relative ones); bucket URLs (gs://...) as given."""
  given = os.fspath(workdir)
  return epath.Path(given if paths.is_remote(given) else os.path.abspath(os.path.expanduser(given)))


# ---------------------------------------------------------------------------------------------------------
# config.json and verified_step.json.
# ---------------------------------------------------------------------------------------------------------


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes DIR/config.json (process 0 only), creating the workdir."""
  if jax.process_index() != 0:
    return
  root = path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  tmp = root / (CONFIG_FILE + ".tmp")
  tmp.write_text(config_lib.to_json(config))
  tmp.replace(root / CONFIG_FILE)  # atomic replace: a reader never sees half a config


def has_config(workdir: str | os.PathLike) -> bool:
  """Whether DIR/config.json exists (a workdir that has been trained or converted into)."""
  return (path(workdir) / CONFIG_FILE).exists()


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a workdir was trained with, or CheckpointError."""
  from cla_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top

  root = path(workdir)
  if not root.exists():
    raise CheckpointError(f"workdir {os.fspath(workdir)!r} does not exist; pass the --workdir of a training run.")
  if not (root / CONFIG_FILE).exists():
    raise CheckpointError(
        f"{os.fspath(workdir)!r} has no {CONFIG_FILE}; it is not a cla_jax workdir "
        f"(train.py or the HF converter writes one)."
    )
  return config_lib.from_json((root / CONFIG_FILE).read_text())


def read_verified_step(workdir: str | os.PathLike) -> int | None:
  """The step DIR/verified_step.json names (the newest checkpoint that passed the health check), or None."""
  try:
    return int(json.loads((path(workdir) / VERIFIED_FILE).read_text())["step"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def write_verified_step(workdir: str | os.PathLike, step: int) -> None:
  """Records `step` as the newest verified checkpoint (process 0, atomic replace)."""
  if jax.process_index() != 0:
    return
  tmp = path(workdir) / (VERIFIED_FILE + ".tmp")
  tmp.write_text(json.dumps({"step": int(step)}) + "\n")
  tmp.replace(path(workdir) / VERIFIED_FILE)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any] | None) -> ml_collections.ConfigDict:
  """A locked copy of `config` with `{"data.source": "text", ...}` applied; only fields in OVERRIDABLE may change."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in (overrides or {}).items():
    if not any(key == f or (f.endswith(".") and key.startswith(f)) for f in OVERRIDABLE):
      raise UserError(
          f"--config.{key} cannot be changed at evaluation (it is fixed by the checkpoint); "
          f"evaluation may override {', '.join(f + '*' if f.endswith('.') else f for f in OVERRIDABLE)}."
      )
    section, _, name = key.rpartition(".")
    node = config
    for part in section.split("."):
      node = node[part]
    if name not in node:
      raise UserError(f"--config.{key}: the workdir's config has no such field.")
    node[name] = value
  config.lock()
  return config


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: the orbax manager on DIR/checkpoints, params alone.
# ---------------------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: str | os.PathLike, **options: Any) -> Any:
  """`checkpoint.make_manager` on DIR/checkpoints (options: keep, async_save, read_only, policy)."""
  from cla_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: slow to import, only here)

  return checkpoint.make_manager(path(workdir) / CHECKPOINT_DIR, **options)


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step of a workdir (not checked for readability), or None."""
  if not (path(workdir) / CHECKPOINT_DIR).exists():
    return None
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_params(
    workdir: str | os.PathLike, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> tuple[Any, ml_collections.ConfigDict, int]:
  """Loads (params, config, step) from a workdir: the newest readable step unless `step` is given.

  Params land sharded by the rule table on `mesh`, or replicated on all devices when mesh is None,
  whatever mesh they were trained on.
  """
  from cla_jax import checkpoint  # pylint: disable=g-import-not-at-top

  config = read_config(workdir)
  cfg = config_lib.model_config(config)
  boxed = model_lib.abstract_params(cfg)
  if mesh is None:
    everywhere = sharding.replicated(sharding.replicated_mesh())
    shardings = jax.tree.map(lambda _: everywhere, nn.meta.unbox(boxed))
  else:
    sharding.check_model_fits(cfg, mesh)
    shardings = sharding.logical_shardings(boxed, mesh)
  abstract = sharding.shardings_like(nn.meta.unbox(boxed), shardings)
  if not (path(workdir) / CHECKPOINT_DIR).exists():
    raise checkpoint.CheckpointError(
        f"{os.fspath(workdir)!r} has no checkpoints/ directory; train first or convert a model."
    )
  manager = checkpoint_manager(workdir, read_only=True)
  try:
    restored = checkpoint.restore(manager, abstract, None, step=step)
  finally:
    manager.close()
  if restored is None:
    raise checkpoint.CheckpointError(
        f"no checkpoint in {os.fspath(workdir)}/{CHECKPOINT_DIR}; train first or convert a model."
    )
  return restored.params, config, restored.step


def save_params_only(workdir: str | os.PathLike, params: Any, config: ml_collections.ConfigDict, step: int = 0) -> None:
  """Writes DIR/config.json and a params-only checkpoint (e.g. a converted HF model); waits until done."""
  from cla_jax import checkpoint  # pylint: disable=g-import-not-at-top

  config_lib.model_config(config)  # validate before writing anything
  write_config(workdir, config)
  manager = checkpoint_manager(workdir, async_save=False)
  try:
    if step in manager.all_steps():
      raise checkpoint.CheckpointError(
          f"{os.fspath(workdir)} already has a checkpoint at step {step}; use a new workdir."
      )
    checkpoint.save(manager, step, params, None, {"source": "params_only"})
    checkpoint.wait(manager)
  finally:
    manager.close()


# ---------------------------------------------------------------------------------------------------------
# The tokenizer.
# ---------------------------------------------------------------------------------------------------------


def tokenizer_file(
    directory: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    names: tuple[str, ...] = TOKENIZER_FILES,
) -> pathlib.Path | None:
  """The tokenizer file a model was trained with: the directory's copy (first of `names`), else `data.tokenizer`
  of `config` when that names a .model/.json file; None when neither exists."""
  for name in names:
    if (pathlib.Path(directory) / name).is_file():
      return pathlib.Path(directory) / name
  if config is None:
    return None
  configured = pathlib.Path(os.path.expanduser(str(config.data.tokenizer)))
  return configured if configured.suffix in (".json", ".model") and configured.is_file() else None


def load_tokenizer(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> Any:
  """The tokenizer the model was trained with: a copy kept in the workdir, else the saved config's."""
  from cla_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top  (sentencepiece)

  copy = tokenizer_file(workdir)
  if copy is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.tokenizer = str(copy)
  tokenizer = tokenizer_lib.get_tokenizer(config)
  tokenizer_lib.check_vocab_covers(
      tokenizer, config.model.vocab_size, "evaluate with the tokenizer the model was trained with."
  )
  return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Opening a workdir.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workdir:
  """An opened workdir: its saved config, the config with overrides, the mesh and the params restored on it."""

  path: str
  saved_config: ml_collections.ConfigDict  # config.json as written
  config: ml_collections.ConfigDict  # with the overrides applied, locked
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh | None  # None: params replicated on every device
  params: Any
  step: int

  @functools.cached_property
  def tokenizer(self) -> Any:
    """The tokenizer the model was trained with, loaded on first use (sentencepiece/tokenizers are slow)."""
    return load_tokenizer(self.path, self.saved_config)


def open(  # pylint: disable=redefined-builtin  (read as workdir.open)
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    overrides: dict[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None | str = "fitting",
    num_devices: int | None = None,
) -> Workdir:
  """Reads config.json, applies `overrides` (OVERRIDABLE fields only), builds the mesh and restores the params.

  mesh: a mesh to restore onto; "fitting" (the default): the config's mesh when it fits the devices and the
  model, else pure data parallelism over the first `num_devices` (or all) devices, with a note; None:
  params replicated on every device. `step`: the newest readable checkpoint unless given.
  """
  workdir = os.path.expanduser(os.fspath(workdir))
  saved = read_config(workdir)
  config = apply_overrides(saved, overrides)
  model_config = config_lib.model_config(config)  # a clear error for a bad model section before any restore
  if isinstance(mesh, str):
    mesh_config = config.mesh if num_devices is None else sharding.data_parallel_config(num_devices)
    mesh = sharding.fitting_mesh(mesh_config, model_config, note=True)
  params, _, restored_step = restore_params(workdir, step=step, mesh=mesh)
  return Workdir(workdir, saved, config, model_config, mesh, params, restored_step)
