"""Loading, validating and saving experiment configs (ml_collections)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import ml_collections

from cla_jax.model import ConfigError, ModelConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way `--config=` does; relative paths also try the repo root."""
  path, _, arg = spec.partition(":")
  if not pathlib.Path(path).exists() and (REPO_ROOT / path).exists():
    path = str(REPO_ROOT / path)
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
