"""Loading, validating and saving experiment configs (ml_collections)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import ml_collections

from cla_jax.model import ConfigError, ModelConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The shipped configs: installed as the package `cla_jax.configs` (setup.py maps it to the checkout's
# top-level configs/), so a regular install has them next to this file and a checkout at its root.
_INSTALLED_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
CONFIGS_DIR = _INSTALLED_CONFIGS if _INSTALLED_CONFIGS.is_dir() else REPO_ROOT / "configs"
DEFAULT_CONFIG = str(CONFIGS_DIR / "default.py")


def resolve(spec: str) -> str:
  """`path[:arg]` with a relative path that is not under the working directory resolved to a shipped config.

  `configs/paper_1b.py:H128-MQA` then names the same file from any directory, installed or in a checkout.
  """
  path, sep, arg = spec.partition(":")
  if not path or pathlib.Path(path).exists() or pathlib.Path(path).is_absolute():
    return spec
  parts = pathlib.PurePath(path).parts
  for candidate in (CONFIGS_DIR.joinpath(*parts[1:]) if parts[0] == "configs" else None, REPO_ROOT / path):
    if candidate is not None and candidate.exists():
      return str(candidate) + sep + arg
  return spec


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way `--config=` does; `configs/...` also finds the shipped configs."""
  path, _, arg = resolve(spec).partition(":")
  if not pathlib.Path(path).exists():
    raise ConfigError(f"config file {path!r} not found; e.g. configs/default.py or configs/paper_1b.py:H128-MQA.")
  spec_ = importlib.util.spec_from_file_location(f"cla_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The validated, hashable model config of an experiment config."""
  return ModelConfig.from_config(config.model)


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (what a workdir keeps)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A locked ConfigDict from `to_json` output."""
  config = ml_collections.ConfigDict(json.loads(text))
  config.lock()
  return config
