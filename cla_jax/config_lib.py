"""Loading, validating and saving experiment configs (ml_collections)."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import jax
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


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value cannot work (one place for the plain value checks).

  Checks that need the mesh, the tokenizer or the data live where those are built (trainer, sharding).
  """
  t, d = config.train, config.data
  rules = [  # (field, value, ok, what it must be)
      *(
          (f"train.{n}", t[n], _is_int(t[n]) and t[n] >= 1, "a positive integer")
          for n in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_batches")
      ),
      ("train.eval_every", t.eval_every, _is_int(t.eval_every) and t.eval_every >= 0, "an integer >= 0 (0: never)"),
      ("train.seed", t.seed, _is_int(t.seed) and t.seed >= 0, "an integer >= 0"),
      ("train.lr", t.lr, _is_number(t.lr) and t.lr > 0, "a number > 0"),
      ("train.warmup_frac", t.warmup_frac, _is_number(t.warmup_frac) and 0 <= t.warmup_frac < 1, "in [0, 1)"),
      ("train.min_lr_ratio", t.min_lr_ratio, _is_number(t.min_lr_ratio) and 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
      ("train.b1", t.b1, _is_number(t.b1) and 0 <= t.b1 < 1, "in [0, 1) (Adam's first-moment decay, e.g. 0.9)"),
      ("train.b2", t.b2, _is_number(t.b2) and 0 <= t.b2 < 1, "in [0, 1) (Adam's second-moment decay, e.g. 0.95)"),
      (
          "train.weight_decay",
          t.weight_decay,
          _is_number(t.weight_decay) and t.weight_decay >= 0,
          "a number >= 0 (negative decay grows the weights)",
      ),
      (
          "train.clip_norm",
          t.clip_norm,
          _is_number(t.clip_norm) and t.clip_norm > 0,
          "a number > 0 (a gradient-norm bound; use a large value to clip less)",
      ),
      (
          "train.peak_flops_per_device",
          t.peak_flops_per_device,
          _is_number(t.peak_flops_per_device) and t.peak_flops_per_device >= 0,
          "a number >= 0 (0: table/measured)",
      ),
      ("train.divergence_check", t.divergence_check, isinstance(t.divergence_check, bool), "True or False"),
      (
          "train.divergence_spike_factor",
          t.divergence_spike_factor,
          _is_number(t.divergence_spike_factor) and (t.divergence_spike_factor == 0 or t.divergence_spike_factor > 1),
          "a number > 1 (0: no spike check)",
      ),
      (
          "train.divergence_window",
          t.divergence_window,
          _is_int(t.divergence_window) and t.divergence_window >= 1,
          "a positive integer",
      ),
      (
          "train.divergence_max_grad_norm",
          t.divergence_max_grad_norm,
          _is_number(t.divergence_max_grad_norm) and t.divergence_max_grad_norm >= 0,
          "a number >= 0 (0: no bound)",
      ),
      ("data.seed", d.seed, _is_int(d.seed) and 0 <= d.seed < 2**32, "an integer in [0, 2**32)"),
      ("data.prefetch", d.prefetch, _is_int(d.prefetch) and d.prefetch >= 0, "an integer >= 0 (0: no prefetch)"),
      (
          "data.max_cache_tokens",
          d.max_cache_tokens,
          _is_int(d.max_cache_tokens) and d.max_cache_tokens >= 0,
          "an integer >= 0 (0: whole split)",
      ),
      (
          "checkpoint.every_steps",
          config.checkpoint.every_steps,
          _is_int(config.checkpoint.every_steps) and config.checkpoint.every_steps >= 1,
          "a positive integer",
      ),
      (
          "checkpoint.keep",
          config.checkpoint.keep,
          _is_int(config.checkpoint.keep) and config.checkpoint.keep >= 1,
          "a positive integer",
      ),
      (
          "eval.batch_size",
          config.eval.batch_size,
          _is_int(config.eval.batch_size) and config.eval.batch_size >= 1,
          "a positive integer",
      ),
      ("eval.max_tokens", config.eval.max_tokens, _is_int(config.eval.max_tokens), "an integer (<= 0: whole split)"),
  ]
  for field, value, ok, must in rules:
    if not ok:
      raise ConfigError(f"{field} must be {must}, got {value!r}.")
  if config.model.attention_impl == "cudnn" and jax.default_backend() != "gpu":
    raise ConfigError(
        f"model.attention_impl=cudnn needs an NVIDIA GPU with cuDNN, but this machine runs on "
        f"{jax.default_backend()}; use auto (cuDNN when it applies) or xla."
    )


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The validated, hashable model config of an experiment config."""
  return ModelConfig.from_config(config.model)


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (what a workdir keeps)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A locked ConfigDict from `to_json` output, upgraded to the current fields (see `upgrade`)."""
  config = ml_collections.ConfigDict(upgrade(json.loads(text)))
  config.lock()
  return config


def upgrade(saved: dict) -> dict:
  """A config dict written by an earlier version, with the fields added since then set to their defaults.

  The one place a config that predates a field gets it: the value comes from configs/default.py, the one home
  of defaults, so code reads `config.section.field` and never keeps a second default of its own. Fields the
  saved config has keep their values (unknown ones too: a newer version's config stays readable).
  """
  return _with_missing(saved, load(DEFAULT_CONFIG).to_dict())


def _with_missing(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for key, default in defaults.items():
    if key not in out:
      out[key] = default
    elif isinstance(default, dict) and isinstance(out[key], dict):
      out[key] = _with_missing(out[key], default)
  return out
