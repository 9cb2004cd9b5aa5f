"""Helpers for the training tests: a tiny text corpus, configs on it, and train.py subprocesses."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour", "a child"]
_VERBS = ["sees", "likes", "follows", "finds", "watches", "helps", "calls", "meets"]
_OBJECTS = [
    "the ball",
    "a red house",
    "the river",
    "some bread",
    "the garden",
    "a green tree",
    "the window",
    "the music",
]


def write_corpus(directory: pathlib.Path, num_docs: int = 10, sentences: int = 300) -> str:
  """Writes `num_docs` .txt files of simple random sentences; returns their glob."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(num_docs):
    text = " ".join(
        f"{_SUBJECTS[rng.integers(8)]} {_VERBS[rng.integers(8)]} {_OBJECTS[rng.integers(8)]}." for _ in range(sentences)
    )
    (directory / f"doc{i}.txt").write_text(text)
  return str(directory / "*.txt")


def tiny_config(**sections: dict):
  """The default config shrunk to run in seconds (also conftest's `tiny_config` fixture), the one test config.

  `sections` then update it: tiny_config(model=dict(pattern="none"), train=dict(lr=1e-3)).
  """
  from cla_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.load("configs/default.py")
  config.model.update(
      num_layers=4, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, vocab_size=256, dtype="float32"
  )
  config.train.update(steps=20, batch_size=8, seq_len=32, log_every=5, eval_every=0)
  config.checkpoint.update(every_steps=10)
  for section, fields in sections.items():
    config[section].update(**fields)
  return config


def use_corpus(config, corpus: tuple[str, str], num_devices: int = 1, mesh=(1, 1, 1)):
  """Points `config` at the test corpus (tokenizer cached in the shared dir) and a mesh."""
  text_glob, cache = corpus
  config.data.update(
      source="text", text_glob=text_glob, data_dir=cache, cache_dir=cache, eval_fraction=0.2, tokenizer_train_chars=0
  )
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2], num_devices=num_devices)
  # A fixed MFU denominator: measuring the CPU peak would add a second to every run.
  config.train.peak_flops_per_device = 1e10
  return config


def config_on(corpus: tuple[str, str], **train):
  """tiny_config on `corpus`, logging every step, with `train` fields set."""
  config = use_corpus(tiny_config(), corpus)
  config.train.update(log_every=1, **train)
  return config


def overrides(config) -> list[str]:
  """`--config.a.b=v` flags that reproduce `config` from configs/default.py (for the fields tests change)."""
  flags = []
  for section in ("model", "data", "train", "checkpoint", "mesh", "eval"):
    for key, value in config[section].items():
      flags.append(f"--config.{section}.{key}={value}")
  return flags


def train_cmd(config, workdir) -> list[str]:
  """The train.py command line for `config` in `workdir`."""
  return [
      sys.executable,
      str(REPO_ROOT / "train.py"),
      "--config=configs/default.py",
      f"--workdir={workdir}",
      *overrides(config),
  ]


_CACHE_DIR: list[str] = []


def enable_compilation_cache(directory) -> None:
  """Shares compiled programs between the in-process runs and the train.py subprocesses of a test session.

  Each run of the same config compiles the same train step; on 2 CPU cores that is most of a test's time.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if not _CACHE_DIR:
    _CACHE_DIR.append(str(directory))
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def env() -> dict[str, str]:
  """The subprocess environment: CPU with 8 fake devices, like the test process, and the shared cache."""
  out = dict(os.environ)
  if _CACHE_DIR:
    out["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR[0]
    out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  out["JAX_PLATFORMS"] = "cpu"
  if "--xla_force_host_platform_device_count" not in out.get("XLA_FLAGS", ""):
    out["XLA_FLAGS"] = out.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  return out


def start(config, workdir) -> subprocess.Popen:
  """Starts train.py in the background (stdout/stderr to files in workdir's parent)."""
  log = open(f"{workdir}.log", "ab")
  return subprocess.Popen(train_cmd(config, workdir), cwd=REPO_ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)


def run(config, workdir, timeout: float = 240) -> subprocess.CompletedProcess:
  """Runs train.py to completion."""
  return subprocess.run(
      train_cmd(config, workdir), cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=timeout
  )


def wait_for(predicate, timeout: float = 240, interval: float = 0.02) -> None:
  """Polls `predicate` until true, or fails the test."""
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline:
      raise AssertionError("timed out waiting for the training process")
    time.sleep(interval)


def kill_after_checkpoint(config, workdir, step: int) -> int:
  """Starts a run, SIGKILLs it once checkpoint `step` exists (no handler runs), returns the newest step left."""
  import signal  # pylint: disable=g-import-not-at-top

  from cla_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  proc = start(config, workdir)
  try:
    wait_for(lambda: (pathlib.Path(workdir) / "checkpoints" / str(step)).exists() or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, open(f"{workdir}.log").read()
  return workdir_lib.latest_step(workdir)


def losses(workdir) -> dict[int, float]:
  """Per-step training loss from DIR/metrics.jsonl (the later line wins for steps logged twice)."""
  from cla_jax import metrics  # pylint: disable=g-import-not-at-top

  return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}
